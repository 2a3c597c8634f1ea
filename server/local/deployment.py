"""``carefl demo --deployment``: the federation as real Flower processes on 127.0.0.1.

One SuperLink (TLS, node authentication, state database) and one SuperNode per hospital, each
a separate process group, started with the certificates and node keys of a consortium
provisioned for the demo. The run goes through ``flwr run`` exactly as a consortium would submit
it, with DP, secure aggregation and a checkpoint after every round; the ServerApp writes the run
folder. Every process is stopped at the end, on an error and on Ctrl-C.

The demo's working folder keeps what a restart needs (consortium, SuperLink database, site
directories with their privacy ledgers, checkpoints, logs): after a crash, the same command with
``--resume`` continues the run from its last completed round.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from client.node import CONNECTED_PATTERN, NodeCredentials, NodeOptions
from client.policy import approve_app
from client.service import RUNTIME_SUFFIX, start_supernode
from client.setup import prepare_site_dir
from client.site import POLICY_FILE
from server.checkpoint import CHECKPOINT_FILE
from server.deployment import (
    LineHandler,
    RunLog,
    RunningSuperLink,
    follow_run,
    progress_printer,
    register_nodes,
    start_superlink,
    submit_run,
)
from server.flwr_cli import COMPLETED
from server.metrics import SiteRoundMetrics
from server.provision import ConsortiumLayout, load_layout, provision
from server.report.runfolder import refuse_occupied
from server.service import APP_DIR
from server.superlink import DEFAULT_HOST, SuperLinkOptions, SuperLinkTLS
from shared.config import RunConfig, absolute_paths
from shared.errors import DeploymentError, InputError
from shared.executables import console_announcer
from shared.fab import build_fab, fab_sha256
from shared.processes import START_TIMEOUT_S, ManagedProcess, ProcessGroups, free_port
from shared.tasks import load_sites, site_name

RUN_TIMEOUT_S = 3600.0
STALE_NODE = "Failed to activate SuperNode"
STALE_NODE_WAIT_S = 120.0


@dataclass(frozen=True)
class DeploymentDemoOptions:
    """What ``carefl demo --deployment`` was asked for.

    Attributes
    ----------
    config : RunConfig
        The federation (its ``run-dir``, ``checkpoint-dir`` and ``resume`` are set here).
    out_dir : Path
        The run folder the ServerApp writes (must not exist or be empty).
    work_dir : Path
        The deployment's working folder (consortium, databases, sites, checkpoints, logs).
    resume : bool
        Continue the run checkpointed in ``work_dir`` (after a crash).
    app_dir : Path
        The Flower app submitted with ``flwr run`` (the folder of CareFL's pyproject.toml).
    run_timeout : float
        Seconds the run may take.
    own_data : Mapping[str, str]
        Hospital name -> its own data (each node's ``data-path``, used whole). Empty: every
        node holds a partition of ``config``'s shared data set (``partition-id``).
    site_worker : bool
        Each node trains in its long-lived site worker (default), or per message as Flower does.
    """

    config: RunConfig
    out_dir: Path
    work_dir: Path
    resume: bool = False
    app_dir: Path = APP_DIR
    run_timeout: float = RUN_TIMEOUT_S
    own_data: Mapping[str, str] = field(default_factory=dict)
    site_worker: bool = True


@dataclass(frozen=True)
class DeploymentPaths:
    """Where the demo deployment keeps its files, under ``root``."""

    root: Path

    @property
    def consortium(self) -> Path:
        """The consortium provisioned for the demo."""
        return self.root / "consortium"

    @property
    def database(self) -> Path:
        """The SuperLink's state (runs, registered nodes)."""
        return self.root / "superlink" / "state.db"

    @property
    def superlink_home(self) -> Path:
        """The SuperLink's ``FLWR_HOME``."""
        return self.root / "superlink" / "flwr-home"

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` of the ``flwr`` CLI (its ``config.toml``)."""
        return self.root / "flwr-home"

    @property
    def checkpoints(self) -> Path:
        """The ServerApp's ``checkpoint-dir``."""
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """Every process's log."""
        return self.root / "logs"

    @property
    def run_config(self) -> Path:
        """The run-config overrides given to ``flwr run``."""
        return self.root / "run-config.toml"

    def site_dir(self, hospital: str) -> Path:
        """Hospital ``hospital``'s private directory (ledger, policy, backbone cache)."""
        return self.root / "sites" / hospital

    def node_home(self, hospital: str) -> Path:
        """Hospital ``hospital``'s SuperNode ``FLWR_HOME``."""
        return self.root / "nodes" / hospital / "flwr-home"


def hospital_slug(name: str) -> str:
    """A site name as a consortium member name (``VA Long Beach`` -> ``va-long-beach``)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._").lower()
    if not slug:
        raise InputError(f"site name {name!r} gives no usable hospital name")
    return slug


class LocalDeployment:
    """The demo's consortium on 127.0.0.1: one SuperLink and a SuperNode per hospital.

    Construction prepares everything that is not a process (folders checked, backbone,
    consortium, site directories); the methods start processes in ``procs``.

    Parameters
    ----------
    options : DeploymentDemoOptions
        The federation and the folders.
    console : Console
        Where commands and progress are shown.
    procs : ProcessGroups
        Owner of the processes (entered by the caller, who stops them).

    Raises
    ------
    InputError
        If the run folder is not empty, or the working folder does not fit ``options.resume``.
    """

    def __init__(self, options: DeploymentDemoOptions, console: Console, procs: ProcessGroups) -> None:
        self.options = options
        self.console = console
        self.procs = procs
        self.out = options.out_dir.resolve()
        self.paths = DeploymentPaths(options.work_dir.resolve())
        _check_folders(self.out, self.paths, options)
        cfg = options.config
        names = list(options.own_data) or [s.name for s in load_sites(cfg.study, cfg.simulation.data_path)]
        self.site_names = dict(zip((hospital_slug(n) for n in names), names, strict=True))
        self.hospitals = list(self.site_names)
        if len(self.hospitals) != len(names):
            raise InputError(f"hospital names {', '.join(names)} are not distinct as consortium members.")
        console.print(
            f"[bold]CareFL deployment demo[/]: task {cfg.study.task}, {len(self.hospitals)} hospitals as SuperNodes "
            f"({', '.join(self.hospitals)}), one SuperLink, all on {DEFAULT_HOST}; working folder {self.paths.root}",
            highlight=False,
        )
        from server.local.demo import demo_policy, ensure_backbone

        ensure_backbone(cfg, console)
        self.layout = _consortium(self.paths, self.hospitals, console)
        for index, hospital in enumerate(self.hospitals):
            name = self.site_names[hospital] if options.own_data else site_name(cfg.study, index)
            prepare_site_dir(self.paths.site_dir(hospital), site=name, policy=demo_policy(cfg.study))
        self.app_sha256 = self.approve_app()
        self.announce = console_announcer(console)
        self.superlink_options = SuperLinkOptions(
            tls=SuperLinkTLS.from_consortium(self.layout), database=self.paths.database, port=free_port()
        )
        self.link: RunningSuperLink | None = None
        self.nodes: list[ManagedProcess] = []
        self._starts = 0

    def approve_app(self) -> str:
        """Approve, at every hospital, the app this deployment submits; returns its FAB's SHA-256.

        The FAB is built from ``options.app_dir`` as ``flwr run`` builds it (deterministic): the
        demo plays the consortium and each hospital's operator, who would review it first.
        """
        sha256 = fab_sha256(build_fab(self.options.app_dir))
        for hospital in self.hospitals:
            approve_app(self.paths.site_dir(hospital) / POLICY_FILE, sha256)
        self.console.print(
            f"Every hospital approved the app {self.options.app_dir} (FAB SHA-256 {sha256}).", highlight=False
        )
        return sha256

    def start_superlink(self) -> RunningSuperLink:
        """Start the SuperLink (again after a crash: same port, same state database) and
        register every hospital's node key (kept by the database across restarts)."""
        self._starts += 1
        self.link = start_superlink(
            self.procs,
            self.superlink_options,
            home=self.paths.superlink_home,
            cli_home=self.paths.cli_home,
            announce=self.announce,
            name="superlink" if self._starts == 1 else f"superlink-{self._starts}",
        )
        keys = {h: self.layout.node_pub(h) for h in self.hospitals}
        registered = register_nodes(self.link, keys, announce=self.announce)
        self.console.print(f"Node keys: {', '.join(f'{h} {state}' for h, state in registered.items())}", highlight=False)
        return self.link

    def start_nodes(self, *, retry_for: float = 0.0) -> list[ManagedProcess]:
        """Start every hospital's SuperNode and wait until the SuperLink accepted each.

        Parameters
        ----------
        retry_for : float
            Seconds to keep restarting a SuperNode the SuperLink refuses as still active: after a
            crash it holds a node "online" until two missed heartbeats (up to a minute).
        """
        assert self.link is not None, "start the SuperLink first"
        self.nodes = [self._start_node(index, hospital, attempt=1) for index, hospital in enumerate(self.hospitals)]
        deadline = time.monotonic() + retry_for
        for position, (index, hospital) in enumerate(enumerate(self.hospitals)):
            attempt = 1
            while True:
                try:
                    self.nodes[position].wait_for_output(CONNECTED_PATTERN, timeout=START_TIMEOUT_S)
                    break
                except DeploymentError:
                    if STALE_NODE not in self.nodes[position].output() or time.monotonic() > deadline:
                        raise
                attempt += 1
                self.console.print(f"{hospital}: the SuperLink still holds its node as active; retrying in 10 s", highlight=False)
                time.sleep(10.0)
                self.nodes[position] = self._start_node(index, hospital, attempt=attempt)
        self.console.print(f"{len(self.nodes)} SuperNodes connected with TLS and node authentication.", highlight=False)
        return self.nodes

    def _start_node(self, index: int, hospital: str, *, attempt: int) -> ManagedProcess:
        assert self.link is not None
        cfg = self.options.config
        own = self.options.own_data.get(self.site_names[hospital])
        shared_data = str(Path(cfg.simulation.data_path).resolve()) if cfg.simulation.data_path else ""
        options = NodeOptions(
            superlink=self.superlink_options.address,
            site_dir=self.paths.site_dir(hospital),
            partition=None if own else (index, len(self.hospitals)),
            site_name=self.site_names[hospital],
            credentials=NodeCredentials.from_dir(self.layout.hospital_dir(hospital)),
            data_path=str(Path(own).resolve()) if own else shared_data,
            port=free_port(),
            site_worker=self.options.site_worker,
        )
        name = f"supernode-{hospital}" if attempt == 1 else f"supernode-{hospital}-{attempt}"
        return start_supernode(
            self.procs, options, home=self.paths.node_home(hospital), announce=self.announce, name=name, wait=False
        )

    def runtimes(self) -> list[ManagedProcess]:
        """The hospitals' site runtimes (they answer every task; a dead one would leave the run waiting)."""
        names = {f"{node.name}{RUNTIME_SUFFIX}" for node in self.nodes}
        return [p for p in self.procs.processes if p.name in names]

    def run(self, *, resume: bool, on_line: LineHandler | None = None) -> Path:
        """Submit the run (``resume``: continue the checkpoint), follow it, check its run folder.

        Raises
        ------
        DeploymentError
            If the SuperLink dies, the run fails, or no run folder was written.
        """
        assert self.link is not None, "start the SuperLink first"
        run_log = RunLog(progress_printer(self.console))

        def handle(when: float, line: str) -> None:
            run_log(when, line)
            if on_line is not None:
                on_line(when, line)

        run_config = _run_config(self.options.config, self.out, self.paths, resume=resume)
        link = self.link
        self.app_sha256 = self.approve_app()  # again: the app's files may have changed since
        run_id = submit_run(link, self.options.app_dir, run_config.to_run_config(), self.paths.run_config, announce=self.announce)
        self.console.print(f"Run {run_id} submitted ({'resuming' if resume else 'new'}); following its ServerApp log:")
        status = follow_run(
            self.procs, link, run_id, handle, announce=self.announce, timeout=self.options.run_timeout,
            watch=[*self.nodes, *self.runtimes()],
        )
        if status != COMPLETED:
            raise run_log.failure(run_id, status, f"see the logs in {self.paths.logs}")
        if not (self.out / "model.pt").is_file():
            raise DeploymentError(f"run {run_id} completed but wrote no run folder at {self.out}; see {self.paths.logs}")
        return self.out


def run_local_deployment(
    options: DeploymentDemoOptions,
    console: Console,
    *,
    procs: ProcessGroups | None = None,
    on_line: LineHandler | None = None,
) -> Path:
    """Run the federation of ``options`` as real processes on 127.0.0.1; return the run folder.

    Parameters
    ----------
    options : DeploymentDemoOptions
        The federation and the folders.
    console : Console
        Where commands and progress are shown.
    procs : ProcessGroups, optional
        Owner of the processes, already entered (a test passes its own to watch them); by
        default one that lives for this call and stops every process on return, error or Ctrl-C.
    on_line : LineHandler, optional
        Also receives every line of the ServerApp's log (e.g. for timing).

    Raises
    ------
    InputError
        If the run folder is not empty, or the working folder does not fit ``resume``.
    DeploymentError
        If a process fails or the run does not complete.
    """
    log_dir = options.work_dir.resolve() / "logs"
    with _owned(procs, log_dir) as owner:
        deployment = LocalDeployment(options, console, owner)
        deployment.start_superlink()
        deployment.start_nodes(retry_for=STALE_NODE_WAIT_S if options.resume else 0.0)
        out = deployment.run(resume=options.resume, on_line=on_line)
    _summarize(out, options.config, console)
    return out


def _check_folders(out: Path, paths: DeploymentPaths, options: DeploymentDemoOptions) -> None:
    refuse_occupied(out)
    if not (options.app_dir / "pyproject.toml").is_file():
        raise InputError(f"{options.app_dir} holds no pyproject.toml: it is not the CareFL Flower app to submit.")
    checkpoint = paths.checkpoints / CHECKPOINT_FILE
    if options.resume and not checkpoint.is_file():
        raise InputError(f"--resume: {checkpoint} does not exist; there is no interrupted run to continue.")
    if not options.resume and paths.root.exists() and any(paths.root.iterdir()):
        raise InputError(
            f"{paths.root} holds an earlier deployment of this run folder; pass --resume to continue it, "
            "or choose another --out."
        )


def _consortium(paths: DeploymentPaths, hospitals: list[str], console: Console) -> ConsortiumLayout:
    if (paths.consortium / "consortium.json").is_file():
        layout = load_layout(paths.consortium)
        if layout.hospitals() != hospitals:
            raise InputError(f"{paths.consortium} was provisioned for {layout.hospitals()}, not {hospitals}.")
        return layout
    layout = provision(paths.consortium, hospitals)
    console.print(f"Provisioned a consortium CA, the SuperLink's certificate and {len(hospitals)} node keys in {layout.root}.")
    return layout


def _run_config(cfg: RunConfig, out: Path, paths: DeploymentPaths, *, resume: bool) -> RunConfig:
    """Server paths made absolute (the ServerApp runs in another working directory)."""
    placed = cfg.with_overrides(run_dir=str(out), checkpoint_dir=str(paths.checkpoints), resume=resume)
    return RunConfig.from_run_config(absolute_paths(placed.to_run_config()))


@contextmanager
def _owned(procs: ProcessGroups | None, log_dir: Path) -> Iterator[ProcessGroups]:
    """The caller's :class:`ProcessGroups` as is, or a new one that stops everything on exit."""
    if procs is not None:
        yield procs
        return
    with ProcessGroups(log_dir) as own:
        yield own


def _summarize(out: Path, cfg: RunConfig, console: Console) -> None:
    """Print the final model's metrics and privacy from its model card."""
    from server.local.demo import privacy_line

    card = json.loads((out / "model_card.json").read_text(encoding="utf-8"))
    final = card["metrics"]["final_per_site"].values()
    rows = [SiteRoundMetrics(**{k: math.nan if v is None else v for k, v in row.items()}) for row in final]
    mean = card["metrics"]["final_weighted_mean"]
    console.print(
        f"Final model: weighted mean accuracy {_fmt(mean['accuracy'])}, AUC {_fmt(mean['auc'])} "
        f"({', '.join(f'{r.site} {_fmt(r.accuracy)}/{_fmt(r.auc)}' for r in rows)})",
        highlight=False,
    )
    console.print(privacy_line(cfg, rows), highlight=False)
    if "resumed" in card:
        resumed = card["resumed"]
        across = ", ".join(f"{site} {v['epsilon']:.2f}" for site, v in sorted(resumed["privacy_per_site_all_runs"].items()))
        console.print(
            f"Resumed after round {resumed['resumed_after_round']}: the epsilons above cover the rounds since; "
            f"over all {len(resumed['flower_runs'])} Flower runs (basic composition, an upper bound): {across or '-'}.",
            highlight=False,
        )
    console.print(f"Run folder: [bold]{out}[/] (metrics.csv/json, model.pt, model_card.json, metrics.png)")


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"
