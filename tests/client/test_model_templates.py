"""The site worker's kept models: a copy trains exactly as a freshly built model would."""

from __future__ import annotations

import torch

from client.worker.templates import ModelTemplates
from shared.config import RunConfig
from shared.pipeline import build_model


def test_a_kept_model_is_a_fresh_copy_that_leaves_the_rng_as_building_does() -> None:
    # Prepare
    cfg = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=1).study
    templates = ModelTemplates()
    first = templates.build(cfg, None)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # a message trains its copy

    # Execute
    kept = templates.build(cfg, None)
    after_kept = torch.rand(3)
    fresh = build_model(cfg, None)
    after_fresh = torch.rand(3)

    # Assert: the same tensors as a fresh build (not the trained copy), and the same RNG after
    assert kept is not first
    for a, b in zip(kept.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(after_kept, after_fresh)


def test_the_least_recently_used_study_is_dropped() -> None:
    # Prepare
    templates = ModelTemplates(capacity=1)
    heart = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=1).study
    other = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=1, seed=7).study

    # Execute
    templates.build(heart, None)
    templates.build(other, None)

    # Assert
    assert len(templates._built) == 1  # pylint: disable=protected-access
