"""The site's audit log: every reply is recorded before it leaves, and any tampering is found."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client.audit import AUDIT_FILE, GENESIS_HASH, HEAD_FILE, AuditLog, AuditRecord, verify
from client.audit_mod import make_audit_mod
from client.ledger import KEY_FILE, LEDGER_FILE, PrivacyLedger, site_mac
from client.ledger import _write as write_ledger
from client.records import canonical
from client.refusal_mod import refusal_mod
from client.secagg import secure_aggregation_mod
from client.setup import prepare_site_dir
from server.local.cli import main
from shared.errors import EXIT_INTEGRITY, InputError, IntegrityError
from shared.privacy import Charge
from shared.protocol import SITE_REFUSED

ENTRIES = 6
Tamper = Callable[[list[str]], list[str]]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 7
    TaskIdentity.node_id = 0


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        run_id="7", round=i, message_type="train", secagg_stage=None, reply_to=f"m{i}",
        payload_sha256=hashlib.sha256(bytes([i])).hexdigest(), payload_bytes=100 + i,
        epsilon=0.5 * i, decision="accepted",
    )  # fmt: skip


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "site")
    for i in range(ENTRIES):
        log.append(_record(i))
    return tmp_path / "site"


def _lines(site: Path) -> list[str]:
    return (site / AUDIT_FILE).read_text().splitlines(keepends=True)


def _write_lines(site: Path, lines: list[str]) -> None:
    (site / AUDIT_FILE).write_text("".join(lines))


def _context() -> Context:
    return Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _train_message(round_: int = 3) -> Message:
    content = RecordDict(
        {
            "fitins.parameters": ArrayRecord([np.zeros(3, dtype=np.float32)]),
            "fitins.config": ConfigRecord({"server-round": round_, "local-epochs": 1}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


# ------------------------------------------------------------------------------ the chain
def test_untouched_log_verifies(site: Path) -> None:
    # Execute
    report = verify(site)
    last = json.loads(_lines(site)[-1])

    # Assert
    assert report.ok and report.entries == ENTRIES
    assert report.head_hash == last["entry_hash"]
    assert json.loads((site / HEAD_FILE).read_text()) == {"count": ENTRIES, "entry_hash": last["entry_hash"]}


def test_entry_hash_is_sha256_of_canonical_json_chained_from_zeros(site: Path) -> None:
    # Prepare
    entries = [json.loads(line) for line in _lines(site)]

    # Execute
    recomputed = [
        hashlib.sha256(
            json.dumps(
                {k: v for k, v in e.items() if k != "entry_hash"}, sort_keys=True, separators=(",", ":")
            ).encode()
        ).hexdigest()
        for e in entries
    ]

    # Assert
    assert recomputed == [e["entry_hash"] for e in entries]
    assert [e["prev_hash"] for e in entries] == [GENESIS_HASH] + recomputed[:-1]
    assert [e["seq"] for e in entries] == list(range(ENTRIES))


def _edit_field(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["epsilon"] = 0.01
    return [*lines[:2], json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n", *lines[3:]]


def _rehash_entry(lines: list[str]) -> list[str]:
    # A careful forger recomputes the edited entry's own hash; the next entry's link breaks.
    entry = json.loads(lines[2])
    entry["decision"] = "refused: nothing was sent"
    body = {k: v for k, v in entry.items() if k != "entry_hash"}
    entry["entry_hash"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return [*lines[:2], json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n", *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "line", "kind"),
    [
        (_edit_field, 3, "altered"),
        (_rehash_entry, 4, "altered"),
        (lambda lines: [*lines[:2], *lines[3:]], 3, "removed"),
        (lambda lines: lines[1:], 1, "removed"),
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2, "reordered"),
        (lambda lines: [*lines[:4], lines[1], *lines[4:]], 5, "reordered"),
        (lambda lines: lines[:-2], ENTRIES - 1, "truncated"),
        (lambda lines: [*lines[:3], "garbage, not json\n", *lines[4:]], 4, "malformed"),
        (lambda lines: [*lines[:-1], lines[-1][:20]], ENTRIES, "malformed"),
    ],
    ids=["edit", "rehash", "delete", "delete-first", "swap", "replay", "truncate-tail", "garbage", "torn"],
)
def test_tampering_is_found_at_the_right_line(site: Path, tamper: Tamper, line: int, kind: str) -> None:
    # Prepare
    _write_lines(site, tamper(_lines(site)))

    # Execute
    report = verify(site)

    # Assert
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.line, report.problem.kind) == (line, kind), report.problem


def test_replaced_head_is_found(site: Path) -> None:
    # Prepare: an older head, as if the log's tail were forged after it
    (site / HEAD_FILE).write_text(
        json.dumps({"count": 2, "entry_hash": json.loads(_lines(site)[1])["entry_hash"]})
    )

    # Execute
    report = verify(site)

    # Assert
    assert report.problem is not None and report.problem.kind == "altered" and report.problem.line is None


def _edit_last(lines: list[str]) -> list[str]:
    entry = json.loads(lines[-1])
    entry["payload_bytes"] = 1
    return [*lines[:-1], json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"]


@pytest.mark.parametrize(
    "tamper",
    [lambda lines: lines[:-1], _edit_last, lambda lines: [*lines[:-1], "junk\n"]],
    ids=["drop", "edit", "junk"],
)
def test_append_refuses_a_broken_tail_and_writes_nothing(site: Path, tamper: Tamper) -> None:
    # Prepare
    _write_lines(site, tamper(_lines(site)))
    before = (site / AUDIT_FILE).read_bytes()

    # Execute
    with pytest.raises(IntegrityError, match="audit verify"):
        AuditLog(site).append(_record(99))

    # Assert
    assert (site / AUDIT_FILE).read_bytes() == before


def test_interrupted_appends_are_recovered(site: Path) -> None:
    # Prepare: a torn last line (the reply never left), and a head one entry behind
    lines = _lines(site)
    (site / HEAD_FILE).write_text(
        json.dumps({"count": ENTRIES - 1, "entry_hash": json.loads(lines[-2])["entry_hash"]})
    )
    _write_lines(site, [*lines, '{"seq":6,"prev'])

    # Execute
    entry = AuditLog(site).append(_record(6))

    # Assert
    assert entry["seq"] == ENTRIES
    report = verify(site)
    assert report.ok and report.entries == ENTRIES + 1


def test_empty_site_verifies_and_missing_site_is_an_input_error(tmp_path: Path) -> None:
    assert verify(tmp_path).ok and verify(tmp_path).entries == 0
    with pytest.raises(InputError):
        verify(tmp_path / "nope")


def test_nan_epsilon_and_clock_are_recorded(tmp_path: Path) -> None:
    # Prepare
    moment = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    log = AuditLog(tmp_path, clock=lambda: moment)

    # Execute
    entry = log.append(AuditRecord("7", None, "evaluate", None, "", None, 0, float("nan"), "accepted"))

    # Assert
    assert entry["epsilon"] is None and entry["time_utc"] == "2025-01-02T03:04:05+00:00"
    assert verify(tmp_path).ok


_WORKER = """
import sys, time
from pathlib import Path
from client.audit import AuditLog, AuditRecord
site, worker, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not (site / "go").exists():
    time.sleep(0.01)
