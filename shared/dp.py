"""DP-SGD with Opacus on exactly the trainable parameters, with Poisson sampling.

The caller decides the noise multiplier (calibrated for the whole run, see
:func:`shared.privacy.calibrate_noise`) and charges the privacy ledger before training; this
module only trains, and reports the schedule Opacus actually ran so the caller can check it
against what was charged.

Randomness: the Gaussian noise and the Poisson sample of every call come from generators
seeded with fresh OS entropy, never from the global torch RNG or the run's seed. Model code
reseeds the global RNG (for identical initial heads at all sites), and the run's seed is known
to the server: noise drawn from either would repeat across rounds or be predictable, which
cancels the noise between two rounds' updates and voids the subsampling argument. Opacus'
``secure_mode`` (a CSPRNG) needs ``torchcsprng``, which has no installable wheel here; the
generators are therefore MT19937 seeded from ``secrets`` (Opacus warns about this).
"""

from __future__ import annotations

import functools
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.dp_linear import linear_head, train_linear_dp
from shared.errors import ConfigError
from shared.privacy import Charge
from shared.training import TrainSettings, class_weights, per_sample_loss, run_epochs

OPACUS_MODES = ("hooks", "ghost", "functorch")
"""Opacus' ways of computing what it clips."""

GRAD_SAMPLE_MODES = ("auto", *OPACUS_MODES, "linear")
"""Every :attr:`TrainSettings.grad_sample_mode`: Opacus' modes, CareFL's closed form for a linear
head (:mod:`shared.dp_linear`), and ``auto`` (``linear`` where it applies, ghost clipping otherwise)."""


@dataclass(frozen=True)
class DPTrainResult:
    """What one DP training call did.

    Attributes
    ----------
    loss : float
        Mean training loss of the last epoch.
    charges : tuple[Charge, ...]
        The schedule Opacus' own accountant recorded (noise multiplier, sample rate, steps).
    """

    loss: float
    charges: tuple[Charge, ...]


