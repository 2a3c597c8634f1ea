"""The final models a site received from the server, one folder per run, and how to read them back.

At the end of a federation the server sends every site that took part the final global model
(:mod:`client.model_mod`). The site stores it in its private site directory::

    <site-dir>/models/<run-id>/        one per Flower run (the run id of the delivery message)
        model.pt                       the server's "carefl-model/1" payload, byte for byte as sent
                                       (torch.save of a dict: format, task, setup, config = the study's
                                       run config, backbone_name, backbone_sha256, state_dict = the
                                       exchanged tensors only; the backbone is in backbones/<sha256>/)
        model_card.json                the server's model card (``model_sha256`` = SHA-256 of model.pt)
        site.json                      this site's own facts (see below); never sent anywhere
        feature_stats.npz              only for a study with ``standardize-features``: the mean and
                                       scale of each backbone feature over this site's training rows
                                       (every augmented view), the figures its training standardized
                                       by (``np.savez``: ``mean``, ``scale``, float32); never sent

``site.json`` holds: ``format`` (``carefl-site-model/1``), ``site`` (the site's name),
``run_id``, ``received_utc``, ``model_sha256``, ``backbone_sha256`` (``null`` from scratch),
``study`` (the :class:`~shared.config.StudyConfig` run-config dict the site trained in),
``operating_point`` (``rule``, and the ``threshold`` that rule picks on the site's own validation
data with the final model, with the ``sensitivity`` and ``specificity`` there), ``at_0_5`` (the
same two figures at threshold 0.5), ``validation_records`` and ``preprocessing`` (what the site's
preprocessing learned from its training rows, :attr:`shared.tasks.SiteData.preprocessing`, to
apply again to new records; ``image_size`` for images), and with ``feature_stats.npz`` its
``feature_stats`` (``file``, ``sha256``, ``width``). Undefined figures are ``null``.

A folder appears complete or not at all: it is written into a hidden ``models/.incoming-*``
directory, flushed to disk and renamed (:func:`store_site_model`). Reading one back
(:func:`load_site_model`) re-checks ``model.pt`` against the SHA-256 recorded in both JSON files,
and ``feature_stats.npz`` against the one in ``site.json``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import fsync_path
from shared.errors import InputError, IntegrityError
from shared.hashing import sha256_bytes, sha256_file

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.pipeline import FeatureStats

MODELS_DIR = "models"
MODEL_FILE = "model.pt"
CARD_FILE = "model_card.json"
SITE_FILE = "site.json"
FEATURE_STATS_FILE = "feature_stats.npz"
SITE_FORMAT = "carefl-site-model/1"
MODEL_FORMAT = "carefl-model/1"
_INCOMING = ".incoming-"


@dataclass(frozen=True)
class SiteModel:
    """A verified model folder of a site.

    Attributes
    ----------
    payload : dict[str, Any]
        ``model.pt`` loaded (``format``, ``task``, ``setup``, ``config``, ``backbone_name``,
        ``backbone_sha256``, ``state_dict`` of torch tensors).
    card : dict[str, Any]
        The server's model card.
    site : dict[str, Any]
        The site's own facts (``site.json``).
    path : Path
        The model folder.
    feature_stats : FeatureStats, optional
        The site's feature statistics (``feature_stats.npz``, verified); ``None`` where the
        folder holds none.
    """

    payload: dict[str, Any]
    card: dict[str, Any]
    site: dict[str, Any]
    path: Path
    feature_stats: FeatureStats | None = None

    @property
    def study(self) -> StudyConfig:
        """The study the model was trained in (validated)."""
        from shared.config import StudyConfig

        return StudyConfig.from_run_config(self.site["study"])

    @property
    def threshold(self) -> float | None:
        """The site's operating point (``None`` where undefined, e.g. not a binary task)."""
        value = self.site["operating_point"]["threshold"]
        return None if value is None else float(value)