log = AuditLog(site)
for i in range(count):
    log.append(AuditRecord("7", i, "train", None, f"{worker}-{i}", None, 0, None, "accepted"))
"""


def test_two_processes_appending_leave_a_valid_chain(tmp_path: Path) -> None:
    # Prepare: two ClientApp-like processes, released at the same moment
    count = 100
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), name, str(count)], cwd=REPO)
        for name in ("a", "b")
    ]

    # Execute
    (tmp_path / "go").touch()
    codes = [p.wait(timeout=120) for p in workers]

    # Assert
    assert codes == [0, 0]
    report = verify(tmp_path)
    assert report.ok and report.entries == 2 * count
    replies = [json.loads(line)["reply_to"] for line in _lines(tmp_path)]
    assert sorted(replies) == sorted(f"{w}-{i}" for w in ("a", "b") for i in range(count))


# -------------------------------------------------------------------------------- the mod
def test_mod_records_the_reply_before_returning_it(tmp_path: Path) -> None:
    # Prepare
    reply_content = RecordDict(
        {
            "fitres.parameters": ArrayRecord([np.arange(4, dtype=np.float32)]),
            "fitres.metrics": ConfigRecord({"site": "hospital-a", "epsilon": 1.25}),
        }
    )
    message = _train_message(round_=3)
    mod = make_audit_mod(lambda _: tmp_path)
    seen_on_disk: list[bool] = []

    def client(msg: Message, context: Context) -> Message:
        seen_on_disk.append((tmp_path / AUDIT_FILE).exists())
        return Message(reply_content, reply_to=msg)

    # Execute
    reply = mod(message, _context(), client)
    entries = [json.loads(line) for line in _lines(tmp_path)]

    # Assert
    expected = recorddict_to_proto(reply.content).SerializeToString(deterministic=True)
    assert seen_on_disk == [False]  # nothing logged before the reply existed ...
    assert len(entries) == 1  # ... and the entry was on disk when the mod returned the reply
    entry = entries[0]
    assert entry["payload_sha256"] == hashlib.sha256(expected).hexdigest()
    assert entry["payload_bytes"] == len(expected)
    assert (entry["run_id"], entry["round"], entry["stage"], entry["epsilon"]) == ("7", 3, "train", 1.25)
    assert entry["decision"] == "accepted"
    assert verify(tmp_path).ok


def test_mod_does_not_let_a_reply_leave_when_the_log_is_broken(site: Path) -> None:
    # Prepare
    _write_lines(site, _lines(site)[:-1])
    mod = make_audit_mod(lambda _: site)

    # Execute / Assert
    with pytest.raises(IntegrityError):
        mod(_train_message(), _context(), lambda msg, ctx: Message(RecordDict(), reply_to=msg))


def test_mod_logs_a_refusal_with_its_reason(tmp_path: Path) -> None:
    # Prepare
    mod = make_audit_mod(lambda _: tmp_path)

    def refusing(msg: Message, context: Context) -> Message:
        raise IntegrityError("hospital-a: epsilon 9.0 exceeds the policy's 3.0")

    # Execute
    reply = mod(_train_message(), _context(), lambda msg, ctx: refusal_mod(msg, ctx, refusing))
    entry = json.loads(_lines(tmp_path)[0])

    # Assert
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert entry["decision"] == "refused: hospital-a: epsilon 9.0 exceeds the policy's 3.0"
    error_json = json.dumps(
        {"code": SITE_REFUSED, "reason": reply.error.reason}, sort_keys=True, separators=(",", ":")
    )
    assert entry["payload_sha256"] == hashlib.sha256(error_json.encode()).hexdigest()
    assert entry["epsilon"] is None


def test_mod_logs_a_crash_and_lets_it_through(tmp_path: Path) -> None:
    # Prepare
    mod = make_audit_mod(lambda _: tmp_path)

    def crashing(msg: Message, context: Context) -> Message:
        raise RuntimeError("out of memory")

    # Execute
    with pytest.raises(RuntimeError):
        mod(_train_message(), _context(), crashing)
    entry = json.loads(_lines(tmp_path)[0])

    # Assert
    assert entry["decision"] == "refused: the ClientApp raised RuntimeError: out of memory"
    assert entry["payload_sha256"] is None


def test_mod_records_the_secagg_stage_flower_pops(tmp_path: Path) -> None:
    # Prepare: a real SecAgg+ setup message through CareFL's SecAgg+ mod
    configs = ConfigRecord(
        {
            "stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0,
            "target_range": 1 << 16, "mod_range": 1 << 30, "max_weight": 1000.0,
        }
    )  # fmt: skip
    message = Message(RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1, message_type="train")
    mod = make_audit_mod(lambda _: tmp_path)

    def unreachable(msg: Message, context: Context) -> Message:
        raise AssertionError("the setup stage does not reach the ClientApp")

    # Execute
    reply = mod(message, _context(), lambda msg, ctx: secure_aggregation_mod(msg, ctx, unreachable))
    entry = json.loads(_lines(tmp_path)[0])

    # Assert
    assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {"pk1", "pk2"}
    assert (entry["stage"], entry["secagg_stage"], entry["round"]) == ("train:setup", "setup", None)


def test_mod_metric_record_epsilon(tmp_path: Path) -> None:
    mod = make_audit_mod(lambda _: tmp_path)
    reply_content = RecordDict({"metrics": MetricRecord({"epsilon": 0.75, "accuracy": 0.9})})
    mod(_train_message(), _context(), lambda msg, ctx: Message(reply_content, reply_to=msg))
    assert json.loads(_lines(tmp_path)[0])["epsilon"] == 0.75


# -------------------------------------------------------------------------------- the CLI
def test_cli_verify(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    ok = main(["audit", "verify", "--site-dir", str(site)])
    out = capsys.readouterr().out
    _write_lines(site, [line for i, line in enumerate(_lines(site)) if i != 3])
    bad = main(["audit", "verify", "--site-dir", str(site)])
    err = capsys.readouterr().err

    # Assert
    assert ok == 0 and out.startswith(f"ok: {ENTRIES} entries, head ")
    assert bad == EXIT_INTEGRITY
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line 4: removed" in errors[0], err


# ---------------------------------------------- the seal and the ledger (site key present)
def _charging_client(site: Path) -> Callable[[Message, Context], Message]:
    """A ClientApp stand-in that charges the site's real ledger for each train round, as fit does."""

    def client(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "train":
            server_round = int(msg.content.config_records["fitins.config"]["server-round"])
            PrivacyLedger.open(site).charge(
                run_id=str(msg.metadata.run_id), round=server_round, charge=Charge(1.1, 0.1, 10),
                delta=1e-5, accountant="rdp", max_grad_norm=1.0,
            )  # fmt: skip
        return Message(RecordDict({"metrics": MetricRecord({"epsilon": 0.5})}), reply_to=msg)

    return client


@pytest.fixture()
def charged_site(tmp_path: Path) -> Path:
    """A prepared site (real ledger and key) that answered 3 charged train rounds and an evaluation."""
    site = prepare_site_dir(tmp_path / "hospital", site="Hungary")
    mod = make_audit_mod(lambda _: site)
    for round_ in (1, 2, 3):
        mod(_train_message(round_), _context(), _charging_client(site))
    evaluate = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), dst_node_id=1, message_type="evaluate")
    mod(evaluate, _context(), _charging_client(site))
    return site


