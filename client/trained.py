"""A trained model ready to apply at a site: its folder read, checked and rebuilt (``evaluate``/``predict``).

``--model`` names either a site's copy (``<site-dir>/models/<run-id>/``: model.pt,
model_card.json and site.json, read by :func:`client.models.load_site_model`) or a server run
folder (model.pt and model_card.json only). A site's copy carries the site's own operating point
and the preprocessing its training rows taught it; a server run folder carries neither, so its
threshold is 0.5 and a tabular model is refused (its standardization was learned at a site and
never left it: applying the data's own statistics instead would silently change every
prediction). For the same reason an image model trained on standardized features
(``standardize-features``) needs the site's ``feature_stats.npz``: it is applied by a
:class:`~shared.pipeline.FeatureStandardization` between backbone and head, in the one forward
pass that predictions and Grad-CAM's gradients go through; a folder without it is refused.

Before anything is applied, the payload, the model card and site.json must name the same task
and backbone, the backbone's weights must hash to that SHA-256 (the site's backbone store, else
the consortium's registry), and model.pt must fit the model the study builds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import ConfigError, InputError, IntegrityError
from shared.log import log

if TYPE_CHECKING:
    from shared.backbones.architectures import BackboneWithHead
    from shared.config import StudyConfig
    from shared.pipeline import FeatureStats, Pretrained
    from shared.tasks.base import Records

SERVER_THRESHOLD = 0.5
"""Decision threshold of a server run folder (no site chose one)."""
SERVER_RULE = "0.5"
PREDICT_BATCH = 256
"""Records per forward pass (one progress step)."""


@dataclass(frozen=True)
class TrainedModel:
    """A verified, rebuilt model and what a site needs to apply it.

    Attributes
    ----------
    path : Path
        The model folder.
    payload : dict[str, Any]
        ``model.pt`` loaded (the ``carefl-model/1`` payload).
    card : dict[str, Any]
        The server's model card.
    site : dict[str, Any] | None
        The site's ``site.json``; ``None`` for a server run folder.
    study : StudyConfig
        The study the model was trained in.
    module : BackboneWithHead
        The model, in eval mode.
    threshold : float
        The decision threshold (positive when probability ``>= threshold``).
    rule : str
        The operating-point rule that threshold comes from.
    preprocessing : dict[str, Any]
        What the site's preprocessing learned from its training rows.
    """

    path: Path
    payload: dict[str, Any]
    card: dict[str, Any]
    site: dict[str, Any] | None
    study: StudyConfig
    module: BackboneWithHead
    threshold: float
    rule: str
    preprocessing: dict[str, Any]

    @property
    def kind(self) -> str:
        """``"site copy"`` or ``"server run folder"``."""
        return "site copy" if self.site is not None else "server run folder"

    @property
    def is_image(self) -> bool:
        """Whether the task's records are images."""
        from shared.tasks import get_task

        return get_task(self.study.task).info.input_spec.get("kind") == "grayscale-image"

    def probabilities(self, x: np.ndarray, *, advance: Callable[[int], None] | None = None) -> np.ndarray:
        """Positive-class probabilities of the model on preprocessed inputs ``x``.

        Parameters
        ----------
        x : np.ndarray
            Model inputs (:attr:`shared.tasks.base.Records.x`).
        advance : Callable[[int], None], optional
            Called with the number of records done after each batch (a progress bar).
        """
        from shared.training import predict_proba

        parts = []
        for start in range(0, len(x), PREDICT_BATCH):
            batch = np.ascontiguousarray(x[start : start + PREDICT_BATCH], dtype=np.float32)
            parts.append(predict_proba(self.module, batch)[:, 1])
            if advance is not None:
                advance(len(batch))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def load_trained_model(model_dir: Path, *, registry_dir: Path | None = None) -> TrainedModel:
    """Read, verify and rebuild the model in ``model_dir``.

    Parameters
    ----------
    model_dir : Path
        A site's copy (``<site-dir>/models/<run-id>/``) or a server run folder.
    registry_dir : Path, optional
        The consortium's backbone registry, tried when the site's store lacks the backbone
        (a server run folder; built-in backbones resolve without it).

    Raises
    ------
    InputError
        If the folder or a file is missing or unreadable, the backbone is nowhere to be found,
        a tabular server run folder is given (no stored preprocessing), or the study
        standardizes features and the folder holds no site's feature statistics.
    IntegrityError
        If model.pt or feature_stats.npz does not hash to what the JSON files record, they name
        different backbones or tasks, the backbone's weights do not hash to that SHA-256, or
        model.pt or the statistics do not fit the study's model.
    """
    from client.models import CARD_FILE, MODEL_FILE, SITE_FILE, load_site_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} not found.")
    stats = None
    if (model_dir / SITE_FILE).is_file():
        held = load_site_model(model_dir)
        payload, card, site = held.payload, held.card, held.site
        study = held.study
        threshold, rule = _site_threshold(site, model_dir / SITE_FILE)
        preprocessing = dict(site.get("preprocessing") or {})
        stats = held.feature_stats
    else:
        payload, card = _server_folder(model_dir, MODEL_FILE, CARD_FILE)
        site = None
        study = _payload_study(payload, model_dir / MODEL_FILE)
        threshold, rule = SERVER_THRESHOLD, SERVER_RULE
        preprocessing = {}
    _check_agreement(model_dir, payload, card, site, study)
    _check_stats_present(model_dir, study, stats, site is not None)
    pretrained = _backbone(model_dir, payload, study, site is not None, registry_dir)
    module = _rebuild(study, pretrained, payload, model_dir / MODEL_FILE, stats)
    trained = TrainedModel(model_dir, payload, card, site, study, module, threshold, rule, preprocessing)
    if site is None and not trained.is_image:
        raise InputError(
            f"{model_dir} is a server run folder: it holds no site's preprocessing (the {study.task} "
            "standardization is learned from a site's own training rows and never leaves it); apply a "
            "site's copy, <site-dir>/models/<run-id>/, instead."
        )
    log(INFO, "model %s (%s, %s): threshold %.4g (%s)", model_dir, trained.kind, study.task, threshold, rule)
    return trained


