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
Three tables; every key is optional and an absent key keeps its default (shown here)::

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

    [apps]
    # Fingerprints (SHA-256 of the FAB) of the Flower apps this node runs; empty: none. Added by
    # `carefl app approve` after it showed the app's name, version, publisher and files.
    approved = []

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

Before any of them, the node's own runtime (:mod:`client.runtime`) checks the app the server
submitted against ``apps.approved`` (:func:`check_app`): a FAB that is not approved is refused
before anything in it is read, and the node runs its own installed CareFL, never the FAB's code.

Rules 1 to 4 (:func:`check_study`) concern the study itself, so the node checks them on every
message that touches the site's data, evaluation included, before it reads the data; rules 5
to 7 and :func:`check_round` concern DP-SGD training, so only training checks them. A backbone
offer or delivery is checked against ``allowed_backbones`` before anything is stored
(:func:`check_backbone`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from pydantic import Field, ValidationInfo, field_validator

from shared.errors import InputError, RefusalError
from shared.schema import BuiltDocument, Document, Sha256, validate
from shared.tasks.registry import TASKS

__all__ = [
    "PolicyViolation",
    "AppNotApproved",
    "RunRequest",
    "SitePolicy",
    "approve_app",
    "check_app",
    "check_backbone",
    "check_round",
    "check_run",
    "check_study",
]

_TOLERANCE = 1e-9
_HEADER = "# CareFL site policy: set by this hospital's operator; the server cannot change it."


class PrivacyTable(Document):
    """The ``[privacy]`` table of a policy file; each field's description is its comment there."""

    require_dp: bool = Field(default=True, description="refuse any run without DP-SGD")
    max_epsilon_per_run: float = Field(
        default=3.0, gt=0, allow_inf_nan=False, description="largest target epsilon of one run"
    )
    max_lifetime_epsilon: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        validate_default=True,  # checked against a max_epsilon_per_run set alone
        description="largest epsilon this site spends over all runs",
    )
    max_delta: float = Field(
        default=1e-3, gt=0, lt=1, allow_inf_nan=False, description="largest delta of a run"
    )
    min_noise_multiplier: float = Field(
        default=0.3, gt=0, allow_inf_nan=False, description="smallest DP-SGD noise multiplier"
    )
    max_rounds: int = Field(default=100, ge=1, description="most federated rounds of one run")

    @field_validator("max_lifetime_epsilon")
    @classmethod
    def _covers_one_run(cls, value: float, info: ValidationInfo) -> float:
        per_run = info.data.get("max_epsilon_per_run")
        if per_run is not None and value < per_run:
            raise ValueError(f"must be >= `privacy.max_epsilon_per_run` ({per_run!r})")
        return value


