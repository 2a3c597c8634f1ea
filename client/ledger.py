"""A hospital's privacy ledger: every DP-SGD charge its data ever paid, kept at the site.

The ledger lives in the site directory as two files:

``privacy-ledger.json``
    A header (format, version, site, creation time, key id and, in ledgers created since audit
    heads are sealed, ``seals_audit_head: true``), then one entry per charged round
    (run, round, noise multiplier, sample rate, steps, delta, accountant, clipping norm, time),
    then the entry count and the last entry's MAC, sealed together.
``ledger.key``
    32 random bytes (mode 0600), the *site key*: it authenticates the ledger with HMAC-SHA256,
    and it seals the head of the site's audit log (:mod:`client.audit`).

Epsilon is never stored: :meth:`PrivacyLedger.spent` recomputes it from the charges with
:func:`shared.privacy.epsilon`, per run or over the site's lifetime (all runs composed). A
round is charged *before* its model update leaves the site, and :meth:`PrivacyLedger.charge`
returns only once the new ledger is on disk (temp file, fsync, rename, directory fsync), so a
crash can only over-count, never under-count.

The ledger fails closed: a missing, unreadable, corrupt or tampered ledger raises
:class:`LedgerError`, which says how to recover; the node must not train until it verifies.
It never silently starts again from zero.

Integrity
---------
With ``canonical(x) = json.dumps(x, sort_keys=True, separators=(",", ":"))`` and
``H(label, data) = HMAC-SHA256(key, label + data)``:

- ``header_mac = H("header", canonical(header))``;
- entry ``i`` stores ``prev_mac`` (``header_mac`` for the first entry, else entry ``i-1``'s
  ``mac``) and ``mac = H("entry", canonical(entry without mac) + prev_mac)``: a hash chain;
- ``seal = H("seal", canonical({header, count, head_mac}))`` where ``head_mac`` is the last
  entry's ``mac`` (``header_mac`` when empty), so dropping entries from the end is detected.

MACs are compared with :func:`hmac.compare_digest`.

What this protects against: any edit, insertion, removal (in the middle or at the end) or
reordering of entries, and any change of the header, count or seal, made by someone who does
not hold ``ledger.key``; a key that is not this ledger's; a truncated or half-written file.

What it does not protect against: rolling back *both* files to an older backup (the older
ledger verifies, and the privacy spent since is forgotten), or anyone holding ``ledger.key``
(who can write any ledger). Detecting those needs an anchor outside the site directory, such
as the server's receipts of the charges. The audit log and the ledger vouch for each other:
``carefl audit verify`` refuses a ledger whose charged rounds have no entry in the audit log.

``seals_audit_head`` is covered by the header's MAC, so it cannot be removed without the key:
a ledger that carries it requires a sealed audit head (a ledger created before it does not,
so that audit logs written before heads were sealed still verify).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from client.records import Clock, canonical, locked, strict_json, utc_now, utc_timestamp
from shared.atomic import atomic_write_bytes, fsync_path
from shared.errors import IntegrityError
from shared.log import log
from shared.privacy import ACCOUNTANTS, Charge, epsilon
from shared.schema import Document, problem

__all__ = [
    "KEY_FILE",
    "LEDGER_FILE",
    "LOCK_FILE",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "read_site_key",
    "site_mac",
    "same_mac",
]

LEDGER_FILE = "privacy-ledger.json"
KEY_FILE = "ledger.key"
LOCK_FILE = "ledger.lock"
FORMAT = "carefl-privacy-ledger"
VERSION = 1
KEY_BYTES = 32

RECOVERY = (
    f"Restore {LEDGER_FILE} and {KEY_FILE} from the site's backup; the node will not train until "
    "the ledger verifies. Never delete the ledger: a new one would forget the privacy already spent."
)

_LABEL_HEADER = b"carefl-ledger/v1/header\x00"
_LABEL_ENTRY = b"carefl-ledger/v1/entry\x00"
_LABEL_SEAL = b"carefl-ledger/v1/seal\x00"
_LABEL_KEY_ID = b"carefl-ledger/v1/key-id\x00"

_D = TypeVar("_D", bound=Document)


class LedgerError(IntegrityError):
    """The privacy ledger is missing, unreadable or does not verify; the node must not train."""


class LedgerEntry(Document):
    """One charged round of DP-SGD at this site.

    Attributes
    ----------
    seq : int
        Position in the ledger, from 0.
    run_id : str
        The federated run the round belongs to.
    round : int
        The server round charged.
    noise_multiplier : float
        Noise standard deviation divided by ``max_grad_norm``.
    sample_rate : float
        Poisson sampling rate per step.
    steps : int
        DP-SGD steps the round may take.
    delta : float
        Delta of the run's guarantee.
    accountant : str
        Accountant the run used (``rdp`` or ``prv``).
    max_grad_norm : float
        Per-sample clipping bound.
    time_utc : str
        When the charge was written (ISO 8601, UTC).
    """

    seq: int
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    max_grad_norm: float
    time_utc: str

    @property
    def charge(self) -> Charge:
        """The (noise multiplier, sample rate, steps) triple the accountant composes."""
        return Charge(self.noise_multiplier, self.sample_rate, self.steps)


class _Record(LedgerEntry):
    """An entry as stored: its fields, then its link to the entry before it and its own MAC."""

    prev_mac: str
    mac: str


class _Header(Document):
    """The ledger's header (what its MAC and the seal cover)."""

    format: Literal["carefl-privacy-ledger"]
    version: int
    site: str
    created_utc: str
    key_id: str
    seals_audit_head: bool = False  # absent from ledgers created before audit heads were sealed


