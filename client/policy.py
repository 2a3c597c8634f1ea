"""A hospital's site policy: what this node agrees to train, whatever the server asks for.

The policy belongs to the site (as in NVFlare, where site filters run before job filters). The
hospital's operator points its node at a TOML file; before training, the node checks the
server's request against it with :func:`check_run`, and before every round it checks what the
privacy ledger says the round would bring the spend to with :func:`check_round`. A request the
policy does not cover is refused with :class:`PolicyViolation`, whose message names the rule,
the value asked for and the limit; the node then does not train.

The server cannot switch differential privacy off at a site that requires it: the decision is
taken by the node, from the operator's file, and nothing in the run config can change that file.

Policy file
-----------
Two tables; every key is optional and an absent key keeps its default (shown here)::

    [privacy]
    require_dp = true              # refuse any run without DP-SGD
    max_epsilon_per_run = 3.0      # largest target epsilon of one run
    max_lifetime_epsilon = 10.0    # largest epsilon this site spends over all runs
    max_delta = 0.001              # largest delta of a run
    min_noise_multiplier = 0.3     # smallest DP-SGD noise multiplier
    max_rounds = 100               # most federated rounds of one run

    [studies]
    allowed_tasks = ["heart-disease", "chest-xray"]
    # Full lowercase SHA-256 values of the backbone weights this site accepts; empty: any
    # backbone whose weights verify against their hash (and training from scratch).
    allowed_backbones = []

An unknown table or key, a value of the wrong type (a string where a number is expected; an
integer is accepted for a float, a boolean is not an integer) or a value out of range is
refused with :class:`~shared.errors.InputError` naming the file and the key.

Order of checks
---------------
:func:`check_run` reports the first rule the request breaks, in this order:

1. ``allowed_tasks``
2. ``allowed_backbones`` (only when the list is non-empty; then a run from scratch is refused)
3. ``require_dp``
4. ``max_rounds``
5. ``max_delta``
6. ``max_epsilon_per_run`` (the request's target epsilon)
7. ``min_noise_multiplier``

Rules 5 to 7 apply to runs with DP; a run without DP at a site that does not require it is not
checked against them. :func:`check_round` checks ``max_epsilon_per_run`` and then
``max_lifetime_epsilon`` against the spend a round would bring.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError, RefusalError
from shared.tasks import TASKS

__all__ = ["PolicyViolation", "RunRequest", "SitePolicy", "check_round", "check_run"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TOLERANCE = 1e-9
_TABLES: dict[str, tuple[str, ...]] = {
    "privacy": (
        "require_dp",
        "max_epsilon_per_run",
        "max_lifetime_epsilon",
        "max_delta",
        "min_noise_multiplier",
        "max_rounds",
    ),
    "studies": ("allowed_tasks", "allowed_backbones"),
}
_TABLE_OF: dict[str, str] = {key: table for table, keys in _TABLES.items() for key in keys}
_COMMENTS: dict[str, str] = {
    "require_dp": "refuse any run without DP-SGD",
    "max_epsilon_per_run": "largest target epsilon of one run",
    "max_lifetime_epsilon": "largest epsilon this site spends over all runs",
    "max_delta": "largest delta of a run",
    "min_noise_multiplier": "smallest DP-SGD noise multiplier",
    "max_rounds": "most federated rounds of one run",
    "allowed_tasks": "studies this site takes part in",
    "allowed_backbones": "SHA-256 of accepted backbone weights; empty: any that verifies",
}


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """What one hospital agrees to: set by its operator, never by the server.

    Attributes
    ----------
    require_dp : bool
        Refuse every run without differential privacy.
    max_epsilon_per_run : float
        Largest epsilon one run may spend at this site (> 0).
    max_lifetime_epsilon : float
        Largest epsilon this site spends over all runs (>= ``max_epsilon_per_run``).
    max_delta : float
        Largest delta of a run, in (0, 1).
    min_noise_multiplier : float
        Smallest DP-SGD noise multiplier accepted (> 0).
    max_rounds : int
        Most federated rounds of one run (>= 1).
    allowed_tasks : tuple[str, ...]
        Tasks this site takes part in (at least one; names from :data:`shared.tasks.TASKS`).
    allowed_backbones : tuple[str, ...]
        Full lowercase SHA-256 values of the backbone weights accepted; empty: any backbone
        whose weights verify against their hash, and training from scratch.

    Raises
    ------
    InputError
        If a value has the wrong type or is out of range; the message names the key as
        ``table.key`` of the policy file.
    """

    require_dp: bool = True
    max_epsilon_per_run: float = 3.0
    max_lifetime_epsilon: float = 10.0
    max_delta: float = 1e-3
    min_noise_multiplier: float = 0.3
    max_rounds: int = 100
    allowed_tasks: tuple[str, ...] = ("heart-disease", "chest-xray")
    allowed_backbones: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.require_dp, bool):
            raise InputError(f"{_wrong_type('require_dp', self.require_dp, 'a boolean')}.")
        for name in ("max_epsilon_per_run", "max_lifetime_epsilon", "max_delta", "min_noise_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(f"{_wrong_type(name, value, 'a number')}.")
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"`{_key(name)}` must be a finite number > 0, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if not self.max_delta < 1:
            raise InputError(f"`{_key('max_delta')}` must be in (0, 1), got {self.max_delta!r}.")
        if self.max_lifetime_epsilon < self.max_epsilon_per_run:
            raise InputError(
                f"`{_key('max_lifetime_epsilon')}` must be >= `{_key('max_epsilon_per_run')}` "
                f"({self.max_epsilon_per_run!r}), got {self.max_lifetime_epsilon!r}."
            )
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int):
            raise InputError(f"{_wrong_type('max_rounds', self.max_rounds, 'an integer')}.")
        if self.max_rounds < 1:
            raise InputError(f"`{_key('max_rounds')}` must be >= 1, got {self.max_rounds!r}.")
        for name in ("allowed_tasks", "allowed_backbones"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise InputError(f"{_wrong_type(name, value, 'a list of strings')}.")
            object.__setattr__(self, name, tuple(value))
        if not self.allowed_tasks:
            raise InputError(
                f"`{_key('allowed_tasks')}` must name at least one task of {', '.join(TASKS)} "
                "(a site that takes part in no study should not run a node)."
            )
        for task in self.allowed_tasks:
            if task not in TASKS:
                raise InputError(
                    f"`{_key('allowed_tasks')}`: unknown task {task!r}; tasks: {', '.join(TASKS)}."
                )
        for sha in self.allowed_backbones:
            if not _SHA256.match(sha):
                raise InputError(
                    f"`{_key('allowed_backbones')}` must hold full SHA-256 values "
                    f"(64 lowercase hex digits), got {sha!r}."
                )

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read and validate a policy file.

        Parameters
        ----------
        path : Path
            The TOML policy file set by the site's operator.

        Returns
        -------
        SitePolicy
            The policy; keys absent from the file keep their defaults.

        Raises
        ------
        InputError
            If the file is missing or unreadable, is not valid TOML, holds an unknown table or
            key, or a value of the wrong type or out of range. The message names the file and
            the key.
        """
        try:
            with Path(path).open("rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise InputError(f"site policy {path}: cannot read the file ({exc.strerror or exc}).") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"site policy {path}: not valid TOML ({exc}).") from None
        values: dict[str, Any] = {}
        for table, content in document.items():
            if table not in _TABLES:
                where = "table" if isinstance(content, dict) else "top-level key"
                raise InputError(
                    f"site policy {path}: unknown {where} `{table}`; keys belong in the tables "
                    f"{', '.join(f'[{t}]' for t in _TABLES)}."
                )
            if not isinstance(content, dict):
                raise InputError(f"site policy {path}: `{table}` must be a table ([{table}]).")
            for key, value in content.items():
                if key not in _TABLES[table]:
                    raise InputError(
                        f"site policy {path}: unknown key `{table}.{key}`; keys of [{table}]: "
                        f"{', '.join(_TABLES[table])}."
                    )
                values[key] = value
        try:
            return cls(**values)
        except InputError as exc:
            raise InputError(f"site policy {path}: {exc}") from None

    def to_toml(self) -> str:
        """Return the policy as a policy file; :meth:`load` of it gives back an equal policy."""
        lines = ["# CareFL site policy: set by this hospital's operator; the server cannot change it."]
        for table, keys in _TABLES.items():
            lines += ["", f"[{table}]"]
            for key in keys:
                lines.append(f"{key} = {_toml_value(getattr(self, key))}  # {_COMMENTS[key]}")
        return "\n".join(lines) + "\n"


class PolicyViolation(RefusalError):
    """The site's policy refuses what the server asked for; the node does not train.

    Parameters
    ----------
    rule : str
        The policy key broken, e.g. ``max_epsilon_per_run``.
    requested : object
        The value asked for.
    limit : object
        The policy's limit.
    hint : str
        What the site would accept instead.
    """

    def __init__(self, rule: str, requested: object, limit: object, hint: str) -> None:
        self.rule = rule
        self.requested = requested
        self.limit = limit
        super().__init__(f"site policy refuses the run: {rule}: requested {requested}, limit {limit}; {hint}")


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What the server asks this site to do, as the site's policy sees it.

    Attributes
    ----------
    task : str
        Task of the run.
    backbone_sha256 : str
        SHA-256 of the backbone weights; ``""`` when training from scratch.
    dp : bool
        Whether the run trains with DP-SGD.
    target_epsilon : float
        Epsilon the run may spend at this site.
    delta : float
        Delta of the run.
    noise_multiplier : float
        DP-SGD noise multiplier.
    rounds : int
        Number of federated rounds.
    """

    task: str
    backbone_sha256: str
    dp: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float
    rounds: int


def check_run(policy: SitePolicy, request: RunRequest) -> None:
    """Refuse a run the site's policy does not cover, before any training.

    Rules are checked in the order of the module docstring and the first one broken is
    reported. Comparisons are written so that a NaN is refused, never let through.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy.
    request : RunRequest
        What the server asks for.

    Raises
    ------
    PolicyViolation
        For the first rule the request breaks.
    """
    if request.task not in policy.allowed_tasks:
        raise PolicyViolation(
            "allowed_tasks",
            request.task,
            policy.allowed_tasks,
            f"this site takes part only in studies of {', '.join(policy.allowed_tasks)}.",
        )
    if policy.allowed_backbones and request.backbone_sha256 not in policy.allowed_backbones:
        scratch = " (training from scratch is refused while the list is set)"
        raise PolicyViolation(
            "allowed_backbones",
            request.backbone_sha256,
            policy.allowed_backbones,
            "accepted: a backbone whose weights have one of the listed SHA-256 values"
            f"{scratch if not request.backbone_sha256 else ''}.",
        )
    if policy.require_dp and not request.dp:
        raise PolicyViolation(
            "require_dp",
            request.dp,
            policy.require_dp,
            "this site trains only with differential privacy; the server cannot switch it off.",
        )
    if not request.rounds <= policy.max_rounds:
        raise PolicyViolation(
            "max_rounds",
            request.rounds,
            policy.max_rounds,
            f"accepted: at most {policy.max_rounds} rounds.",
        )
    if not request.dp:
        return
    if not request.delta <= policy.max_delta:
        raise PolicyViolation(
            "max_delta", request.delta, policy.max_delta, f"accepted: delta <= {policy.max_delta}."
        )
    if not request.target_epsilon <= policy.max_epsilon_per_run:
        raise PolicyViolation(
            "max_epsilon_per_run",
            request.target_epsilon,
            policy.max_epsilon_per_run,
            f"accepted: a target epsilon <= {policy.max_epsilon_per_run} per run.",
        )
    if not request.noise_multiplier >= policy.min_noise_multiplier:
        raise PolicyViolation(
            "min_noise_multiplier",
            request.noise_multiplier,
            policy.min_noise_multiplier,
            f"accepted: a noise multiplier >= {policy.min_noise_multiplier}.",
        )


def check_round(policy: SitePolicy, *, run_epsilon_after: float, lifetime_epsilon_after: float) -> None:
    """Refuse a round that would spend more epsilon than the site's policy allows.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy.
    run_epsilon_after : float
        This run's epsilon at this site once the round is done (from the privacy ledger).
    lifetime_epsilon_after : float
        The site's epsilon over all runs once the round is done.

    Raises
    ------
    PolicyViolation
        ``max_epsilon_per_run`` or ``max_lifetime_epsilon`` (checked in that order) when the
        spend would exceed the limit by more than 1e-9; a NaN spend is refused too.
    """
    if not run_epsilon_after <= policy.max_epsilon_per_run + _TOLERANCE:
        raise PolicyViolation(
            "max_epsilon_per_run",
            run_epsilon_after,
            policy.max_epsilon_per_run,
            "this round would overspend the run's budget; the site stops training in this run.",
        )
    if not lifetime_epsilon_after <= policy.max_lifetime_epsilon + _TOLERANCE:
        raise PolicyViolation(
            "max_lifetime_epsilon",
            lifetime_epsilon_after,
            policy.max_lifetime_epsilon,
            "this round would overspend the site's lifetime budget; only the site's operator can raise it.",
        )


def _key(name: str) -> str:
    """Return the policy file's dotted key of field ``name`` (``privacy.max_delta``)."""
    return f"{_TABLE_OF[name]}.{name}"


def _wrong_type(name: str, value: object, expected: str) -> str:
    return f"`{_key(name)}` must be {expected}, got {value!r} ({type(value).__name__})"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_string(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_string(value: object) -> str:
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
