"""The "each site alone" baseline: every hospital trains on its own data only, no federation.

Each site starts from the same model as the federation and runs as many local epochs as it
would over the whole federated run (rounds x local epochs), then is evaluated on its own
held-out part exactly like the federated model: the same clinical scores, and its operating
point by the study's rule. With DP, it trains with the noise multiplier calibrated for the
same target epsilon and number of steps, so both methods give each site's data the same
guarantee. This is a researcher's counterfactual: it is not charged to any hospital's ledger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from client.numpy_client import clinical_metrics
from client.privacy import cfg_run_noise
from server.metrics import CLINICAL_NAMES, SiteRoundMetrics
from shared import protocol as wire
from shared.config import RunConfig
from shared.dp import train_dp
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.privacy import epsilon
from shared.scores import classification_metrics
from shared.tasks.base import SiteData
from shared.training import predict_proba, train


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
    total_epochs = cfg.study.num_rounds * cfg.study.local_epochs
    for site in sites:
        model = build_model(cfg.study, pretrained)
        sha = pretrained.manifest.sha256 if pretrained else ""
        problem = local_problem(cfg.study, model, site, backbone_sha256=sha, cache_dir=cache_root)
        settings = replace(train_settings(cfg.study, server_round=1), epochs=total_epochs)
        eps = delta = math.nan
        if cfg.study.dp:
            planned = cfg_run_noise(cfg.study, site.num_train)
            delta = planned.delta
            result = train_dp(
                problem.module, problem.x_train, problem.y_train, settings,
                noise_multiplier=planned.noise_multiplier, max_grad_norm=cfg.study.max_grad_norm,
                accountant=cfg.study.accountant,
            )  # fmt: skip
            eps = epsilon(result.charges, delta=delta, accountant=cfg.study.accountant)
        else:
            train(problem.module, problem.x_train, problem.y_train, settings)
        probs = predict_proba(problem.module, problem.x_val)
        loss, accuracy, auc = classification_metrics(problem.y_val, probs)
        scores = clinical_metrics(problem.y_val, probs, cfg.study.operating_point)
        clinical = {name: float(scores[key]) for name, key in zip(CLINICAL_NAMES, wire.CLINICAL_METRICS, strict=True)}
        rows.append(
            SiteRoundMetrics(cfg.study.num_rounds, site.name, site.num_val, loss, accuracy, auc, eps, delta, **clinical)
        )
    return rows