def models_dir(site_dir: Path) -> Path:
    """Return the folder of the models received by the site at ``site_dir``."""
    return Path(site_dir) / MODELS_DIR


def list_site_models(site_dir: Path) -> list[Path]:
    """Return the model folders of the site at ``site_dir``, sorted by name (none: ``[]``).

    Hidden folders (a delivery being written) are left out; the folders are not verified
    (:func:`load_site_model` does).
    """
    root = models_dir(site_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_site_model(model_dir: Path) -> SiteModel:
    """Read a model folder and check ``model.pt`` against the SHA-256 in ``site.json`` and ``model_card.json``.

    Parameters
    ----------
    model_dir : Path
        A folder ``<site-dir>/models/<run-id>``.

    Raises
    ------
    InputError
        If the folder or one of its three files is missing, or a JSON file is unreadable or
        lacks a key.
    IntegrityError
        If ``model.pt`` does not hash to the SHA-256 both JSON files record (a tampered or
        truncated copy), or they record different ones; or ``feature_stats.npz`` does not hash to
        the SHA-256 ``site.json`` records, or is missing while ``site.json`` records one.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {model_dir} not found.")
    missing = [name for name in (MODEL_FILE, CARD_FILE, SITE_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise InputError(f"model folder {model_dir} is incomplete: {', '.join(missing)} missing.")
    card = _read_json(model_dir / CARD_FILE)
    site = _read_json(model_dir / SITE_FILE)
    for path, doc, keys in (
        (model_dir / CARD_FILE, card, ("model_sha256",)),
        (model_dir / SITE_FILE, site, ("model_sha256", "study", "operating_point")),
    ):
        absent = [key for key in keys if key not in doc]
        if absent:
            raise InputError(f"{path} lacks {', '.join(absent)}: not a CareFL model folder.")
    actual = sha256_file(model_dir / MODEL_FILE)
    for path, doc in ((model_dir / SITE_FILE, site), (model_dir / CARD_FILE, card)):
        if doc["model_sha256"] != actual:
            raise IntegrityError(
                f"{model_dir / MODEL_FILE} has SHA-256 {actual[:16]}..., but {path.name} records "
                f"{str(doc['model_sha256'])[:16]}...: the copy was altered or truncated; refused."
            )
    payload = read_payload((model_dir / MODEL_FILE).read_bytes(), origin=str(model_dir / MODEL_FILE))
    stats = _verified_stats(model_dir, site)
    return SiteModel(payload=payload, card=card, site=site, path=model_dir, feature_stats=stats)


def feature_stats_bytes(stats: FeatureStats) -> bytes:
    """``feature_stats.npz``'s bytes: ``mean`` and ``scale`` as float32 arrays (``np.savez``, no pickle)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, mean=np.asarray(stats.mean, dtype=np.float32), scale=np.asarray(stats.scale, dtype=np.float32))
    return buffer.getvalue()


def read_feature_stats(data: bytes, *, origin: str) -> FeatureStats:
    """Load ``feature_stats.npz``'s bytes (``allow_pickle=False``: no code runs).

    Raises
    ------
    InputError
        If ``data`` is not an ``.npz`` of two equally long 1-d arrays ``mean`` and ``scale``,
        finite, every scale positive.
    """
    import io
    import zipfile

    import numpy as np

    from shared.pipeline import FeatureStats

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            mean, scale = np.asarray(arrays["mean"], dtype=np.float32), np.asarray(arrays["scale"], dtype=np.float32)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise InputError(f"{origin} is not a feature-statistics file (mean, scale): {err}.") from err
    if mean.ndim != 1 or mean.shape != scale.shape:
        raise InputError(f"{origin}: mean {mean.shape} and scale {scale.shape} must be equally long vectors.")
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise InputError(f"{origin}: a mean or scale is not finite, or a scale is not positive.")
    return FeatureStats(mean=mean, scale=scale)


def _verified_stats(model_dir: Path, site: dict[str, Any]) -> FeatureStats | None:
    """The folder's ``feature_stats.npz`` checked against ``site.json``'s SHA-256 (``None``: it records none)."""
    record = site.get("feature_stats")
    if record is None:
        return None
    path = model_dir / FEATURE_STATS_FILE
    if not isinstance(record, dict) or "sha256" not in record:
        raise InputError(f"{model_dir / SITE_FILE}: `feature_stats` lacks its sha256: not a CareFL model folder.")
    if not path.is_file():
        raise IntegrityError(f"{path} is missing, but {SITE_FILE} records its SHA-256; refused.")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != record["sha256"]:
        raise IntegrityError(
            f"{path} has SHA-256 {actual[:16]}..., but {SITE_FILE} records {str(record['sha256'])[:16]}...: "
            "the site's feature statistics were altered; refused."
        )
    return read_feature_stats(data, origin=str(path))


def read_payload(data: bytes, *, origin: str) -> dict[str, Any]:
    """Load a ``carefl-model/1`` payload (``torch.load`` with ``weights_only``: no code runs).

    Raises
    ------
    InputError
        If ``data`` is not such a payload.
    """
    import io

    import torch  # only where a model is read

    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike
        raise InputError(f"{origin} is not a CareFL model ({type(err).__name__}: {err}).") from err
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{origin} is not a CareFL model (format {MODEL_FORMAT} expected).")
    return payload


def store_site_model(
    site_dir: Path,
    run_id: str,
    model: bytes,
    card: dict[str, Any],
    site: dict[str, Any],
    *,
    feature_stats: FeatureStats | None = None,
) -> Path:
    """Write ``models/<run_id>/`` (model.pt, model_card.json, site.json[, feature_stats.npz]) completely or not at all.

    The files go into a hidden directory in ``models/``, are fsync'd, and the directory is
    renamed onto ``models/<run_id>``; any failure removes it. A folder already there is kept.

    Parameters
    ----------
    site_dir : Path
        The site's private directory.
    run_id : str
        The Flower run the model comes from (the folder's name).
    model : bytes
        ``model.pt``'s bytes, as received.
    card : dict[str, Any]
        The server's model card.
    site : dict[str, Any]
        The site's facts (JSON-ready; NaN is written as ``null``).
    feature_stats : FeatureStats, optional
        The site's feature statistics (``standardize-features``): written to
        ``feature_stats.npz``, its SHA-256 and width recorded in site.json's ``feature_stats``.

    Returns
    -------
    Path
        The model folder.

    Raises
    ------
    IntegrityError
        If ``models/<run_id>`` already holds another model.
    """
    root = models_dir(site_dir)
    final = root / str(run_id)
    if not final.name or final.name.startswith(".") or final.parent != root:
        raise InputError(f"run id {run_id!r} cannot name a model folder.")
    sha256 = sha256_bytes(model)
    if final.exists():
        held = sha256_file(final / MODEL_FILE) if (final / MODEL_FILE).is_file() else "nothing"
        if held == sha256:
            return final  # delivered twice: the same bytes are there already
        raise IntegrityError(
            f"{final} already holds another model ({held[:16]}...); refused, nothing stored."
        )
    files = {MODEL_FILE: model, CARD_FILE: _dumps(card).encode("utf-8")}
    if feature_stats is not None:
        stats = feature_stats_bytes(feature_stats)
        files[FEATURE_STATS_FILE] = stats
        site = {
            **site,
            "feature_stats": {"file": FEATURE_STATS_FILE, "sha256": sha256_bytes(stats), "width": feature_stats.width},
        }
    files[SITE_FILE] = _dumps(site).encode("utf-8")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = root / f"{_INCOMING}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name in files:
            fsync_path(staging / name)
        fsync_path(staging)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(root)
    return final


def _dumps(doc: dict[str, Any]) -> str:
    """Strict JSON (NaN as null), indented, final newline."""
    return json.dumps(_no_nan(doc), indent=2, allow_nan=False) + "\n"


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({err}).") from err
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a JSON object.")
    return doc
