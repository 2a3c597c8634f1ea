"""Class weighting ("balanced"): weights from the site's own counts, a per-sample loss that helps
the rare class, and DP-SGD's guarantee untouched (same accountant, each record still clipped)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from sklearn.metrics import recall_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from shared.config import StudyConfig
from shared.dp import train_dp
from shared.errors import ConfigError
from shared.pipeline import train_settings
from shared.privacy import Charge, poisson_schedule
from shared.tasks import load_site
from shared.training import TrainSettings, class_weights, predict_proba, train
from tests.dp_steps import record_dp_steps

NONE = TrainSettings(epochs=4, batch_size=16, learning_rate=0.1, seed=7)
BALANCED = replace(NONE, class_weighting="balanced")


def _imbalanced(n: int, *, rare_fraction: float, seed: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian classes (mean shift 1 along every axis), class 1 rare."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) < round(rare_fraction * n)).astype(np.int64)
    rng.shuffle(y)
    x = rng.normal(size=(n, d)) + 0.5 * y[:, None]
    return x.astype(np.float32), y


def _mlp(d: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 2))


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_balanced_weights_are_sklearns_on_the_sites_own_training_counts() -> None:
    # Prepare: a real, imbalanced hospital (VA Long Beach: 19 negatives, 66 positives in training)
    site = load_site(StudyConfig(task="heart-disease"), 2)
    counts = np.bincount(site.y_train)

    # Execute
    weights = class_weights(site.y_train, "balanced")

    # Assert: scikit-learn's "balanced", i.e. n / (k * n_c); each class carries total weight n / k
    assert weights is not None
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=site.y_train)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), len(site.y_train) / (2 * counts), rtol=1e-6)
    np.testing.assert_allclose(weights.numpy() * counts, [len(site.y_train) / 2] * 2, rtol=1e-6)
    assert class_weights(site.y_train, "none") is None


def test_a_class_absent_at_the_site_gets_no_weight_and_k_counts_present_classes() -> None:
    # Prepare: Switzerland's training part has positives only; a 3-class site lacks class 1
    switzerland = load_site(StudyConfig(task="heart-disease"), 1)
    y3 = np.array([0, 0, 0, 2], dtype=np.int64)

    # Execute
    swiss = class_weights(switzerland.y_train, "balanced")
    three = class_weights(y3, "balanced")

    # Assert: one present class weighs 1 (n / (1 * n)); the absent class has weight 0, k = 2 present
    assert swiss is not None and three is not None
    assert np.bincount(switzerland.y_train, minlength=2)[0] == 0
    np.testing.assert_allclose(swiss.numpy(), [0.0, 1.0])
    np.testing.assert_allclose(three.numpy(), [4 / (2 * 3), 0.0, 4 / (2 * 1)])


def test_unknown_weighting_is_refused() -> None:
    with pytest.raises(ConfigError, match="class-weighting"):
        class_weights(np.array([0, 1]), "inverse")


def test_train_settings_carry_the_studys_weighting() -> None:
    # Execute
    settings = train_settings(StudyConfig(task="heart-disease", class_weighting="balanced"), server_round=2)

    # Assert
    assert settings.class_weighting == "balanced"
    assert train_settings(StudyConfig(task="heart-disease"), server_round=2).class_weighting == "none"


def test_none_is_todays_training_bit_for_bit() -> None:
    # Prepare: the training loop as it was before class weighting, written out by hand
    x, y = _imbalanced(90, rare_fraction=0.1, seed=5)
    ours, reference = _mlp(), _mlp()
    params = list(reference.parameters())
    optimizer = torch.optim.SGD(params, lr=NONE.learning_rate, momentum=NONE.momentum)
    generator = torch.Generator().manual_seed(NONE.seed)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    reference.train()
    for _ in range(NONE.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), NONE.batch_size):
            batch = order[start : start + NONE.batch_size]
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(reference(inputs[batch]), labels[batch]).backward()
            optimizer.step()

    # Execute
    train(ours, x, y, NONE)

    # Assert: identical bits, and the balanced run does move elsewhere (the test can fail)
    assert torch.equal(_flat(ours), _flat(reference))
    weighted = _mlp()
    train(weighted, x, y, BALANCED)
    assert not torch.equal(_flat(weighted), _flat(reference))


def test_balanced_raises_the_rare_class_recall_on_a_9_to_1_site() -> None:
    # Prepare: 9:1 training data; a balanced test set from the same two distributions.
    # Plain training is deterministic (seeded order, seeded model), so this is not flaky.
    x, y = _imbalanced(400, rare_fraction=0.1, seed=1)
    x_test, y_test = _imbalanced(2000, rare_fraction=0.5, seed=2)
    settings = replace(NONE, epochs=20, learning_rate=0.05)
    plain, weighted = _mlp(), _mlp()

    # Execute
    train(plain, x, y, settings)
    train(weighted, x, y, replace(settings, class_weighting="balanced"))

    # Assert: the rare class is found far more often, at little cost to the common one
    recall = {}
    for name, module in (("none", plain), ("balanced", weighted)):
        predicted = predict_proba(module, x_test).argmax(axis=1)
        recall[name] = recall_score(y_test, predicted, average=None)
    assert recall["none"][1] < 0.5
    assert recall["balanced"][1] > recall["none"][1] + 0.1
    assert recall["balanced"].mean() > recall["none"].mean()  # balanced accuracy


def _epsilon_of(charges: tuple[Charge, ...], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in charges]
    return accountant.get_epsilon(delta=delta)


def test_weighting_leaves_the_accountants_epsilon_unchanged() -> None:
    # Prepare
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    x, y = _imbalanced(180, rare_fraction=0.1, seed=3)
    sigma, delta = 1.1, 1e-3
    q, per_epoch = poisson_schedule(len(y), NONE.batch_size)

    # Execute
    plain = train_dp(_mlp(), x, y, NONE, noise_multiplier=sigma, max_grad_norm=1.0)
    weighted = train_dp(_mlp(), x, y, BALANCED, noise_multiplier=sigma, max_grad_norm=1.0)

    # Assert: same schedule recorded, same epsilon, which Google's accountant computes too
    assert weighted.charges == plain.charges == (Charge(sigma, q, NONE.epochs * per_epoch),)
    assert _epsilon_of(weighted.charges, delta) == _epsilon_of(plain.charges, delta)
    google = dp_accounting.rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    google.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), NONE.epochs * per_epoch
    ))  # fmt: skip
    assert _epsilon_of(weighted.charges, delta) == pytest.approx(google.get_epsilon(delta), rel=0.03)


def test_weights_scale_each_records_loss_before_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 60 records at 9:1 (the rare class weighs 5) in Poisson batches of 15 on average,
    # so a batch's weights do not sum to its size (a weighted *mean* would differ from the
    # per-sample loss). A linear model has closed-form per-record gradients; every step is
    # recorded: the batch and parameters it saw, the per-sample gradients Opacus clips, the sum.
    x, y = _imbalanced(60, rare_fraction=0.1, seed=4, d=6)
    x *= 0.4  # unweighted gradients mostly below the bound; weighted rare ones above it
    bound = 1.0
    torch.manual_seed(0)
    module = nn.Linear(6, 2)
    weights = class_weights(y, "balanced")
    assert weights is not None and weights.max() == pytest.approx(5.0)
    steps = record_dp_steps(module, monkeypatch)
    settings = replace(  # Opacus' hooks: the steps recorded are Opacus'
        BALANCED, epochs=3, batch_size=15, learning_rate=1.0, momentum=0.0, grad_sample_mode="hooks"
    )

    # Execute
    train_dp(module, x, y, settings, noise_multiplier=1e-9, max_grad_norm=bound)

    # Assert, step by step
    row_of = {row.tobytes(): i for i, row in enumerate(x)}
    binding = 0
    for step in steps:
        batch_x = step["x"]
        if len(batch_x) == 0:
            continue
        labels = torch.from_numpy(y[[row_of[row.numpy().tobytes()] for row in batch_x]])
        # 1: what Opacus clips is w[y_i] * grad ce_i of each record alone (weighted before clipping)
        residual = torch.softmax(batch_x @ step["w"].T + step["b"], dim=1) - nn.functional.one_hot(labels, 2)
        residual = weights[labels][:, None] * residual
        grad_w = residual[:, :, None] * batch_x[:, None, :]
        torch.testing.assert_close(step["samples"][0], grad_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step["samples"][1], residual, rtol=1e-5, atol=1e-6)
        # 2: no record contributes more than the bound to the sum that gets noised
        norms = torch.sqrt(grad_w.flatten(1).pow(2).sum(1) + residual.pow(2).sum(1))
        binding += int((norms[labels == 1] > bound).sum())
        factor = (bound / (norms + 1e-6)).clamp(max=1.0)
        contributions = torch.cat(
            [(factor[:, None, None] * grad_w).flatten(1), factor[:, None] * residual], dim=1
        )
        assert contributions.norm(dim=1).max() <= bound * (1 + 1e-5)
        summed = torch.cat([step["summed"][0].flatten(), step["summed"][1]])
        torch.testing.assert_close(summed, contributions.sum(0), rtol=1e-5, atol=1e-5)
    assert sum(len(s["x"]) > 0 for s in steps) >= 8  # 3 epochs of 4 steps, few empty
    assert binding > 0  # clipping did cut weighted rare-class gradients
