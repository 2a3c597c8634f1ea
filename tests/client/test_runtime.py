"""The site's runtime decides what runs on its data: an approved app runs the installed CareFL,
any other FAB is refused with its SHA-256 named and audited, and no code of a FAB ever runs."""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.audit import AUDIT_FILE, verify
from client.policy import SitePolicy, approve_app
from client.runtime.task import answer
from client.setup import prepare_site_dir
from client.site import POLICY_FILE
from shared.backbones import BackboneRegistry
from shared.errors import InputError
from shared.fab import build_fab, read_fab
from shared.protocol import APP_REFUSED, BACKBONE_MESSAGE_TYPE, BACKBONE_RECORD

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "carefl"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "carefl"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
num-rounds = 1
"""


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0


def _modified_app(folder: Path, marker: Path) -> bytes:
    """A FAB named like CareFL whose ClientApp skips the ledger, and whose import leaves ``marker``."""
    (folder / "client").mkdir(parents=True)
    (folder / "server").mkdir()
    (folder / "pyproject.toml").write_text(_PYPROJECT)
    (folder / "client" / "__init__.py").write_text("")
    (folder / "server" / "__init__.py").write_text("")
    (folder / "server" / "app.py").write_text("app = None\n")
    (folder / "client" / "app.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the FAB ran')\n"
        "raise RuntimeError('this ClientApp skips the privacy ledger')\n"
    )
    return build_fab(folder)


def _site(tmp_path: Path, approved: tuple[str, ...] = ()) -> Path:
    site = prepare_site_dir(tmp_path / "pecs", site="Pecs", policy=SitePolicy(approved=approved))
    return site


def _context(site: Path) -> Context:
    node = {"site-dir": str(site), "partition-id": 0, "num-partitions": 1}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _query() -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type="query")


class _Installed:
    """Stands for the installed CareFL: counts the messages it answers."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> ClientApp:
        app = ClientApp()

        @app.query()
        def query(message: Message, context: Context) -> Message:
            self.calls += 1
            return Message(RecordDict({"answer": ConfigRecord({"by": "installed"})}), reply_to=message)

        return app


def test_fab_fingerprint_is_flowers_hash_of_the_bundle(tmp_path: Path) -> None:
    # Prepare
    content = _modified_app(tmp_path / "app", tmp_path / "marker")

    # Execute
    info = read_fab(content)

    # Assert: SHA-256 of the bytes `flwr run` sends, its manifest, and nothing of it ran
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    assert info.fab_id == "carefl/carefl" and info.version == "0.1.0"
    assert {path for path, _, _ in info.files} == {
        "pyproject.toml", "client/__init__.py", "client/app.py", "server/__init__.py", "server/app.py"
    }
    app_py = (tmp_path / "app" / "client" / "app.py").read_bytes()
    assert (hashlib.sha256(app_py).hexdigest(), len(app_py)) in {(d, n) for p, d, n in info.files if p == "client/app.py"}
    assert build_fab(tmp_path / "app") == content  # deterministic: the hospital rebuilds the same bytes
    assert not (tmp_path / "marker").exists()
    with pytest.raises(InputError, match="not a Flower App Bundle"):
        read_fab(b"not a zip")


def test_unapproved_fab_is_refused_naming_its_hash_and_audited(tmp_path: Path) -> None:
    # Prepare: the site approved another app
    marker = tmp_path / "marker"
    content = _modified_app(tmp_path / "app", marker)
    sha = hashlib.sha256(content).hexdigest()
    site = _site(tmp_path, approved=("0" * 64,))
    installed = _Installed()

    # Execute
    reply = answer(_query(), _context(site), content, fab_id="carefl/carefl", installed=installed)

    # Assert: an error reply naming the hash; nothing ran, neither the installed app nor the FAB's
    assert reply.has_error() and reply.error.code == APP_REFUSED
    assert sha in reply.error.reason and "pecs: " in reply.error.reason and "carefl app approve" in reply.error.reason
    assert installed.calls == 0 and not marker.exists()
    (entry,) = [json.loads(line) for line in (site / AUDIT_FILE).read_text().splitlines()]
    assert entry["decision"].startswith("refused: ") and sha in entry["decision"]
    assert entry["run_id"] == "7" and entry["message_type"] == "query" and entry["epsilon"] is None
    assert verify(site).ok


def test_policy_without_apps_table_approves_nothing(tmp_path: Path) -> None:
    # Prepare: a policy file written before `[apps]` existed
    content = _modified_app(tmp_path / "app", tmp_path / "marker")
    site = _site(tmp_path)
    policy = site / POLICY_FILE
    policy.write_text("[privacy]\nrequire_dp = true\n")

    # Execute
    reply = answer(_query(), _context(site), content, installed=_Installed())

    # Assert
    assert reply.has_error() and reply.error.code == APP_REFUSED
    assert SitePolicy.load(policy).approved == ()


