"""The hospital's commands: ``node``, ``budget``, ``audit verify``, ``app approve``.

Thin composers: each parses its flags and calls the site module that does the work. The root
command (:mod:`server.local.cli`) mounts them next to the consortium's (:mod:`server.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from client.app_cli import register_app_commands
from client.data_cli import data_app
from shared.errors import ConfigError, IntegrityError


def budget(
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory.")],
    init: Annotated[bool, typer.Option(help="Create the ledger (and a default policy.toml) once.")] = False,
    site: Annotated[str, typer.Option(help="Site name recorded in a new ledger.")] = "",
) -> None:
    """Show a hospital its privacy ledger: spent per run, lifetime, and what remains."""
    from client.budget import budget_table
    from client.setup import prepare_site_dir

    if init:
        prepare_site_dir(site_dir, site=site or site_dir.name)
    Console().print(budget_table(site_dir))


def node(
    superlink: Annotated[str, typer.Option(help="The SuperLink's address, host:port.")],
    site_dir: Annotated[
        Path, typer.Option(help="The hospital's site directory (prepared once with `carefl budget --init`).")
    ],
    credentials: Annotated[
        Path | None, typer.Option(help="The hospital's folder from `carefl provision` (node.key, ca.crt).")
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="The site's own data, used whole: a class-folder tree, a manifest CSV, DICOM, an .npz or a table (see `carefl data check`)."
        ),
    ] = "",
    site_name: Annotated[
        str, typer.Option(help="The site's name in metrics (default: the site directory's name).")
    ] = "",
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of the site's records held out for validation (default 0.2).")
    ] = None,
    split_seed: Annotated[
        int | None, typer.Option(help="Seed of the site's own train/validation split (default 42).")
    ] = None,
    partition_id: Annotated[
        int | None,
        typer.Option(help="Benchmarks only: hold partition N of a shared data set (with --num-partitions)."),
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option(help="Benchmarks only: how many partitions the shared data set is cut into.")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="The site's policy file (default: SITE_DIR/policy.toml).")
    ] = None,
    port: Annotated[
        int, typer.Option(help="Port of the SuperNode's Runtime API (distinct per node on one machine).")
    ] = 9094,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node key: a local test only.")] = False,
    site_worker: Annotated[
        bool,
        typer.Option(
            help="Train in one long-lived site worker (torch, data, backbone stay loaded), "
            "or in a fresh process per message as plain Flower does."
        ),
    ] = True,
    idle_poll: Annotated[
        float,
        typer.Option(help="Seconds the SuperNode waits after a pull that found no message (Flower's own: 3)."),
    ] = 0.5,
    connect_timeout: Annotated[
        float,
        typer.Option(help="Seconds the SuperLink may take to accept the node; then it stops and says why."),
    ] = 120.0,
) -> None:
    """Run a hospital's SuperNode: TLS to the SuperLink, authenticated with its node key."""
    from client.service import node_options, serve_node

    options = node_options(
        superlink=superlink, site_dir=site_dir, credentials=credentials, insecure=insecure, data_path=data,
        partition=partition_of(partition_id, num_partitions), site_name=site_name, val_fraction=val_fraction,
        split_seed=split_seed, policy=policy, port=port, site_worker=site_worker, idle_poll=idle_poll,
    )  # fmt: skip
    serve_node(options, Console(), connect_timeout=connect_timeout)


def partition_of(partition_id: int | None, num_partitions: int | None) -> tuple[int, int] | None:
    """``(partition-id, num-partitions)`` from the two options, which come together or not at all."""
    if (partition_id is None) != (num_partitions is None):
        raise ConfigError(
            "give --partition-id and --num-partitions together (a benchmark partition), or neither."
        )
    return None if partition_id is None or num_partitions is None else (partition_id, num_partitions)


audit_app = typer.Typer(help="The hospital's audit log of what left the site.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory.")],
) -> None:
    """Check the audit log's hash chain, its sealed head and the privacy ledger's charged rounds."""
    from client.audit import verified_line, verify

    report = verify(site_dir)
    if report.problem is not None:
        raise IntegrityError(f"{report.path}: {report.problem} ({report.entries} entries verified before it)")
    Console().print(verified_line(report), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the hospital's commands to ``app``."""
    app.command()(budget)
    app.command()(node)
    app.add_typer(audit_app, name="audit")
    app.add_typer(data_app, name="data")
    register_app_commands(app)
