"""The wire contract between the consortium's server and the hospitals' nodes.

Everything one side writes into a Flower message and the other reads is named here, once:
message types, record and field names, the keys the server adds to each round's config, the
metric keys a site reports, and the error codes of a site's refusals. This module imports
neither torch nor Flower: a ClientApp imports it in a fresh process for every message.

The run-configuration keys themselves are defined by :mod:`shared.config` (the
:class:`~shared.config.StudyConfig` part is what travels to the sites).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

Scalar = bool | bytes | float | int | str
"""A metric's or config value's type (Flower's ``Scalar``, without importing Flower)."""

# ------------------------------------------------------------------ backbone distribution
BACKBONE_MESSAGE_TYPE: Final = "query.carefl_backbone"
"""Message type of the server's backbone offer or delivery."""
BACKBONE_RECORD: Final = "backbone"
"""Config record of a backbone offer, delivery or reply."""
BACKBONE_SHA256: Final = "sha256"
"""Field: the backbone weights' full SHA-256 (hex)."""
BACKBONE_MANIFEST: Final = "manifest"
"""Field: the backbone manifest (JSON text)."""
BACKBONE_WEIGHTS: Final = "weights"
"""Field, delivery only: the weights' bytes."""
BACKBONE_STATUS: Final = "status"
"""Field of the site's reply: one of :data:`STATUS_HAVE`, :data:`STATUS_NEED`, :data:`STATUS_STORED`."""
STATUS_HAVE: Final = "have"
STATUS_NEED: Final = "need"
STATUS_STORED: Final = "stored"

# ------------------------------------------------------------------ final model delivery
MODEL_MESSAGE_TYPE: Final = "query.carefl_model"
"""Message type of the server's delivery of the final global model, after the last round."""
MODEL_RECORD: Final = "model"
"""Config record of a model delivery or reply."""
MODEL_PAYLOAD: Final = "payload"
"""Field, delivery: the ``carefl-model/1`` payload's bytes (the server's ``model.pt``)."""
MODEL_SHA256: Final = "sha256"
"""Field of a delivery and its reply: the payload's SHA-256 (hex)."""
MODEL_CARD: Final = "card"
"""Field, delivery: the model card (JSON text); its ``model_sha256`` is the payload's SHA-256."""
MODEL_STATUS: Final = "status"
"""Field of the site's reply: :data:`STATUS_STORED` (a refusal is an error reply)."""
MODEL_SITE: Final = "site"
"""Field of the site's reply: the site's name."""

# ------------------------------------------------------------------ keys the server adds to a round's config
ROUND_KEY: Final = "server-round"
"""The server round (1-based) a fit or evaluate message belongs to."""
PROXIMAL_MU_KEY: Final = "proximal_mu"
"""FedProx's proximal weight, added by Flower's ``FedProx`` to each fit config."""
ROUND_KEYS: Final = (ROUND_KEY, "server_round")
"""Where a round number can appear in a message (CareFL's key, and SecAgg+'s stage config)."""
EVALUATE_INCOMING_KEY: Final = "evaluate-incoming"
"""Fit config: when true, the site first evaluates the model it receives (as an evaluate message would), then
trains; it reports those figures under :data:`INCOMING_PREFIX`. Saves the separate evaluate message per round."""
SERVER_KEYS: Final = (ROUND_KEY, PROXIMAL_MU_KEY, EVALUATE_INCOMING_KEY)
"""Keys of a fit/evaluate config that are not run-configuration keys."""

# ------------------------------------------------------------------ metrics a site reports
METRIC_SITE: Final = "site"
METRIC_ACCURACY: Final = "accuracy"
METRIC_AUC: Final = "auc"
METRIC_SENSITIVITY: Final = "sensitivity"
"""Binary tasks, at the 0.5 cut-off (positive when p >= 0.5), like the next six."""
METRIC_SPECIFICITY: Final = "specificity"
METRIC_PPV: Final = "ppv"
METRIC_NPV: Final = "npv"
METRIC_F1: Final = "f1"
METRIC_BALANCED_ACCURACY: Final = "balanced-accuracy"
METRIC_BRIER: Final = "brier"
"""Brier score of the positive-class probabilities (threshold-free)."""
METRIC_ECE: Final = "ece"
"""Expected calibration error, 10 equal-width bins (threshold-free)."""
METRIC_THRESHOLD: Final = "threshold"
"""The site's operating point, chosen by the study's ``operating-point`` rule on its validation data."""
METRIC_SENSITIVITY_AT_OP: Final = "sensitivity-at-op"
METRIC_SPECIFICITY_AT_OP: Final = "specificity-at-op"
CLINICAL_METRICS: Final = (
    METRIC_SENSITIVITY, METRIC_SPECIFICITY, METRIC_PPV, METRIC_NPV, METRIC_F1, METRIC_BALANCED_ACCURACY,
    METRIC_BRIER, METRIC_ECE, METRIC_THRESHOLD, METRIC_SENSITIVITY_AT_OP, METRIC_SPECIFICITY_AT_OP,
)  # fmt: skip
"""The clinical metrics a site reports in evaluation (NaN where undefined or not a binary task)."""
METRIC_TRAIN_LOSS: Final = "train-loss"
METRIC_EPSILON: Final = "epsilon"
METRIC_DELTA: Final = "delta"
METRIC_LIFETIME_EPSILON: Final = "lifetime-epsilon"
METRIC_NOISE_MULTIPLIER: Final = "noise-multiplier"
METRIC_DELTA_CLIPPED: Final = "delta-clipped-fraction"
METRIC_DROPPED_ROWS: Final = "dropped-rows"
METRIC_CLASS_COUNTS: Final = "class-counts"
"""JSON text: the site's records per class label, ``{"train": {"0": n, ...}, "val": {...}}`` (counts only)."""
"""Rows of the site's raw data its task's preprocessing left out (heart-disease: a missing value)."""

INCOMING_PREFIX: Final = "incoming-"
"""Prefix of a fit reply's metrics that describe the model the site *received* (before it trained): every
metric of an evaluate reply, plus :data:`METRIC_INCOMING_LOSS` and :data:`METRIC_INCOMING_NUM_EXAMPLES`."""
METRIC_INCOMING_LOSS: Final = INCOMING_PREFIX + "loss"
"""The received model's loss on the site's validation part (an evaluate reply's ``loss``)."""
METRIC_INCOMING_NUM_EXAMPLES: Final = INCOMING_PREFIX + "num-examples"
"""The validation records that loss was computed on (an evaluate reply's ``num_examples``)."""

# ------------------------------------------------------------------ error codes of a site's replies
BACKBONE_REFUSED: Final = 4001
"""The site refused a backbone delivery (its weights did not match their SHA-256)."""
MODEL_REFUSED: Final = 4004
"""The site refused the final model (its payload, SHA-256 or backbone did not match); nothing stored."""
SITE_REFUSED: Final = 4003
"""The site declined the request (policy, privacy budget, ledger, data); the reason says why."""
APP_REFUSED: Final = 4005
"""The site refused the Flower app (FAB) itself: its SHA-256 is not approved by the site's policy; nothing ran."""


def incoming_metrics(loss: float, num_examples: int, metrics: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """An evaluate reply's figures, named as the received model's within a fit reply (:data:`INCOMING_PREFIX`).

    Parameters
    ----------
    loss, num_examples : float, int
        The evaluation's loss and its number of validation records.
    metrics : Mapping[str, Scalar]
        Its metrics; :data:`METRIC_SITE` is left out (the fit reply names the site itself).

    Returns
    -------
    dict[str, Scalar]
        ``incoming-<key>`` for every metric, plus :data:`METRIC_INCOMING_LOSS` and
        :data:`METRIC_INCOMING_NUM_EXAMPLES`.
    """
    named = {INCOMING_PREFIX + key: value for key, value in metrics.items() if key != METRIC_SITE}
    return {**named, METRIC_INCOMING_LOSS: float(loss), METRIC_INCOMING_NUM_EXAMPLES: int(num_examples)}


def split_incoming(metrics: Mapping[str, Scalar]) -> tuple[float, int, dict[str, Scalar]] | None:
    """The evaluate reply a fit reply carries (:func:`incoming_metrics` undone), or None if it carries none.

    Returns
    -------
    tuple[float, int, dict[str, Scalar]] | None
        ``(loss, num_examples, metrics)`` as an evaluate reply gives them, ``metrics`` with the fit
        reply's :data:`METRIC_SITE`.
    """
    if METRIC_INCOMING_NUM_EXAMPLES not in metrics:
        return None
    values = {
        key[len(INCOMING_PREFIX) :]: value
        for key, value in metrics.items()
        if key.startswith(INCOMING_PREFIX) and key not in (METRIC_INCOMING_LOSS, METRIC_INCOMING_NUM_EXAMPLES)
    }
    if METRIC_SITE in metrics:
        values[METRIC_SITE] = metrics[METRIC_SITE]
    return float(metrics[METRIC_INCOMING_LOSS]), int(metrics[METRIC_INCOMING_NUM_EXAMPLES]), values