def test_approved_fab_runs_the_installed_app_never_its_own_code(tmp_path: Path) -> None:
    # Prepare: the site approved exactly this FAB, whose own ClientApp would skip the ledger
    marker = tmp_path / "marker"
    content = _modified_app(tmp_path / "app", marker)
    site = _site(tmp_path)
    approve_app(site / POLICY_FILE, hashlib.sha256(content).hexdigest())
    installed = _Installed()
    modules_before = set(sys.modules)

    # Execute
    reply = answer(_query(), _context(site), content, fab_id="carefl/carefl", installed=installed)

    # Assert: the installed app answered; the FAB's module never ran, nothing of it was unpacked
    assert not reply.has_error() and reply.content.config_records["answer"]["by"] == "installed"
    assert installed.calls == 1 and not marker.exists()
    assert not [name for name in set(sys.modules) - modules_before if str(tmp_path) in str(getattr(sys.modules[name], "__file__", ""))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "pecs"]


def test_approved_fab_is_answered_by_installed_carefl_with_its_audit(tmp_path: Path, heart_registry: Path) -> None:
    # Prepare: a backbone offer under an approved FAB (the real installed ClientApp answers)
    content = _modified_app(tmp_path / "app", tmp_path / "marker")
    site = _site(tmp_path, approved=(hashlib.sha256(content).hexdigest(),))
    manifest = BackboneRegistry(heart_registry).resolve("heart-mlp-cleveland").manifest
    offer = Message(
        RecordDict({BACKBONE_RECORD: ConfigRecord({"sha256": manifest.sha256, "manifest": manifest.to_json()})}),
        dst_node_id=1,
        message_type=BACKBONE_MESSAGE_TYPE,
    )

    # Execute: the default `installed` is this machine's client.app
    reply = answer(offer, _context(site), content)

    # Assert: CareFL's backbone mod answered and its audit mod recorded it; the FAB's code did not run
    assert reply.content.config_records[BACKBONE_RECORD]["status"] == "need"
    (entry,) = [json.loads(line) for line in (site / AUDIT_FILE).read_text().splitlines()]
    assert entry["decision"] == "accepted" and entry["message_type"] == BACKBONE_MESSAGE_TYPE
    assert not (tmp_path / "marker").exists()


def test_approve_command_shows_the_app_then_records_its_hash(tmp_path: Path) -> None:
    # Prepare
    import typer
    from typer.testing import CliRunner

    from client.cli import register

    content = _modified_app(tmp_path / "app", tmp_path / "marker")
    fab = tmp_path / "app.fab"
    fab.write_bytes(content)
    site = _site(tmp_path)
    root = typer.Typer()
    register(root)
    runner = CliRunner()

    # Execute: declined at the prompt, then approved
    declined = runner.invoke(root, ["app", "approve", str(fab), "--site-dir", str(site)], input="n\n")
    policy_after_decline = SitePolicy.load(site / POLICY_FILE)
    approved = runner.invoke(root, ["app", "approve", str(fab), "--site-dir", str(site), "--yes"])
    again = runner.invoke(root, ["app", "approve", hashlib.sha256(content).hexdigest(), "--site-dir", str(site), "--yes"])

    # Assert
    sha = hashlib.sha256(content).hexdigest()
    assert declined.exit_code == 1 and policy_after_decline.approved == ()
    assert approved.exit_code == 0, approved.output
    assert "carefl/carefl" in approved.output and sha in approved.output and "client/app.py" in approved.output
    assert again.exit_code == 0 and "not shown" in again.output
    assert SitePolicy.load(site / POLICY_FILE).approved == (sha,)


def test_fab_is_a_zip_of_its_files(tmp_path: Path) -> None:
    # Independent reading of the bundle with zipfile: the manifest lists every file but itself
    content = _modified_app(tmp_path / "app", tmp_path / "marker")
    names = set(zipfile.ZipFile(BytesIO(content)).namelist())
    assert names - {".info/CONTENT"} == {path for path, _, _ in read_fab(content).files}


def test_node_runs_its_supernode_in_process_isolation_with_its_own_runtime(tmp_path: Path) -> None:
    # Prepare
    from client.node import NodeOptions, supernode_command
    from client.runtime.superexec import runtime_command, task_command
    from client.service import runtime_secret

    options = NodeOptions(superlink="127.0.0.1:9092", site_dir=tmp_path / "site", credentials=None, partition=(0, 2), port=9999)

    # Execute
    secret = runtime_secret(tmp_path / "home")
    node = supernode_command(options, auth_secret_file=secret)
    runtime = runtime_command("127.0.0.1:9999", 1234, auth_secret_file=secret)
    task = task_command("127.0.0.1:9999", "TOKEN", 1234)

    # Assert: no FAB runner of Flower's is started; the runtime and each task run this Python's CareFL
    assert node[node.index("--isolation") + 1] == "process"
    assert node[node.index("--superexec-auth-secret-file") + 1] == str(secret) == runtime[runtime.index("--auth-secret-file") + 1]
    assert node[:4] == [sys.executable, "-P", "-m", "client.runtime.supernode"]  # Flower's, idle poll capped
    assert runtime[:4] == [sys.executable, "-P", "-m", "client.runtime.superexec"]
    assert task[:4] == [sys.executable, "-P", "-m", "client.runtime.task"] and "TOKEN" in task
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600
    assert runtime_secret(tmp_path / "home").read_bytes() == secret.read_bytes()  # made once


def test_policy_built_in_code_takes_lists_for_every_table() -> None:
    # Both tables' list-to-tuple validators survive in the flat SitePolicy
    policy = SitePolicy(allowed_tasks=["chest-xray"], approved=["a" * 64])
    assert policy.allowed_tasks == ("chest-xray",) and policy.approved == ("a" * 64,)