class StudiesTable(Document):
    """The ``[studies]`` table of a policy file (lists are read as tuples)."""

    allowed_tasks: tuple[str, ...] = Field(default=tuple(TASKS), description="studies this site takes part in")
    allowed_backbones: tuple[Sha256, ...] = Field(
        default=(), description="SHA-256 of accepted backbone weights; empty: any that verifies"
    )

    @field_validator("allowed_tasks", "allowed_backbones", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: object) -> object:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("allowed_tasks")
    @classmethod
    def _some_task(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(
                f"must name at least one task of {', '.join(TASKS)} "
                "(a site that takes part in no study should not run a node)"
            )
        unknown = [task for task in value if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
        return value


class AppsTable(Document):
    """The ``[apps]`` table of a policy file: the Flower apps this node runs."""

    approved: tuple[Sha256, ...] = Field(
        default=(), description="SHA-256 of the approved FABs (`carefl app approve`); empty: none"
    )

    @field_validator("approved", mode="before")
    @classmethod
    def _approved_as_tuple(cls, value: object) -> object:  # a name of its own: SitePolicy inherits both tables
        return tuple(value) if isinstance(value, list) else value


_TABLES: dict[str, type[Document]] = {"privacy": PrivacyTable, "studies": StudiesTable, "apps": AppsTable}
_TABLE_OF: dict[str, str] = {name: table for table, model in _TABLES.items() for name in model.model_fields}
_KNOWN: dict[str, str] = {
    "": f"{', '.join(f'[{t}]' for t in _TABLES)} (every key belongs in one of these tables)",
    **{table: ", ".join(model.model_fields) for table, model in _TABLES.items()},
}


class PolicyFile(Document):
    """A policy file as written: three tables, each optional, each key optional."""

    privacy: PrivacyTable = PrivacyTable()
    studies: StudiesTable = StudiesTable()
    apps: AppsTable = AppsTable()


class SitePolicy(BuiltDocument, AppsTable, StudiesTable, PrivacyTable):  # fields: the last base's first
    """What one hospital agrees to: set by its operator, never by the server.

    The keys of both tables of the policy file, flat: their rules are the tables' own.

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
        Tasks this site takes part in (at least one; names from :data:`shared.tasks.registry.TASKS`).
    allowed_backbones : tuple[str, ...]
        Full lowercase SHA-256 values of the backbone weights accepted; empty: any backbone
        whose weights verify against their hash, and training from scratch.
    approved : tuple[str, ...]
        Fingerprints (full lowercase SHA-256 of the FAB) of the Flower apps this node runs;
        empty: it runs none.

    Raises
    ------
    InputError
        If a value has the wrong type or is out of range; the message names the key as
        ``table.key`` of the policy file.
    """

    @classmethod
    def key_of(cls, name: str) -> str:
        """The policy file's dotted key of field ``name`` (``privacy.max_delta``)."""
        return f"{_TABLE_OF[name]}.{name}" if name in _TABLE_OF else name

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
        tables = validate(PolicyFile, document, source=f"site policy {path}", error=InputError, known=_KNOWN)
        return cls(**tables.privacy.model_dump(), **tables.studies.model_dump(), **tables.apps.model_dump())

    def to_toml(self) -> str:
        """Return the policy as a policy file; :meth:`load` of it gives back an equal policy."""
        tables = {table: self.model_dump(include=set(model.model_fields)) for table, model in _TABLES.items()}
        lines = [_HEADER, "", *map(_commented, tomli_w.dumps(tables).splitlines())]
        return "\n".join(lines) + "\n"


def _commented(line: str) -> str:
    """``line`` of the policy file, with the comment of the key it sets, if it sets one."""
    name = line.partition(" = ")[0]
    field = SitePolicy.model_fields.get(name)
    return f"{line}  # {field.description}" if field is not None and not line.startswith(" ") else line


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


def check_study(policy: SitePolicy, *, task: str, backbone_sha256: str, dp: bool, rounds: int) -> None:
    """Refuse a study the site does not take part in: rules 1 to 4, for every message on its data.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy.
    task : str
        Task of the run.
    backbone_sha256 : str
        SHA-256 of the backbone weights; ``""`` when training from scratch.
    dp : bool
        Whether the run trains with DP-SGD.
    rounds : int
        Number of federated rounds.

    Raises
    ------
    PolicyViolation
        For the first of ``allowed_tasks``, ``allowed_backbones``, ``require_dp`` and
        ``max_rounds`` the study breaks.
    """
    if task not in policy.allowed_tasks:
        raise PolicyViolation(
            "allowed_tasks",
            task,
            policy.allowed_tasks,
            f"this site takes part only in studies of {', '.join(policy.allowed_tasks)}.",
        )
    check_backbone(policy, backbone_sha256)
    if policy.require_dp and not dp:
        raise PolicyViolation(
            "require_dp",
            dp,
            policy.require_dp,
            "this site trains only with differential privacy; the server cannot switch it off.",
        )
    if not rounds <= policy.max_rounds:
        raise PolicyViolation(
            "max_rounds",
            rounds,
            policy.max_rounds,
            f"accepted: at most {policy.max_rounds} rounds.",
        )


def check_backbone(policy: SitePolicy, sha256: str) -> None:
    """Refuse a backbone (``""``: training from scratch) that ``allowed_backbones`` does not list.

    Raises
    ------
    PolicyViolation
        ``allowed_backbones``, when the list is set and ``sha256`` is not on it.
    """
    if policy.allowed_backbones and sha256 not in policy.allowed_backbones:
        scratch = " (training from scratch is refused while the list is set)"
        raise PolicyViolation(
            "allowed_backbones",
            sha256,
            policy.allowed_backbones,
            "accepted: a backbone whose weights have one of the listed SHA-256 values"
            f"{scratch if not sha256 else ''}.",
        )


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
    check_study(
        policy, task=request.task, backbone_sha256=request.backbone_sha256, dp=request.dp, rounds=request.rounds
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


class AppNotApproved(RefusalError):
    """The site's policy does not approve the Flower app (FAB) the server submitted.

    Parameters
    ----------
    sha256 : str
        The FAB's fingerprint (SHA-256 of its bytes, computed by the node).
    fab_id : str
        ``publisher/name`` the run names (as the server says; not trusted).
    """

    def __init__(self, sha256: str, fab_id: str = "") -> None:
        self.sha256 = sha256
        named = f" ({fab_id})" if fab_id else ""
        super().__init__(
            f"site policy refuses the app{named}: its FAB's SHA-256 {sha256} is not in `apps.approved`; "
            "nothing in it was run. The hospital's operator approves an app with "
            "`carefl app approve --site-dir DIR FAB` after reviewing it."
        )


def check_app(policy: SitePolicy, sha256: str, fab_id: str = "") -> None:
    """Refuse a FAB whose fingerprint the site has not approved.

    Raises
    ------
    AppNotApproved
        If ``sha256`` is not in ``policy.approved`` (an empty list approves nothing).
    """
    if sha256 not in policy.approved:
        raise AppNotApproved(sha256, fab_id)


def approve_app(path: Path, sha256: str) -> SitePolicy:
    """Add the FAB fingerprint ``sha256`` to ``apps.approved`` of the policy file at ``path``.

    The file is rewritten (atomically) in the format :meth:`SitePolicy.to_toml` writes; its other
    keys keep their values. Approving an approved app changes nothing.

    Raises
    ------
    InputError
        If the policy file is missing or invalid, or ``sha256`` is not a full lowercase SHA-256.
    """
    from shared.atomic import atomic_write_text

    policy = SitePolicy.load(path)
    if sha256 in policy.approved:
        return policy
    updated = SitePolicy(**{**policy.model_dump(), "approved": (*policy.approved, sha256)})
    atomic_write_text(Path(path), updated.to_toml())
    return updated
