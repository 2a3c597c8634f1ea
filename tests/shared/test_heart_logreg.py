"""Heart-disease's logistic regression (``model = "logreg"``, FLamby's baseline): the run-config
key, the model it builds, and DP training of it on the real UCI data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.privacy import cfg_run_noise
from shared.config import RunConfig, StudyConfig
from shared.dp import train_dp
from shared.errors import ConfigError
from shared.pipeline import build_model, local_problem, train_settings
from shared.privacy import Charge
from shared.tasks import heart
from shared.tasks.base import SiteData
from shared.training import TrainSettings, evaluate, train

LOGREG = StudyConfig(model="logreg", setup="benchmark", target_delta=1e-3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread: a 13 x 2 model's steps are slower on a loaded machine's thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cleveland() -> SiteData:
    """Cleveland's 199 training and 104 test rows (FLamby's split)."""
    return heart.load_sites(("Cleveland",))[0]


def test_model_key_is_read_from_the_run_config_and_defaults_to_mlp() -> None:
    # Execute
    default = RunConfig.from_run_config({})
    chosen = RunConfig.from_run_config({"model": "logreg", "setup": "benchmark"})

    # Assert
    assert default.study.model == "mlp"
    assert chosen.study.model == "logreg"
    assert chosen.to_run_config()["model"] == "logreg"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"model": "svm"}, "`model` must be one of mlp or logreg, got 'svm'"),
        ({"model": "logreg"}, "no backbone to transfer"),  # setup transfer (the default)
        ({"model": "logreg", "setup": "scratch", "task": "chest-xray"}, "is a heart-disease model"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_with_one_line(values: dict[str, str], named: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(values)

    # Assert
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_logreg_is_one_linear_layer_on_the_13_inputs() -> None:
    # Prepare
    x = torch.randn(5, heart.NUM_FEATURES)

    # Execute
    model = build_model(LOGREG, None)
    mlp = build_model(LOGREG.with_overrides(model="mlp"), None)

    # Assert: only the head's weight and bias, and the logits are x W^T + b
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == {"head.weight": (2, 13), "head.bias": (2,)}
    expected = x @ model.head.weight.T + model.head.bias
    assert torch.allclose(model(x), expected)
    assert sum(p.numel() for p in mlp.parameters()) > 1000  # the MLP is what model = mlp still builds


@pytest.mark.usefixtures("one_thread")
def test_logreg_without_noise_fits_what_scikit_learn_fits(cleveland: SiteData) -> None:
    # Prepare: plain full-batch gradient descent to convergence vs scikit-learn's unpenalized fit
    from sklearn.linear_model import LogisticRegression

    problem = local_problem(LOGREG, build_model(LOGREG, None), cleveland, backbone_sha256="", cache_dir=None)
    settings = TrainSettings(epochs=150, batch_size=256, learning_rate=0.5, seed=0)  # momentum 0.9

    # Execute
    train(problem.module, problem.x_train, problem.y_train, settings)
    ours = problem.module(torch.from_numpy(cleveland.x_val)).argmax(dim=1).numpy()
    sklearn = LogisticRegression(C=1e6, max_iter=5000).fit(cleveland.x_train, cleveland.y_train).predict(cleveland.x_val)

    # Assert: the same test-set predictions, up to a record or two near the boundary
    assert np.mean(ours == sklearn) >= 0.98


@pytest.mark.usefixtures("one_thread")
def test_logreg_trains_full_batch_with_dp_at_the_accounted_epsilon(cleveland: SiteData) -> None:
    # Prepare: epsilon 1 over 20 rounds of one full-batch step (batch 256 > 199 rows: sample rate 1)
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    cfg = LOGREG.with_overrides(target_epsilon=1.0, batch_size=256, num_rounds=20, local_epochs=1, learning_rate=1.0)
    problem = local_problem(cfg, build_model(cfg, None), cleveland, backbone_sha256="", cache_dir=None)
    planned = cfg_run_noise(cfg, len(problem.y_train))
    _, majority = np.unique(cleveland.y_val, return_counts=True)

    # Execute: the run's 20 rounds, as a site trains them
    charges: list[Charge] = []
    for server_round in range(1, cfg.num_rounds + 1):
        result = train_dp(
            problem.module, problem.x_train, problem.y_train, train_settings(cfg, server_round=server_round),
            noise_multiplier=planned.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        )  # fmt: skip
        charges.extend(result.charges)
    _, accuracy, _ = evaluate(problem.module, cleveland.x_val, cleveland.y_val)

    # Assert: Opacus ran 20 steps at rate 1 with the calibrated noise; its epsilon is Google's and the target
    assert planned.sample_rate == 1.0 and planned.steps == 20
    assert sum(c.steps for c in charges) == 20
    assert {(c.noise_multiplier, c.sample_rate) for c in charges} == {(planned.noise_multiplier, 1.0)}
    accountant = RDPAccountant()
    accountant.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in charges]
    ours = accountant.get_epsilon(delta=planned.delta)
    google = dp_accounting.rdp.RdpAccountant(orders=list(RDPAccountant.DEFAULT_ALPHAS))
    google.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(planned.noise_multiplier), 20))
    assert ours == pytest.approx(google.get_epsilon(planned.delta), rel=0.02)
    assert 0.97 <= ours <= 1.0
    assert accuracy > majority.max() / len(cleveland.y_val) + 0.1  # it learned, under the noise
