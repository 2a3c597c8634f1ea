"""Secure aggregation (SecAgg+) on Flower's simulation engine gives the plaintext aggregate."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarray_to_bytes

from client.numpy_client import bound_delta
from client.policy import SitePolicy
from server.local.simulation import simulate
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.tasks import load_sites


def test_secure_aggregate_equals_the_plaintext_weighted_mean(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: without DP local training is deterministic, so a plaintext run is the reference
    cfg = RunConfig.of(registry_dir=str(heart_registry), num_rounds=1, local_epochs=1, dp=False, delta_bound=10.0)
    no_dp = SitePolicy(require_dp=False)
    sizes = [len(site.y_train) for site in load_sites(cfg.study)[:3]]

    # Execute
    plain = simulate(cfg.with_overrides(secure_aggregation=False), num_sites=3, sites_root=tmp_path / "plain", policy=no_dp)
    secure = simulate(cfg, num_sites=3, sites_root=tmp_path / "secure", policy=no_dp)

    # Assert: equal within SecAgg+'s quantization error (range 10 over 2^22 levels, weights
    # n / max_weight); masks from the server's and the clients' generators cancelled exactly.
    for p, s in zip(plain.parameters, secure.parameters, strict=True):
        np.testing.assert_allclose(s, p, rtol=0, atol=cfg.secagg.error_bound(sizes))
    assert not np.allclose(secure.parameters[0], 0.0)
    # Each site uploaded masked int64 vectors of the head's shapes (.npy serialized)
    # (after the site's masked weight, one int64 value)
    masked = sum(len(ndarray_to_bytes(np.zeros(shape, dtype=np.int64))) for shape in [(1,), *(a.shape for a in plain.parameters)])
    assert secure.upload_bytes[1] == [masked] * 3
    assert masked > plain.upload_bytes[1][0]
    assert len(secure.final_rows()) == 3


def test_sites_bound_their_update_before_secure_aggregation() -> None:
    # Prepare
    delta = [np.array([[0.5, -3.0], [2.0, 0.1]], dtype=np.float32), np.array([-0.2], dtype=np.float32)]

    # Execute
    bounded, clipped = bound_delta(delta, 1.0)

    # Assert
    np.testing.assert_array_equal(bounded[0], np.array([[0.5, -1.0], [1.0, 0.1]], dtype=np.float32))
    assert clipped == 2 / 5


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"delta_bound": 0.0}, "`delta-bound`"),
        ({"secagg_max_weight": -1.0}, "`secagg-max-weight`"),
        ({"secagg_modulus": 3 * 2**30}, "`secagg-modulus` must be a power of two"),
        ({"secagg_modulus": 2**40}, "`secagg-modulus` must be at most 2^32"),
        ({"secagg_quantization_range": 0}, "`secagg-quantization-range`"),
        ({"secagg_quantization_range": 2**31}, "`secagg-quantization-range`"),
        ({"secagg_threshold": 5, "num_sites": 4}, "`secagg-threshold` = 5 is above the number of sites"),
        ({"secagg_threshold": 1}, "`secagg-threshold` must be 0 (automatic) or >= 2"),
        ({"secagg_modulus": 2**24, "secagg_quantization_range": 2**22, "num_sites": 4}, "would wrap around"),
        ({"stage_timeout": 0.0}, "`stage-timeout`"),
    ],
)
def test_invalid_secure_aggregation_parameters_are_refused_at_start_up(changes: dict[str, object], named: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(named)):
        RunConfig.of(**changes)  # type: ignore[arg-type]


def test_parameters_sound_for_secure_aggregation_are_accepted_and_ignored_without_it() -> None:
    # Execute: the last site count that cannot wrap 2^32 with 2^22 levels is 1023
    accepted = RunConfig.of(num_sites=1023, secagg_threshold=1023)
    plain = RunConfig.of(secure_aggregation=False, secagg_modulus=3)

    # Assert
    assert accepted.secagg.threshold == 1023
    assert not plain.study.secure_aggregation


def test_the_error_bound_covers_quantizing_values_and_weights() -> None:
    # Prepare: a tight setting where both terms are visible
    settings = RunConfig.of(delta_bound=1.0, secagg_max_weight=1000.0, secagg_quantization_range=2**10).secagg

    # Execute
    bound = settings.error_bound([100, 300])

    # Assert: 2 levels of 2/1024 over a total weight 0.4, plus 2 * 0.5 * 1000 / (1024 * 100)
    assert bound == pytest.approx(2 * (2 / 1024) / 0.4 + 2 * 0.5 * 1000 / (1024 * 100))
