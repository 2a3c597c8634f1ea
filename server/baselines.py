"""The "each site alone" baseline: every hospital trains on its own data only, no federation.

Each site starts from the same model as the federation and runs as many local epochs as it
would over the whole federated run (rounds x local epochs), then is evaluated on its own
held-out part, exactly like the federated model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from shared.config import RunConfig
from shared.metrics import SiteRoundMetrics
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.tasks.base import SiteData
from shared.training import evaluate, train


def site_alone(
    cfg: RunConfig,
    sites: Sequence[SiteData],
    pretrained: Pretrained | None,
    *,
    cache_root: Path | None,
) -> list[SiteRoundMetrics]:
    """Train each site on its own data and return its held-out metrics.

    Parameters
    ----------
    cfg : RunConfig
        The federation's configuration (same model, same schedule in total).
    sites : Sequence[SiteData]
        The sites.
    pretrained : Pretrained, optional
        The backbone of the transfer setup.
    cache_root : Path, optional
        Feature cache (shared with the federated run: same keys).
    """
    rows = []
    total_epochs = cfg.num_rounds * cfg.local_epochs
    for site in sites:
        model = build_model(cfg, pretrained)
        sha = pretrained.manifest.sha256 if pretrained else ""
        problem = local_problem(cfg, model, site, backbone_sha256=sha, cache_dir=cache_root)
        settings = replace(train_settings(cfg, server_round=1), epochs=total_epochs)
        train(problem.module, problem.x_train, problem.y_train, settings)
        loss, accuracy, auc = evaluate(problem.module, problem.x_val, problem.y_val)
        rows.append(SiteRoundMetrics(cfg.num_rounds, site.name, site.num_val, loss, accuracy, auc))
    return rows
