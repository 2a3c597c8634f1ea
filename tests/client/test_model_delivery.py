"""The final model comes home: a site verifies it, picks its operating point with it, stores it whole.

Real messages built in memory, the server's real payload and card (:mod:`server.report.result`),
a real heart-disease site (index 0: Hungary) holding the real pretrained backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import recall_score

from client import models
from client.audit import AUDIT_FILE, verify
from client.audit_mod import make_audit_mod
from client.model_mod import make_model_mod
from client.models import list_site_models, load_site_model, store_site_model
from client.policy import SitePolicy
from client.refusal_mod import refusal_mod
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, Partition, SiteEnvironment
from client.store import BackboneStore
from server.report.result import FederationResult, federation_card
from shared import protocol as wire
from shared.backbones import BackboneRegistry
from shared.config import RunConfig
from shared.errors import InputError, IntegrityError
from shared.hashing import sha256_bytes
from shared.params import exchanged_names, get_arrays
from shared.pipeline import Pretrained, build_model, effective_trainable
from shared.tasks import load_site

RUN = 1


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN
    TaskIdentity.node_id = 0


@pytest.fixture()
def cfg(heart_registry: Path) -> RunConfig:
    return RunConfig.of(
        registry_dir=str(heart_registry),
        num_rounds=1,
        operating_point="sensitivity:0.9",
        secure_aggregation=False,
    )


@pytest.fixture()
def result(cfg: RunConfig, heart_registry: Path) -> FederationResult:
    """A finished run's result: the pretrained model with a head moved away from its start."""
    resolved = BackboneRegistry(heart_registry).resolve(cfg.study.backbone)
    model = build_model(cfg.study, Pretrained(resolved.manifest, resolved.path))
    names = exchanged_names(model, effective_trainable(cfg.study))
    rng = np.random.default_rng(0)
    arrays = [a + rng.normal(0, 0.1, a.shape).astype(a.dtype) for a in get_arrays(model, names)]
    return FederationResult(config=cfg, manifest=resolved.manifest, names=names, parameters=arrays, rows=[])


def _site(
    tmp_path: Path, heart_registry: Path, *, backbone: bool = True, policy: SitePolicy | None = None
) -> SiteEnvironment:
    site_dir = tmp_path / "site"
    prepare_site_dir(site_dir, site="Hungary", policy=policy or SitePolicy())
    if backbone:
        resolved = BackboneRegistry(heart_registry).resolve("heart-mlp-cleveland")
        BackboneStore(site_dir).put(resolved.manifest.to_json(), resolved.read_bytes())
    return SiteEnvironment(data_path="", site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(0, 3))


def _message(payload: bytes, card: dict, sha256: str | None = None) -> Message:
    record = {
        wire.MODEL_PAYLOAD: payload,
        wire.MODEL_SHA256: sha256 or sha256_bytes(payload),
        wire.MODEL_CARD: json.dumps(card),
    }
    return Message(
        RecordDict({wire.MODEL_RECORD: ConfigRecord(record)}),  # type: ignore[arg-type]
        dst_node_id=1,
        message_type=wire.MODEL_MESSAGE_TYPE,
    )


