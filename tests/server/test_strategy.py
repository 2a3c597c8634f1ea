"""The delta strategies aggregate exactly like their parents on restored weights."""

from __future__ import annotations

import numpy as np
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy

from server.recorder import FederationRecorder
from server.strategy import make_strategy
from shared.config import RunConfig


class _Proxy(ClientProxy):
    """A stand-in for the network connection to a node (collaborator only)."""

    def get_properties(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_parameters(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def fit(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def evaluate(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def reconnect(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _fit_res(arrays: list[np.ndarray], n: int) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})


def test_fedavg_on_deltas_equals_weighted_mean_of_local_weights() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    global_w = [rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    locals_w = [[g + rng.normal(size=g.shape).astype(np.float32) for g in global_w] for _ in range(3)]
    counts = [10, 30, 60]
    recorder = FederationRecorder()
    strategy = make_strategy(
        RunConfig.of(secure_aggregation=False), global_w, recorder, fit_config=lambda r: {}, evaluate_config=lambda r: {}
    )
    results = [
        (_Proxy(str(i)), _fit_res([lw - g for lw, g in zip(local, global_w)], n))
        for i, (local, n) in enumerate(zip(locals_w, counts))
    ]

    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])

    # Assert: independent weighted mean of the clients' local weights
    expected = [sum(n * lw[i] for lw, n in zip(locals_w, counts)) / sum(counts) for i in range(2)]
    got = parameters_to_ndarrays(params)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert recorder.upload_bytes[1] == [sum(len(t) for t in r.parameters.tensors) for _, r in results]
    # The next round's deltas are taken against the new global model
    np.testing.assert_allclose(strategy.global_arrays[0], expected[0], rtol=1e-5, atol=1e-6)


def test_fedadam_moves_towards_the_mean_delta() -> None:
    # Prepare
    global_w = [np.zeros((3,), dtype=np.float32)]
    delta = [np.ones((3,), dtype=np.float32)]
    cfg = RunConfig.of(strategy="fedadam", server_learning_rate=0.1, min_sites=1)
    strategy = make_strategy(
        cfg, global_w, FederationRecorder(), fit_config=lambda r: {}, evaluate_config=lambda r: {}
    )

    # Execute
    params, _ = strategy.aggregate_fit(1, [(_Proxy("0"), _fit_res(delta, 5))], [])

    # Assert: Adam's first step, computed by hand with Flower's bias correction (t = round + 1)
    beta_1, beta_2, eta, t = 0.9, 0.99, 0.1, 2.0
    m, v = (1 - beta_1) * 1.0, (1 - beta_2) * 1.0
    eta_norm = eta * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    new = parameters_to_ndarrays(params)[0]
    np.testing.assert_allclose(new, eta_norm * m / (np.sqrt(v) + 1e-9), rtol=1e-5)


def test_each_sites_dropped_rows_reach_the_recorder() -> None:
    # Prepare: two sites' evaluation replies, as client.numpy_client sends them
    from flwr.common import EvaluateRes

    from shared import protocol as wire

    recorder = FederationRecorder()
    strategy = make_strategy(
        RunConfig.of(secure_aggregation=False), [np.zeros(2, np.float32)], recorder,
        fit_config=lambda r: {}, evaluate_config=lambda r: {},
    )  # fmt: skip
    replies = [
        (_Proxy("1"), EvaluateRes(Status(Code.OK, ""), 0.5, 89, {wire.METRIC_SITE: "Hungary", wire.METRIC_DROPPED_ROWS: 33})),
        (_Proxy("2"), EvaluateRes(Status(Code.OK, ""), 0.4, 16, {wire.METRIC_SITE: "Switzerland", wire.METRIC_DROPPED_ROWS: 77})),
    ]

    # Execute
    strategy.aggregate_evaluate(1, replies, [])

    # Assert
    assert recorder.dropped_rows == {"Hungary": 33, "Switzerland": 77}


def test_each_sites_clinical_scores_and_operating_point_reach_its_row() -> None:
    # Prepare: a site reporting every clinical metric, and one (older) reporting none
    from flwr.common import EvaluateRes

    from server.metrics import CLINICAL_NAMES
    from shared import protocol as wire

    recorder = FederationRecorder()
    strategy = make_strategy(
        RunConfig.of(secure_aggregation=False), [np.zeros(2, np.float32)], recorder,
        fit_config=lambda r: {}, evaluate_config=lambda r: {},
    )  # fmt: skip
    clinical = {key: 0.01 * (i + 1) for i, key in enumerate(wire.CLINICAL_METRICS)}
    replies = [
        (_Proxy("1"), EvaluateRes(Status(Code.OK, ""), 0.5, 89, {wire.METRIC_SITE: "Hungary", **clinical})),
        (_Proxy("2"), EvaluateRes(Status(Code.OK, ""), 0.4, 16, {wire.METRIC_SITE: "Switzerland"})),
    ]

    # Execute
    strategy.aggregate_evaluate(1, replies, [])

    # Assert: field name = wire key in snake case, each value where it belongs
    hungary, switzerland = recorder.rows
    assert [name.replace("_", "-") for name in CLINICAL_NAMES] == list(wire.CLINICAL_METRICS)
    assert {name: getattr(hungary, name) for name in CLINICAL_NAMES} == dict(zip(CLINICAL_NAMES, clinical.values()))
    assert (hungary.threshold, hungary.sensitivity_at_op) == (clinical["threshold"], clinical["sensitivity-at-op"])
    assert all(np.isnan(getattr(switzerland, name)) for name in CLINICAL_NAMES)