def _rewrite_chain(site: Path, head: Callable[[dict[str, object], dict[str, object]], dict[str, object]]) -> None:
    """An attacker without the site key edits entry 2 and rehashes the whole chain and the head."""
    old_head = json.loads((site / HEAD_FILE).read_text())
    entries = [json.loads(line) for line in _lines(site)]
    entries[1]["payload_sha256"] = hashlib.sha256(b"what was really sent").hexdigest()
    prev = GENESIS_HASH
    for entry in entries:
        entry["prev_hash"] = prev
        body = {k: v for k, v in entry.items() if k != "entry_hash"}
        entry["entry_hash"] = prev = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    _write_lines(site, [json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries])
    new_head = {"count": len(entries), "entry_hash": prev}
    (site / HEAD_FILE).write_text(json.dumps(head(new_head, old_head)))


def _verify_cli(site: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["audit", "verify", "--site-dir", str(site)])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 0 or len(errors) == 1, captured.err
    return code, errors[0] if errors else captured.out


def test_head_is_sealed_with_the_site_key(charged_site: Path) -> None:
    # Prepare
    key = (charged_site / KEY_FILE).read_bytes()
    head = json.loads((charged_site / HEAD_FILE).read_text())
    body = json.dumps({"count": head["count"], "entry_hash": head["entry_hash"]}, sort_keys=True, separators=(",", ":"))

    # Execute
    report = verify(charged_site)

    # Assert: the documented recipe recomputes the seal
    assert head["mac"] == hmac.new(key, b"carefl-audit/v1/head\x00" + body.encode(), hashlib.sha256).hexdigest()
    assert report.ok and report.sealed and report.entries == 4 and report.charged_rounds == 3


