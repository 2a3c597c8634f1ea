"""The typed run configuration, split by who owns each key.

Flower's ``run_config`` is one flat table (``[tool.flwr.app.config]`` in pyproject.toml,
kebab-case keys; ``tests/shared/test_config.py`` keeps its defaults equal to these). Each key
belongs to exactly one part, by the model that declares it:

- :class:`StudyConfig`: what the study computes. The server sends it to every site with each
  round, and each site validates it again before it touches its data. A resumed run must have
  the same study.
- :class:`ServerSettings`: facts about the server's own machine (paths, checkpointing, how long
  it waits). Never sent; may differ when a run resumes.
- :class:`SimulationSettings`: what only a simulation on one machine needs (where the shared
  data set lies; a deployed node names its own data in its node config).

:class:`RunConfig` composes the three and reads and writes the flat table. Every value is
validated on construction, and an invalid one is refused with a message naming its key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.errors import ConfigError
from shared.schema import KebabDocument, Sha256OrEmpty, kebab, validate
from shared.secagg import SecAggSettings

PATH = {"path": True}
"""Marks a setting that names a file or folder on the machine that reads it."""

Setup = Literal["transfer", "benchmark", "scratch"]
Trainable = Literal["head", "last", "full"]
Accountant = Literal["rdp", "prv"]
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedyogi"]
ClassWeighting = Literal["none", "balanced"]
Missing = Literal["drop", "impute"]
Augment = Literal["none", "crop-rotate-flip"]
GradSampleMode = Literal["auto", "hooks", "ghost", "functorch", "linear"]
Model = Literal["mlp", "logreg"]


class StudyConfig(KebabDocument):
    """What the study computes: sent to every site, and checked there.

    Attributes
    ----------
    task : str
        A task of :data:`shared.tasks.registry.TASKS` (``heart-disease``, ``chest-xray``).
    setup : str
        ``transfer`` (pretrained frozen backbone, train the head), ``benchmark`` (heart-disease:
        all 4 FLamby sites from one random initialization) or ``scratch`` (no pretrained weights,
        every parameter trained).
    backbone : str
        Name of the backbone in the registry.
    backbone_sha256 : str
        If set, the backbone's weights must have exactly this SHA-256. The server pins it to the
        hash of the backbone it resolved before sending the study to the sites.
    model : str
        What heart-disease trains from a random initialization (``benchmark``, ``scratch``):
        ``mlp`` (13-32-32 ReLU layers and a linear head, the architecture of the Cleveland
        backbone) or ``logreg`` (logistic regression: the linear head alone on the 13 inputs,
        FLamby's baseline model). ``logreg`` has no backbone to transfer, so it needs ``setup``
        benchmark or scratch, and the heart-disease task.
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
        Number of hospitals the data is split into (chest-xray); also bounds SecAgg+'s sum.
    dirichlet_alpha : float
        Label-skew concentration of the chest-xray split (smaller: more skewed).
    image_size : int
        Side of the images fed to the backbone (chest-xray).
    feature_blocks : str
        Which blocks of a frozen ImageNet backbone give the features the head trains on:
        comma-separated block indices (negative ones count from the end; MobileNetV2 has 19
        blocks, ``-2`` its 320-channel block before the last 1x1 convolution), whose global
        average pooled outputs are concatenated. Empty: the backbone's own features (its last
        block, pooled). Image tasks; applies with ``setup`` transfer and ``trainable`` head
        (a frozen backbone) and is ignored otherwise (the from-scratch and ``last`` models).
    standardize_features : bool
        Standardize each backbone feature by the mean and standard deviation of the site's own
        training rows (the statistics never leave the site; validation rows are scaled by the
        training rows' figures). Image tasks; like ``feature_blocks``, ignored unless ``setup``
        is transfer and ``trainable`` head.
    val_fraction : float
        Validation fraction for image folders without a validation split.
    operating_point : str
        How each site picks its decision threshold on its own validation data, reported next to
        the 0.5 figures: ``youden`` (maximise sensitivity + specificity - 1), ``sensitivity:S``
        (the highest threshold reaching sensitivity S, 0 < S < 1) or a fixed threshold such as
        ``0.5``. Only the threshold and its sensitivity/specificity leave the site.
    class_weighting : str
        ``none``, or ``balanced``: each training record's loss is weighted by
        ``n / (k * n_c)`` from the site's own training counts (``n`` records, ``k`` classes,
        ``n_c`` of the record's class), so a rare class counts as much as a common one. Still a
        per-sample loss: DP-SGD clips each record's weighted gradient as before and the
        accountant's epsilon is unchanged. The weights come from the site's class counts, which
        are treated as released (like its record count, they are reported unprotected).
    missing : str
        What a site does with a tabular record missing a value: ``drop`` it (FLamby's rule) or
        ``impute`` it (median of a numeric column, mode of a categorical one, learned from the
        site's own training rows only). Counts are reported either way.
    augment : str
        ``none``, or ``crop-rotate-flip``: each training image is seen as ``augment-views``
        seeded random views (resized crop of 85-100 % of the area, rotation within 10 degrees,
        horizontal flip; validation images never) whose features the frozen backbone computes
        once (cached). Image tasks, head training (``trainable`` = head) only.
    augment_views : int
        ``K``, the augmented views per training image (augmentation multiplicity, De et al.
        2022). Each record's loss is the mean over its ``K`` views, so a record still gives
        one gradient, clipped once: the sampling, the noise and the accountant's epsilon do
        not depend on ``K``. More than 1 needs ``augment``.
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
    grad_sample_mode : str
        How DP-SGD gets what it clips: Opacus' ``hooks`` (per-sample gradients from layer
        hooks), ``ghost`` (ghost clipping: per-sample gradient norms only, then a second
        backward pass of the clipped loss) or ``functorch`` (per-sample gradients with
        ``torch.func``); ``linear``, CareFL's closed form for a model whose only trainable layer
        is one linear layer (``trainable`` head, or ``model`` logreg: :mod:`shared.dp_linear`,
        the same mechanism without Opacus' per-step overhead); or ``auto`` (default):
        ``linear`` where it applies, ``ghost`` otherwise. The same per-sample gradients are
        clipped either way; the privacy accounting is identical. ``ghost`` is the fast one when
        backbone layers train (``scripts/bench_dp_modes.py``).
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
    """

    task: str = "heart-disease"
    setup: Setup = "transfer"
    backbone: str = "heart-mlp-cleveland"
    backbone_sha256: Sha256OrEmpty = ""
    model: Model = "mlp"
    trainable: Trainable = "head"
    last_blocks: int = Field(default=1, ge=1)
    strategy: Strategy = "fedavg"
    num_rounds: int = Field(default=5, ge=1)
    local_epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=0.05, gt=0, allow_inf_nan=False)
    proximal_mu: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    server_learning_rate: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    fraction_fit: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, gt=0, le=1)
    min_sites: int = Field(default=2, ge=1)
    seed: int = 42
    num_sites: int = Field(default=4, ge=1)
    dirichlet_alpha: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    image_size: int = Field(default=64, ge=8)
    feature_blocks: str = ""
    standardize_features: bool = False
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    operating_point: str = "0.5"
    class_weighting: ClassWeighting = "none"
    missing: Missing = "drop"
    augment: Augment = "none"
    augment_views: int = Field(default=1, ge=1, le=64)
    dp: bool = True
    target_epsilon: float = Field(default=3.0, gt=0, allow_inf_nan=False)
    target_delta: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    accountant: Accountant = "rdp"
    grad_sample_mode: GradSampleMode = "auto"
    secure_aggregation: bool = True
    delta_bound: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    secagg_max_weight: float = Field(default=10000.0, gt=0, allow_inf_nan=False)
    secagg_threshold: int = 0
    secagg_quantization_range: int = 1 << 22
    secagg_modulus: int = 1 << 32

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from shared.tasks.registry import TASKS

        if value not in TASKS:
            raise ValueError(f"must be one of {', '.join(TASKS)}")
        return value

    @field_validator("operating_point")
    @classmethod
    def _operating_point_rule(cls, value: str) -> str:
        from shared.scores import parse_operating_point

        parse_operating_point(value)
        return value

    @field_validator("feature_blocks")
    @classmethod
    def _block_list(cls, value: str) -> str:
        parse_blocks(value)
        return value.replace(" ", "")

    def feature_block_indices(self) -> tuple[int, ...]:
        """The block indices of :attr:`feature_blocks` (empty: the backbone's own features)."""
        return parse_blocks(self.feature_blocks)

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if self.dp and self.strategy == "fedprox":
            raise ConfigError(
                "`strategy` fedprox is not supported with DP-SGD (`dp` = true); use fedavg, fedadam or fedyogi."
            )
        self._augmentable()
        self._model_fits()
        if self.grad_sample_mode == "linear" and not self.trains_linear_head():
            raise ConfigError(
                "`grad-sample-mode` linear trains a single linear layer: it needs `setup` transfer with "
                "`trainable` head, or `model` logreg; use auto, hooks, ghost or functorch."
            )
        self._feature_options()
        if self.secure_aggregation:
            self.secagg_settings(timeout=math.inf).check(self.num_sites)
        return self

    def trains_linear_head(self) -> bool:
        """Whether the only trainable layer is the linear head (``grad-sample-mode`` linear applies)."""
        if self.setup == "transfer":
            return self.trainable == "head"
        return self.model == "logreg"

    def _model_fits(self) -> None:
        if self.model == "mlp":
            return
        if self.task != "heart-disease":
            raise ConfigError(f"`model` {self.model} is a heart-disease model; {self.task} takes `model` mlp (its default).")
        if self.setup == "transfer":
            raise ConfigError(
                f"`model` {self.model} has no backbone to transfer: use `setup` benchmark or scratch, or `model` mlp."
            )

    def _augmentable(self) -> None:
        if self.augment_views > 1 and self.augment == "none":
            raise ConfigError(
                f"`augment-views` {self.augment_views} needs `augment` (crop-rotate-flip): views of an "
                "unaugmented image are all the same."
            )
        if self.augment == "none":
            return
        from shared.tasks.registry import TASKS

        if TASKS[self.task].info.input_spec.get("kind") != "grayscale-image":
            raise ConfigError(f"`augment` {self.augment} applies to image tasks, not {self.task}.")
        if self.setup != "transfer" or self.trainable != "head":
            raise ConfigError(
                f"`augment` {self.augment} augments the cached features of a frozen backbone: it needs "
                "`setup` transfer and `trainable` head."
            )

    def _feature_options(self) -> None:
        chosen = [
            f"`{key}` {value}"
            for key, value, on in (
                ("feature-blocks", self.feature_blocks, bool(self.feature_blocks)),
                ("standardize-features", "true", self.standardize_features),
            )
            if on
        ]
        if not chosen:
            return
        from shared.tasks.registry import TASKS

        if TASKS[self.task].info.input_spec.get("kind") != "grayscale-image":
            raise ConfigError(f"{' and '.join(chosen)} apply to image tasks, not {self.task}.")

    def shapes_features(self) -> bool:
        """Whether ``feature-blocks`` and ``standardize-features`` apply: a frozen backbone's cached features."""
        return self.setup == "transfer" and self.trainable == "head"

    def secagg_settings(self, *, timeout: float) -> SecAggSettings:
        """The SecAgg+ parameters of this study, with the server's stage ``timeout``."""
        return SecAggSettings(
            clipping_range=self.delta_bound,
            max_weight=self.secagg_max_weight,
            quantization_range=self.secagg_quantization_range,
            modulus=self.secagg_modulus,
            threshold=self.secagg_threshold,
            timeout=timeout,
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudyConfig:
        """Validate the study a site received (kebab-case keys); any other key is refused."""
        return validate(cls, run_config, known=", ".join(keys_of(cls)))

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the study as kebab-case run-config values."""
        return self.model_dump(by_alias=True)

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """Return a validated copy with ``changes`` (snake-case names) applied."""
        return validate(StudyConfig, {**self.model_dump(), **changes})


class ServerSettings(KebabDocument):
    """Facts about the server's machine: never sent to sites, may change when a run resumes.

    Attributes
    ----------
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
    stage_timeout : float
        Seconds the server waits at each SecAgg+ stage before treating a site as dropped, and
        for ``min-sites`` sites to be connected before a round.
    evaluate_in_fit : bool
        Sites evaluate the global model they receive in the same message that trains on it (one
        message fewer per round); only the final model gets an evaluate message of its own. The
        metrics are the same either way, each attributed to the model it measures (round ``r``:
        the model after round ``r``; with this on, round 0, the initial model, too). ``false``: a
        separate evaluate message after every round.
    """

    registry_dir: str = Field(default="", json_schema_extra=PATH)
    backbone_weights: str = Field(default="", json_schema_extra=PATH)
    run_dir: str = Field(default="", json_schema_extra=PATH)
    checkpoint_dir: str = Field(default="", json_schema_extra=PATH)
    resume: bool = False
    stage_timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    evaluate_in_fit: bool = True

    @model_validator(mode="after")
    def _resumable(self) -> ServerSettings:
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("`resume` = true needs the `checkpoint-dir` of the run to continue.")
        return self


class SimulationSettings(KebabDocument):
    """What only a simulation on one machine needs.

    Attributes
    ----------
    data_path : str
        The data set the simulated sites split among themselves; a deployed node names its own
        data (node config ``data-path``), which wins.
    """

    data_path: str = Field(default="", json_schema_extra=PATH)


def parse_blocks(value: str) -> tuple[int, ...]:
    """Parse a ``feature-blocks`` value: comma-separated distinct integers, or empty.

    Raises
    ------
    ValueError
        Naming the item that is not an integer, or the index named twice.
    """
    items = [item.strip() for item in value.split(",")] if value.strip() else []
    blocks = []
    for item in items:
        try:
            blocks.append(int(item))
        except ValueError:
            raise ValueError(f"must be comma-separated block indices such as '-2' or '15,16,17'; got {item!r}") from None
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"names a block twice: {value!r}")
    return tuple(blocks)


PARTS: tuple[type[KebabDocument], ...] = (StudyConfig, ServerSettings, SimulationSettings)
"""The parts of a run configuration, in the order their keys are written."""


def keys_of(part: type[KebabDocument]) -> tuple[str, ...]:
    """The run-config keys (kebab case) a part declares."""
    return tuple(kebab(name) for name in part.model_fields)


@cache
def owners() -> dict[str, type[KebabDocument]]:
    """Map each run-config key to the part that owns it."""
    return {key: part for part in PARTS for key in keys_of(part)}


def absolute_paths(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (flat kebab-case run config) with every path made absolute.

    The ServerApp of a deployment runs in another working directory than the command that
    submitted it, so relative paths would point elsewhere.
    """
    paths = {
        kebab(name)
        for part in PARTS
        for name, info in part.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("path")
    }
    return {k: str(Path(str(v)).resolve()) if k in paths and v else v for k, v in values.items()}


@dataclass(frozen=True)
class RunConfig:
    """One run's configuration: the study, the server's settings and the simulation's.

    Attributes
    ----------
    study : StudyConfig
        What is computed; what the sites receive.
    server : ServerSettings
        The server machine's paths and waits.
    simulation : SimulationSettings
        The simulation's shared data set.
    """

    study: StudyConfig = field(default_factory=StudyConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)

    @classmethod
    def of(cls, **values: Any) -> RunConfig:
        """Build a config from flat snake-case values (each goes to the part that owns it)."""
        return cls().with_overrides(**values)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build a config from Flower's flat kebab-case ``run_config``; unknown keys are refused.

        Parameters
        ----------
        run_config : Mapping[str, Any]
            ``context.run_config`` (or any mapping with the same keys).

        Returns
        -------
        RunConfig
            The validated configuration; keys absent from ``run_config`` keep their defaults.
        """
        known = owners()
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
            )
        split: dict[type[KebabDocument], dict[str, Any]] = {part: {} for part in PARTS}
        for key, value in run_config.items():
            split[known[key]][key] = value
        study, server, simulation = (validate(part, split[part]) for part in PARTS)
        return cls(study, server, simulation)  # type: ignore[arg-type]

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Return the config as Flower's flat kebab-case ``run_config``."""
        return {
            **self.study.model_dump(by_alias=True),
            **self.server.model_dump(by_alias=True),
            **self.simulation.model_dump(by_alias=True),
        }

    def with_overrides(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` (flat snake-case names) applied."""
        return RunConfig.from_run_config({**self.to_run_config(), **{kebab(k): v for k, v in changes.items()}})

    @property
    def secagg(self) -> SecAggSettings:
        """The SecAgg+ parameters of this run (the study's, with the server's stage timeout)."""
        return self.study.secagg_settings(timeout=self.server.stage_timeout)
