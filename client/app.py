"""The CareFL ClientApp: one per hospital node.

``app`` is what ``flwr run`` and ``flower-supernode`` load; :func:`create_client_app` lets the
local simulation pass site defaults (data path, cache root) that a real node sets in its node
config instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.client import Client
from flwr.client.mod import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.audit_mod import make_audit_mod
from client.backbone_mod import make_backbone_mod
from client.ledger import KEY_FILE, LEDGER_FILE
from client.model_mod import make_model_mod
from client.refusal_mod import refusal_mod
from client.secagg import secure_aggregation_mod
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, SiteEnvironment, site_environment
from shared.log import log
from shared.masks import install_secure_masks
from shared.offline import configure_flower_env

if TYPE_CHECKING:
    from client.numpy_client import ModelBuilder


def make_client_fn(
    defaults: Mapping[str, str] | None = None, models: ModelBuilder | None = None
) -> Callable[[Context], Client]:
    """The innermost call of the site's ClientApp: the site's Flower client (training, evaluation).

    Parameters
    ----------
    defaults : Mapping[str, str], optional
        Fallbacks for node-config keys (``data-path``, ``sites-root``).
    models : ModelBuilder, optional
        Builds each study's model (the site worker's kept models; default: built per message).
    """
    environment = site_environment_of(defaults)

    def client_fn(context: Context) -> Client:
        # Imported here: the SecAgg+ stages, the backbone offer and the audit need neither torch
        # nor the model, so a task process that only runs them stays thin.
        from client.numpy_client import SiteClient

        return SiteClient(environment(context), str(context.run_id), models).to_client()

    return client_fn


def site_environment_of(defaults: Mapping[str, str] | None = None) -> Callable[[Context], SiteEnvironment]:
    """The site's environment of a message's context (a simulated hospital's prepared on first use)."""
    site_defaults = dict(defaults or {})

    def environment(context: Context) -> SiteEnvironment:
        return simulated_site_ready(site_environment(context, site_defaults))

    return environment


def site_mods(defaults: Mapping[str, str] | None = None) -> list[Mod]:
    """CareFL's mods, outermost first: audit, refusal, backbone offer, model delivery, SecAgg+.

    The audit mod is outermost: it records exactly what leaves the site, refusals included.
    """
    environment = site_environment_of(defaults)

    def site_dir_of(context: Context) -> Path:
        return environment(context).site_dir

    def policy_of(context: Context) -> Path:
        return environment(context).policy_path

    backbone_mod = make_backbone_mod(site_dir_of, policy_of)
    return [
        make_audit_mod(site_dir_of),
        refusal_mod,
        backbone_mod,
        make_model_mod(environment),
        secure_aggregation_mod,
    ]


def create_client_app(defaults: Mapping[str, str] | None = None, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """Build the ClientApp that trains in its own process (simulation, ``flwr run`` on the engine).

    Parameters
    ----------
    defaults : Mapping[str, str], optional
        Fallbacks for node-config keys (``data-path``, ``sites-root``).
    outer_mods : Sequence[Mod]
        Mods run before (outside) CareFL's own, e.g. a test's fault injection.
    """
    configure_flower_env()
    install_secure_masks()
    return ClientApp(client_fn=make_client_fn(defaults), mods=[*outer_mods, *site_mods(defaults)])


def create_worker_app(parent_pid: int, outer_mods: Sequence[Mod] = ()) -> ClientAppCallable:
    """Build the deployed node's ClientApp: CareFL's mods here, training and evaluation in the site worker.

    The task process runs the mod chain (no torch) and hands the innermost call to the site's
    long-lived worker (:class:`client.worker.link.WorkerLink`), starting it if it is down. Every
    message goes through the mods, as with Flower's ``ClientApp(client_fn=..., mods=...)``.

    Parameters
    ----------
    parent_pid : int
        The site runtime's process id (a worker started here stops with it).
    outer_mods : Sequence[Mod]
        Mods run before (outside) CareFL's own.
    """
    from client.worker.link import WorkerLink

    configure_flower_env()
    install_secure_masks()

    environment = site_environment_of()

    def in_worker(message: Message, context: Context) -> Message:
        return WorkerLink(environment(context).site_dir, parent_pid=parent_pid).handle(message, context)

    return make_ffn(in_worker, [*outer_mods, *site_mods()])


def simulated_site_ready(env: SiteEnvironment) -> SiteEnvironment:
    """Prepare the site directory of a simulated hospital (ledger, default policy) on first use.

    Under ``flwr run`` with a simulation SuperLink, Flower's simulation engine runs the nodes and
    nobody prepared their sites; the ClientApp does it once, as ``carefl budget --init`` would
    (existing files are never touched). A deployed node (``site-dir`` in its node config) is
    never prepared here: its operator does it, and it refuses to start without.
    """
    files = [env.site_dir / name for name in (LEDGER_FILE, KEY_FILE, POLICY_FILE)]
    if env.simulated and not all(path.exists() for path in files):
        prepare_site_dir(env.site_dir, site=env.site_dir.name)
        log(
            INFO,
            "simulated hospital %s: privacy ledger and default policy in %s",
            env.site_dir.name,
            env.site_dir,
        )
    return env


app = create_client_app()