def test_deleting_the_audit_log_of_a_charged_ledger_is_found(
    charged_site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    (charged_site / AUDIT_FILE).unlink()
    (charged_site / HEAD_FILE).unlink()

    # Execute
    code, line = _verify_cli(charged_site, capsys)

    # Assert
    assert code == EXIT_INTEGRITY
    assert "audit.jsonl and audit.head are missing" in line and "3 charged round(s)" in line
    assert "first: run 7 round 1" in line


def test_a_charged_round_without_its_entry_is_found(charged_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: round 4 is charged, but its reply never reached the audit log
    PrivacyLedger.open(charged_site).charge(
        run_id="7", round=4, charge=Charge(1.1, 0.1, 10), delta=1e-5, accountant="rdp", max_grad_norm=1.0
    )

    # Execute
    code, line = _verify_cli(charged_site, capsys)

    # Assert
    assert code == EXIT_INTEGRITY
    assert "privacy-ledger.json: missing:" in line and "1 of them have no train entry" in line
    assert "run 7 round 4" in line


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (lambda new, old: new, "audit.head: unsealed: audit.head is not sealed"),
        (lambda new, old: {**new, "mac": old["mac"]}, "audit.head: altered: the seal of audit.head does not verify"),
    ],
    ids=["seal-dropped", "old-seal-kept"],
)
def test_a_complete_rewrite_without_the_key_is_found(
    charged_site: Path, capsys: pytest.CaptureFixture[str], head: Callable[..., dict[str, object]], found: str
) -> None:
    # Prepare: the chain is consistent again, only the seal can tell
    _rewrite_chain(charged_site, head)
    assert _verify_chain_only(charged_site)

    # Execute
    code, line = _verify_cli(charged_site, capsys)

    # Assert
    assert code == EXIT_INTEGRITY
    assert found in line
    with pytest.raises(IntegrityError, match="seal|not sealed"):
        AuditLog(charged_site).append(_record(9))


