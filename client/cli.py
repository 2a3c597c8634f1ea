"""The hospital's commands: ``node``, ``budget``, ``audit verify``.

Thin composers: each parses its flags and calls the site module that does the work. The root
command (:mod:`server.local.cli`) mounts them next to the consortium's (:mod:`server.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shared.errors import IntegrityError


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
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory (prepared once with `carefl budget --init`).")],
    credentials: Annotated[Path | None, typer.Option(help="The hospital's folder from `carefl provision` (node.key, ca.crt).")] = None,
    site_index: Annotated[int, typer.Option(help="Which site of the federation this hospital is (0-based).")] = 0,
    data: Annotated[str, typer.Option(help="The site's data (default: the task's built-in source).")] = "",
    policy: Annotated[Path | None, typer.Option(help="The site's policy file (default: SITE_DIR/policy.toml).")] = None,
    port: Annotated[int, typer.Option(help="Port of the SuperNode's Runtime API (distinct per node on one machine).")] = 9094,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node key: a local test only.")] = False,
    connect_timeout: Annotated[float, typer.Option(help="Seconds the SuperLink may take to accept the node; then it stops and says why.")] = 120.0,
) -> None:
    """Run a hospital's SuperNode: TLS to the SuperLink, authenticated with its node key."""
    from client.service import node_options, serve_node

    options = node_options(
        superlink=superlink, site_dir=site_dir, site_index=site_index, credentials=credentials,
        insecure=insecure, data_path=data, policy=policy, port=port,
    )  # fmt: skip
    serve_node(options, Console(), connect_timeout=connect_timeout)


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
