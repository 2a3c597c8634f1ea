"""Secure aggregation (SecAgg+) on Flower's simulation engine gives the plaintext aggregate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.common import ndarray_to_bytes

from client.numpy_client import bound_delta
from client.policy import SitePolicy
from server.simulation import simulate
from shared.config import RunConfig


def test_secure_aggregate_equals_the_plaintext_weighted_mean(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: without DP local training is deterministic, so a plaintext run is the reference
    cfg = RunConfig(registry_dir=str(heart_registry), num_rounds=1, local_epochs=1, dp=False, delta_bound=10.0)
    no_dp = SitePolicy(require_dp=False)

    # Execute
    plain = simulate(cfg, num_sites=3, sites_root=tmp_path / "plain", policy=no_dp)
    secure = simulate(cfg.with_overrides(secure_aggregation=True), num_sites=3, sites_root=tmp_path / "secure", policy=no_dp)

    # Assert: equal within SecAgg+'s quantization error (range 10 over 2^22 levels, scaled by
    # n / max_weight); masks from the server's and the clients' generators cancelled exactly.
    for p, s in zip(plain.parameters, secure.parameters, strict=True):
        np.testing.assert_allclose(s, p, atol=2e-3)
    assert not np.allclose(secure.parameters[0], 0.0)
    # Each site uploaded masked int64 vectors of the head's shapes (.npy serialized)
    masked = sum(len(ndarray_to_bytes(np.zeros(a.shape, dtype=np.int64))) for a in plain.parameters)
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
