"""Opacus' per-sample gradient modes (hooks, ghost clipping, functorch): the same clipped
per-sample gradients, the same bound on each record, and the same accountant's epsilon (the
closed form of a linear head, grad-sample-mode linear: tests/shared/test_dp_linear.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import shared.dp
from shared.backbones.architectures import TrainableStack
from shared.config import StudyConfig
from shared.dp import GRAD_SAMPLE_MODES, OPACUS_MODES, conv2d_norm_sample, train_dp
from shared.errors import ConfigError
from shared.pipeline import train_settings
from shared.privacy import Charge, poisson_schedule
from shared.training import TrainSettings, train

SETTINGS = TrainSettings(epochs=3, batch_size=8, learning_rate=0.5, seed=0, momentum=0.0)
MODES = ("hooks", "ghost", "functorch")


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _linear(d: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, 2)


def _last_block_and_head() -> nn.Module:
    """A small 'last block + head' on (8, 2, 2) features, like MobileNetV2's: a grouped conv
    (per-sample gradients), frozen BatchNorm (eval), ReLU6, a 1x1 conv (ghost norms), pooling, Linear."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8)
    norm.running_mean.uniform_(-0.2, 0.2)
    norm.requires_grad_(False)
    return TrainableStack(
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), norm, nn.ReLU6(),
        nn.Conv2d(8, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip


def _data(shape: tuple[int, ...], *, seed: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype(np.float32), rng.integers(0, 2, size=shape[0])


def _seeded_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make train_dp's Poisson sample and noise repeat from call to call (tests only)."""
    seeds = iter(range(10**6))
    monkeypatch.setattr(shared.dp, "fresh_generator", lambda: torch.Generator().manual_seed(next(seeds) % 2))


def test_the_modes_are_the_configs() -> None:
    # Execute
    settings = train_settings(StudyConfig(grad_sample_mode="ghost"), server_round=1)

    # Assert: every mode of the study is one train_dp knows: Opacus', the closed form of a linear
    # head, and auto (the default: linear where it applies, hooks otherwise)
    assert settings.grad_sample_mode == "ghost"
    assert StudyConfig().grad_sample_mode == "auto" == TrainSettings(1, 1, 1.0, 0).grad_sample_mode
    assert (
        set(StudyConfig.model_fields["grad_sample_mode"].annotation.__args__)
        == set(GRAD_SAMPLE_MODES)
        == {"auto", *MODES, "linear"}
    )
    assert OPACUS_MODES == MODES


def test_an_unknown_mode_is_refused() -> None:
    # Prepare
    x, y = _data((20, 6), seed=0)

    # Execute / Assert
    with pytest.raises(ConfigError, match="grad-sample-mode"):
        train_dp(
            _linear(), x, y, replace(SETTINGS, grad_sample_mode="ew"), noise_multiplier=1.0, max_grad_norm=1.0
        )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="grad-sample-mode"):
        StudyConfig.from_run_config({"grad-sample-mode": "ew"})


@pytest.mark.parametrize("shape", [(64, 6), (20, 8, 6)], ids=["one view", "8 views"])
def test_the_accountants_epsilon_does_not_depend_on_the_mode(shape: tuple[int, ...]) -> None:
    # Prepare: every mode, CareFL's closed form (linear, and auto's choice of it) among them
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    x, y = _data(shape, seed=1)
    sigma, delta = 1.2, 1e-3
    q, per_epoch = poisson_schedule(len(y), SETTINGS.batch_size)

    # Execute
    charges = {
        mode: train_dp(
            _linear(),
            x,
            y,
            replace(SETTINGS, grad_sample_mode=mode),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
        ).charges
        for mode in GRAD_SAMPLE_MODES
    }

    # Assert: the same schedule in every mode, so the same epsilon, which Google's accountant computes too
    assert set(charges.values()) == {(Charge(sigma, q, SETTINGS.epochs * per_epoch),)}
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, SETTINGS.epochs * per_epoch)]
    google = dp_accounting.rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    google.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), SETTINGS.epochs * per_epoch
    ))  # fmt: skip
    assert accountant.get_epsilon(delta) == pytest.approx(google.get_epsilon(delta), rel=0.03)


