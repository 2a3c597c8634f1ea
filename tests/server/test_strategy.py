"""The delta strategies aggregate exactly like their parents on restored weights."""

from __future__ import annotations

import numpy as np
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from server.recorder import FederationRecorder
from server.strategy import make_strategy
from shared import protocol as wire
from shared.config import RunConfig
from tests.node_proxy import NodeProxy


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
        (NodeProxy(str(i)), _fit_res([lw - g for lw, g in zip(local, global_w)], n))
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
    params, _ = strategy.aggregate_fit(1, [(NodeProxy("0"), _fit_res(delta, 5))], [])

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
        (NodeProxy("1"), EvaluateRes(Status(Code.OK, ""), 0.5, 89, {wire.METRIC_SITE: "Hungary", wire.METRIC_DROPPED_ROWS: 33})),
        (NodeProxy("2"), EvaluateRes(Status(Code.OK, ""), 0.4, 16, {wire.METRIC_SITE: "Switzerland", wire.METRIC_DROPPED_ROWS: 77})),
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
        (NodeProxy("1"), EvaluateRes(Status(Code.OK, ""), 0.5, 89, {wire.METRIC_SITE: "Hungary", **clinical})),
        (NodeProxy("2"), EvaluateRes(Status(Code.OK, ""), 0.4, 16, {wire.METRIC_SITE: "Switzerland"})),
    ]

    # Execute
    strategy.aggregate_evaluate(1, replies, [])

    # Assert: field name = wire key in snake case, each value where it belongs
    hungary, switzerland = recorder.rows
    assert [name.replace("_", "-") for name in CLINICAL_NAMES] == list(wire.CLINICAL_METRICS)
    assert {name: getattr(hungary, name) for name in CLINICAL_NAMES} == dict(zip(CLINICAL_NAMES, clinical.values()))
    assert (hungary.threshold, hungary.sensitivity_at_op) == (clinical["threshold"], clinical["sensitivity-at-op"])
    assert all(np.isnan(getattr(switzerland, name)) for name in CLINICAL_NAMES)


def _trained(n: int, site: str, epsilon: float, incoming: tuple[float, int, dict[str, Scalar]] | None) -> FitRes:
    """A site's fit reply: its (zero) delta, its training epsilon, and the evaluation of the model it received."""
    metrics: dict[str, Scalar] = {wire.METRIC_SITE: site, wire.METRIC_EPSILON: epsilon, wire.METRIC_DELTA: 1e-5}
    if incoming is not None:
        metrics.update(wire.incoming_metrics(*incoming))
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]), n, metrics)


def _evaluation(accuracy: float, spent: float) -> dict[str, Scalar]:
    return {wire.METRIC_ACCURACY: accuracy, wire.METRIC_AUC: 0.5, wire.METRIC_EPSILON: spent, wire.METRIC_DELTA: 1e-5}


def test_metrics_of_round_r_plus_1s_fit_land_on_the_model_after_round_r() -> None:
    # Prepare: two sites, two rounds; each fit reply carries the evaluation of the model received
    seen: list[tuple[int, list[str]]] = []
    recorder = FederationRecorder(listeners=[lambda rnd, rows: seen.append((rnd, [r.site for r in rows]))])
    cfg = RunConfig.of(secure_aggregation=False, evaluate_in_fit=True, num_rounds=2)
    strategy = make_strategy(
        cfg, [np.zeros(2, dtype=np.float32)], recorder, fit_config=lambda r: {}, evaluate_config=lambda r: {}
    )
    a, b = NodeProxy("a"), NodeProxy("b")

    # Execute: round 1 (the initial model's evaluation), round 2, then the final evaluate
    strategy.aggregate_fit(1, [(a, _trained(10, "A", 1.0, (0.7, 5, _evaluation(0.50, 0.0)))),
                               (b, _trained(30, "B", 1.2, (0.6, 7, _evaluation(0.55, 0.0))))], [])  # fmt: skip
    strategy.aggregate_fit(2, [(a, _trained(10, "A", 2.0, (0.5, 5, _evaluation(0.60, 1.0)))),
                               (b, _trained(30, "B", 2.4, (0.4, 7, _evaluation(0.65, 1.2))))], [])  # fmt: skip
    final = [(p, EvaluateRes(Status(Code.OK, ""), loss, n, {wire.METRIC_SITE: site, **_evaluation(acc, eps)}))
             for p, site, loss, n, acc, eps in ((a, "A", 0.3, 5, 0.80, 2.0), (b, "B", 0.2, 7, 0.85, 2.4))]  # fmt: skip
    strategy.aggregate_evaluate(2, final, [])

    # Assert: rows 0 (initial), 1 and 2 (final), each site once, in the order they were measured
    assert seen == [(0, ["A", "B"]), (1, ["A", "B"]), (2, ["A", "B"])]
    by = {(r.round, r.site): r for r in recorder.rows}
    assert (by[0, "A"].accuracy, by[0, "A"].loss, by[0, "A"].num_examples) == (0.50, 0.7, 5)
    assert (by[1, "B"].accuracy, by[1, "B"].loss, by[1, "B"].num_examples) == (0.65, 0.4, 7)
    assert (by[2, "A"].accuracy, by[2, "B"].accuracy) == (0.80, 0.85)
    # ... each with the epsilon its model cost: the initial model none, round r's the one trained in round r
    assert [by[r, "B"].epsilon for r in (0, 1, 2)] == [0.0, 1.2, 2.4]
    assert recorder.training_privacy == {1: {"A": (1.0, 1e-5), "B": (1.2, 1e-5)}, 2: {"A": (2.0, 1e-5), "B": (2.4, 1e-5)}}


def test_a_fit_without_carried_evaluations_records_no_row() -> None:
    # Prepare: evaluate-in-fit off (a separate evaluate message each round)
    recorder = FederationRecorder()
    cfg = RunConfig.of(secure_aggregation=False, evaluate_in_fit=False)
    strategy = make_strategy(
        cfg, [np.zeros(2, dtype=np.float32)], recorder, fit_config=lambda r: {}, evaluate_config=lambda r: {}
    )

    # Execute
    strategy.aggregate_fit(1, [(NodeProxy(s), _trained(10, s, 1.0, (0.7, 5, _evaluation(0.5, 0.0)))) for s in "AB"], [])

    # Assert
    assert recorder.rows == []
