"""The CareFL ClientApp: one per hospital node.

``app`` is what ``flwr run`` and ``flower-supernode`` load; :func:`create_client_app` lets the
local simulation pass site defaults (data path, cache root) that a real node sets in its node
config instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

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


def create_client_app(defaults: Mapping[str, str] | None = None, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    defaults : Mapping[str, str], optional
        Fallbacks for node-config keys (``data-path``, ``sites-root``).
    outer_mods : Sequence[Mod]
        Mods run before (outside) CareFL's own, e.g. a test's fault injection.
    """
    configure_flower_env()
    install_secure_masks()
    site_defaults = dict(defaults or {})

    def environment(context: Context) -> SiteEnvironment:
        return simulated_site_ready(site_environment(context, site_defaults))

    def client_fn(context: Context) -> Client:
        # Imported here: Flower starts a fresh process per message, and the SecAgg+ stages,
        # the backbone offer and the audit need neither torch nor the model.
        from client.numpy_client import SiteClient

        return SiteClient(environment(context), str(context.run_id)).to_client()

    def site_dir_of(context: Context) -> Path:
        return environment(context).site_dir

    def policy_of(context: Context) -> Path:
        return environment(context).policy_path

    # The audit mod is outermost: it records exactly what leaves the site, refusals included.
    backbone_mod = make_backbone_mod(site_dir_of, policy_of)
    mods = [make_audit_mod(site_dir_of), refusal_mod, backbone_mod, make_model_mod(environment), secure_aggregation_mod]
    return ClientApp(client_fn=client_fn, mods=[*outer_mods, *mods])


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
        log(INFO, "simulated hospital %s: privacy ledger and default policy in %s", env.site_dir.name, env.site_dir)
    return env


app = create_client_app()
