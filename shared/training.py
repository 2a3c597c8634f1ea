"""Local training and evaluation of a module on in-memory arrays (no Flower here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.metrics import classification_metrics


@dataclass(frozen=True)
class TrainSettings:
    """Local optimization schedule.

    Attributes
    ----------
    epochs : int
        Passes over the local training data.
    batch_size : int
        Examples per step.
    learning_rate : float
        SGD step size.
    seed : int
        Seed of the data order.
    proximal_mu : float
        Weight of FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (0: plain SGD).
    momentum : float
        SGD momentum.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    momentum: float = 0.9


def train(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> float:
    """Train ``module`` with cross-entropy and SGD; returns the mean loss of the last epoch.

    Parameters
    ----------
    module : nn.Module
        Maps a batch of ``x`` to logits; only its parameters with ``requires_grad`` move.
    x, y : np.ndarray
        Inputs and integer labels.
    settings : TrainSettings
        The schedule.
    reference : Sequence[torch.Tensor], optional
        The global parameters for the FedProx term, in ``module.parameters()`` order of the
        trainable parameters.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    loss_fn = nn.CrossEntropyLoss()
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(settings.seed)
    module.train()
    last = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(module(inputs[batch]), labels[batch])
            if reference is not None and settings.proximal_mu > 0:
                prox = sum(((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True))
                loss = loss + 0.5 * settings.proximal_mu * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        last = total / max(seen, 1)
    return last


@torch.no_grad()
def predict_proba(module: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Return class probabilities of ``module`` on ``x`` (eval mode)."""
    module.eval()
    outputs = [
        torch.softmax(module(torch.from_numpy(x[i : i + batch_size])), dim=1).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


def evaluate(module: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Return loss, accuracy and ROC AUC of ``module`` on ``(x, y)`` (NaNs when empty)."""
    if len(y) == 0:
        return math.nan, math.nan, math.nan
    return classification_metrics(y, predict_proba(module, x))