def check_dp_compatible(module: nn.Module) -> None:
    """Refuse modules Opacus cannot train privately (e.g. trainable BatchNorm), with a clear message.

    Raises
    ------
    ConfigError
        Naming the offending layers and what to do instead.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        details = "; ".join(str(e) for e in errors[:3])
        raise ConfigError(
            f"DP-SGD cannot train this model as it is ({details}). Freeze BatchNorm layers "
            "(train the head or the last blocks with BatchNorm frozen) or use a model without "
            "BatchNorm."
        )


def train_dp(
    module: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = "rdp",
) -> DPTrainResult:
    """Train ``module`` with DP-SGD (per-sample clipping + Gaussian noise, Poisson sampling).

    Parameters
    ----------
    module : nn.Module
        Maps a batch of ``x`` to logits; only parameters with ``requires_grad`` are trained.
    x, y : np.ndarray
        The site's training inputs and labels.
    settings : TrainSettings
        Epochs, expected batch size, learning rate, seed (``proximal_mu`` must be 0), class
        weighting. With ``balanced`` each record's loss is multiplied by its class weight (from
        this ``y``) *before* Opacus computes and clips its gradient, and the batch loss stays a
        mean over the batch: every record still contributes at most ``max_grad_norm``, and the
        Poisson sampling, the noise and so the accountant's epsilon are unchanged.
        ``grad_sample_mode`` picks how the per-sample gradients are had: from Opacus
        (``hooks``, ``ghost``: only their norms, then a second backward pass of the clipped
        loss, ``functorch``), or in closed form for a module whose only trainable layer is one
        ``nn.Linear`` (``linear``, :func:`shared.dp_linear.train_linear_dp`: the same sampling,
        clipping, noise, optimizer and accountant without Opacus' per-step overhead; any other
        module is refused); ``auto`` is ``linear`` where it applies and ``ghost`` otherwise.
        The sampling, the noise and the accounting are the same in every mode. ``x`` may hold
        ``K`` augmented views per record, ``(N, K, ...)``: ``module`` then maps a batch to
        ``(B, K, classes)`` logits, a record's loss is the mean over its views and its one
        gradient is clipped.
    noise_multiplier : float
        Noise standard deviation divided by ``max_grad_norm``.
    max_grad_norm : float
        Per-sample gradient clipping bound.
    accountant : str
        Opacus accountant recording the schedule (``rdp`` or ``prv``).
    """
    from opacus import PrivacyEngine

    if settings.proximal_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported with DP-SGD; use fedavg, fedadam or fedyogi.")
    mode = settings.grad_sample_mode
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(f"grad-sample-mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, not {mode!r}.")
    module.train()
    check_dp_compatible(module)
    generator = fresh_generator()  # Poisson sampling: never the run's (server-known) seed
    split = linear_head(module) if mode in ("auto", "linear") else None
    if split is not None:
        loss, charges = train_linear_dp(
            split, x, y, settings, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            accountant=accountant, sample_generator=generator, noise_generator=fresh_generator(),
        )  # fmt: skip
        return DPTrainResult(loss=loss, charges=charges)
    if mode == "linear":
        trained = [name for name, p in module.named_parameters() if p.requires_grad]
        listed = ", ".join(trained[:4]) + (" ..." if len(trained) > 4 else "")
        raise ConfigError(
            f"grad-sample-mode linear trains a single nn.Linear layer, but this {type(module).__name__} "
            f"trains {listed or 'nothing'}; use auto, hooks, ghost or functorch."
        )
    # auto: ghost clipping, the fastest of Opacus' modes when backbone blocks train (bench_dp_modes)
    mode = "ghost" if mode == "auto" else mode
    if mode == "ghost":
        register_conv_norm_sampler()
    criterion: Any = per_sample_loss(class_weights(y, settings.class_weighting))
    loader = DataLoader(
        BatchedTensors(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=_as_batch,
    )
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    engine = PrivacyEngine(accountant=accountant)
    private = engine.make_private(
        module=module,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=fresh_generator(),
        loss_reduction="mean",  # what run_epochs' loss is: a mean of per-record terms over the batch
        grad_sample_mode=mode,
    )
    if mode == "ghost":  # Opacus wraps the loss: per-record losses, norms, then the clipped loss's backward
        private_module, private_optimizer, criterion, private_loader = private
    else:
        private_module, private_optimizer, private_loader = private
    private_module.train()
    with warnings.catch_warnings():
        # A head trained on cached features has inputs without gradients: harmless here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        last = run_epochs(private_module, private_optimizer, lambda: private_loader, settings.epochs, loss_fn=criterion)
    charges = tuple(Charge(float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    _detach(private_module)
    return DPTrainResult(loss=last, charges=charges)


@functools.cache
def register_conv_norm_sampler() -> None:
    """Give Opacus' ghost clipping a per-sample gradient *norm* for ``nn.Conv2d`` (it has none).

    Without one, ghost clipping materializes a convolution's per-sample gradients (``B`` copies
    of its weight) just to take their norms, as the hooks mode does. Registered once per process
    through Opacus' own :func:`opacus.grad_sample.register_norm_sampler`; see
    :func:`conv2d_norm_sample`.
    """
    from opacus.grad_sample import register_norm_sampler

    register_norm_sampler(nn.Conv2d)(conv2d_norm_sample)


def conv2d_norm_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a convolution, by the ghost-norm identity where it pays.

    A convolution is a linear map applied at ``L`` output positions to the unfolded input
    patches ``a_l`` (``d_a = C_in k_h k_w``), with output gradients ``g_l`` (``d_g = C_out``), so
    a record's weight gradient is ``sum_l g_l a_l^T`` and its squared norm is
    ``sum_{l,l'} (a_l . a_l') (g_l . g_l')`` (Li et al. 2022; Opacus' own ``nn.Linear`` rule
    on sequences): ``O(L^2 (d_a + d_g))`` per record instead of ``O(L d_a d_g)``. Grouped or
    string-padded convolutions, and those where ``L (d_a + d_g) >= d_a d_g``, take the norms
    of Opacus' per-sample gradients instead. The bias gradient is ``sum_l g_l``.

    Parameters
    ----------
    layer : nn.Conv2d
        The convolution.
    activations : list[torch.Tensor]
        Its input, ``[(B, C_in, H, W)]``.
    backprops : torch.Tensor
        The gradient of the loss at its output, ``(B, C_out, H', W')`` (scaled by Opacus).

    Returns
    -------
    dict[nn.Parameter, torch.Tensor]
        The ``(B,)`` per-sample gradient norm of each trainable parameter.
    """
    x = activations[0].to(backprops.dtype)
    batch, d_g = backprops.shape[:2]
    positions = backprops.shape[2] * backprops.shape[3]
    d_a = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    ghost = (
        layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and positions * (d_a + d_g) < d_a * d_g
    )
    if not ghost:
        from opacus.grad_sample.conv import compute_conv_grad_sample

        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.reshape(len(g), -1).norm(dim=1) for p, g in grads.items()}
    g = backprops.reshape(batch, d_g, positions)
    ggt = torch.einsum("ncl,ncm->nlm", g, g)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        a = nn.functional.unfold(
            x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
        )
        aat = torch.einsum("ncl,ncm->nlm", a, a)
        norms[layer.weight] = torch.einsum("nlm,nlm->n", ggt, aat).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = ggt.sum(dim=(1, 2)).clamp(min=0).sqrt()
    return norms


def fresh_generator() -> torch.Generator:
    """A torch generator seeded with 63 bits of OS entropy, independent of any global seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class BatchedTensors(TensorDataset):
    """A tensor dataset that hands a whole sampled batch over in one indexing operation.

    Opacus' Poisson loader draws a list of record indices per step; with ``__getitems__`` the
    DataLoader slices the tensors once instead of fetching and collating record by record,
    which otherwise costs more than the DP step itself for a small head.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _as_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate function for :class:`BatchedTensors`: the batch is already stacked."""
    return batch


def _detach(private_module: nn.Module) -> None:
    """Remove Opacus' hooks so the module can be evaluated or serialized normally."""
    to_standard = getattr(private_module, "to_standard_module", None)
    if callable(to_standard):
        to_standard()


def same_schedule(planned: Sequence[Charge], done: Sequence[Charge]) -> bool:
    """Return whether Opacus ran at most the planned steps with the planned noise and rate."""
    if not done:
        return True
    rates = {(round(c.noise_multiplier, 12), round(c.sample_rate, 12)) for c in (*planned, *done)}
    return len(rates) == 1 and sum(c.steps for c in done) <= sum(c.steps for c in planned)
