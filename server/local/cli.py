"""The ``carefl`` command: one root that mounts the consortium's and the hospital's commands.

The consortium's commands live in :mod:`server.cli`, the hospital's in :mod:`client.cli`; the
root adds ``demo`` (a whole consortium on this machine) and maps errors to exit statuses by
kind (:mod:`shared.errors`): one ``error: ...`` line, nothing half-written.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from client import cli as hospital
from client import model_cli
from server import cli as consortium
from server.cli import DEFAULT_STATE
from shared.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, CareFLError, ConfigError, Terminated
from shared.offline import configure_flower_env
from shared.processes import raise_terminated


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
    operating_point: Annotated[str | None, typer.Option(help="How each site picks its threshold on its validation data: youden (default), sensitivity:S or a fixed value such as 0.5.")] = None,
    class_weighting: Annotated[str | None, typer.Option(help="none (default) or balanced: weight each record's loss by its class's rarity at its site.")] = None,
    site: Annotated[list[str] | None, typer.Option(help="With --deployment: a hospital with its own data, NAME=PATH (repeat per hospital); each node uses its data whole.")] = None,
) -> None:
    """Run a local federation of hospitals on real data, offline, and compare with baselines."""
    from server.local.demo import DemoOptions, default_out_dir, demo_config, run_demo, state_key

    refuse_flags_that_do_not_apply(
        task, dp=dp, deployment=deployment, compare=compare,
        given={"--sites": sites, "--alpha": alpha, "--image-size": image_size, "--epsilon": epsilon,
               "--accountant": accountant},
    )  # fmt: skip

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
        operating_point=operating_point,
        class_weighting=class_weighting,
    )
    own_data = own_sites(site or [], deployment=deployment, data=data)
    if own_data:
        cfg = cfg.with_overrides(num_sites=len(own_data), min_sites=min(cfg.study.min_sites, len(own_data)))
    if resume and not (deployment and out):
        raise ConfigError("--resume continues an interrupted `carefl demo --deployment`: give --deployment and its --out.")
    out_dir = out or default_out_dir(task)
    if deployment:
        from server.local.deployment import DeploymentDemoOptions, run_local_deployment

        work_dir = state_dir / "deployments" / state_key(out_dir)
        run_local_deployment(DeploymentDemoOptions(cfg, out_dir, work_dir, resume=resume, own_data=own_data), Console())
        return
    options = DemoOptions(
        config=cfg,
        out_dir=out_dir,
        sites_root=state_dir / "sites" / state_key(out_dir),
        compare=compare,
    )
    run_demo(options, Console())


def own_sites(values: list[str], *, deployment: bool, data: Path | None) -> dict[str, str]:
    """Parse ``--site NAME=PATH`` values into hospital name -> own data path.

    Raises
    ------
    ConfigError
        If a value is not ``NAME=PATH``, a name repeats, or ``--site`` comes without
        ``--deployment`` or with ``--data`` (a shared data set to partition).
    """
    if not values:
        return {}
    if not deployment:
        raise ConfigError("--site gives a hospital of a deployment its own data: add --deployment.")
    if data is not None:
        raise ConfigError("--data is a shared data set the hospitals partition; with --site each has its own: drop one.")
    sites: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--site takes NAME=PATH, got {value!r}.")
        if name.strip() in sites:
            raise ConfigError(f"--site names hospital {name.strip()!r} twice.")
        sites[name.strip()] = path.strip()
    return sites


IMAGE_FLAGS = ("--sites", "--alpha", "--image-size")
DP_FLAGS = ("--epsilon", "--accountant")


def refuse_flags_that_do_not_apply(
    task: str, *, dp: bool, deployment: bool, compare: bool, given: dict[str, object]
) -> None:
    """Refuse a flag the run would ignore, naming it: the user meant something by it.

    Raises
    ------
    ConfigError
        For ``--sites``/``--alpha``/``--image-size`` outside chest-xray (the heart-disease
        hospitals are fixed), ``--epsilon``/``--accountant`` with ``--no-dp``, and
        ``--no-compare`` with ``--deployment`` (which runs no baselines).
    """
    chosen = [flag for flag, value in given.items() if value is not None]
    if task != "chest-xray" and (image := [f for f in chosen if f in IMAGE_FLAGS]):
        raise ConfigError(
            f"{', '.join(image)} applies to chest-xray only: the {task} task's hospitals are fixed; drop it."
        )
    if not dp and (budget := [f for f in chosen if f in DP_FLAGS]):
        raise ConfigError(f"{', '.join(budget)} sets the DP-SGD budget, which --no-dp turns off; drop one of them.")
    if deployment and not compare:
        raise ConfigError("--no-compare does nothing with --deployment, which runs no baselines; drop it.")


def build_app() -> typer.Typer:
    """The root ``carefl`` command with every command mounted."""
    app = typer.Typer(
        name="carefl",
        help="CareFL: federated transfer learning for hospitals (Flower + PyTorch).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.command()(demo)
    consortium.register(app)
    hospital.register(app)
    model_cli.register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``carefl`` console script; returns the exit status.

    A :class:`~shared.errors.CareFLError` prints one line and returns its kind's status
    (2 usage or input, 3 integrity, 4 deployment, 5 refusal); Ctrl-C returns 130 and SIGTERM
    143, after a clean stop.
    """
    configure_flower_env()
    err = Console(stderr=True)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        status = build_app()(args=argv, standalone_mode=False)
    except CareFLError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return error.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except Terminated:
        err.print("terminated; nothing was written.")
        return EXIT_TERMINATED
    except (KeyboardInterrupt, click.exceptions.Abort):
        status = EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status == EXIT_INTERRUPTED:  # click >= 8.2 returns 130 on Ctrl-C instead of raising Abort
        err.print("interrupted; nothing was written.")
        return EXIT_INTERRUPTED
    return 0


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s status.

    After Ctrl-C or SIGTERM the process exits at once: Flower's simulation leaves worker
    threads waiting on sites that will never answer, and Python would wait for them. Everything
    CareFL writes is atomic (run folder, ledger, audit log), so nothing is left half-written.
    """
    status = main()
    if status in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
