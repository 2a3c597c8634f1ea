"""DP-SGD of a linear head in closed form (shared.dp_linear, grad-sample-mode linear / auto): the
per-record norms and clipped sums of torch.func's per-sample gradients, the parameters Opacus'
hooks mode trains on the same draw (noise included), the same accountant, and a clear refusal
of any other model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import shared.dp
from shared.backbones.architectures import BackboneWithHead, TrainableStack
from shared.config import StudyConfig
from shared.dp import train_dp
from shared.dp_linear import input_gram, linear_head, record_errors, record_norms
from shared.errors import ConfigError
from shared.privacy import Charge
from shared.training import RecordLoss, TrainSettings, class_weights, train

SETTINGS = TrainSettings(epochs=3, batch_size=8, learning_rate=0.5, seed=0)  # SGD momentum 0.9, as shipped


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _linear(d: int = 6, classes: int = 2, *, trained: str = "both") -> nn.Linear:
    """A seeded linear layer training ``both`` weight and bias, the ``weight`` (no bias) or the ``bias``."""
    torch.manual_seed(0)
    layer = nn.Linear(d, classes, bias=trained != "weight")
    layer.weight.requires_grad_(trained != "bias")
    return layer


def _data(
    shape: tuple[int, ...], *, seed: int, classes: int = 2, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=shape)).astype(np.float32), rng.integers(0, classes, size=shape[0])


def _seeded_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make train_dp's Poisson sample (first generator) and noise (second) repeat from call to call."""
    seeds = iter(range(10**6))
    monkeypatch.setattr(shared.dp, "fresh_generator", lambda: torch.Generator().manual_seed(next(seeds) % 2))


