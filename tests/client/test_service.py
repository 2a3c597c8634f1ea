"""A SuperNode that is not accepted says why: a TLS mismatch, an unregistered key, no SuperLink.

The address is probed for real: a TLS listener with the consortium's SuperLink certificate, a
plain TCP listener, and a port where nothing listens. (Real SuperLinks: tests/e2e/test_deployment.py.)
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.node import NodeCredentials, NodeOptions
from client.service import _ConnectionWatch, connection_hint, speaks_tls
from server.provision import ConsortiumLayout, provision
from shared.errors import DeploymentError
from shared.processes import ProcessGroups, free_port


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> ConsortiumLayout:
    return provision(tmp_path_factory.mktemp("c") / "consortium", ["hungary"])


def _serve(tls: ssl.SSLContext | None) -> Iterator[int]:
    """Accept connections on a free port (TLS with ``tls``, else plain TCP) until the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                if tls is not None:
                    with tls.wrap_socket(conn, server_side=True) as secure:
                        secure.recv(1)
                else:
                    conn.recv(1024)
            except OSError:
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.fixture()
def tls_port(consortium: ConsortiumLayout) -> Iterator[int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(consortium.server_cert, consortium.server_key)
    context.set_alpn_protocols(["h2"])
    yield from _serve(context)


@pytest.fixture()
def plain_port() -> Iterator[int]:
    yield from _serve(None)


def _options(port: int, consortium: ConsortiumLayout | None) -> NodeOptions:
    credentials = NodeCredentials.from_dir(consortium.hospital_dir("hungary")) if consortium else None
    return NodeOptions(superlink=f"127.0.0.1:{port}", site_dir=Path("site"), partition=(0, 3), credentials=credentials)


def test_the_probe_tells_tls_from_plain_from_nothing(tls_port: int, plain_port: int) -> None:
    assert speaks_tls("127.0.0.1", tls_port) is True
    assert speaks_tls("127.0.0.1", plain_port) is False
    assert speaks_tls("127.0.0.1", free_port()) is None


def test_an_insecure_node_against_a_tls_superlink_is_a_tls_mismatch(tls_port: int) -> None:
    hint = connection_hint(_options(tls_port, None), "Connection attempt failed, retrying in 2.00 seconds")
    assert hint.startswith("a TLS mismatch: the SuperLink speaks TLS but this node runs with --insecure")


def test_a_tls_node_against_a_plain_superlink_is_a_tls_mismatch(plain_port: int, consortium: ConsortiumLayout) -> None:
    hint = connection_hint(_options(plain_port, consortium), "Connection attempt failed")
    assert hint.startswith("a TLS mismatch: the SuperLink does not speak TLS")


def test_a_refused_activation_is_an_unregistered_key(tls_port: int, consortium: ConsortiumLayout) -> None:
    output = "ERROR :      [code: 2004] Failed to activate SuperNode."
    hint = connection_hint(_options(tls_port, consortium), output)
    assert "is not registered with the SuperLink" in hint and "flwr supernode register" in hint
    assert str(consortium.hospital_dir("hungary") / "node.key") in hint


def test_no_superlink_at_the_address_is_said(consortium: ConsortiumLayout) -> None:
    hint = connection_hint(_options(free_port(), consortium), "Connection attempt failed")
    assert hint.startswith("nothing accepts connections at 127.0.0.1:")


def test_a_node_whose_site_runtime_died_stops_and_says_so(tmp_path: Path) -> None:
    # Prepare: a live stand-in for the SuperNode, and a site runtime that has exited with status 3
    with ProcessGroups(tmp_path / "logs") as procs:
        node = procs.start("supernode", [sys.executable, "-c", "import time; time.sleep(30)"])
        runtime = procs.start("supernode-runtime", [sys.executable, "-c", "raise SystemExit(3)"])
        runtime.wait(timeout=30)
        watch = _ConnectionWatch(node, _options(free_port(), None), 60.0, runtime=runtime)

        # Execute / Assert
        with pytest.raises(DeploymentError, match=r"site runtime .* exited with status 3; the node stops"):
            watch.check()
