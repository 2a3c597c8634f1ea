"""DP-SGD is actually applied: per-sample clipping and Gaussian noise of the right scale,
measured on the update itself; calibration lands on the target epsilon."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from shared.dp import check_dp_compatible, train_dp
from shared.errors import ConfigError
from shared.privacy import Charge, calibrate_noise, default_delta, poisson_schedule, run_steps
from shared.training import TrainSettings, train

ONE_STEP = TrainSettings(epochs=1, batch_size=64, learning_rate=1.0, seed=0, momentum=0.0)


def _weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _linear(d: int) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, 2, bias=False)


def test_per_sample_gradients_are_clipped() -> None:
    # Prepare: 64 records with huge inputs, so every per-sample gradient is far above the bound.
    # With 64 records and batch 64, Poisson sampling has rate 1: one step over all records.
    rng = np.random.default_rng(0)
    x = (1000.0 * rng.normal(size=(64, 32))).astype(np.float32)
    y = rng.integers(0, 2, size=64)
    bound = 0.5
    private, plain = _linear(32), _linear(32)
    before = _weights(private)

    # Execute
    train_dp(private, x, y, ONE_STEP, noise_multiplier=1e-6, max_grad_norm=bound)
    train(plain, x, y, ONE_STEP)

    # Assert: the step is lr/B times a sum of 64 vectors of norm <= bound, so its norm <= bound.
    dp_step = torch.linalg.vector_norm(_weights(private) - before).item()
    plain_step = torch.linalg.vector_norm(_weights(plain) - before).item()
    assert dp_step <= bound * (1 + 1e-3)
    assert plain_step > 100 * bound  # the same data without clipping


def test_noise_has_the_calibrated_scale() -> None:
    # Prepare: all-zero inputs make every data gradient of the weights exactly 0,
    # so the whole update is the Gaussian noise: N(0, (sigma * C)^2) / B per coordinate, times lr.
    x = np.zeros((64, 1024), dtype=np.float32)
    y = np.zeros(64, dtype=np.int64)
    sigma, bound = 2.0, 1.5
    module = _linear(1024)
    before = _weights(module)

    # Execute
    train_dp(module, x, y, ONE_STEP, noise_multiplier=sigma, max_grad_norm=bound)

    # Assert: 2048 coordinates estimate the standard deviation within a few percent
    step = (_weights(module) - before).numpy()
    expected_std = sigma * bound / 64
    assert step.std() == pytest.approx(expected_std, rel=0.08)
    assert abs(step.mean()) < 4 * expected_std / np.sqrt(step.size)


def test_opacus_runs_exactly_the_schedule_that_is_charged() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    n, batch = 172, 32
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    settings = TrainSettings(epochs=3, batch_size=batch, learning_rate=0.1, seed=3)
    q, per_epoch = poisson_schedule(n, batch)

    # Execute
    result = train_dp(_linear(8), x, y, settings, noise_multiplier=1.3, max_grad_norm=1.0)

    # Assert: Opacus' own accountant recorded the planned rate and steps
    assert result.charges == (Charge(1.3, q, 3 * per_epoch),)


def test_trainable_batchnorm_is_refused_and_frozen_batchnorm_accepted() -> None:
    # Prepare
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    # Execute / Assert
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_dp_compatible(model)
    for param in model[1].parameters():
        param.requires_grad_(False)
    check_dp_compatible(model)


@pytest.mark.parametrize(("target", "n"), [(1.0, 172), (3.0, 30), (0.5, 1200)])
def test_calibration_spends_the_target_and_no_more(target: float, n: int) -> None:
    # Prepare
    q, _ = poisson_schedule(n, 32)
    steps = run_steps(n, 32, rounds=5, local_epochs=5)
    delta = default_delta(n)

    # Execute
    sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)

    # Assert, with Opacus' RDP analysis called directly (not through the accountant class)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    spent, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert 0.98 * target <= spent <= target


def _chest_model(trainable: str):  # type: ignore[no-untyped-def]
    from shared.backbones import BackboneRegistry
    from shared.config import StudyConfig
    from shared.pipeline import Pretrained, build_model

    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    cfg = StudyConfig(task="chest-xray", backbone="mobilenet_v2-imagenet", trainable=trainable, image_size=32)
    return build_model(cfg, Pretrained(resolved.manifest, resolved.path))


def test_partial_fine_tuning_keeps_batchnorm_frozen_in_eval_mode() -> None:
    # Prepare
    model = _chest_model("last")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # Execute: a forward pass in train mode
    model.train()
    model(torch.rand(4, 28, 28) * 255)

    # Assert: the last block's convolution and the head train; no BatchNorm moves
    assert "head.weight" in trainable
    assert "backbone.1.features.18.0.weight" in trainable  # the last block's 1x1 convolution
    assert not any("features.18.1" in n for n in trainable)  # its BatchNorm stays frozen
    assert all(not m.training for m in norms)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    check_dp_compatible(nn.Sequential(model.backbone, model.head))


def test_dp_on_a_fully_trainable_batchnorm_network_is_refused() -> None:
    # Prepare
    model = _chest_model("full")
    x = np.random.default_rng(0).uniform(0, 255, size=(8, 28, 28)).astype(np.float32)
    y = np.zeros(8, dtype=np.int64)

    # Execute / Assert
    with pytest.raises(ConfigError, match="BatchNorm"):
        train_dp(model, x, y, ONE_STEP, noise_multiplier=1.0, max_grad_norm=1.0)


def test_dp_training_of_the_last_block_leaves_batchnorm_statistics_untouched() -> None:
    # Prepare: the module local training runs in `last` mode (last block + head, on cached
    # activations of the frozen prefix), left in eval mode as evaluation leaves it
    from shared.config import StudyConfig
    from shared.pipeline import local_problem
    from shared.tasks.base import SiteData

    model = _chest_model("last")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(40, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 2, size=40)
    site = SiteData("s", images, labels, images[:8], labels[:8], fingerprint="test")
    cfg = StudyConfig(task="chest-xray", backbone="mobilenet_v2-imagenet", trainable="last", image_size=32)
    problem = local_problem(cfg, model, site, backbone_sha256="a" * 64, cache_dir=None)
    problem.module.eval()
    norms = [m for m in problem.module.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    conv = problem.module[0][0][0].weight.detach().clone()

    # Execute
    settings = TrainSettings(epochs=1, batch_size=8, learning_rate=0.1, seed=0)
    train_dp(problem.module, problem.x_train, problem.y_train, settings, noise_multiplier=1.0, max_grad_norm=1.0)

    # Assert: the convolution learned, its BatchNorm did not
    assert norms
    assert not torch.equal(conv, problem.module[0][0][0].weight)
    for (mean, var), norm in zip(stats, norms, strict=True):
        assert torch.equal(mean, norm.running_mean) and torch.equal(var, norm.running_var)


def test_noise_is_fresh_even_when_the_global_seed_is_reset() -> None:
    # Prepare: model code reseeds torch's global RNG every round (identical initial heads);
    # with zero data gradients each update is pure noise.
    x = np.zeros((64, 512), dtype=np.float32)
    y = np.zeros(64, dtype=np.int64)
    steps = []

    # Execute: two "rounds", each starting from the same global seed and the same settings
    for _ in range(2):
        torch.manual_seed(0)
        module = _linear(512)
        before = _weights(module)
        train_dp(module, x, y, ONE_STEP, noise_multiplier=1.0, max_grad_norm=1.0)
        steps.append((_weights(module) - before).numpy())

    # Assert: independent noise, so the difference of two rounds does not cancel it
    correlation = float(np.corrcoef(steps[0], steps[1])[0, 1])
    assert abs(correlation) < 0.1
    assert np.std(steps[0] - steps[1]) == pytest.approx(np.sqrt(2) * np.std(steps[0]), rel=0.1)