def _torch_func_per_record(
    layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Per-record gradients of RecordLoss (one record at a time, with torch.func): independent of
    both Opacus and the closed form."""
    loss_of = RecordLoss(weight, reduction="sum")
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_of(torch.func.functional_call(layer, p, (xi[None],)), yi[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize(
    ("shape", "classes", "weighting"),
    [
        ((24, 6), 2, "none"),  # one view: ||e||^2 (||x||^2 + 1)
        ((24, 8, 6), 2, "balanced"),
        ((24, 3, 5), 12, "balanced"),
    ],
    ids=["K=1", "K=8", "K=3, 12 classes"],
)
def test_norms_and_clipped_sum_are_those_of_the_per_record_gradients(
    shape: tuple[int, ...], classes: int, weighting: str
) -> None:
    # Prepare: a bound that clips some records and not others
    x, y = _data(shape, seed=1, classes=classes, scale=1.0)
    layer = _linear(shape[-1], classes)
    weight = class_weights(y, weighting)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    views = inputs if inputs.ndim == 3 else inputs[:, None]
    expected = _torch_func_per_record(layer, inputs, labels, weight)
    expected_norms = torch.sqrt(
        expected["weight"].flatten(1).square().sum(1) + expected["bias"].square().sum(1)
    )
    bound = float(expected_norms.median())

    # Execute
    with torch.no_grad():
        losses, errors = record_errors(
            nn.functional.linear(views, layer.weight, layer.bias),
            labels,
            None if weight is None else weight[labels],
        )
        norms = record_norms(errors, input_gram(views))
        factor = (bound / (norms + 1e-6)).clamp(max=1.0)
        clipped = (factor[:, None, None] * errors).reshape(-1, classes)
        summed_w, summed_b = clipped.T @ views.reshape(-1, shape[-1]), clipped.sum(0)

    # Assert: norms, losses and the clipped sum of the per-record gradients (Opacus' clipping factor)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, RecordLoss(weight, reduction="none")(layer(inputs), labels).detach())
    expected_factor = (bound / (expected_norms + 1e-6)).clamp(max=1.0)
    assert 0 < int((expected_factor < 1).sum()) < len(y)
    torch.testing.assert_close(summed_w, torch.einsum("i,icf->cf", expected_factor, expected["weight"]))
    torch.testing.assert_close(summed_b, torch.einsum("i,ic->c", expected_factor, expected["bias"]))


@pytest.mark.parametrize(
    ("shape", "weighting", "trained_part"),
    [
        ((50, 6), "none", "both"),
        ((50, 8, 6), "balanced", "both"),
        ((50, 6), "balanced", "weight"),  # nn.Linear(bias=False)
        ((50, 3, 6), "none", "bias"),  # the weight frozen
    ],
    ids=["K=1", "K=8 balanced", "no bias", "bias only"],
)
def test_linear_trains_what_opacus_hooks_train_on_the_same_draw(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], weighting: str, trained_part: str
) -> None:
    # Prepare: the same Poisson batches and the same noise generator in both modes; real noise,
    # momentum, a bound that clips most records; 50 records in batches of 8 is rate 1/7 and
    # Opacus' expected batch int(50 / 7) = 7, not 8
    x, y = _data(shape, seed=2)
    settings = replace(SETTINGS, class_weighting=weighting)  # type: ignore[arg-type]
    _seeded_generators(monkeypatch)
    trained, results = {}, {}

    # Execute
    for mode in ("hooks", "linear"):
        module = _linear(trained=trained_part)
        results[mode] = train_dp(
            module, x, y, replace(settings, grad_sample_mode=mode), noise_multiplier=0.8, max_grad_norm=0.3
        )
        trained[mode] = _flat(module)
    quiet = _linear(trained=trained_part)
    train_dp(
        quiet, x, y, replace(settings, grad_sample_mode="linear"), noise_multiplier=1e-9, max_grad_norm=0.3
    )

    # Assert: the same parameters (noise included), loss and accountant's history; the noise moved them
    torch.testing.assert_close(trained["linear"], trained["hooks"], rtol=1e-4, atol=1e-5)
    assert results["linear"].loss == pytest.approx(results["hooks"].loss, rel=1e-5)
    assert results["linear"].charges == results["hooks"].charges
    assert (trained["linear"] - _flat(quiet)).abs().max() > 1e-2


def test_empty_poisson_batches_still_step_noise_and_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 40 records at rate 1/20 (batch 2): P(empty batch) = 0.95^40 = 0.13 per step
    x, y = _data((40, 6), seed=3)
    settings = replace(SETTINGS, epochs=2, batch_size=2)
    draws = torch.Generator().manual_seed(0)  # what the seeded Poisson sampler draws, step by step
    empty = 0
    for _ in range(settings.epochs):
        torch.empty((), dtype=torch.int64).random_(generator=draws)  # the DataLoader's base seed
        empty += sum(int((torch.rand(40, generator=draws) < 1 / 20).sum()) == 0 for _ in range(20))
    _seeded_generators(monkeypatch)
    trained, charges = {}, {}

    # Execute
    for mode in ("hooks", "linear"):
        module = _linear()
        result = train_dp(
            module, x, y, replace(settings, grad_sample_mode=mode), noise_multiplier=1.0, max_grad_norm=0.5
        )
        trained[mode], charges[mode] = _flat(module), result.charges

    # Assert: some steps had no record, and both modes took (and counted) them alike
    assert empty >= 2
    torch.testing.assert_close(trained["linear"], trained["hooks"], rtol=1e-4, atol=1e-5)
    assert charges["linear"] == charges["hooks"] == (Charge(1.0, 1 / 20, 40),)


def test_each_records_contribution_is_bounded() -> None:
    # Prepare: huge inputs, every per-record gradient far above the bound; 64 records in a batch
    # of 64 is one step at rate 1
    x, y = _data((64, 6), seed=5, scale=1000.0)
    one_step = TrainSettings(
        epochs=1, batch_size=64, learning_rate=1.0, seed=0, momentum=0.0, grad_sample_mode="linear"
    )
    module, plain = _linear(), _linear()
    before = _flat(module)

    # Execute
    train_dp(module, x, y, one_step, noise_multiplier=1e-6, max_grad_norm=0.5)
    train(plain, x, y, one_step)

    # Assert: the step is lr/64 times a sum of 64 vectors of norm <= 0.5, the unclipped one far larger
    assert torch.linalg.vector_norm(_flat(module) - before).item() <= 0.5 * (1 + 1e-3)
    assert torch.linalg.vector_norm(_flat(plain) - before).item() > 10 * 0.5


def test_auto_takes_the_closed_form_for_a_linear_model_and_ghost_clipping_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a head, logistic regression (a linear head behind nn.Identity), an MLP
    calls: list[str] = []
    closed_form = shared.dp.train_linear_dp

    def spy(split, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(type(split.prefix).__name__)
        return closed_form(split, *args, **kwargs)

    monkeypatch.setattr(shared.dp, "train_linear_dp", spy)
    register = shared.dp.register_conv_norm_sampler  # called by ghost clipping only
    monkeypatch.setattr(shared.dp, "register_conv_norm_sampler", lambda: (calls.append("ghost"), register())[1])
    x, y = _data((32, 6), seed=6)
    torch.manual_seed(0)
    logreg = BackboneWithHead(nn.Identity(), 6, 2)
    mlp = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    frozen_mlp = BackboneWithHead(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), 4, 2)
    frozen_mlp.freeze_backbone()

    # Execute
    for module in (_linear(), logreg, mlp, frozen_mlp):
        train_dp(module, x, y, SETTINGS, noise_multiplier=1.0, max_grad_norm=1.0)

    # Assert: the closed form for the head, logistic regression and a frozen backbone; ghost clipping for the MLP
    assert calls == ["NoneType", "Identity", "ghost", "Sequential"]
    assert linear_head(mlp) is None
    assert SETTINGS.grad_sample_mode == "auto" == StudyConfig().grad_sample_mode


def test_a_frozen_backbone_in_front_trains_as_hooks_do(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a BackboneWithHead whose backbone is frozen (features computed once, up front)
    x, y = _data((48, 6), seed=7)
    _seeded_generators(monkeypatch)

    def model() -> BackboneWithHead:
        torch.manual_seed(0)
        built = BackboneWithHead(nn.Sequential(nn.Linear(6, 5), nn.Tanh()), 5, 2)
        built.freeze_backbone()
        return built

    trained = {}

    # Execute
    for mode in ("hooks", "linear"):
        module = model()
        train_dp(
            module, x, y, replace(SETTINGS, grad_sample_mode=mode), noise_multiplier=0.5, max_grad_norm=0.2
        )
        trained[mode] = _flat(module)

    # Assert
    torch.testing.assert_close(trained["linear"], trained["hooks"], rtol=1e-4, atol=1e-5)
    assert (trained["linear"] - _flat(model())).abs().max() > 1e-2


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)),
        TrainableStack(nn.Linear(6, 6), nn.Linear(6, 2)),
        BackboneWithHead(nn.Linear(6, 6), 6, 2),  # its backbone trains
    ],
    ids=["mlp", "two linear layers", "trainable backbone"],
)
def test_linear_refuses_any_other_model(module: nn.Module) -> None:
    # Prepare
    x, y = _data((20, 6), seed=8)

    # Execute / Assert
    with pytest.raises(ConfigError, match="grad-sample-mode linear trains a single nn.Linear layer"):
        train_dp(
            module,
            x,
            y,
            replace(SETTINGS, grad_sample_mode="linear"),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_the_study_refuses_linear_where_more_than_the_head_trains() -> None:
    # Execute / Assert: a trainable head (transfer) or logistic regression take it; the last blocks do not
    assert StudyConfig(grad_sample_mode="linear").trains_linear_head()
    assert (
        StudyConfig(grad_sample_mode="linear", setup="benchmark", model="logreg").grad_sample_mode == "linear"
    )
    for refused in ({"trainable": "last"}, {"setup": "scratch"}, {"trainable": "full"}):
        with pytest.raises(ConfigError, match="`grad-sample-mode` linear"):
            StudyConfig.from_run_config({"grad-sample-mode": "linear", **refused})
