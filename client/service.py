"""Run a hospital's SuperNode process; ``carefl node`` keeps it in the foreground until Ctrl-C.

The hospital's operator prepares the site directory once (``carefl budget --init``: privacy
ledger and policy) and receives its folder from the consortium's ``carefl provision`` (node key
and the CA's certificate). The SuperNode runs the CareFL ClientApp for each message; its log is
shown on the console.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from client.ledger import LEDGER_FILE
from client.node import CONNECTED_PATTERN, NodeCredentials, NodeOptions, supernode_command
from client.policy import SitePolicy
from client.site import POLICY_FILE
from shared.errors import DeploymentError, InputError
from shared.executables import INSECURE_WARNING, Announce, command_line, console_announcer, flower_env
from shared.processes import START_TIMEOUT_S, ManagedProcess, ProcessGroups, follow_output


def check_site_dir(site_dir: Path, policy: Path | None = None) -> SitePolicy:
    """Refuse a site directory without its privacy ledger, or whose policy file is broken.

    Parameters
    ----------
    site_dir : Path
        The site directory (the operator prepares it once).
    policy : Path, optional
        The site's policy file (default: ``site_dir/policy.toml``).

    Returns
    -------
    SitePolicy
        The site's policy, as every message will read it.

    Raises
    ------
    InputError
        If ``site_dir/privacy-ledger.json`` is missing, or the policy file is missing or invalid
        (the message names the file and the key).
    """
    if not (site_dir / LEDGER_FILE).is_file():
        raise InputError(
            f"{site_dir} has no privacy ledger; create it once with "
            f"`carefl budget --site-dir {site_dir} --init --site NAME` (and review its policy.toml)."
        )
    return SitePolicy.load(policy if policy is not None else site_dir / POLICY_FILE)


def serve_node(options: NodeOptions, console: Console) -> int:
    """Run the SuperNode of ``options`` until it exits or Ctrl-C; returns its exit status.

    Raises
    ------
    InputError
        If the site directory is not prepared or its policy file is broken.
    DeploymentError
        If the SuperNode cannot connect (e.g. refused by the SuperLink) or fails.
    """
    site_dir = Path(options.site_dir).resolve()
    check_site_dir(site_dir, options.policy)
    with ProcessGroups(site_dir / "logs") as procs:
        node = start_supernode(
            procs, options, home=site_dir / "flwr-home", announce=console_announcer(console), name="supernode", wait=False
        )
        console.print(f"SuperNode started; connecting to {options.superlink}. Ctrl-C stops it. Its log follows.", highlight=False)
        status = follow_output(node, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    if status != 0:
        raise DeploymentError(f"the SuperNode exited with status {status}; its log: {node.log_path}")
    return status


def start_supernode(
    procs: ProcessGroups,
    options: NodeOptions,
    *,
    home: Path,
    announce: Announce,
    name: str,
    wait: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> ManagedProcess:
    """Start one hospital's SuperNode; with ``wait``, until the SuperLink accepted it.

    Parameters
    ----------
    procs : ProcessGroups
        Owner of the process.
    options : NodeOptions
        SuperLink address, credentials, node config, Runtime API port.
    home : Path
        The SuperNode's ``FLWR_HOME`` (where it installs submitted apps).
    announce : Announce
        Receives the command line before it runs.
    name : str
        Process name (log file stem).
    wait : bool
        Wait for "SuperNode ID" in its output (it connected and was accepted).
    timeout : float
        Seconds to wait.

    Raises
    ------
    DeploymentError
        If it exits (e.g. refused by the SuperLink) or does not connect in time.
    """
    if options.insecure:
        announce(INSECURE_WARNING)
    argv = supernode_command(options)
    env = flower_env(FLWR_HOME=str(home))
    announce(command_line(argv, env))
    process = procs.start(name, argv, env=env)
    if wait:
        process.wait_for_output(CONNECTED_PATTERN, timeout)
    return process


def node_options(
    *,
    superlink: str,
    site_dir: Path,
    site_index: int,
    credentials: Path | None,
    insecure: bool,
    data_path: str = "",
    policy: Path | None = None,
    port: int,
) -> NodeOptions:
    """Build the node options from the command line's values (credentials or ``--insecure``).

    Raises
    ------
    InputError
        If neither or both of ``credentials`` and ``insecure`` are given, or a file is missing.
    """
    if insecure == (credentials is not None):
        raise InputError("give the hospital's folder from `carefl provision` with --credentials, or --insecure for a local test.")
    return NodeOptions(
        superlink=superlink,
        site_index=site_index,
        site_dir=site_dir,
        credentials=None if credentials is None else NodeCredentials.from_dir(credentials),
        data_path=data_path,
        policy=policy,
        port=port,
    )
