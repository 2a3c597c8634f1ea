"""The typed run configuration, read once from Flower's ``run_config``.

Defaults live here and in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case keys);
``tests/test_config.py`` keeps the two equal. Every value is validated on construction and an
invalid one is refused with a message naming the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from shared.errors import ConfigError
from shared.secagg import SecAggSettings

TASKS: tuple[str, ...] = ("heart-disease", "chest-xray")
SETUPS: tuple[str, ...] = ("transfer", "benchmark", "scratch")
TRAINABLE: tuple[str, ...] = ("head", "last", "full")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RunConfig:
    """Hyperparameters of one federated run (the consortium's side of the agreement).

    Attributes
    ----------
    task : str
        ``heart-disease`` or ``chest-xray``.
    setup : str
        ``transfer`` (pretrained frozen backbone, train the head), ``benchmark`` (heart-disease:
        all 4 FLamby sites from one random initialization) or ``scratch`` (no pretrained weights,
        every parameter trained).
    backbone : str
        Name of the backbone in the registry.
    backbone_sha256 : str
        If set, the backbone's weights must have exactly this SHA-256.
    trainable : str
        ``head`` (frozen backbone), ``last`` (the last ``last-blocks`` backbone blocks, their
        BatchNorm frozen, plus the head) or ``full``.
    last_blocks : int
        How many backbone blocks ``last`` trains.
    strategy : str
        One of ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``.
    num_rounds, local_epochs, batch_size : int
        Federation length and local training schedule.
    learning_rate : float
        Local SGD learning rate.
    proximal_mu : float
        FedProx proximal term weight.
    server_learning_rate : float
        FedAdam/FedYogi server step size.
    fraction_fit, fraction_evaluate : float
        Fraction of sites sampled per round.
    min_sites : int
        Fewest sites a round may run with.
    seed : int
        Seed of initialization, data splits and sampling.
    num_sites : int
        Number of simulated hospitals (chest-xray).
    dirichlet_alpha : float
        Label-skew concentration of the chest-xray split (smaller: more skewed).
    image_size : int
        Side of the images fed to the backbone (chest-xray).
    val_fraction : float
        Validation fraction for image folders without a validation split.
    data_path : str
        Data location in simulation; in a deployment each node's ``data-path`` wins.
    registry_dir : str
        Directory of operator-registered backbones (e.g. from ``carefl pretrain``).
    backbone_weights : str
        A weights file named by the operator, tried first for built-in backbones.
    run_dir : str
        Where the server writes the run folder; empty: nothing written by the ServerApp.
    checkpoint_dir : str
        Where the server checkpoints the run after every round (global model, strategy state,
        metrics); empty: no checkpoints.
    resume : bool
        Continue the run checkpointed in ``checkpoint-dir`` from its last completed round.
    dp : bool
        Train with DP-SGD (a site's policy may require it whatever the server says).
    target_epsilon : float
        Epsilon each site's data may spend over the whole run; the noise multiplier is
        calibrated for it up front.
    target_delta : float
        Delta of the guarantee; 0 means each site uses ``min(1e-5, 1 / (10 n))`` for its ``n``
        training records.
    max_grad_norm : float
        Per-sample gradient clipping bound.
    accountant : str
        ``rdp`` (default) or ``prv``.
    secure_aggregation : bool
        Aggregate with SecAgg+ (masked uploads; the server learns only the sum).
    delta_bound : float
        Each site clips its update (delta) to ``[-delta_bound, delta_bound]`` per value before
        secure aggregation; SecAgg+'s clipping range is set to it, so the quantizer never
        saturates.
    secagg_max_weight : float
        SecAgg+'s ``max_weight``: sites scale their update by ``n / max_weight``; a site with
        more training records refuses the round.
    secagg_threshold : int
        Sites whose key shares reconstruct a dropped site's masks (SecAgg+'s reconstruction
        threshold); 0 means two thirds of the sites sampled in a round (at least 2).
    secagg_quantization_range : int
        Integer levels each value is quantized to over ``[-delta_bound, delta_bound]``.
    secagg_modulus : int
        Power of two the masked sums are taken modulo; at least ``num_sites`` times the
        quantization range, so the sum of quantized values never wraps around.
    stage_timeout : float
        Seconds the server waits at each SecAgg+ stage before treating a site as dropped.
    """

    task: str = "heart-disease"
    setup: str = "transfer"
    backbone: str = "heart-mlp-cleveland"
    backbone_sha256: str = ""
    trainable: str = "head"
    last_blocks: int = 1
    strategy: str = "fedavg"
    num_rounds: int = 5
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.05
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    seed: int = 42
    num_sites: int = 4
    dirichlet_alpha: float = 1.0
    image_size: int = 64
    val_fraction: float = 0.2
    data_path: str = ""
    registry_dir: str = ""
    backbone_weights: str = ""
    run_dir: str = field(default="")
    checkpoint_dir: str = ""
    resume: bool = False
    dp: bool = True
    target_epsilon: float = 3.0
    target_delta: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    secure_aggregation: bool = True
    delta_bound: float = 1.0
    secagg_max_weight: float = 10000.0
    secagg_threshold: int = 0
    secagg_quantization_range: int = 1 << 22
    secagg_modulus: int = 1 << 32
    stage_timeout: float = 120.0

    def __post_init__(self) -> None:
        _one_of("task", self.task, TASKS)
        _one_of("setup", self.setup, SETUPS)
        _one_of("trainable", self.trainable, TRAINABLE)
        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        for name in ("num_rounds", "local_epochs", "batch_size", "min_sites", "num_sites", "last_blocks"):
            _at_least(name, getattr(self, name), 1)
        _at_least("image_size", self.image_size, 8)
        for name in (
            "learning_rate", "server_learning_rate", "dirichlet_alpha", "proximal_mu",
            "target_epsilon", "target_delta", "max_grad_norm", "delta_bound", "secagg_max_weight",
            "stage_timeout",
        ):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"`{_kebab(name)}` must be a finite number, got {getattr(self, name)!r}.")
        for name in (
            "learning_rate", "server_learning_rate", "dirichlet_alpha", "target_epsilon", "max_grad_norm",
            "delta_bound", "secagg_max_weight", "stage_timeout",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"`{_kebab(name)}` must be > 0, got {getattr(self, name)!r}.")
        if self.proximal_mu < 0:
            raise ConfigError(f"`proximal-mu` must be >= 0, got {self.proximal_mu!r}.")
        for name in ("fraction_fit", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"`{_kebab(name)}` must be in (0, 1], got {getattr(self, name)!r}.")
        if not 0 <= self.target_delta < 1:
            raise ConfigError(f"`target-delta` must be in [0, 1) (0: automatic), got {self.target_delta!r}.")
        if self.dp and self.strategy == "fedprox":
            raise ConfigError("`strategy` fedprox is not supported with DP-SGD (`dp` = true); use fedavg, fedadam or fedyogi.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"`val-fraction` must be in (0, 1), got {self.val_fraction!r}.")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("`resume` = true needs the `checkpoint-dir` of the run to continue.")
        if self.backbone_sha256 and not _SHA256.match(self.backbone_sha256):
            raise ConfigError(
                "`backbone-sha256` must be 64 lowercase hex digits (a full SHA-256), "
                f"got {self.backbone_sha256!r}."
            )
        if self.secure_aggregation:
            self.secagg.check(self.num_sites)

    @property
    def secagg(self) -> SecAggSettings:
        """The SecAgg+ parameters of this run."""
        return SecAggSettings(
            clipping_range=self.delta_bound,
            max_weight=self.secagg_max_weight,
            quantization_range=self.secagg_quantization_range,
            modulus=self.secagg_modulus,
            threshold=self.secagg_threshold,
            timeout=self.stage_timeout,
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build a config from Flower's kebab-case ``run_config``; unknown keys are refused.

        Parameters
        ----------
        run_config : Mapping[str, Any]
            ``context.run_config`` (or any mapping with the same keys).

        Returns
        -------
        RunConfig
            The validated configuration; keys absent from ``run_config`` keep their defaults.
        """
        known = {_kebab(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            spec = known[key]
            values[spec.name] = _coerce(key, value, type(getattr(cls(), spec.name)))
        return cls(**values)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the config as Flower's kebab-case ``run_config``."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` (snake_case names) applied."""
        return replace(self, **changes)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{_kebab(name)}` must be one of {', '.join(allowed)}; got {value!r}.")


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"`{_kebab(name)}` must be >= {minimum}, got {value!r}.")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert ``value`` to ``kind`` (TOML gives ints for floats like ``1``)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if not isinstance(value, kind):
        raise ConfigError(f"`{key}` must be of type {kind.__name__}, got {value!r}.")
    return value
