"""Augmentation multiplicity: K seeded views per training image, cached as features, each record's
loss the mean over its views, one clipped gradient per record, and the accountant unchanged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn

from shared.augment import Augmentation, augmented_views
from shared.backbones.architectures import BackboneWithHead, ImageNetInput
from shared.config import StudyConfig
from shared.dp import train_dp
from shared.errors import ConfigError
from shared.features import cache_key, compute_features, site_features
from shared.pipeline import local_problem
from shared.privacy import Charge, poisson_schedule
from shared.tasks import input_spec
from shared.tasks.base import SiteData
from shared.training import RecordLoss, TrainSettings, train
from tests.dp_steps import record_dp_steps

SIDE = 32
CROP = Augmentation(kind="crop-rotate-flip", views=3, seed=5)
SETTINGS = TrainSettings(epochs=3, batch_size=16, learning_rate=0.2, seed=3)


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random 'X-rays' in [0, 255] (float32, like the chest task's inputs)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, 1, 8, 8)).astype(np.float32))
    return nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear")[:, 0].numpy()


def _trunk(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        ImageNetInput(SIDE), nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )


def _site(n_train: int = 20, n_val: int = 7) -> SiteData:
    rng = np.random.default_rng(1)
    return SiteData(
        name="site-a", x_train=_images(n_train, 2), y_train=rng.integers(0, 2, n_train),
        x_val=_images(n_val, 3), y_val=rng.integers(0, 2, n_val), fingerprint="f" * 64,
    )  # fmt: skip


def _views_data(n: int, views: int, *, seed: int, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 1, d)) + 0.3 * rng.normal(size=(n, views, d)) + 0.8 * y[:, None, None]
    return x.astype(np.float32), y


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# ------------------------------------------------------------------ the views
def test_views_are_seeded_distinct_and_leave_the_global_rng_alone() -> None:
    # Prepare
    images = _images(6)
    torch.manual_seed(123)
    state = torch.get_rng_state()

    # Execute
    first = list(augmented_views(images, CROP))
    after = torch.get_rng_state()
    again = list(augmented_views(images, CROP))
    other = list(augmented_views(images, replace(CROP, seed=6)))

    # Assert: K arrays shaped like the images; the same seed gives the same views, another seed
    # others; views differ from the image and from one another; the global RNG is untouched
    assert len(first) == 3 and all(v.shape == images.shape and v.dtype == images.dtype for v in first)
    assert torch.equal(state, after)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    assert not np.array_equal(first[0], first[1])
    assert all(not np.array_equal(v[i], images[i]) for v in first for i in range(len(images)))
    assert [v for v in augmented_views(images, Augmentation())][0] is images


def test_views_are_mild_crops_rotations_and_flips_of_their_image() -> None:
    # Prepare
    images = _images(8, seed=4)
    mirrored = images[:, :, ::-1]

    # Execute
    views = list(augmented_views(images, replace(CROP, views=4)))

    # Assert: each view's centre (a crop of >= 85 % of the area rotated by <= 10 degrees keeps it)
    # still looks like its image's or that image's mirror (Pearson r > 0.5), more than like any
    # other image's either way round; both orientations occur (flip probability 1/2)
    def r(a: np.ndarray, b: np.ndarray) -> float:
        centre = slice(SIDE // 4, 3 * SIDE // 4)
        return float(np.corrcoef(a[centre, centre].ravel(), b[centre, centre].ravel())[0, 1])

    flipped = 0
    for view in views:
        for i in range(len(images)):
            own, mirror = r(view[i], images[i]), r(view[i], mirrored[i])
            others = [abs(r(view[i], images[j])) for j in range(len(images)) if j != i]
            assert max(own, mirror) > max(0.5, *others)
            flipped += mirror > own
    assert 0 < flipped < len(views) * len(images)
    assert all(v.min() >= 0 and v.max() <= 255 for v in views)


# ------------------------------------------------------------------ the cached features
def test_k_views_of_training_images_are_cached_and_validation_is_never_augmented(tmp_path) -> None:
    # Prepare
    site, trunk = _site(), _trunk()
    spec = {"kind": "grayscale-image", "image_size": SIDE}

    # Execute
    features = site_features(
        trunk, site, backbone_sha256="b" * 64, preprocessing=spec, cache_dir=tmp_path, augmentation=CROP
    )

    # Assert: (N, K, F) train features, each view the trunk's features of that view's images;
    # validation features are those of the images themselves
    views = list(augmented_views(site.x_train, CROP))
    assert features.train.shape == (site.num_train, 3, 24)
    for k, view in enumerate(views):
        np.testing.assert_array_equal(features.train[:, k], compute_features(trunk, view))
    np.testing.assert_array_equal(features.val, compute_features(trunk, site.x_val))
    # the cache is used (another trunk would give other features), and keyed by the augmentation
    cached = site_features(
        _trunk(9), site, backbone_sha256="b" * 64, preprocessing=spec, cache_dir=tmp_path, augmentation=CROP
    )
    np.testing.assert_array_equal(cached.train, features.train)
    more = site_features(
        _trunk(9),
        site,
        backbone_sha256="b" * 64,
        preprocessing=spec,
        cache_dir=tmp_path,
        augmentation=replace(CROP, views=2),
    )
    assert more.train.shape == (site.num_train, 2, 24)
    assert not np.array_equal(more.train[:, 0], features.train[:, 0])
    # no augmentation: today's (N, F) features under today's key
    plain = site_features(trunk, site, backbone_sha256="b" * 64, preprocessing=spec, cache_dir=tmp_path)
    np.testing.assert_array_equal(plain.train, compute_features(trunk, site.x_train))
    assert (tmp_path / "features" / f"{cache_key('b' * 64, site.fingerprint, spec)}.npz").is_file()
    assert len(list((tmp_path / "features").iterdir())) == 3


def test_local_problem_of_an_augmented_study_trains_the_head_on_k_views(tmp_path) -> None:
    # Prepare: a chest-xray study on a small random frozen trunk
    cfg = StudyConfig(task="chest-xray", image_size=SIDE, augment="crop-rotate-flip", augment_views=4, seed=8)
    torch.manual_seed(0)
    model = BackboneWithHead(_trunk(), 24, 2)
    model.freeze_backbone()
    site = _site()

    # Execute
    problem = local_problem(cfg, model, site, backbone_sha256="c" * 64, cache_dir=tmp_path)

    # Assert: the head sees (N, 4, F) training inputs, (M, F) validation ones; same labels
    assert problem.module is model.head
    assert problem.x_train.shape == (site.num_train, 4, 24) and problem.x_val.shape == (site.num_val, 24)
    views = list(augmented_views(site.x_train, Augmentation("crop-rotate-flip", 4, 8)))
    np.testing.assert_array_equal(problem.x_train[:, 2], compute_features(model.backbone, views[2]))
    key = cache_key(
        "c" * 64,
        site.fingerprint,
        {**input_spec(cfg), "augmentation": Augmentation("crop-rotate-flip", 4, 8).spec()},
    )
    assert (tmp_path / "features" / f"{key}.npz").is_file()
    assert model.head(torch.from_numpy(problem.x_train[:5])).shape == (5, 4, 2)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": "chest-xray", "augment_views": 4}, "augment-views"),
        ({"task": "heart-disease", "augment": "crop-rotate-flip"}, "image tasks"),
        ({"task": "chest-xray", "augment": "crop-rotate-flip", "trainable": "last"}, "trainable"),
        ({"task": "chest-xray", "augment": "crop-rotate-flip", "setup": "scratch"}, "setup"),
    ],
)
def test_augmentation_the_study_cannot_use_is_refused(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StudyConfig(**changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the loss over views
def test_a_records_loss_is_the_mean_of_its_views_cross_entropies() -> None:
    # Prepare
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3, 2), torch.tensor([0, 1, 1, 0, 1])
    weight = torch.tensor([0.7, 2.0])

    # Execute
    per_record = RecordLoss(weight, reduction="none")(logits, labels)
    mean = RecordLoss(weight)(logits, labels)

    # Assert: against cross-entropy written out view by view
    expected = torch.stack(
        [
            weight[labels[i]]
            * torch.stack([-torch.log_softmax(logits[i, k], 0)[labels[i]] for k in range(3)]).mean()
            for i in range(5)
        ]
    )
    torch.testing.assert_close(per_record, expected)
    torch.testing.assert_close(mean, expected.mean())


def test_one_view_is_todays_training_bit_for_bit() -> None:
    # Prepare: the same records shaped (N, F) as today and (N, 1, F) as one augmented view
    x, y = _views_data(70, 1, seed=2)
    torch.manual_seed(0)
    today, one_view = nn.Linear(6, 2), nn.Linear(6, 2)
    one_view.load_state_dict(today.state_dict())

    # Execute
    train(today, x[:, 0], y, SETTINGS)
    train(one_view, x, y, SETTINGS)

    # Assert: identical bits (and the training moved the weights: the test can fail)
    assert torch.equal(_flat(today), _flat(one_view))
    torch.manual_seed(0)
    assert not torch.equal(_flat(nn.Linear(6, 2)), _flat(today))


def test_a_linear_heads_per_sample_gradient_on_k_views_is_that_of_the_records_mean_loss() -> None:
    # Prepare: Opacus' hooks on a Linear head fed (B, K, F)
    x, y = _views_data(9, 8, seed=3)
    torch.manual_seed(0)
    head = nn.Linear(6, 2)
    wrapped = GradSampleModule(head, loss_reduction="mean")
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    # Execute
    RecordLoss()(wrapped(inputs), labels).backward()

    # Assert: per record, autograd of that record's own mean-over-views loss, computed alone
    for i in range(len(y)):
        reference = nn.Linear(6, 2)
        reference.load_state_dict(head.state_dict())
        nn.functional.cross_entropy(reference(inputs[i]), labels[i].repeat(8)).backward()
        torch.testing.assert_close(head.weight.grad_sample[i], reference.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.bias.grad_sample[i], reference.bias.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ privacy unchanged
def _epsilon_of(charges: tuple[Charge, ...], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in charges]
    return accountant.get_epsilon(delta=delta)


def test_the_accountants_figures_are_identical_with_one_and_eight_views() -> None:
    # Prepare
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    sigma, delta, n = 1.1, 1e-3, 160
    x1, y = _views_data(n, 1, seed=4)
    x8, _ = _views_data(n, 8, seed=4)
    q, per_epoch = poisson_schedule(n, SETTINGS.batch_size)
    torch.manual_seed(0)

    # Execute
    one = train_dp(nn.Linear(6, 2), x1, y, SETTINGS, noise_multiplier=sigma, max_grad_norm=1.0)
    eight = train_dp(nn.Linear(6, 2), x8, y, SETTINGS, noise_multiplier=sigma, max_grad_norm=1.0)

    # Assert: sample rate from the records (not the views), same steps and noise, same epsilon,
    # which Google's accountant computes too
    assert one.charges == eight.charges == (Charge(sigma, q, SETTINGS.epochs * per_epoch),)
    assert q == pytest.approx(SETTINGS.batch_size / n)
    assert _epsilon_of(one.charges, delta) == _epsilon_of(eight.charges, delta)
    google = dp_accounting.rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    google.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), SETTINGS.epochs * per_epoch
    ))  # fmt: skip
    assert _epsilon_of(eight.charges, delta) == pytest.approx(google.get_epsilon(delta), rel=0.03)


def test_with_eight_views_each_record_contributes_one_gradient_clipped_to_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: every step recorded (inputs, parameters, per-sample gradients, the clipped sum)
    x, y = _views_data(60, 8, seed=5)
    x *= 2.0  # most per-record gradients above the bound
    bound = 0.5
    torch.manual_seed(0)
    module = nn.Linear(6, 2)
    steps = record_dp_steps(module, monkeypatch)
    settings = replace(  # Opacus' hooks: the steps recorded are Opacus'
        SETTINGS, batch_size=15, learning_rate=1.0, momentum=0.0, grad_sample_mode="hooks"
    )

    # Execute
    train_dp(module, x, y, settings, noise_multiplier=1e-9, max_grad_norm=bound)

    # Assert, step by step: one per-sample gradient per *record* (B rows, not B * K), equal to the
    # closed-form gradient of its mean-over-views loss; each clipped contribution within the bound
    row_of = {row.tobytes(): i for i, row in enumerate(x)}
    binding = 0
    for step in steps:
        batch_x = step["x"]
        if len(batch_x) == 0:
            continue
        labels = torch.from_numpy(y[[row_of[row.numpy().tobytes()] for row in batch_x]])
        residual = (
            torch.softmax(batch_x @ step["w"].T + step["b"], dim=2)
            - nn.functional.one_hot(labels, 2)[:, None]
        )
        grad_w = torch.einsum("bkc,bkf->bcf", residual, batch_x) / 8
        grad_b = residual.mean(dim=1)
        assert step["samples"][0].shape == (len(batch_x), 2, 6)
        torch.testing.assert_close(step["samples"][0], grad_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step["samples"][1], grad_b, rtol=1e-5, atol=1e-6)
        norms = torch.sqrt(grad_w.flatten(1).pow(2).sum(1) + grad_b.pow(2).sum(1))
        binding += int((norms > bound).sum())
        factor = (bound / (norms + 1e-6)).clamp(max=1.0)
        contributions = torch.cat(
            [(factor[:, None, None] * grad_w).flatten(1), factor[:, None] * grad_b], dim=1
        )
        assert contributions.norm(dim=1).max() <= bound * (1 + 1e-5)
        summed = torch.cat([step["summed"][0].flatten(), step["summed"][1]])
        torch.testing.assert_close(summed, contributions.sum(0), rtol=1e-5, atol=1e-5)
    assert sum(len(s["x"]) > 0 for s in steps) >= 8
    assert binding > 0