class _Layout(Document):
    """The privacy ledger file: header, entries (each a :class:`_Record`), count and seal."""

    header: _Header
    header_mac: str
    entries: list[dict[str, Any]]
    count: int
    head_mac: str
    seal: str


@dataclass(frozen=True)
class _State:
    """A verified ledger as read from disk."""

    header: dict[str, Any]
    entries: tuple[LedgerEntry, ...]
    records: tuple[dict[str, Any], ...]
    head_mac: str


class PrivacyLedger:
    """The privacy ledger of one site directory. Create with :meth:`init`, then :meth:`open`.

    Parameters
    ----------
    site_dir : Path
        Directory holding the ledger and its key.
    state : _State
        The verified content (internal; use :meth:`open`).
    now : Callable[[], datetime] | None
        Clock for entry times (timezone-aware); ``datetime.now(UTC)`` by default.
    """

    def __init__(self, site_dir: Path, state: _State, *, now: Clock | None = None) -> None:
        self._dir = Path(site_dir)
        self._state = state
        self._now: Clock = now or utc_now

    # ----------------------------------------------------------------- creation and loading
    @classmethod
    def init(cls, site_dir: Path, *, site: str, now: Clock | None = None) -> PrivacyLedger:
        """Create the key and an empty ledger in ``site_dir``; once per site, ever.

        Parameters
        ----------
        site_dir : Path
            The site directory (created if missing).
        site : str
            Name of the site, recorded in the header.
        now : Callable[[], datetime] | None
            Clock (timezone-aware); UTC now by default.

        Raises
        ------
        LedgerError
            If a ledger or a key already exists there.
        """
        if not isinstance(site, str) or not site.strip():
            raise ValueError(f"`site` must be a non-empty string, got {site!r}")
        site_dir = Path(site_dir)
        site_dir.mkdir(parents=True, exist_ok=True)
        clock = now or utc_now
        with locked(site_dir / LOCK_FILE):
            existing = [name for name in (LEDGER_FILE, KEY_FILE) if (site_dir / name).exists()]
            if existing:
                raise LedgerError(
                    f"a ledger already exists in {site_dir} ({', '.join(existing)} found); never "
                    "re-initialise: that would forget the privacy already spent. Open it instead, or, "
                    f"if it does not verify: {RECOVERY}"
                )
            created = utc_timestamp(clock, "the ledger")  # before any file is written: a bad clock leaves nothing
            key = _create_key(site_dir / KEY_FILE)
            header = {
                "format": FORMAT,
                "version": VERSION,
                "site": site,
                "created_utc": created,
                "key_id": site_mac(key, _LABEL_KEY_ID, b""),
                "seals_audit_head": True,
            }
            header_mac = site_mac(key, _LABEL_HEADER, canonical(header))
            _write(site_dir / LEDGER_FILE, key, header, header_mac, [])
        return cls.open(site_dir, now=now)

    @classmethod
    def open(cls, site_dir: Path, *, now: Clock | None = None) -> PrivacyLedger:
        """Read and verify the ledger of ``site_dir``.

        Parameters
        ----------
        site_dir : Path
            The site directory.
        now : Callable[[], datetime] | None
            Clock for later charges (timezone-aware); UTC now by default.

        Raises
        ------
        LedgerError
            If the ledger or its key is missing, unreadable, malformed or does not verify; the
            message names the file, the problem and how to recover.
        """
        site_dir = Path(site_dir)
        state, _ = _load(site_dir)
        return cls(site_dir, state, now=now)

    # ----------------------------------------------------------------------------- queries
    @property
    def site(self) -> str:
        """The site named in the header."""
        return str(self._state.header["site"])

    @property
    def seals_audit_head(self) -> bool:
        """Whether this site's audit head must be sealed with the site key (ledgers created since)."""
        return bool(self._state.header.get("seals_audit_head", False))

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._dir / LEDGER_FILE

    @property
    def key_path(self) -> Path:
        """The key file."""
        return self._dir / KEY_FILE

    def entries(self, run_id: str | None = None) -> list[LedgerEntry]:
        """Return the entries of ``run_id`` (all runs if None), in ledger order."""
        return [e for e in self._state.entries if run_id is None or e.run_id == run_id]

    def run_ids(self) -> list[str]:
        """Return the runs charged, in first-seen order."""
        return list(dict.fromkeys(e.run_id for e in self._state.entries))

    def charges(self, run_id: str | None = None) -> list[Charge]:
        """Return the charges of ``run_id`` (all runs, i.e. the lifetime, if None)."""
        return [e.charge for e in self.entries(run_id)]

    def spent(self, *, run_id: str | None, delta: float, accountant: str = "rdp") -> float:
        """Return the epsilon spent by ``run_id``, or over the site's lifetime if None.

        Recomputed from the charges with :func:`shared.privacy.epsilon`, never summed.

        Parameters
        ----------
        run_id : str | None
            One run, or None for all runs composed.
        delta : float
            Delta at which epsilon is reported.
        accountant : str
            ``rdp`` or ``prv``.
        """
        return epsilon(self.charges(run_id), delta=delta, accountant=accountant)

    def rounds_charged(self, run_id: str) -> list[int]:
        """Return the distinct rounds of ``run_id`` charged, ascending (a retried round once)."""
        return sorted({e.round for e in self.entries(run_id)})

    # ----------------------------------------------------------------------------- charging
    def charge(
        self,
        *,
        run_id: str,
        round: int,
        charge: Charge,
        delta: float,
        accountant: str,
        max_grad_norm: float,
        expect_entries: int | None = None,
    ) -> LedgerEntry:
        """Append one round's charge and return once it is durably on disk.

        Call this *before* the round's model update leaves the site. Under an exclusive lock on
        ``ledger.lock`` the ledger is re-read and verified from disk, the entry appended and the
        file replaced atomically (fsync'd); this object is then refreshed from the result.

        Parameters
        ----------
        run_id : str
            The federated run.
        round : int
            The server round (>= 0).
        charge : Charge
            Noise multiplier, sample rate and steps of the round.
        delta : float
            Delta of the run, in (0, 1).
        accountant : str
            ``rdp`` or ``prv``.
        max_grad_norm : float
            Per-sample clipping bound (> 0).
        expect_entries : int, optional
            The number of entries the caller's budget check saw; if another process charged
            the ledger since, nothing is written and :class:`LedgerError` is raised, so a
            budget is never checked against a stale ledger.

        Raises
        ------
        LedgerError
            If the ledger on disk does not verify, is not the one this object opened, or
            changed since the caller's budget check.
        """
        _check_charge_args(run_id, round, charge, delta, accountant, max_grad_norm)
        with locked(self._dir / LOCK_FILE):
            state, key = _load(self._dir)
            if state.header != self._state.header:
                raise LedgerError(
                    f"{self.path}: the ledger was replaced by another one since it was opened "
                    f"(header {state.header} != {self._state.header}). {RECOVERY}"
                )
            if expect_entries is not None and len(state.entries) != expect_entries:
                raise LedgerError(
                    f"{self.path}: another run charged this ledger since the budget was checked "
                    f"({len(state.entries)} entries, expected {expect_entries}); nothing was "
                    "charged and the round is declined. It can be retried."
                )
            entry = LedgerEntry(
                seq=len(state.entries),
                run_id=run_id,
                round=int(round),
                noise_multiplier=float(charge.noise_multiplier),
                sample_rate=float(charge.sample_rate),
                steps=int(charge.steps),
                delta=float(delta),
                accountant=accountant,
                max_grad_norm=float(max_grad_norm),
                time_utc=utc_timestamp(self._now, "the ledger"),
            )
            header_mac = site_mac(key, _LABEL_HEADER, canonical(state.header))
            records = [*state.records, _seal_entry(key, entry, state.head_mac)]
            _write(self.path, key, state.header, header_mac, records)
            self._state, _ = _load(self._dir)
        return entry


