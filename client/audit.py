"""A hospital's audit log: one hash-chained entry per message that leaves the site.

The log lives in the site directory as two files:

``audit.jsonl``
    One JSON object per line (canonical JSON: sorted keys, no spaces), in the order the
    replies left: ``seq`` (from 0), ``prev_hash``, ``time_utc``, ``run_id``, ``round``,
    ``stage``, ``message_type``, ``secagg_stage``, ``reply_to``, ``payload_sha256``,
    ``payload_bytes``, ``epsilon``, ``decision`` and ``entry_hash``. The reply to the server's
    final model (message type ``query.carefl_model``, a *model receipt*) has ``model_sha256``
    too: the SHA-256 of the model the site stored; no other entry has that key.
``audit.head``
    ``{"count": n, "entry_hash": ..., "mac": ...}`` of the last entry, replaced atomically after
    each append, so removing entries from the end is detected. ``mac`` seals the head with the
    site key (``ledger.key``, the privacy ledger's key): ``HMAC-SHA256(key,
    b"carefl-audit/v1/head\x00" + canonical({"count": n, "entry_hash": ...}))`` in hex. It is
    absent at a site without a key, and in heads written before heads were sealed.

With ``canonical(x) = json.dumps(x, sort_keys=True, separators=(",", ":"))``, an entry's
``entry_hash`` is ``sha256(canonical(entry without entry_hash))`` in hex; it covers ``seq`` and
``prev_hash``, the previous entry's ``entry_hash`` (64 zeros for the first). Anyone can check
the chain with ``jq`` and ``sha256sum``; no key is involved.

:meth:`AuditLog.append` returns only once the entry is on disk (the line fsync'd, then the
head replaced), and refuses to append to a log whose tail does not match its head: a node
whose audit log is broken sends nothing (fail closed). Several ClientApp processes of one
site may append at once: they take turns under an ``flock`` on ``audit.lock``.

What this protects against: editing, removing, reordering or inserting entries, or dropping
the tail, without rewriting every later entry *and* the head. A complete rewrite of the chain
(entries and head) is detected by the head's seal: without the site key, nobody can seal the
new head. The privacy ledger vouches for the log too: :func:`verify` refuses a ledger whose
charged rounds have no ``train`` entry in the log (e.g. both files deleted, or entries dropped
and the head recomputed).

Logs written before heads were sealed: a head without ``mac`` verifies at a site whose ledger
was created before (its header has no ``seals_audit_head``), and the next append seals it. A
ledger created since requires a sealed head, so removing the ``mac`` (a downgrade) is refused.
Someone holding the site key can still rewrite everything; to detect that too, record the head
printed by ``carefl audit verify`` somewhere the site's disk cannot change (a ticket, the
server's logs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from client.ledger import KEY_FILE, LEDGER_FILE, PrivacyLedger, read_site_key, same_mac, site_mac
from client.records import Clock, canonical, locked, strict_json, utc_now, utc_timestamp
from shared.atomic import atomic_write_text, fsync_path
from shared.errors import InputError, IntegrityError
from shared.log import log
from shared.schema import Document, problem

__all__ = [
    "ACCEPTED",
    "AUDIT_FILE",
    "GENESIS_HASH",
    "HEAD_FILE",
    "LOCK_FILE",
    "AuditLog",
    "AuditProblem",
    "AuditRecord",
    "AuditReport",
    "head_mac",
    "verified_line",
    "verify",
]

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
LOCK_FILE = "audit.lock"
GENESIS_HASH = "0" * 64
ACCEPTED = "accepted"
TRAIN = "train"
_LABEL_HEAD = b"carefl-audit/v1/head\x00"

RECOVERY = (
    f"Restore {AUDIT_FILE} and {HEAD_FILE} from the site's backup (or move both aside and keep "
    "them as evidence); the node sends nothing until its audit log verifies."
)


class _Entry(Document):
    """One line of ``audit.jsonl``: the fields of the module docstring, with their JSON types."""

    seq: int = Field(ge=0)
    prev_hash: str
    time_utc: str
    run_id: str
    round: int | None
    stage: str
    message_type: str
    secagg_stage: str | None
    reply_to: str
    payload_sha256: str | None
    payload_bytes: int
    epsilon: float | None  # an integer too
    decision: str
    entry_hash: str
    model_sha256: str | None = None  # model receipts only


class _Head(Document):
    """``audit.head``: the number of entries, the last one's hash and their seal."""

    count: int = Field(ge=0)
    entry_hash: str
    mac: str | None = None


