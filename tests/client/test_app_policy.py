"""The site's policy is enforced on every message that touches its data, and at node start-up.

Messages go through the real ClientApp (mods, SiteClient) with a real site directory (ledger,
policy file, audit log): a refusal must come back as the ``SITE_REFUSED`` error reply and be
written to the audit log, and nothing may be read or stored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import create_client_app
from client.audit import AUDIT_FILE, verify
from client.ledger import PrivacyLedger
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.site import POLICY_FILE
from client.store import BackboneStore
from server.local.cli import main
from shared.backbones import BackboneRegistry, ResolvedBackbone
from shared.config import StudyConfig
from shared.errors import EXIT_USAGE
from shared.params import exchanged_names, get_arrays
from shared.pipeline import Pretrained, build_model
from shared.processes import free_port
from shared.protocol import BACKBONE_MESSAGE_TYPE, BACKBONE_RECORD, ROUND_KEY, SITE_REFUSED

OTHER_SHA256 = hashlib.sha256(b"a backbone this site never accepted").hexdigest()


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 7
    TaskIdentity.node_id = 0


@pytest.fixture(scope="module")
def backbone(heart_registry: Path) -> ResolvedBackbone:
    """The Cleveland-pretrained heart backbone the server would distribute."""
    return BackboneRegistry(heart_registry).resolve("heart-mlp-cleveland")


@pytest.fixture(scope="module")
def head(backbone: ResolvedBackbone) -> list[np.ndarray]:
    """The global head the server sends for evaluation."""
    model = build_model(StudyConfig(), Pretrained(backbone.manifest, backbone.path))
    return get_arrays(model, exchanged_names(model, "head"))


def _site(tmp_path: Path, backbone: ResolvedBackbone, policy: SitePolicy | None = None) -> Path:
    """A site as its operator sets it up, that already received the backbone."""
    site = prepare_site_dir(tmp_path / "site", site="Hungary", policy=policy)
    BackboneStore(site).put(backbone.manifest.to_json(), backbone.read_bytes())
    return site


def _context(site: Path, policy_file: Path | None = None) -> Context:
    node = {"partition-id": 0, "num-partitions": 3, "site-dir": str(site), "policy": str(policy_file or site / POLICY_FILE)}
    return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})


def _evaluate(backbone: ResolvedBackbone, head: list[np.ndarray], **study: object) -> Message:
    """An evaluate message as the server sends it: the study with the backbone's hash pinned."""
    cfg = StudyConfig().with_overrides(backbone_sha256=backbone.manifest.sha256, **study)
    content = RecordDict(
        {
            "evaluateins.parameters": ArrayRecord(head),
            "evaluateins.config": ConfigRecord({**cfg.to_run_config(), ROUND_KEY: 1}),  # type: ignore[arg-type]
        }
    )
    return Message(content, dst_node_id=1, message_type="evaluate")


def test_evaluation_is_answered_where_the_policy_covers_the_study(
    tmp_path: Path, backbone: ResolvedBackbone, head: list[np.ndarray]
) -> None:
    # Prepare
    site = _site(tmp_path, backbone, SitePolicy(allowed_backbones=(backbone.manifest.sha256,)))

    # Execute
    reply = create_client_app()(_evaluate(backbone, head), _context(site))

    # Assert
    assert not reply.has_error(), reply.error.reason
    assert _audited(site)[0]["decision"] == "accepted"


def _audited(site: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (site / AUDIT_FILE).read_text().splitlines()]


@pytest.mark.parametrize(
    ("policy", "study", "rule"),
    [
        (SitePolicy(allowed_tasks=("chest-xray",)), {}, "allowed_tasks"),
        (SitePolicy(allowed_backbones=(OTHER_SHA256,)), {}, "allowed_backbones"),
        (SitePolicy(require_dp=True), {"dp": False}, "require_dp"),
    ],
    ids=["task", "backbone", "require-dp"],
)
def test_evaluation_is_refused_where_the_policy_refuses_the_study(
    tmp_path: Path, backbone: ResolvedBackbone, head: list[np.ndarray], policy: SitePolicy,
    study: dict[str, object], rule: str,
) -> None:  # fmt: skip
    # Prepare: the site holds the backbone and the data; only its policy stands in the way
    site = _site(tmp_path, backbone, policy)
    app = create_client_app()

    # Execute
    reply = app(_evaluate(backbone, head, **study), _context(site))

    # Assert: the error reply names the site and the rule, and the audit log recorded it
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert reply.error.reason.startswith(f"Hungary: site policy refuses the run: {rule}: "), reply.error.reason
    [entry] = _audited(site)
    assert entry["message_type"] == "evaluate" and entry["decision"] == f"refused: {reply.error.reason}"