# ------------------------------------------------------------------------------ the site key
def read_site_key(site_dir: Path) -> bytes | None:
    """Return the site key (``ledger.key``) of ``site_dir``, or None if the site has none.

    Raises
    ------
    LedgerError
        If the key file exists but cannot be read or is not a key.
    """
    if not (Path(site_dir) / KEY_FILE).exists():
        return None
    return _read_key(Path(site_dir))


def site_mac(key: bytes, label: bytes, data: bytes) -> str:
    """``HMAC-SHA256(key, label + data)`` in hex; ``label`` separates the uses of one key."""
    return hmac.new(key, label + data, hashlib.sha256).hexdigest()


def same_mac(a: object, b: str) -> bool:
    """Whether ``a`` is the MAC ``b`` (a string compared in constant time)."""
    return isinstance(a, str) and hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


# --------------------------------------------------------------------------------- helpers

def _seal_mac(key: bytes, header: dict[str, Any], count: int, head_mac: str) -> str:
    return site_mac(key, _LABEL_SEAL, canonical({"header": header, "count": count, "head_mac": head_mac}))


def _seal_entry(key: bytes, entry: LedgerEntry, prev_mac: str) -> dict[str, Any]:
    """Return the stored record of ``entry``: its fields, ``prev_mac`` and ``mac``."""
    record: dict[str, Any] = {**entry.model_dump(), "prev_mac": prev_mac}
    record["mac"] = site_mac(key, _LABEL_ENTRY, canonical(record) + prev_mac.encode("ascii"))
    return record


