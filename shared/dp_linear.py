"""DP-SGD of a linear head in closed form: Opacus' mechanism without Opacus' per-step machinery.

When the only trainable layer is one ``nn.Linear`` (the head on cached frozen-backbone
features, or logistic regression), each record's gradient has a closed form: with
``e_v = dL_i / dz_v`` at the logits of view ``v`` of record ``i`` (``K`` views, their loss
averaged) and its input ``x_v``, the record's gradient is ``sum_v e_v x_v^T`` for the weight
and ``sum_v e_v`` for the bias, so its squared norm is

    ``sum_{v,w} (e_v . e_w) (x_v . x_w + 1)``

(``||e||^2 (||x||^2 + 1)`` with one view; the inputs' half is computed once, up front), and
the clipped sum over a batch is one matrix product ``(c * E)^T X``. No per-sample gradient is
materialized. :func:`train_linear_dp` runs exactly what :func:`shared.dp.train_dp` has Opacus
run, step for step: Poisson sampling at rate ``1 / ceil(N / B)`` (the draws of Opacus'
``UniformWithReplacementSampler``, empty batches included), per-record clipping to
``max_grad_norm`` with Opacus' factor ``min(1, C / (||g_i|| + 1e-6))``, Gaussian noise of
standard deviation ``noise_multiplier * C`` added to the clipped sum, division by Opacus'
expected batch size ``int(N / ceil(N / B))``, the same ``torch.optim.SGD`` step, and an Opacus
accountant stepped once per step, so its history (and the epsilon) is the Opacus path's.
Given the same two generators it draws the same batches and the same noise as Opacus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.backbones.architectures import BackboneWithHead
from shared.errors import ConfigError
from shared.privacy import Charge
from shared.training import TrainSettings, class_weights

CLIP_EPSILON = 1e-6
"""Opacus' stabilizer in the clipping factor ``C / (||g|| + 1e-6)``."""


@dataclass(frozen=True)
class LinearHead:
    """A module whose only trainable layer is one ``nn.Linear``, split at that layer.

    Attributes
    ----------
    prefix : nn.Module, optional
        A fixed (frozen, parameter-free in the gradient sense) function before the head, e.g.
        logistic regression's ``nn.Identity`` backbone; ``None`` when the module is the head.
    head : nn.Linear
        The trained layer.
    """

    prefix: nn.Module | None
    head: nn.Linear


def linear_head(module: nn.Module) -> LinearHead | None:
    """Return ``module`` split at its one trainable linear layer, or ``None`` if it has another shape.

    Accepted: an ``nn.Linear`` itself (the head trained on cached features), or a
    :class:`~shared.backbones.architectures.BackboneWithHead` whose backbone has no trainable
    parameter (logistic regression, a fully frozen backbone). Subclasses of ``nn.Linear`` (whose
    forward may differ) and modules with any other trainable parameter are not.
    """
    if type(module) is nn.Linear:
        split = LinearHead(None, module)
    elif isinstance(module, BackboneWithHead) and type(module.head) is nn.Linear:
        if any(p.requires_grad for p in module.backbone.parameters()):
            return None
        split = LinearHead(module.backbone, module.head)
    else:
        return None
    if not any(p.requires_grad for p in split.head.parameters()):
        return None
    return split


def train_linear_dp(
    split: LinearHead,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str,
    sample_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> tuple[float, tuple[Charge, ...]]:
    """Train a linear head with DP-SGD in closed form (see the module docstring); in place.

    Parameters
    ----------
    split : LinearHead
        From :func:`linear_head`.
    x, y : np.ndarray
        Inputs ``(N, F)`` or ``(N, K, F)`` (``K`` views per record) and labels ``(N,)``.
    settings : TrainSettings
        Epochs, expected batch size, learning rate, momentum, class weighting.
    noise_multiplier, max_grad_norm : float
        As for :func:`shared.dp.train_dp`.
    accountant : str
        Opacus accountant recording the schedule (``rdp`` or ``prv``).
    sample_generator, noise_generator : torch.Generator
        The Poisson sample's and the noise's random streams (consumed as Opacus' DataLoader and
        DPOptimizer consume theirs).

    Returns
    -------
    tuple[float, tuple[Charge, ...]]
        The mean record loss of the last epoch and the accountant's history.

    Raises
    ------
    ConfigError
        If there is no training record.
    """
    from opacus.accountants import create_accountant

    if len(y) == 0:
        raise ConfigError("DP-SGD needs at least one training record.")
    head = split.head
    inputs = torch.from_numpy(x)
    if split.prefix is not None:
        with torch.no_grad():  # frozen and in eval mode (BackboneWithHead.train): a fixed function
            inputs = split.prefix(inputs)
    views = inputs if inputs.ndim == 3 else inputs[:, None, :]
    labels = torch.from_numpy(y).long()
    weight = class_weights(y, settings.class_weighting)
    record_weight = weight[labels] if weight is not None else None
    steps_per_epoch = max(1, math.ceil(len(labels) / settings.batch_size))
    sample_rate = 1 / steps_per_epoch  # Opacus: 1 / len(data_loader)
    expected_batch = int(len(labels) * sample_rate)  # Opacus' expected_batch_size
    trains_weight = head.weight.requires_grad
    trains_bias = head.bias is not None and head.bias.requires_grad
    params = [p for p in head.parameters() if p.requires_grad]  # Opacus' order: weight, bias
    gram = input_gram(views, weight=trains_weight, bias=trains_bias)
    optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    ledger = create_accountant(mechanism=accountant)
    std = noise_multiplier * max_grad_norm
    last = float("nan")
    with torch.no_grad():
        for _ in range(settings.epochs):
            # Opacus' DataLoader draws its base seed from the sampling generator at every epoch
            torch.empty((), dtype=torch.int64).random_(generator=sample_generator)
            total, seen = 0.0, 0
            for _ in range(steps_per_epoch):
                index = (
                    (torch.rand(len(labels), generator=sample_generator) < sample_rate).nonzero().reshape(-1)
                )
                batch = views[index]
                losses, errors = record_errors(
                    nn.functional.linear(batch, head.weight, head.bias),
                    labels[index],
                    None if record_weight is None else record_weight[index],
                )
                norms = record_norms(errors, gram[index])
                factor = norms.add_(CLIP_EPSILON).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)
                clipped = errors.mul_(factor[:, None, None]).reshape(-1, errors.shape[-1])
                sums = []
                if trains_weight:
                    sums.append(clipped.T @ batch.reshape(-1, batch.shape[-1]))
                if trains_bias:
                    sums.append(clipped.sum(dim=0))
                for param, summed in zip(params, sums, strict=True):
                    param.grad = summed.add_(_noise(std, summed, noise_generator)).div_(expected_batch)
                optimizer.step()
                ledger.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
                total += float(losses.sum())
                seen += len(index)
            last = total / max(seen, 1)
    for param in params:
        param.grad = None
    return last, tuple(Charge(float(s), float(q), int(n)) for s, q, n in ledger.history)