def test_evaluation_is_refused_with_a_broken_policy_file(
    tmp_path: Path, backbone: ResolvedBackbone, head: list[np.ndarray]
) -> None:
    # Prepare
    site = _site(tmp_path, backbone)
    broken = tmp_path / "policy.toml"
    broken.write_text("[privacy]\nmax_epsilon_per_run = 'three'\n")

    # Execute
    reply = create_client_app()(_evaluate(backbone, head), _context(site, broken))

    # Assert
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert str(broken) in reply.error.reason and "privacy.max_epsilon_per_run" in reply.error.reason
    assert _audited(site)[0]["decision"].startswith("refused: Hungary: site policy")


def test_a_backbone_the_policy_does_not_allow_is_refused_before_it_is_stored(
    tmp_path: Path, backbone: ResolvedBackbone
) -> None:
    # Prepare: a real backbone, delivered with its weights, to a site that allows another one
    site = prepare_site_dir(tmp_path / "site", site="Hungary", policy=SitePolicy(allowed_backbones=(OTHER_SHA256,)))
    record = {"sha256": backbone.manifest.sha256, "manifest": backbone.manifest.to_json(), "weights": backbone.read_bytes()}
    delivery = Message(RecordDict({BACKBONE_RECORD: ConfigRecord(record)}), dst_node_id=1, message_type=BACKBONE_MESSAGE_TYPE)  # type: ignore[arg-type]

    # Execute
    reply = create_client_app()(delivery, _context(site))

    # Assert
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "allowed_backbones" in reply.error.reason and backbone.manifest.sha256 in reply.error.reason
    assert not BackboneStore(site).has(backbone.manifest.sha256)
    assert _audited(site)[0]["decision"].startswith("refused: site policy refuses the run: allowed_backbones")


def test_a_delivery_whose_manifest_names_another_backbone_is_refused(
    tmp_path: Path, backbone: ResolvedBackbone
) -> None:
    # Prepare: the offer names an allowed SHA-256, the manifest delivered another one
    site = prepare_site_dir(tmp_path / "site", site="Hungary", policy=SitePolicy(allowed_backbones=(OTHER_SHA256,)))
    record = {"sha256": OTHER_SHA256, "manifest": backbone.manifest.to_json(), "weights": backbone.read_bytes()}
    delivery = Message(RecordDict({BACKBONE_RECORD: ConfigRecord(record)}), dst_node_id=1, message_type=BACKBONE_MESSAGE_TYPE)  # type: ignore[arg-type]

    # Execute
    reply = create_client_app()(delivery, _context(site))

    # Assert
    assert reply.has_error() and "is not the one offered" in reply.error.reason
    assert not BackboneStore(site).has(backbone.manifest.sha256)


def test_a_node_with_a_broken_policy_does_not_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a prepared site, and a policy file with a typo'd key
    site = prepare_site_dir(tmp_path / "site", site="Hungary")
    broken = tmp_path / "policy.toml"
    broken.write_text("[privacy]\nmax_epsilon = 3.0\n")
    argv = ["node", "--superlink", f"127.0.0.1:{free_port()}", "--site-dir", str(site), "--insecure", "--data", str(tmp_path),
            "--policy", str(broken), "--port", str(free_port())]  # fmt: skip

    # Execute
    code = main(argv)

    # Assert: refused before any process started (no log folder), one line naming file and key
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_USAGE
    assert len(errors) == 1 and str(broken) in errors[0] and "max_epsilon" in errors[0], err
    assert not (site / "logs").exists()


def _offer(backbone: ResolvedBackbone) -> Message:
    record = {"sha256": backbone.manifest.sha256, "manifest": backbone.manifest.to_json()}
    return Message(RecordDict({BACKBONE_RECORD: ConfigRecord(record)}), dst_node_id=1, message_type=BACKBONE_MESSAGE_TYPE)  # type: ignore[arg-type]


def test_a_simulated_hospital_gets_its_site_prepared(
    tmp_path: Path, backbone: ResolvedBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: `flwr run` with a simulation SuperLink: Flower's node config, nobody prepared a site
    monkeypatch.setattr("client.site.DEFAULT_SITES_ROOT", tmp_path / "sites")  # the user's ~/.carefl/sites
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})

    # Execute
    reply = create_client_app()(_offer(backbone), context)

    # Assert: a ledger, the default policy, and an audit log sealed from its first entry
    site = tmp_path / "sites" / "site-1"
    assert not reply.has_error() and reply.content.config_records[BACKBONE_RECORD]["status"] == "need"
    assert PrivacyLedger.open(site).site == "site-1" and SitePolicy.load(site / POLICY_FILE) == SitePolicy()
    assert verify(site).ok and verify(site).sealed


def test_a_deployed_node_is_never_prepared_by_the_app(tmp_path: Path, backbone: ResolvedBackbone) -> None:
    # Prepare: a node config naming a site directory its operator never prepared
    site = tmp_path / "site"
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3, "site-dir": str(site)}, state=RecordDict(), run_config={})

    # Execute
    reply = create_client_app()(_offer(backbone), context)

    # Assert
    assert reply.has_error() and "cannot read the file" in reply.error.reason
    assert not (site / "privacy-ledger.json").exists()