def read_records(
    model: TrainedModel, data: Path, *, labelled: bool, progress: Callable[[int, int], None] | None = None
) -> Records:
    """Read the records at ``data`` as the model's task reads them, with the site's preprocessing.

    ``progress(done, total)`` is passed on to a task whose reader reports progress (image folders).

    Raises
    ------
    InputError
        If ``data`` is missing or nothing usable is there (the task's own message).
    """
    from shared.tasks import get_task

    if not Path(data).exists():
        raise InputError(f"data {data} not found.")
    preprocessing = dict(model.preprocessing)
    if model.is_image:
        preprocessing.setdefault("image_size", model.study.image_size)
    import inspect

    reader = get_task(model.study.task).read_records
    extra = {"progress": progress} if progress is not None and "progress" in inspect.signature(reader).parameters else {}
    records = reader(model.study, str(data), preprocessing=preprocessing, labelled=labelled, **extra)
    if len(records.ids) == 0:
        raise InputError(f"{data}: no usable record ({records.report.problem or 'nothing readable there'}).")
    return records


def _site_threshold(site: Mapping[str, Any], origin: Path) -> tuple[float, str]:
    """The site's stored operating point: (threshold, rule); 0.5 where it is undefined."""
    point = site.get("operating_point") or {}
    rule = str(point.get("rule", SERVER_RULE))
    value = point.get("threshold")
    if value is None or not math.isfinite(float(value)):
        log(WARNING, "%s holds no threshold for rule %s (undefined on the site's validation data): using 0.5", origin, rule)
        return SERVER_THRESHOLD, SERVER_RULE
    return float(value), rule