def _create_key(path: Path) -> bytes:
    """Write a fresh 32-byte key to ``path`` (mode 0600, refusing to overwrite) and return it."""
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)
    return key


def _write(
    path: Path, key: bytes, header: dict[str, Any], header_mac: str, records: list[dict[str, Any]]
) -> None:
    head_mac = records[-1]["mac"] if records else header_mac
    doc = {
        "header": header,
        "header_mac": header_mac,
        "entries": records,
        "count": len(records),
        "head_mac": head_mac,
        "seal": _seal_mac(key, header, len(records), head_mac),
    }
    text = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("ascii"))


def _fail(path: Path, problem: str) -> LedgerError:
    return LedgerError(f"{path}: {problem}. {RECOVERY}")


def _parse(path: Path, model: type[_D], data: object, what: str) -> _D:
    """Validate ``data`` as ``model``, or fail saying ``what`` is wrong and why."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _fail(path, f"{what} ({problem(err, spell=model.key_of)})") from None


def _read_key(site_dir: Path) -> bytes:
    path = site_dir / KEY_FILE
    try:
        key = path.read_bytes()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise _fail(path, f"cannot read the ledger key ({exc.strerror or exc})") from exc
    if len(key) != KEY_BYTES:
        raise _fail(path, f"the ledger key is {len(key)} bytes, expected {KEY_BYTES}")
    if mode & 0o077:
        log(
            WARNING,
            "%s is readable by others (mode %o): anyone who can read it can forge the "
            "privacy ledger; chmod 600 it",
            path,
            mode,
        )
    return key


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read the privacy ledger ({exc.strerror or exc})") from exc
    try:
        doc = strict_json(raw, "a privacy ledger")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"the privacy ledger is not valid JSON ({exc})") from exc
    layout = _parse(path, _Layout, doc, "the privacy ledger is malformed, not a CareFL privacy ledger")
    version = layout.header.version
    if version != VERSION:
        raise _fail(
            path,
            f"unsupported ledger format version {version!r}; this CareFL reads version "
            f"{VERSION} (use the CareFL release that wrote it)",
        )
    return doc


def _load(site_dir: Path) -> tuple[_State, bytes]:
    """Read both files of ``site_dir``, verify the ledger and return it with its key.

    Raises
    ------
    LedgerError
        If either file is missing or unreadable, or the ledger does not verify.
    """
    ledger, key_path = site_dir / LEDGER_FILE, site_dir / KEY_FILE
    has_ledger, has_key = ledger.exists(), key_path.exists()
    if not has_ledger and not has_key:
        raise LedgerError(
            f"no privacy ledger in {site_dir}: initialise it once with "
            f"`carefl budget --init --site-dir {site_dir}`. If this site has trained before, restore "
            f"{LEDGER_FILE} and {KEY_FILE} from its backup instead: a new ledger would forget the "
            "privacy already spent."
        )
    if not has_ledger:
        raise _fail(ledger, f"the privacy ledger is missing although its key {key_path} exists")
    if not has_key:
        raise _fail(key_path, f"the ledger key is missing although the privacy ledger {ledger} exists")
    doc = _read_doc(ledger)
    key = _read_key(site_dir)
    return _verify(ledger, key, doc), key


def _verify(path: Path, key: bytes, doc: dict[str, Any]) -> _State:
    """Check key id, header MAC, the entry chain and the seal, in that order."""
    header = doc["header"]
    if not same_mac(header["key_id"], site_mac(key, _LABEL_KEY_ID, b"")):
        raise _fail(path, f"{KEY_FILE} is not the key of this ledger (or the header's key id was altered)")
    header_mac = site_mac(key, _LABEL_HEADER, canonical(header))
    if not same_mac(doc["header_mac"], header_mac):
        raise _fail(path, "the header was altered (its MAC does not verify)")
    entries, prev = _verify_chain(path, key, doc["entries"], header_mac)
    if not same_mac(doc["seal"], _seal_mac(key, header, doc["count"], doc["head_mac"])):
        raise _fail(path, "the seal over count and head_mac was altered (its MAC does not verify)")
    if doc["count"] != len(entries):
        raise _fail(
            path,
            f"the ledger holds {len(entries)} entries but its seal records {doc['count']}: "
            "entries were removed from (or added at) the end",
        )
    if not same_mac(doc["head_mac"], prev):
        raise _fail(path, "the last entry is not the one the seal records: entries were replaced at the end")
    return _State(header=header, entries=tuple(entries), records=tuple(doc["entries"]), head_mac=prev)


def _verify_chain(
    path: Path, key: bytes, records: list[dict[str, Any]], header_mac: str
) -> tuple[list[LedgerEntry], str]:
    """Verify each record's layout, link and MAC; return the entries and the last MAC."""
    entries: list[LedgerEntry] = []
    prev = header_mac
    for position, record in enumerate(records):
        stored = _parse(path, _Record, record, f"entry at position {position} is malformed")
        if not same_mac(stored.prev_mac, prev):
            raise _fail(
                path,
                f"entry at position {position} does not follow the entry before it: entries were "
                "removed, inserted or reordered",
            )
        body = {k: v for k, v in record.items() if k != "mac"}
        if not same_mac(stored.mac, site_mac(key, _LABEL_ENTRY, canonical(body) + prev.encode("ascii"))):
            raise _fail(path, f"entry at position {position} was altered (its MAC does not verify)")
        entries.append(_entry_of(path, position, stored))
        prev = stored.mac
    return entries, prev


def _entry_of(path: Path, position: int, stored: _Record) -> LedgerEntry:
    """The :class:`LedgerEntry` of a verified record, whose position and charge must be sound."""
    entry = LedgerEntry(**stored.model_dump(exclude={"prev_mac", "mac"}))
    if entry.seq != position:
        raise _fail(path, f"entry at position {position} carries sequence number {entry.seq}")
    try:
        Charge(entry.noise_multiplier, entry.sample_rate, entry.steps)  # validates the triple
    except ValueError as exc:
        raise _fail(path, f"entry at position {position} holds an invalid charge ({exc})") from exc
    return entry


def _check_charge_args(
    run_id: str, round: int, charge: Charge, delta: float, accountant: str, max_grad_norm: float
) -> None:
    """Validate :meth:`PrivacyLedger.charge`'s arguments, naming the bad one."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"`run_id` must be a non-empty string, got {run_id!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"`round` must be an int >= 0, got {round!r}")
    if not isinstance(charge, Charge):
        raise TypeError(f"`charge` must be a shared.privacy.Charge, got {type(charge).__name__}")
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"`max_grad_norm` must be > 0, got {max_grad_norm!r}")
