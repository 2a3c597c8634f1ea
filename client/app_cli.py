"""The hospital's ``carefl app approve``: let this node run a Flower app, after seeing what it is.

The consortium builds its app (``carefl app build``) and sends the ``.fab`` file, or its
fingerprint, to each hospital out of band. The hospital's operator runs ``carefl app approve``:
it shows the app's publisher, name, version, components and every file with its SHA-256, then
records the FAB's fingerprint in ``apps.approved`` of the site policy. The node runs no other app
(:mod:`client.runtime`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from shared.errors import InputError
from shared.fab import FabInfo

_SHA256 = re.compile(r"[0-9a-f]{64}")


def approve(
    app: Annotated[str, typer.Argument(help="The consortium's .fab file, or its SHA-256 (then nothing can be shown).")],
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory.")],
    policy: Annotated[
        Path | None, typer.Option(help="The site's policy file (default: SITE_DIR/policy.toml).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking (after showing the app).")] = False,
) -> None:
    """Approve a Flower app for this node: show what it is, then add its SHA-256 to the site policy."""
    from client.policy import SitePolicy, approve_app
    from client.site import POLICY_FILE
    from shared.fab import read_fab_file

    console = Console()
    policy_path = policy if policy is not None else site_dir / POLICY_FILE
    SitePolicy.load(policy_path)  # a missing or broken policy is refused before anything is shown
    if Path(app).is_file():
        info = read_fab_file(Path(app))
        show_fab(info, console)
        sha256 = info.sha256
    elif _SHA256.fullmatch(app):
        sha256 = app
        console.print(
            f"warning: approving {sha256} by its SHA-256 alone: its contents are not shown here; "
            "approve the .fab file instead to review them.",
            highlight=False,
            soft_wrap=True,
        )
    else:
        raise InputError(f"{app}: neither a .fab file nor a full lowercase SHA-256.")
    if not yes and not typer.confirm(f"Approve this app for the node of {site_dir}?", default=False):
        raise typer.Exit(1)
    updated = approve_app(policy_path, sha256)
    console.print(
        f"approved {sha256} in {policy_path} ({len(updated.approved)} approved app(s))", highlight=False, soft_wrap=True
    )


def show_fab(info: FabInfo, console: Console) -> None:
    """Print what a FAB is: fingerprint, publisher/name/version, components, and its files."""
    console.print(f"app {info.fab_id} version {info.version}", highlight=False)
    console.print(f"SHA-256 {info.sha256}", highlight=False, soft_wrap=True)
    for role, ref in sorted(info.components.items()):
        console.print(f"{role}: {ref}", highlight=False)
    columns = (Column("file", overflow="fold"), Column("bytes", justify="right"), Column("sha256", overflow="fold"))
    table = Table(*columns, title=f"{len(info.files)} files")
    for path, digest, size in info.files:
        table.add_row(path, str(size), digest)
    console.print(table)


def register_app_commands(root: typer.Typer) -> None:
    """Add ``approve`` to the ``app`` command group of ``root`` (created if the consortium's is not there)."""
    group = next((info.typer_instance for info in root.registered_groups if info.name == "app"), None)
    if group is None:
        group = typer.Typer(help="Flower apps: build and fingerprint (consortium), approve (hospital).", no_args_is_help=True)
        root.add_typer(group, name="app")
    group.command()(approve)
