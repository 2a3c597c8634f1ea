"""Local training and evaluation of a module on in-memory arrays (no Flower here)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.config import ClassWeighting, GradSampleMode
from shared.errors import ConfigError
from shared.scores import classification_metrics


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
    class_weighting : str
        ``none`` (every record's loss counts once) or ``balanced`` (a record of class ``c``
        counts ``n / (k * n_c)`` times, from the training labels given to :func:`train` or
        :func:`shared.dp.train_dp`; see :func:`class_weights`).
    grad_sample_mode : str
        How :func:`shared.dp.train_dp` gets what it clips: Opacus' ``hooks``, ``ghost`` or
        ``functorch``, the closed form of a linear head (``linear``), or ``auto`` (``linear``
        where it applies, ``ghost`` otherwise); ignored without DP.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    proximal_mu: float = 0.0
    momentum: float = 0.9
    class_weighting: ClassWeighting = "none"
    grad_sample_mode: GradSampleMode = "auto"


def class_weights(y: np.ndarray, weighting: str) -> torch.Tensor | None:
    """Return the loss weight of each class from the site's own training labels ``y``.

    ``balanced`` is scikit-learn's ``compute_class_weight("balanced")``: class ``c`` weighs
    ``n / (k * n_c)`` for the ``k`` classes present in ``y`` (``n`` records, ``n_c`` of class
    ``c``), so every present class carries the same total weight ``n / k``. A class absent from
    ``y`` has no record to weigh; its entry is 0.

    Parameters
    ----------
    y : np.ndarray
        Integer labels of the training records.
    weighting : str
        ``none`` or ``balanced``.

    Returns
    -------
    torch.Tensor or None
        ``None`` for ``none`` (unweighted loss); otherwise float32 weights indexed by label,
        of length ``max(y) + 1``.

    Raises
    ------
    ConfigError
        For an unknown ``weighting``.
    """
    if weighting == "none":
        return None
    if weighting != "balanced":
        raise ConfigError(f"class-weighting must be none or balanced, not {weighting!r}.")
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(y, dtype=np.int64)
    weights = np.zeros(int(labels.max()) + 1 if len(labels) else 0, dtype=np.float32)
    if len(labels):
        present = np.unique(labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(weights)


class RecordLoss(nn.Module):
    """Cross-entropy of each record: (class-weighted) and averaged over the record's views.

    ``logits`` are ``(B, classes)``, or ``(B, K, classes)`` for ``K`` augmented views of each
    record: then a record's loss is the mean of its ``K`` views' cross-entropies, one term per
    record, so DP-SGD clips the gradient of that mean (one gradient per record, whatever ``K``).
    With weights a record's loss is multiplied by ``w[y_i]``.

    Attributes
    ----------
    class_weight : torch.Tensor, optional
        Weight per class label (see :func:`class_weights`).
    reduction : str
        ``mean`` (over the batch: ``sum_i loss_i / B``), ``sum`` or ``none`` (the ``(B,)``
        per-record losses; Opacus' ghost clipping sets it while it computes them).
    """

    def __init__(self, class_weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.class_weight = class_weight
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the reduced loss of the batch (see the class)."""
        if logits.ndim == 3 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim == 2 and self.class_weight is None:
            return nn.functional.cross_entropy(logits, labels, reduction=self.reduction)
        if logits.ndim == 3:
            batch, views, classes = logits.shape
            per_view = nn.functional.cross_entropy(
                logits.reshape(batch * views, classes), labels.repeat_interleave(views), reduction="none"
            )
            per_record = per_view.view(batch, views).mean(dim=1)
        else:
            per_record = nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.class_weight is not None:
            per_record = self.class_weight[labels] * per_record
        if self.reduction == "mean":
            return per_record.mean()
        return per_record.sum() if self.reduction == "sum" else per_record


def per_sample_loss(class_weight: torch.Tensor | None) -> RecordLoss:
    """Return the batch loss: the mean over the batch of each record's (weighted) cross-entropy.

    With weights the loss is ``sum_i w[y_i] * ce_i / B``, *not* PyTorch's weighted mean
    ``sum_i w[y_i] * ce_i / sum_i w[y_i]``: that one would make each record's gradient depend on
    the other records drawn with it, whereas DP-SGD needs a sum of per-record terms (Opacus'
    ``loss_reduction="mean"`` multiplies by ``B`` to recover ``w[y_i] * grad ce_i`` and clips
    that). Without weights and views it is exactly :class:`torch.nn.CrossEntropyLoss`'s mean.
    With ``K`` views per record, ``ce_i`` is the mean over the views (see :class:`RecordLoss`).

    Parameters
    ----------
    class_weight : torch.Tensor, optional
        Weight per class label (see :func:`class_weights`).
    """
    return RecordLoss(class_weight)


def train(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> float:
    """Train ``module`` with cross-entropy and SGD; returns the mean (weighted) loss of the last epoch.

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

    Raises
    ------
    ConfigError
        For an unknown ``settings.class_weighting``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(settings.seed)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            yield inputs[batch], labels[batch]

    penalty = None
    if reference is not None and settings.proximal_mu > 0:

        def penalty() -> torch.Tensor:
            prox = sum(((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True))
            return 0.5 * settings.proximal_mu * prox  # type: ignore[return-value]

    weight = class_weights(y, settings.class_weighting)
    module.train()
    return run_epochs(module, optimizer, batches, settings.epochs, penalty=penalty, class_weight=weight)


def run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    *,
    penalty: Callable[[], torch.Tensor] | None = None,
    class_weight: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Run ``epochs`` passes of cross-entropy SGD; returns the mean loss of the last one.

    Parameters
    ----------
    module : nn.Module
        Maps inputs to logits (possibly wrapped by Opacus).
    optimizer : torch.optim.Optimizer
        Plain or DP optimizer.
    batches : Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
        Returns one epoch's batches. An empty batch (Poisson sampling drew no record) still
        takes an optimizer step: a DP optimizer adds its noise and counts the step.
    epochs : int
        Number of passes.
    penalty : Callable[[], torch.Tensor], optional
        Extra loss term added at every step (FedProx's proximal term).
    class_weight : torch.Tensor, optional
        Loss weight per class label; the batch loss stays a mean over the batch of per-record
        terms (see :func:`per_sample_loss`).
    loss_fn : Callable, optional
        The loss of a batch (default: ``per_sample_loss(class_weight)``); Opacus' ghost
        clipping passes its wrapper of that loss.
    """
    if loss_fn is None:
        loss_fn = per_sample_loss(class_weight)
    last = float("nan")
    for _ in range(epochs):
        total, seen = 0.0, 0
        for inputs, labels in batches():
            optimizer.zero_grad()
            loss = loss_fn(module(inputs), labels) if len(labels) else module(inputs).sum() * 0.0
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
        last = total / max(seen, 1)
    return last


PREDICT_BATCH = 512
"""Examples evaluated at once."""


@torch.no_grad()
def predict_proba(module: nn.Module, x: np.ndarray, *, batch_size: int = PREDICT_BATCH) -> np.ndarray:
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
