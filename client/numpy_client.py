"""The site's Flower client: trains the exchanged tensors locally and returns their delta.

It only translates between Flower's messages and :mod:`shared.pipeline`; the data, the model
and the training loop live there.
"""

from __future__ import annotations

import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from client.site import SiteEnvironment
from client.store import BackboneStore
from shared.config import RunConfig
from shared.params import get_arrays, set_arrays, subtract
from shared.pipeline import (
    LocalProblem,
    build_model,
    local_problem,
    train_settings,
)
from shared.tasks import load_site
from shared.training import evaluate, train

# Keys the server adds to the run config it sends each round.
ROUND_KEY = "server-round"
PROX_KEY = "proximal_mu"
SERVER_KEYS = (ROUND_KEY, PROX_KEY)


def config_from_message(config: dict[str, Scalar]) -> tuple[RunConfig, int, float]:
    """Split a fit/evaluate config into the run config, the round and FedProx's mu."""
    values = {k: v for k, v in config.items() if k not in SERVER_KEYS}
    server_round = int(config.get(ROUND_KEY, 0))
    mu = float(config.get(PROX_KEY, 0.0))
    return RunConfig.from_run_config(values), server_round, mu


class SiteClient(NumPyClient):
    """Flower client of one hospital.

    Parameters
    ----------
    env : SiteEnvironment
        The site's data and cache locations.
    """

    def __init__(self, env: SiteEnvironment) -> None:
        self.env = env
        torch.set_num_threads(1)

    def _problem(self, cfg: RunConfig) -> LocalProblem:
        pretrained = None
        sha = ""
        if cfg.setup == "transfer":
            pretrained = BackboneStore(self.env.cache_dir).get(cfg.backbone_sha256)
            sha = pretrained.manifest.sha256
        model = build_model(cfg, pretrained)
        site = load_site(cfg, self.env.index, self.env.data_path)
        return local_problem(cfg, model, site, backbone_sha256=sha, cache_dir=self.env.cache_dir)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train from the global tensors; return the delta, the example count and the loss."""
        cfg, server_round, mu = config_from_message(config)
        problem = self._problem(cfg)
        set_arrays(problem.model, problem.names, parameters)
        reference = [p.detach().clone() for p in problem.module.parameters() if p.requires_grad]
        loss = train(
            problem.module,
            problem.x_train,
            problem.y_train,
            train_settings(cfg, server_round=server_round, proximal_mu=mu),
            reference=reference,
        )
        delta = subtract(get_arrays(problem.model, problem.names), parameters)
        return delta, len(problem.y_train), {"site": problem.site_name, "train-loss": loss}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the global tensors on the site's held-out part."""
        cfg, _, _ = config_from_message(config)
        problem = self._problem(cfg)
        set_arrays(problem.model, problem.names, parameters)
        loss, accuracy, auc = evaluate(problem.module, problem.x_val, problem.y_val)
        metrics: dict[str, Scalar] = {"site": problem.site_name, "accuracy": accuracy, "auc": auc}
        return loss, len(problem.y_val), metrics
