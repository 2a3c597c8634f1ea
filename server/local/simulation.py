"""Run a CareFL federation on Flower's simulation engine, on this machine."""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from client.policy import SitePolicy
from client.setup import prepare_site_dir
from server.recorder import FederationRecorder
from server.report.result import FederationResult
from shared.config import RunConfig
from shared.errors import ConfigError, Terminated
from shared.offline import configure_flower_env

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod


def simulate(
    cfg: RunConfig,
    *,
    num_sites: int,
    sites_root: Path,
    recorder: FederationRecorder | None = None,
    quiet: bool = True,
    policy: SitePolicy | None = None,
    client_mods: Sequence[Mod] = (),
) -> FederationResult:
    """Run ``cfg`` with one simulated SuperNode per site and return the result.

    Parameters
    ----------
    cfg : RunConfig
        The run configuration (``data-path`` is given to the sites as their data).
    num_sites : int
        Number of simulated hospitals.
    sites_root : Path
        Parent of the simulated hospitals' private directories (``site-<i>`` each); a
        directory without a ledger or policy gets a new ledger and ``policy`` (default policy
        if ``None``), as a hospital's operator would set up.
    recorder : FederationRecorder, optional
        Receives per-round metrics (e.g. for a live table).
    quiet : bool
        Keep Flower's and Ray's per-round logging off the console.
    client_mods : Sequence[Mod]
        Mods run at every site outside CareFL's own (tests inject faults with them).

    Raises
    ------
    ConfigError
        If there are fewer sites than ``min-sites`` (the run could never start).
    RuntimeError
        If the federation produced no result.
    """
    if num_sites < cfg.study.min_sites:
        raise ConfigError(
            f"{num_sites} site(s) cannot run a federation that needs `min-sites` = {cfg.study.min_sites} "
            "in every round; add sites or lower min-sites."
        )
    configure_flower_env()
    # Ray's C++ core would turn SIGTERM into a crash dump and an abort; let Python handle it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from server.app import create_server_app
    from shared.tasks import site_name

    for index in range(num_sites):
        prepare_site_dir(sites_root / f"site-{index}", site=site_name(cfg.study, index), policy=policy)
    results: list[FederationResult] = []
    # The caller writes the run folder (with its baselines), not the ServerApp.
    stop = threading.Event()
    server_app = create_server_app(cfg.with_overrides(run_dir=""), recorder, results, stop)
    client_app = create_client_app({"data-path": cfg.simulation.data_path, "sites-root": str(sites_root)}, client_mods)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": not quiet},
    }
    flwr_logger = logging.getLogger("flwr")
    previous = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(server_app, client_app, num_supernodes=num_sites, backend_config=backend)  # type: ignore[arg-type]
    except BaseException as stopped:
        stop.set()  # Ctrl-C, SIGTERM: the ServerApp's thread ends now, not at a stage timeout
        _stop_ray()  # and Flower's workers stop waiting on sites that will not answer
        if isinstance(stopped, SystemExit) and stopped.code == signal.SIGTERM:
            raise Terminated() from None  # ray.init makes SIGTERM a SystemExit(15) in the driver
        raise
    finally:
        flwr_logger.setLevel(previous)
    if not results:
        raise RuntimeError("the federation ended without a result; see the log above.")
    return results[0]


def _stop_ray() -> None:
    """Shut Ray down if it runs: pending ``ray.get`` calls in Flower's worker threads then end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