def record_errors(
    logits: torch.Tensor, labels: torch.Tensor, record_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's loss and its gradient at the logits of each of its views, in closed form.

    The loss is :class:`shared.training.RecordLoss`'s: ``w[y_i]`` times the mean over the
    record's ``K`` views of their cross-entropies, so its gradient at view ``v``'s logits is
    ``w[y_i] (softmax(z_v) - onehot(y_i)) / K``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, K, classes)``.
    labels : torch.Tensor
        ``(B,)`` integer labels.
    record_weight : torch.Tensor, optional
        ``(B,)`` weight of each record's loss (its class weight); ``None``: 1.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The ``(B,)`` record losses and the ``(B, K, classes)`` errors.
    """
    batch, views = logits.shape[:2]
    log_p = torch.log_softmax(logits, dim=2)
    target = labels[:, None, None].expand(batch, views, 1)
    picked = log_p.gather(2, target)  # log p of the label, (B, K, 1)
    errors = log_p.exp_().scatter_(2, target, picked.exp() - 1)  # softmax - onehot
    losses = picked.reshape(batch, views).mean(dim=1).neg_()
    scale = 1.0 / views if record_weight is None else (record_weight / views)[:, None, None]
    if record_weight is not None:
        losses = losses.mul_(record_weight)
    return losses, errors.mul_(scale)


def input_gram(inputs: torch.Tensor, *, weight: bool = True, bias: bool = True) -> torch.Tensor:
    """Each record's Gram matrix of its views' inputs, ``x_v . x_w + 1``: the data half of its gradient norm.

    Computed once for all records (``N K^2`` values, ``K / F`` of the features' own memory), so a
    step only pays for the errors' half (:func:`record_norms`).

    Parameters
    ----------
    inputs : torch.Tensor
        ``(N, K, F)``: each view's input to the linear layer.
    weight, bias : bool
        Whether the weight (the ``x_v . x_w`` term) and the bias (the ``+ 1``) are trained.

    Returns
    -------
    torch.Tensor
        ``(N, K, K)``.
    """
    records, views = inputs.shape[:2]
    gram = torch.bmm(inputs, inputs.transpose(1, 2)) if weight else inputs.new_zeros(records, views, views)
    return gram.add_(1.0) if bias else gram


def record_norms(errors: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Each record's gradient norm over the linear layer's trained parameters, without its gradient.

    Record ``i``'s gradient is ``sum_v e_v x_v^T`` (weight) and ``sum_v e_v`` (bias), so its
    squared norm is ``sum_{v,w} (e_v . e_w)(x_v . x_w + 1)``: ``||e||^2 (||x||^2 + 1)`` with one
    view. ``O(K^2 C)`` per record, given the inputs' half.

    Parameters
    ----------
    errors : torch.Tensor
        ``(B, K, C)``: the loss's gradient at each view's logits (:func:`record_errors`).
    gram : torch.Tensor
        ``(B, K, K)``: the records' :func:`input_gram`.

    Returns
    -------
    torch.Tensor
        ``(B,)`` per-record gradient norms.
    """
    return torch.bmm(errors, errors.transpose(1, 2)).mul_(gram).sum(dim=(1, 2)).sqrt_()


def _noise(std: float, reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Opacus' Gaussian noise (``_generate_noise`` without secure mode): one draw per value."""
    if std == 0:
        return torch.zeros_like(reference)
    return torch.normal(mean=0, std=std, size=reference.shape, generator=generator, dtype=reference.dtype)
