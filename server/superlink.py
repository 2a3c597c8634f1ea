"""The ``flower-superlink`` command line of a CareFL consortium (pure: builds, never runs).

In Flower 1.41 the SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port
(``--host``/``--port``, default 127.0.0.1:8000): SuperNodes, the ``flwr`` CLI and the
SuperLink's own ``flower-superexec`` all connect there, and all of them check its certificate
against the consortium's CA. With node authentication, only SuperNodes whose public key was
registered (``flwr supernode register``, through the Control API of the running SuperLink)
may connect; registrations are kept in the state database across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.provision import ConsortiumLayout
from shared.errors import ConfigError, InputError
from shared.executables import executable

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000  # flwr.supercore.constant.SUPERLINK_UVICORN_DEFAULT_PORT
READY_PATTERN = r"Uvicorn running on https?://"


@dataclass(frozen=True)
class SuperLinkTLS:
    """The SuperLink's TLS files (from ``carefl provision``: ``DIR/superlink/``).

    Attributes
    ----------
    certfile, keyfile : Path
        Its certificate and private key.
    ca_certfile : Path
        The consortium CA's certificate (its own children verify the SuperLink with it).
    """

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    @classmethod
    def from_consortium(cls, layout: ConsortiumLayout) -> SuperLinkTLS:
        """The files of a provisioned consortium; refused if one is missing."""
        tls = cls(layout.server_cert, layout.server_key, layout.server_ca_cert)
        for path in (tls.certfile, tls.keyfile, tls.ca_certfile):
            if not path.is_file():
                raise InputError(f"{path} not found: {layout.root} is not a complete consortium (`carefl provision`).")
        return tls


@dataclass(frozen=True)
class SuperLinkOptions:
    """How to start one SuperLink.

    Attributes
    ----------
    tls : SuperLinkTLS | None
        Certificates; ``None`` runs it without TLS (``--insecure``), which also turns node
        authentication off.
    database : Path | None
        SQLite state file (runs, registered nodes); ``None`` keeps the state in memory.
    host, port : str, int
        Where it listens.
    node_auth : bool
        Accept only registered SuperNodes (requires ``tls``).
    """

    tls: SuperLinkTLS | None
    database: Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    node_auth: bool = True

    def __post_init__(self) -> None:
        if self.node_auth and self.tls is None:
            raise ConfigError("node authentication needs TLS: give the consortium's certificates or turn both off (--insecure).")
        if not 0 < self.port < 65536:
            raise ConfigError(f"`port` must be in 1..65535, got {self.port!r}.")

    @property
    def insecure(self) -> bool:
        """Whether it runs without TLS."""
        return self.tls is None

    @property
    def address(self) -> str:
        """``host:port`` of its APIs."""
        return f"{self.host}:{self.port}"


def superlink_command(options: SuperLinkOptions) -> list[str]:
    """Return the ``flower-superlink`` command line for ``options``.

    Runtime dependency installation stays off (nothing is fetched from the internet).
    """
    argv = [executable("flower-superlink")]
    if options.tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-certfile", str(options.tls.certfile),
            "--ssl-keyfile", str(options.tls.keyfile),
            "--ssl-ca-certfile", str(options.tls.ca_certfile),
        ]  # fmt: skip
    if options.node_auth:
        argv.append("--enable-supernode-auth")
    if options.database is not None:
        argv += ["--database", str(options.database)]
    argv += ["--disable-runtime-dependency-installation", "--host", options.host, "--port", str(options.port)]
    return argv
