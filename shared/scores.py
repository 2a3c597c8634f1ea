"""Scores of a model's predictions on labelled data (computed at the site, on its own records)."""

from __future__ import annotations

import math

import numpy as np


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray
) -> tuple[float, float, float]:
    """Compute loss, accuracy and ROC AUC from class probabilities.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape ``(n,)``.
    probabilities : np.ndarray
        Class probabilities, shape ``(n, num_classes)``.

    Returns
    -------
    tuple[float, float, float]
        Mean cross-entropy, accuracy, and ROC AUC of class 1 (NaN unless exactly two classes
        are present in ``labels``).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    auc = math.nan
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    return loss, accuracy, auc