def _context() -> Context:
    return Context(run_id=RUN, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _unreachable(message: Message, context: Context) -> Message:
    raise AssertionError("a model delivery must not reach the ClientApp")


def _deliver(env: SiteEnvironment, message: Message) -> Message:
    """The ClientApp's mod chain for a delivery: audit, refusal, model."""
    mod = make_model_mod(lambda _: env)
    audit = make_audit_mod(lambda _: env.site_dir)
    return audit(
        message, _context(), lambda m, c: refusal_mod(m, c, lambda m2, c2: mod(m2, c2, _unreachable))
    )


def _stored_anything(env: SiteEnvironment) -> bool:
    root = env.site_dir / "models"
    return root.exists() and any(root.iterdir())


def test_stored_model_is_the_bytes_sent_with_the_sites_operating_point(
    tmp_path: Path, heart_registry: Path, cfg: RunConfig, result: FederationResult
) -> None:
    # Prepare
    env = _site(tmp_path, heart_registry)
    payload, card = result.model_bytes(), federation_card(result)

    # Execute
    reply = _deliver(env, _message(payload, card))

    # Assert: the reply says stored, with the model's hash and the site's name
    sha = sha256_bytes(payload)
    answer = reply.content.config_records[wire.MODEL_RECORD]
    assert (answer[wire.MODEL_STATUS], answer[wire.MODEL_SHA256], answer[wire.MODEL_SITE]) == (
        "stored",
        sha,
        "Hungary",
    )
    # ... the folder holds the exact bytes and the server's card
    assert list_site_models(env.site_dir) == [env.site_dir / "models" / str(RUN)]
    stored = load_site_model(env.site_dir / "models" / str(RUN))
    assert (stored.path / "model.pt").read_bytes() == payload
    assert stored.card == card and card["model_sha256"] == sha
    facts = stored.site
    assert facts["site"] == "Hungary" and facts["model_sha256"] == sha
    assert facts["backbone_sha256"] == result.manifest.sha256  # type: ignore[union-attr]
    pinned = cfg.study.model_copy(update={"backbone_sha256": result.manifest.sha256})  # type: ignore[union-attr]
    assert stored.study == pinned
    assert stored.payload["config"] == pinned.to_run_config()  # the study only: no server path travels
    # ... and the operating point, recomputed independently: the full model on the site's validation rows
    site = load_site(cfg.study, 0)
    model = build_model(stored.study, BackboneStore(env.site_dir).get(facts["backbone_sha256"]))
    model.load_state_dict(stored.payload["state_dict"], strict=False)
    model.eval()
    with torch.no_grad():
        positive = torch.softmax(model(torch.from_numpy(site.x_val)), dim=1)[:, 1].numpy()
    op = facts["operating_point"]
    assert facts["validation_records"] == len(site.y_val) > 0
    assert op["rule"] == "sensitivity:0.9" and 0.0 <= op["threshold"] <= 1.0
    assert op["sensitivity"] == pytest.approx(recall_score(site.y_val, positive >= op["threshold"]))
    assert op["sensitivity"] >= 0.9
    assert op["specificity"] == pytest.approx(
        recall_score(site.y_val, positive >= op["threshold"], pos_label=0)
    )
    assert facts["at_0_5"]["sensitivity"] == pytest.approx(recall_score(site.y_val, positive >= 0.5))
    # ... and the audit log records the receipt: what left the site, with the model's hash
    entry = json.loads((env.site_dir / AUDIT_FILE).read_text().splitlines()[-1])
    assert (entry["message_type"], entry["decision"], entry["model_sha256"]) == (
        wire.MODEL_MESSAGE_TYPE,
        "accepted",
        sha,
    )
    assert verify(env.site_dir).ok


@pytest.mark.parametrize("tamper", ["payload", "card"])
def test_a_payload_that_does_not_match_its_hash_is_refused_and_nothing_stored(
    tmp_path: Path, heart_registry: Path, result: FederationResult, tamper: str
) -> None:
    # Prepare
    env = _site(tmp_path, heart_registry)
    payload, card = result.model_bytes(), federation_card(result)
    sha = sha256_bytes(payload)
    if tamper == "payload":
        message = _message(payload[:-1] + bytes([payload[-1] ^ 1]), card, sha256=sha)
    else:
        message = _message(payload, {**card, "model_sha256": "0" * 64})

    # Execute
    reply = _deliver(env, message)

    # Assert
    assert reply.has_error() and reply.error.code == wire.MODEL_REFUSED
    assert "SHA-256" in reply.error.reason
    assert not _stored_anything(env)
    entry = json.loads((env.site_dir / AUDIT_FILE).read_text().splitlines()[-1])
    assert entry["decision"].startswith("refused") and "model_sha256" not in entry


def test_a_model_on_a_backbone_the_site_does_not_hold_is_refused(
    tmp_path: Path, heart_registry: Path, result: FederationResult
) -> None:
    # Prepare: the site never received the backbone
    env = _site(tmp_path, heart_registry, backbone=False)

    # Execute
    reply = _deliver(env, _message(result.model_bytes(), federation_card(result)))

    # Assert
    assert reply.has_error() and reply.error.code == wire.MODEL_REFUSED
    assert "does not hold" in reply.error.reason
    assert not _stored_anything(env)


def test_a_site_whose_policy_refuses_the_study_refuses_its_model(
    tmp_path: Path, heart_registry: Path, result: FederationResult
) -> None:
    # Prepare
    env = _site(tmp_path, heart_registry, policy=SitePolicy(allowed_tasks=["chest-xray"]))

    # Execute
    reply = _deliver(env, _message(result.model_bytes(), federation_card(result)))

    # Assert
    assert reply.has_error() and reply.error.code == wire.SITE_REFUSED
    assert "site policy refuses the run: allowed_tasks" in reply.error.reason
    assert not _stored_anything(env)


def test_a_failed_store_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the rename that publishes the folder fails (a full disk, a crash)
    def fail(*_: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(models.os, "rename", fail)
    model = b"model bytes"

    # Execute
    with pytest.raises(OSError, match="no space"):
        store_site_model(
            tmp_path, "7", model, {"model_sha256": sha256_bytes(model)}, {"model_sha256": sha256_bytes(model)}
        )

    # Assert: neither the folder nor its staging copy is there
    assert list((tmp_path / "models").iterdir()) == []
    assert list_site_models(tmp_path) == []


def test_a_tampered_or_incomplete_copy_is_refused_on_read(
    tmp_path: Path, heart_registry: Path, result: FederationResult
) -> None:
    # Prepare
    env = _site(tmp_path, heart_registry)
    _deliver(env, _message(result.model_bytes(), federation_card(result)))
    folder = env.site_dir / "models" / str(RUN)
    again = _deliver(env, _message(result.model_bytes(), federation_card(result)))  # delivered twice: kept
    original = (folder / "model.pt").read_bytes()

    # Execute / Assert
    assert again.content.config_records[wire.MODEL_RECORD][wire.MODEL_STATUS] == "stored"
    (folder / "model.pt").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="altered"):
        load_site_model(folder)
    (folder / "site.json").unlink()
    with pytest.raises(InputError, match="site.json missing"):
        load_site_model(folder)
    with pytest.raises(InputError, match="not found"):
        load_site_model(tmp_path / "nowhere")


# ------------------------------------------------------------ chest-xray with standardized features
def _chest_site(tmp_path: Path, npz: Path) -> tuple[SiteEnvironment, Path]:
    """Site 0 of 2 on a small MedMNIST-layout npz of real X-rays, holding ImageNet MobileNetV2."""
    with np.load(npz) as arrays:
        small = {
            "train_images": arrays["train_images"][:160], "train_labels": arrays["train_labels"][:160],
            "val_images": arrays["val_images"][:60], "val_labels": arrays["val_labels"][:60],
        }  # fmt: skip
    data = tmp_path / "small.npz"
    np.savez(data, **small)
    site_dir = tmp_path / "site"
    prepare_site_dir(site_dir, site="site-0", policy=SitePolicy())
    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    BackboneStore(site_dir).put(resolved.manifest.to_json(), resolved.read_bytes())
    env = SiteEnvironment(data_path=str(data), site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(0, 2))
    return env, data


def _chest_result(**study: object) -> FederationResult:
    """A finished chest run (feature-blocks -2, standardized features) with a seeded random head."""
    cfg = RunConfig.of(task="chest-xray", backbone="mobilenet_v2-imagenet", image_size=32, num_sites=2,
                       feature_blocks="-2", standardize_features=True, num_rounds=1, secure_aggregation=False,
                       **study)  # fmt: skip
    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    model = build_model(cfg.study, Pretrained(resolved.manifest, resolved.path))
    names = exchanged_names(model, effective_trainable(cfg.study))
    return FederationResult(config=cfg, manifest=resolved.manifest, names=names, parameters=get_arrays(model, names), rows=[])


def _numpy_stats(result: FederationResult, site_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean and sd of the pooled block features over the site's training rows (every augmented view), in numpy."""
    from shared.augment import augmented_views
    from shared.pipeline import augmentation_of

    study = result.config.study
    rows = load_site(study, 0, str(data)).x_train
    model = build_model(study, BackboneStore(site_dir).get(result.manifest.sha256))  # type: ignore[union-attr]
    model.eval()
    with torch.no_grad():
        views = [model.backbone(torch.from_numpy(v.astype(np.float32))).numpy() for v in augmented_views(rows, augmentation_of(study))]
    features = np.concatenate(views).astype(np.float64)
    sd = features.std(axis=0)
    sd[sd == 0] = 1.0
    return features.mean(axis=0), sd, len(features)


@pytest.mark.parametrize("augment", [{}, {"augment": "crop-rotate-flip", "augment_views": 2}], ids=["plain", "2 views"])
def test_a_standardized_chest_model_is_stored_with_the_sites_feature_statistics(
    tmp_path: Path, pneumonia_npz: Path, augment: dict[str, object]
) -> None:
    # Prepare
    env, data = _chest_site(tmp_path, pneumonia_npz)
    result = _chest_result(**augment)
    payload, card = result.model_bytes(), federation_card(result)

    # Execute
    reply = _deliver(env, _message(payload, card))

    # Assert: stored, and what left the site names the model only
    answer = reply.content.config_records[wire.MODEL_RECORD]
    assert answer[wire.MODEL_STATUS] == "stored" and set(answer) == {wire.MODEL_STATUS, wire.MODEL_SHA256, wire.MODEL_SITE}
    folder = env.site_dir / "models" / str(RUN)
    assert sorted(p.name for p in folder.iterdir()) == ["feature_stats.npz", "model.pt", "model_card.json", "site.json"]
    stored = load_site_model(folder)
    record = stored.site["feature_stats"]
    assert record["sha256"] == sha256_bytes((folder / "feature_stats.npz").read_bytes()) and record["width"] == 320
    # ... the statistics training standardizes by, recomputed independently with numpy
    mean, sd, rows = _numpy_stats(result, env.site_dir, data)
    assert rows == (2 if augment else 1) * len(load_site(result.config.study, 0, str(data)).y_train)
    assert stored.feature_stats is not None and stored.feature_stats.width == 320
    np.testing.assert_allclose(stored.feature_stats.mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored.feature_stats.scale, sd, rtol=1e-4, atol=1e-5)
    # ... and nothing of them in the server's card
    assert "feature_stats" not in json.dumps(card)


def test_tampered_or_missing_feature_statistics_are_refused(tmp_path: Path, pneumonia_npz: Path) -> None:
    # Prepare: a delivered standardized chest model
    from client.trained import load_trained_model

    env, _ = _chest_site(tmp_path, pneumonia_npz)
    result = _chest_result()
    _deliver(env, _message(result.model_bytes(), federation_card(result)))
    folder = env.site_dir / "models" / str(RUN)
    stats = folder / "feature_stats.npz"
    original = stats.read_bytes()
    assert load_trained_model(folder).module.backbone[-1].mean.shape == (320,)

    # Execute / Assert: one changed byte in the statistics
    stats.write_bytes(original[:-30] + bytes([original[-30] ^ 1]) + original[-29:])
    with pytest.raises(IntegrityError, match="feature statistics were altered"):
        load_trained_model(folder)
    # ... the file gone while site.json records it
    stats.unlink()
    with pytest.raises(IntegrityError, match="feature_stats.npz is missing"):
        load_site_model(folder)
    # ... an older copy: neither file nor record
    site = json.loads((folder / "site.json").read_text())
    del site["feature_stats"]
    (folder / "site.json").write_text(json.dumps(site))
    with pytest.raises(InputError, match=r"standardized features .* has no feature_stats.npz"):
        load_trained_model(folder)