@dataclass(frozen=True)
class _HeadState:
    """A head as read: ``(count, entry_hash)`` and its seal (None when unsealed)."""

    count: int
    entry_hash: str
    mac: str | None

    @property
    def position(self) -> tuple[int, str]:
        return self.count, self.entry_hash


@dataclass(frozen=True)
class AuditRecord:
    """What one reply that leaves the site is recorded as (the caller's part of an entry).

    Attributes
    ----------
    run_id : str
        Flower's run id.
    round : int | None
        The server round, when the message's config carries one.
    message_type : str
        Flower's message type (``train``, ``evaluate``, ``query`` ...).
    secagg_stage : str | None
        The SecAgg+ stage, for secure-aggregation messages.
    reply_to : str
        Id of the message answered.
    payload_sha256 : str | None
        SHA-256 (hex) of the serialized reply; None when nothing but an error left.
    payload_bytes : int
        Size of the serialized reply.
    epsilon : float | None
        Privacy the reply reports as spent in the run, when it reports it.
    decision : str
        ``accepted``, or ``refused: <reason>``.
    model_sha256 : str | None
        A model receipt: SHA-256 of the final model the site stored (None otherwise).
    """

    run_id: str
    round: int | None
    message_type: str
    secagg_stage: str | None
    reply_to: str
    payload_sha256: str | None
    payload_bytes: int
    epsilon: float | None
    decision: str
    model_sha256: str | None = None

    @property
    def stage(self) -> str:
        """``message_type``, or ``message_type:secagg_stage`` for SecAgg+ messages."""
        return f"{self.message_type}:{self.secagg_stage}" if self.secagg_stage else self.message_type


@dataclass(frozen=True)
class AuditProblem:
    """The first thing wrong with an audit log.

    Attributes
    ----------
    line : int | None
        1-based line of ``audit.jsonl`` (None when the problem is the head file, or the log as
        a whole).
    kind : str
        ``altered``, ``removed``, ``reordered``, ``truncated``, ``malformed``, ``unsealed`` (a
        head the site's ledger requires sealed) or ``missing`` (charged rounds of the privacy
        ledger without their entry).
    detail : str
        What was expected and what was found.
    where : str | None
        Where the problem is, when not a line (default: the head file).
    """

    line: int | None
    kind: str
    detail: str
    where: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else self.where or HEAD_FILE
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class AuditReport:
    """The result of :func:`verify`.

    Attributes
    ----------
    path : Path
        The audit log checked.
    entries : int
        Entries that verified before the first problem (all of them when ``ok``).
    head_hash : str
        ``entry_hash`` of the last verified entry (:data:`GENESIS_HASH` when none).
    problem : AuditProblem | None
        The first problem found, or None.
    sealed : bool
        Whether the head's seal was checked with the site key.
    charged_rounds : int | None
        Rounds the site's privacy ledger charged, each found in the log (None: no ledger).
    """

    path: Path
    entries: int
    head_hash: str
    problem: AuditProblem | None = None
    sealed: bool = False
    charged_rounds: int | None = None

    @property
    def ok(self) -> bool:
        """True when the whole log verified."""
        return self.problem is None