def _server_folder(model_dir: Path, model_file: str, card_file: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A server run folder's payload and card, model.pt checked against the card's SHA-256 when it has one."""
    import json

    from client.models import read_payload
    from shared.hashing import sha256_file

    missing = [name for name in (model_file, card_file) if not (model_dir / name).is_file()]
    if missing:
        raise InputError(f"model folder {model_dir} is incomplete: {', '.join(missing)} missing.")
    try:
        card = json.loads((model_dir / card_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{model_dir / card_file} is not readable JSON ({err}).") from err
    if not isinstance(card, dict):
        raise InputError(f"{model_dir / card_file} is not a JSON object.")
    recorded = card.get("model_sha256")
    if recorded is not None:
        actual = sha256_file(model_dir / model_file)
        if actual != recorded:
            raise IntegrityError(
                f"{model_dir / model_file} has SHA-256 {actual[:16]}..., but {card_file} records "
                f"{str(recorded)[:16]}...: the file was altered or truncated; refused."
            )
    payload = read_payload((model_dir / model_file).read_bytes(), origin=str(model_dir / model_file))
    return payload, card


def _payload_study(payload: Mapping[str, Any], origin: Path) -> StudyConfig:
    """The study of a payload's flat run config."""
    from shared.config import RunConfig, StudyConfig, keys_of

    config = payload.get("config")
    if not isinstance(config, Mapping):
        raise InputError(f"{origin} holds no run config: not a CareFL model.")
    if set(config) <= set(keys_of(StudyConfig)):  # the study (what sites receive)
        return StudyConfig.from_run_config(dict(config))
    return RunConfig.from_run_config(dict(config)).study  # a whole run config (older run folders)


def _check_agreement(
    model_dir: Path,
    payload: Mapping[str, Any],
    card: Mapping[str, Any],
    site: Mapping[str, Any] | None,
    study: StudyConfig,
) -> None:
    """Refuse a folder whose payload, card, site.json and study disagree on task or backbone."""
    backbone = payload.get("backbone_sha256")
    claims: dict[str, Any] = {}
    card_backbone = card.get("backbone")
    if isinstance(card_backbone, Mapping) and "sha256" in card_backbone:
        claims["model_card.json"] = card_backbone.get("sha256")
    if site is not None and "backbone_sha256" in site and study.setup == "transfer":
        claims["site.json"] = site.get("backbone_sha256")
    if study.backbone_sha256:
        claims["the study's backbone-sha256 pin"] = study.backbone_sha256
    for where, value in claims.items():
        if (value or None) != (backbone or None):
            raise IntegrityError(
                f"{model_dir}: model.pt was trained on backbone {_short(backbone)}, but {where} names "
                f"{_short(value)}; refused."
            )
    tasks = {"model.pt": payload.get("task"), "the study": study.task}
    if "task" in card:
        tasks["model_card.json"] = card.get("task")
    if len(set(tasks.values())) > 1:
        named = ", ".join(f"{where} {task!r}" for where, task in tasks.items())
        raise IntegrityError(f"{model_dir}: the files name different tasks ({named}); refused.")


def _short(sha256: Any) -> str:
    return f"{str(sha256)[:16]}..." if sha256 else "none (trained from scratch)"


def _backbone(
    model_dir: Path, payload: Mapping[str, Any], study: StudyConfig, site_copy: bool, registry_dir: Path | None
) -> Pretrained | None:
    """The verified backbone the model was trained on: the site's store, else the registry."""
    from shared.backbones.registry import BackboneRegistry
    from shared.pipeline import Pretrained

    if study.setup != "transfer":
        return None
    sha256 = payload.get("backbone_sha256")
    name = payload.get("backbone_name")
    if not sha256:
        raise IntegrityError(f"{model_dir / 'model.pt'} names no backbone, but its study transfers one; refused.")
    if site_copy:
        from client.store import BackboneStore

        store = BackboneStore(model_dir.parent.parent)
        if store.has(sha256):
            return store.get(sha256)
    try:
        resolved = BackboneRegistry(registry_dir, allow_download=False).resolve(str(name))
    except (InputError, ConfigError) as err:
        raise InputError(
            f"backbone {name!r} ({str(sha256)[:16]}...) of {model_dir} is neither in the site's store nor in "
            f"the registry {registry_dir or '(none given)'}: {err}"
        ) from err
    if resolved.manifest.sha256 != sha256:
        raise IntegrityError(
            f"backbone {name!r} in {resolved.origin} has SHA-256 {resolved.manifest.sha256[:16]}..., but "
            f"{model_dir / 'model.pt'} was trained on {str(sha256)[:16]}...; refused."
        )
    return Pretrained(manifest=resolved.manifest, path=resolved.path)


def _check_stats_present(model_dir: Path, study: StudyConfig, stats: FeatureStats | None, site_copy: bool) -> None:
    """Refuse a model trained on standardized features whose folder holds no site's statistics."""
    from client.models import FEATURE_STATS_FILE

    if stats is not None or not (study.standardize_features and study.shapes_features()):
        return
    where = (
        "a server run folder holds none (they never leave the sites)"
        if not site_copy
        else f"this site's copy has no {FEATURE_STATS_FILE} (stored before deliveries kept them)"
    )
    raise InputError(
        f"{model_dir} was trained on standardized features (`standardize-features`) and needs the site's "
        f"feature statistics, but {where}: apply a site's copy <site-dir>/models/<run-id>/ holding "
        f"{FEATURE_STATS_FILE} (delivered at the end of a run)."
    )


def _rebuild(
    study: StudyConfig,
    pretrained: Pretrained | None,
    payload: Mapping[str, Any],
    origin: Path,
    stats: FeatureStats | None = None,
) -> BackboneWithHead:
    """Build the study's model, load the payload's exchanged tensors and, if the study standardizes, the statistics."""
    import torch

    from shared.pipeline import build_model, with_standardization

    model = build_model(study, pretrained)
    state = payload.get("state_dict")
    if not isinstance(state, Mapping) or not state:
        raise IntegrityError(f"{origin} holds no weights; refused.")
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected or not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected[key].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise IntegrityError(
                f"{origin}: tensor {key!r} ({shape}) does not fit the {study.task} model the study builds; refused."
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    if stats is not None and study.standardize_features and study.shapes_features():
        try:
            with_standardization(model, stats)
        except ValueError as err:
            raise IntegrityError(f"{origin.parent}: the site's feature statistics do not fit the model ({err}); refused.") from None
    model.eval()
    return model