@pytest.mark.parametrize(
    ("name", "build", "shape", "bound", "weighting"),
    [
        ("head", _linear, (48, 6), 0.3, "none"),
        ("head on 8 views, balanced", _linear, (48, 8, 6), 0.3, "balanced"),
        ("last block + head", _last_block_and_head, (32, 8, 2, 2), 0.05, "none"),
    ],
)
def test_ghost_and_functorch_train_what_hooks_train_on_the_same_draw(
    monkeypatch: pytest.MonkeyPatch, name: str, build, shape: tuple[int, ...], bound: float, weighting: str
) -> None:
    # Prepare: the same Poisson batches and noise in every mode (noise 1e-9: Opacus' accountant
    # refuses 0), a bound that clips most records
    x, y = _data(shape, seed=2)
    settings = replace(SETTINGS, epochs=2, class_weighting=weighting)  # type: ignore[arg-type]
    _seeded_generators(monkeypatch)

    # Execute
    trained = {}
    for mode in MODES:
        module = build()
        train_dp(
            module, x, y, replace(settings, grad_sample_mode=mode), noise_multiplier=1e-9, max_grad_norm=bound
        )
        trained[mode] = _flat(module)
    unclipped = build()
    train_dp(unclipped, x, y, settings, noise_multiplier=1e-9, max_grad_norm=1e6)

    # Assert: the same parameters to float tolerance, which clipping did change (the test can fail)
    for mode in ("ghost", "functorch"):
        torch.testing.assert_close(
            trained[mode], trained["hooks"], rtol=1e-4, atol=1e-5, msg=f"{name}: {mode}"
        )
    assert (trained["hooks"] - _flat(unclipped)).abs().max() > 1e-2
    assert (trained["hooks"] - _flat(build())).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [_linear, _last_block_and_head], ids=["head", "last block + head"])
def test_every_mode_bounds_each_records_contribution(mode: str, build) -> None:
    # Prepare: huge inputs, so every per-sample gradient is far above the bound; 64 records in a
    # batch of 64 is Poisson rate 1: one step over all records
    # (ReLU6 would saturate on huge inputs: the conv stack gets moderate ones and a small bound)
    shape, scale, bound = ((64, 6), 1000.0, 0.5) if build is _linear else ((64, 8, 2, 2), 3.0, 0.01)
    x, y = _data(shape, seed=3, scale=scale)
    one_step = TrainSettings(
        epochs=1, batch_size=64, learning_rate=1.0, seed=0, momentum=0.0, grad_sample_mode=mode
    )  # type: ignore[arg-type]
    private, plain = build(), build()
    before = _flat(private)

    # Execute
    train_dp(private, x, y, one_step, noise_multiplier=1e-6, max_grad_norm=bound)
    train(plain, x, y, one_step)

    # Assert: the step is lr/B times a sum of 64 vectors of norm <= bound, so its norm <= bound
    assert torch.linalg.vector_norm(_flat(private) - before).item() <= bound * (1 + 1e-3)
    assert torch.linalg.vector_norm(_flat(plain) - before).item() > 10 * bound


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(16, 32, 3, stride=2, padding=1), (5, 16, 4, 4)),  # ghost: L (d_a + d_g) < d_a d_g
        (nn.Conv2d(8, 32, 1, bias=False), (5, 8, 2, 2)),  # ghost, MobileNetV2's last 1x1 conv
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), (5, 4, 5, 5)),  # grouped: per-sample gradients
        (nn.Conv2d(3, 2, 3, padding="same"), (5, 3, 6, 6)),  # few channels, many positions
    ],
)
def test_conv_norm_sampler_gives_each_records_gradient_norm(conv: nn.Conv2d, shape: tuple[int, ...]) -> None:
    # Prepare: per-record gradients of a loss with torch.func (independent of Opacus)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    target = torch.randn_like(conv(x))
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(conv, p, (xi[None],))
        return (out * ti[None]).sum()

    per_record = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)

    # Execute: the output gradient of that loss is the target itself
    norms = conv2d_norm_sample(conv, [x], target)

    # Assert
    for name, param in conv.named_parameters():
        expected = per_record[name].reshape(len(x), -1).norm(dim=1)
        torch.testing.assert_close(norms[param], expected, rtol=1e-4, atol=1e-5)