def _verify_chain_only(site: Path) -> bool:
    """Whether the chain alone (no key, no ledger) verifies: a copy of the log without its site."""
    bare = site.parent / "bare"
    bare.mkdir()
    for name in (AUDIT_FILE, HEAD_FILE):
        doc = (site / name).read_text()
        (bare / name).write_text(doc if name == AUDIT_FILE else json.dumps({k: v for k, v in json.loads(doc).items() if k != "mac"}))
    return verify(bare).ok


def _legacy_ledger(site: Path) -> None:
    """Rewrite the site's ledger as a ledger created before heads were sealed (no header flag)."""
    key = (site / KEY_FILE).read_bytes()
    doc = json.loads((site / LEDGER_FILE).read_text())
    header = {k: v for k, v in doc["header"].items() if k != "seals_audit_head"}
    records, prev = [], site_mac(key, b"carefl-ledger/v1/header\x00", canonical(header))
    header_mac = prev
    for record in doc["entries"]:
        body = {k: v for k, v in record.items() if k not in ("mac", "prev_mac")} | {"prev_mac": prev}
        body["mac"] = prev = site_mac(key, b"carefl-ledger/v1/entry\x00", canonical(body) + prev.encode())
        records.append(body)
    write_ledger(site / LEDGER_FILE, key, header, header_mac, records)


def test_a_log_written_before_heads_were_sealed_still_verifies(
    charged_site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: an older site: its ledger has no seals_audit_head, its head no mac
    _legacy_ledger(charged_site)
    head = json.loads((charged_site / HEAD_FILE).read_text())
    (charged_site / HEAD_FILE).write_text(json.dumps({"count": head["count"], "entry_hash": head["entry_hash"]}))
    assert not PrivacyLedger.open(charged_site).seals_audit_head

    # Execute
    before = verify(charged_site)
    code, out = _verify_cli(charged_site, capsys)
    AuditLog(charged_site).append(_record(9))
    after = verify(charged_site)

    # Assert: verified as before (unsealed, said so), and sealed by the next append
    assert before.ok and not before.sealed and before.charged_rounds == 3
    assert code == 0 and "head not sealed" in out
    assert after.ok and after.sealed and after.entries == 5
    assert "mac" in json.loads((charged_site / HEAD_FILE).read_text())