class AuditLog:
    """The audit log of one site directory.

    Parameters
    ----------
    site_dir : Path
        The hospital's private site directory (created, mode 0700, if missing).
    clock : Callable[[], datetime], optional
        Timezone-aware clock of the entries' ``time_utc``.
    """

    def __init__(self, site_dir: Path, clock: Clock | None = None) -> None:
        self.site_dir = Path(site_dir)
        self.path = self.site_dir / AUDIT_FILE
        self.head_path = self.site_dir / HEAD_FILE
        self._now = clock or utc_now

    def append(self, record: AuditRecord) -> dict[str, Any]:
        """Append ``record`` and return its full entry once it is durably on disk.

        The new head is sealed with the site key when the site has one.

        Raises
        ------
        IntegrityError
            If the log's tail does not match its head (altered, truncated or replaced), or the
            head's seal does not verify; nothing is written.
        """
        self.site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(self.site_dir / LOCK_FILE):
            key = read_site_key(self.site_dir)
            count, prev_hash = self._tail(key)
            entry: dict[str, Any] = {
                "seq": count,
                "prev_hash": prev_hash,
                "time_utc": utc_timestamp(self._now, "the audit"),
                "run_id": record.run_id,
                "round": record.round,
                "stage": record.stage,
                "message_type": record.message_type,
                "secagg_stage": record.secagg_stage,
                "reply_to": record.reply_to,
                "payload_sha256": record.payload_sha256,
                "payload_bytes": int(record.payload_bytes),
                "epsilon": _finite_or_none(record.epsilon),
                "decision": record.decision,
            }
            if record.model_sha256 is not None:  # a model receipt; other entries keep their format
                entry["model_sha256"] = record.model_sha256
            entry["entry_hash"] = entry_hash(entry)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as handle:
                handle.write(canonical(entry) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                fsync_path(self.site_dir)
            _write_head(self.head_path, count + 1, entry["entry_hash"], key)
        return entry

    def _tail(self, key: bytes | None) -> tuple[int, str]:
        """Return (entries, last entry_hash) after checking the log's last entry against the head.

        Two crashes are recovered from, and only when the rest matches the head: a last line
        cut short (no newline: the append was interrupted before the reply left) is dropped,
        and a head one entry behind the log (interrupted between the two writes) catches up.
        The head's seal is checked first (see :func:`_seal_problem`).
        """
        state = _read_head(self.head_path)
        problem = _seal_problem(self.site_dir, state, key)
        if problem is not None:
            raise self._fail(problem)
        head = state.position if state else (0, GENESIS_HASH)
        last, torn_at = _tail_of(self.path)
        if last is None:
            if head[0] > 0:
                raise self._fail(f"{AUDIT_FILE} holds no entry but {HEAD_FILE} records {head[0]}")
            count, last_hash = 0, GENESIS_HASH
        else:
            entry = _parse(last)
            if isinstance(entry, str) or entry["entry_hash"] != entry_hash(entry):
                raise self._fail(f"the last entry of {AUDIT_FILE} is malformed or altered")
            count, last_hash = entry["seq"] + 1, entry["entry_hash"]
            if head == (entry["seq"], entry["prev_hash"]):
                log(
                    WARNING,
                    "%s: %s catches up with the last entry (an append was interrupted)",
                    self.path,
                    HEAD_FILE,
                )
                _write_head(self.head_path, count, last_hash, key)
            elif head != (count, last_hash):
                raise self._fail(
                    f"the last entry of {AUDIT_FILE} (seq {entry['seq']}) is not the one {HEAD_FILE} "
                    f"records ({head[0]} entries): entries were removed or replaced"
                )
        if state is not None and state.mac is None and key is not None:
            log(WARNING, "%s: sealing a head written before heads were sealed", self.head_path)
        if torn_at is not None:
            log(WARNING, "%s: dropping a last line cut short (an append was interrupted)", self.path)
            with self.path.open("rb+") as handle:
                handle.truncate(torn_at)
                os.fsync(handle.fileno())
        return count, last_hash

    def _fail(self, problem: str) -> IntegrityError:
        return IntegrityError(
            f"{self.path}: {problem}. Run `carefl audit verify --site-dir {self.site_dir}`. {RECOVERY}"
        )


def verify(site_dir: Path) -> AuditReport:
    """Check the whole audit log of ``site_dir`` and report its first problem, if any.

    Checks, line by line: each line is a well-formed entry (``malformed``), its ``entry_hash``
    matches its content (``altered``), its ``seq`` follows the previous one (``removed`` when
    an entry is missing, ``reordered`` when entries are out of order or replayed) and its
    ``prev_hash`` is the previous entry's hash (``altered``). Then the head file: it must not
    record more entries than the log holds (``truncated``), and the entry it records must be
    the one in the log (``altered``). Then the head's seal, with the site key (``altered``;
    ``unsealed`` when the site's ledger requires a seal and there is none). Last, the privacy
    ledger: each round it charged must have a ``train`` entry of that run and round
    (``missing``).

    Raises
    ------
    InputError
        If ``site_dir`` does not exist.
    IntegrityError
        If the site's privacy ledger does not verify (:class:`client.ledger.LedgerError`).
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise InputError(f"{site_dir} is not a site directory (not found)")
    path = site_dir / AUDIT_FILE
    ledger = _ledger_of(site_dir)
    key = read_site_key(site_dir)
    try:
        state = _read_head(site_dir / HEAD_FILE)
    except IntegrityError as err:
        return AuditReport(path, 0, GENESIS_HASH, AuditProblem(None, "malformed", str(err)))
    entries, report = _verify_chain(path, state)
    if report is not None:
        return report
    prev = entries[-1]["entry_hash"] if entries else GENESIS_HASH
    sealing = _seal_problem(site_dir, state, key, ledger)
    if sealing is not None:
        kind = "unsealed" if state is not None and state.mac is None else "altered"
        return AuditReport(path, len(entries), prev, AuditProblem(None, kind, sealing))
    sealed = state is not None and state.mac is not None
    if ledger is None:
        return AuditReport(path, len(entries), prev, sealed=sealed)
    missing = _uncharged_problem(ledger, entries, log_exists=path.exists() or state is not None)
    charged = len(ledger.entries())
    return AuditReport(path, len(entries), prev, missing, sealed=sealed, charged_rounds=charged)


def _verify_chain(path: Path, state: _HeadState | None) -> tuple[list[dict[str, Any]], AuditReport | None]:
    """Check every line of ``path`` and the head against them; return the entries or a report."""
    lines = path.read_bytes().split(b"\n") if path.exists() else [b""]
    torn = lines[-1] != b""
    if not torn:
        lines.pop()
    entries: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for number, raw in enumerate(lines, start=1):
        if torn and number == len(lines):
            detail = "the last line is cut short (an interrupted append; the next append drops it)"
            return entries, AuditReport(path, len(entries), prev, AuditProblem(number, "malformed", detail))
        entry = _parse(raw)
        if isinstance(entry, str):
            return entries, AuditReport(path, len(entries), prev, AuditProblem(number, "malformed", entry))
        problem = _check_link(entry, number, prev, lines)
        if problem is not None:
            return entries, AuditReport(path, len(entries), prev, problem)
        entries.append(entry)
        prev = entry["entry_hash"]
    count, head_hash = state.position if state else (0, GENESIS_HASH)
    if count > len(entries):
        detail = f"{HEAD_FILE} records {count} entries but the log holds {len(entries)}: its tail was removed"
        problem = AuditProblem(len(entries) + 1, "truncated", detail)
        return entries, AuditReport(path, len(entries), prev, problem)
    if count > 0 and entries[count - 1]["entry_hash"] != head_hash:
        detail = f"entry seq {count - 1} is not the one {HEAD_FILE} records (hash {head_hash[:16]}...)"
        verified = entries[count - 2]["entry_hash"] if count > 1 else GENESIS_HASH
        return entries, AuditReport(path, count - 1, verified, AuditProblem(count, "altered", detail))
    if count < len(entries) - 1:
        detail = (
            f"{HEAD_FILE} records {count} entries but the log holds {len(entries)}: "
            "the head was replaced by an older one, or entries were appended behind its back"
        )
        return entries, AuditReport(path, count, head_hash, AuditProblem(None, "altered", detail))
    return entries, None


def _ledger_of(site_dir: Path) -> PrivacyLedger | None:
    """The site's verified privacy ledger, or None when the site has neither ledger nor key."""
    if not (site_dir / LEDGER_FILE).exists() and not (site_dir / KEY_FILE).exists():
        return None
    return PrivacyLedger.open(site_dir)


def _seal_problem(
    site_dir: Path, state: _HeadState | None, key: bytes | None, ledger: PrivacyLedger | None = None
) -> str | None:
    """What is wrong with the head's seal, or None.

    A sealed head must verify with the site key. An unsealed head is accepted only where the
    site's ledger does not require a seal (it predates sealed heads) or there is no key.
    """
    if state is None:
        return None
    if state.mac is not None:
        if key is None:
            return (
                f"{HEAD_FILE} is sealed with the site key, but {site_dir / KEY_FILE} is missing: "
                "the seal cannot be checked"
            )
        if not same_mac(state.mac, head_mac(key, state.count, state.entry_hash)):
            return (
                f"the seal of {HEAD_FILE} does not verify with the site key ({KEY_FILE}): the log and "
                "its head were rewritten by someone without the key"
            )
        return None
    if key is None or state.count == 0:
        return None
    if ledger is None:
        ledger = PrivacyLedger.open(site_dir)
    if ledger.seals_audit_head:
        return (
            f"{HEAD_FILE} is not sealed, but this site's privacy ledger requires a sealed head: the "
            "log and its head were rewritten by someone without the site key"
        )
    return None


def _uncharged_problem(
    ledger: PrivacyLedger, entries: list[dict[str, Any]], *, log_exists: bool
) -> AuditProblem | None:
    """The charged rounds of ``ledger`` that have no ``train`` entry in the log, as a problem."""
    logged = {(e["run_id"], e["round"]) for e in entries if e["message_type"] == TRAIN}
    missing = [(e.run_id, e.round) for e in ledger.entries() if (e.run_id, e.round) not in logged]
    if not missing:
        return None
    run, rnd = missing[0]
    charged = f"{ledger.path.name} records {len(ledger.entries())} charged round(s)"
    if not log_exists:
        detail = (
            f"{AUDIT_FILE} and {HEAD_FILE} are missing, but {charged} (first: run {run} round {rnd}): "
            "the audit log was deleted"
        )
    else:
        detail = (
            f"{charged}, and {len(missing)} of them have no {TRAIN} entry in {AUDIT_FILE} "
            f"(first: run {run} round {rnd}): entries were removed (or a node was killed between "
            "charging a round and answering it)"
        )
    return AuditProblem(None, "missing", detail, where=LEDGER_FILE)


def verified_line(report: AuditReport) -> str:
    """The line ``carefl audit verify`` prints for a log that verified."""
    if report.sealed:
        seal = "sealed with the site key"
    elif report.entries == 0:
        seal = "nothing to seal"
    else:
        seal = "head not sealed (written before heads were sealed, or no site key: record it outside the site)"
    ledger = (
        "no privacy ledger"
        if report.charged_rounds is None
        else f"{report.charged_rounds} charged round(s) of the privacy ledger each logged"
    )
    return f"ok: {report.entries} entries, head {report.head_hash[:16]}, {seal}; {ledger}"


def head_mac(key: bytes, count: int, last_hash: str) -> str:
    """The seal of a head: ``HMAC-SHA256(key, label + canonical({count, entry_hash}))`` in hex."""
    return site_mac(key, _LABEL_HEAD, canonical({"count": count, "entry_hash": last_hash}))


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Return ``sha256(canonical(entry without entry_hash))`` in hex."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "entry_hash"})).hexdigest()


# --------------------------------------------------------------------------------- helpers
def _check_link(entry: dict[str, Any], number: int, prev: str, lines: list[bytes]) -> AuditProblem | None:
    """Check one parsed entry against its own hash and the entry before it."""
    seq, expected = entry["seq"], number - 1
    if entry["entry_hash"] != entry_hash(entry):
        return AuditProblem(number, "altered", f"entry seq {seq} does not match its entry_hash")
    if seq > expected:
        if any(isinstance(e := _parse(raw), dict) and e["seq"] == expected for raw in lines[number:]):
            detail = f"seq {seq} where seq {expected} was expected; seq {expected} comes later"
            return AuditProblem(number, "reordered", detail)
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
        return AuditProblem(number, "removed", f"{missing} missing (found seq {seq})")
    if seq < expected:
        detail = f"seq {seq} after seq {expected - 1}: entries out of order or replayed"
        return AuditProblem(number, "reordered", detail)
    if entry["prev_hash"] != prev:
        detail = f"entry seq {seq} does not link to the entry before it (one of them was rewritten)"
        return AuditProblem(number, "altered", detail)
    return None


def _parse(raw: bytes) -> dict[str, Any] | str:
    """Return the entry of one line, or a description of what is wrong with it."""
    try:
        entry = strict_json(raw, "an audit entry")
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not a JSON entry ({exc})"
    try:
        _Entry.model_validate(entry)
    except ValidationError as err:
        return f"not an audit entry ({problem(err, spell=_Entry.key_of)})"
    return entry  # as read: its hash covers exactly these values


def _read_head(path: Path) -> _HeadState | None:
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{path} cannot be read ({exc}). {RECOVERY}") from exc
    try:
        head = _Head.model_validate(doc)
    except ValidationError as err:
        wrong = problem(err, spell=_Head.key_of)
        raise IntegrityError(f"{path} is malformed ({wrong}). {RECOVERY}") from None
    return _HeadState(head.count, head.entry_hash, head.mac)


def _write_head(path: Path, count: int, last_hash: str, key: bytes | None) -> None:
    """Replace the head atomically; sealed with ``key`` when the site has one."""
    head: dict[str, Any] = {"count": count, "entry_hash": last_hash}
    if key is not None:
        head["mac"] = head_mac(key, count, last_hash)
    atomic_write_text(path, json.dumps(head, sort_keys=True) + "\n")


def _tail_of(path: Path) -> tuple[bytes | None, int | None]:
    """Return the last complete line of ``path`` (without newline) and where a torn tail starts.

    Reads from the end, so appending stays cheap however long the log grows. The torn tail is
    what follows the last newline (None when the file ends with one).
    """
    if not path.exists():
        return None, None
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = _start_of_last_line(handle, size)  # just after the last newline
        torn_at = end if end < size else None
        if end == 0:
            return None, torn_at
        start = _start_of_last_line(handle, end - 1)
        handle.seek(start)
        return handle.read(end - 1 - start), torn_at


def _start_of_last_line(handle: Any, end: int) -> int:
    """Return the offset just after the last newline before ``end`` (0 if none)."""
    block = 4096
    position = end
    while position > 0:
        step = min(block, position)
        handle.seek(position - step)
        chunk = handle.read(step)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return position - step + newline + 1
        position -= step
    return 0


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
