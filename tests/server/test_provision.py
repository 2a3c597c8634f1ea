"""Provisioning: a CA, a SuperLink certificate that verifies, P-384 OpenSSH node keys, never overwritten."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.local.cli import main
from server.provision import ConsortiumLayout, load_layout, provision
from shared.errors import EXIT_USAGE, ConfigError, InputError

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> ConsortiumLayout:
    out = tmp_path_factory.mktemp("consortium") / "provision"
    return provision(out, HOSPITALS, hosts=["superlink", "localhost", "127.0.0.1", "::1"], days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _private_files(layout: ConsortiumLayout) -> list[Path]:
    return [layout.ca_key, layout.server_key, *(layout.node_key(h) for h in HOSPITALS)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_has_every_file(consortium: ConsortiumLayout) -> None:
    # Prepare
    expected = [
        consortium.ca_cert, consortium.ca_key, consortium.server_cert, consortium.server_key,
        consortium.server_ca_cert, consortium.node_keys_list, consortium.consortium_file,
    ]  # fmt: skip
    for name in HOSPITALS:
        expected += [consortium.node_key(name), consortium.node_pub(name), consortium.hospital_ca_cert(name)]
        expected.append(consortium.node_keys_dir / f"{name}.pub")

    # Execute
    missing = [p for p in expected if not p.is_file()]
    reloaded = load_layout(consortium.root)

    # Assert
    assert missing == []
    assert reloaded == consortium
    assert reloaded.hospitals() == HOSPITALS
    assert consortium.server_ca_cert.read_bytes() == consortium.ca_cert.read_bytes()
    assert consortium.hospital_ca_cert("hospital-b").read_bytes() == consortium.ca_cert.read_bytes()


def test_server_certificate_chains_to_the_ca(consortium: ConsortiumLayout) -> None:
    # Prepare
    ca, server = _cert(consortium.ca_cert), _cert(consortium.server_cert)
    store = x509.verification.Store([ca])
    verifier = x509.verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName("superlink"))

    # Execute
    chain = verifier.verify(server, [])
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    # Assert
    assert chain[-1] == ca
    assert ca_constraints.critical and ca_constraints.value.ca
    assert ca_usage.key_cert_sign
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (
        isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    )
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_sans_name_every_host_with_its_type(consortium: ConsortiumLayout) -> None:
    # Execute
    sans = _cert(consortium.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # Assert
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_private_keys_are_0600_in_0700_folders(consortium: ConsortiumLayout) -> None:
    # Execute
    modes = {p.name + str(p.parent): stat.S_IMODE(p.stat().st_mode) for p in _private_files(consortium)}
    folder_modes = {stat.S_IMODE(p.parent.stat().st_mode) for p in _private_files(consortium)}

    # Assert
    assert set(modes.values()) == {0o600}
    assert folder_modes == {0o700}
    assert stat.S_IMODE(consortium.node_pub("hospital-a").stat().st_mode) == 0o644


def test_node_keys_are_p384_openssh_and_match_their_public_keys(consortium: ConsortiumLayout) -> None:
    # Prepare
    listed = consortium.node_keys_list.read_text().splitlines()

    for number, name in enumerate(HOSPITALS):
        # Execute
        private = serialization.load_ssh_private_key(consortium.node_key(name).read_bytes(), password=None)
        public_text = consortium.node_pub(name).read_text()
        public = serialization.load_ssh_public_key(public_text.encode())

        # Assert
        assert consortium.node_key(name).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.strip().endswith(f" {name}")
        assert public == private.public_key()
        assert listed[number] == public_text.strip()
        assert (consortium.node_keys_dir / f"{name}.pub").read_text() == public_text


def test_consortium_file_holds_fingerprints_and_no_secret(consortium: ConsortiumLayout) -> None:
    # Execute
    text = consortium.consortium_file.read_text()
    doc = json.loads(text)

    # Assert
    assert doc["hosts"] == ["superlink", "localhost", "127.0.0.1", "::1"]
    assert [h["name"] for h in doc["hospitals"]] == HOSPITALS
    assert doc["ca_cert_sha256"] == _cert(consortium.ca_cert).fingerprint(hashes.SHA256()).hex()
    assert doc["server_cert_sha256"] == _cert(consortium.server_cert).fingerprint(hashes.SHA256()).hex()
    assert "PRIVATE" not in text


def test_refuses_to_overwrite_without_force_and_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "provision"
    provision(out, ["hospital-a"])
    before = _snapshot(out)

    # Execute
    with pytest.raises(InputError) as refused:
        provision(out, ["hospital-a", "hospital-b"])

    # Assert
    assert str(out) in str(refused.value) and "--force" in str(refused.value)
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".provision.*"))


def test_refuses_a_single_existing_file(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "provision"
    (out / "superlink").mkdir(parents=True)
    (out / "superlink" / "server.key").write_text("an operator's own key")

    # Execute
    with pytest.raises(InputError, match="server.key"):
        provision(out, ["hospital-a"])

    # Assert
    assert (out / "superlink" / "server.key").read_text() == "an operator's own key"
    assert not (out / "ca").exists()


def test_force_regenerates_everything(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "provision"
    old = provision(out, ["hospital-a", "hospital-b"])
    old_doc = json.loads(old.consortium_file.read_text())
    old_node_key = old.node_key("hospital-a").read_bytes()
    (out / "NOTES.txt").write_text("kept")

    # Execute
    new = provision(out, ["hospital-a"], force=True)
    new_doc = json.loads(new.consortium_file.read_text())

    # Assert
    assert new_doc["ca_cert_sha256"] != old_doc["ca_cert_sha256"]
    assert new_doc["server_cert_sha256"] != old_doc["server_cert_sha256"]
    assert new.node_key("hospital-a").read_bytes() != old_node_key
    assert new.hospitals() == ["hospital-a"]
    assert not new.hospital_dir("hospital-b").exists()
    assert (out / "NOTES.txt").read_text() == "kept"
    assert stat.S_IMODE(new.node_key("hospital-a").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".provision.*"))


def test_a_failure_half_way_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: fail after the CA, the server and one hospital's files were written
    import server.provision as module

    def fail(_public: bytes) -> str:
        raise OSError("disk full")

    old = provision(tmp_path / "old", ["hospital-a"])
    before = _snapshot(old.root)
    monkeypatch.setattr(module, "_ssh_fingerprint", fail)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        provision(tmp_path / "new", ["hospital-a", "hospital-b"])
    with pytest.raises(OSError, match="disk full"):
        provision(old.root, ["hospital-a"], force=True)

    # Assert
    assert not (tmp_path / "new").exists()
    assert _snapshot(old.root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


@pytest.mark.parametrize(
    ("hospitals", "needle"),
    [
        ([], "at least one hospital"),
        (["../evil"], "'../evil' is not allowed"),
        (["-a"], "'-a' is not allowed"),
        (["a b"], "'a b' is not allowed"),
        ([""], "'' is not allowed"),
        (["hospital-a", "Hospital-A"], "given twice"),
    ],
)
def test_bad_hospital_names_are_refused(tmp_path: Path, hospitals: list[str], needle: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as refused:
        provision(tmp_path / "out", hospitals)

    # Assert
    assert needle in str(refused.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "needle"), [({"days": 0}, "days"), ({"hosts": ["bad host"]}, "bad host")])
def test_bad_days_or_host_are_refused(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        provision(tmp_path / "out", ["hospital-a"], **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_load_layout_needs_a_consortium_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="consortium.json"):
        load_layout(tmp_path)


def _tls_handshake(server: ConsortiumLayout, trusted_ca: Path) -> bytes:
    """Serve one TLS connection with ``server``'s certificate; connect trusting only ``trusted_ca``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.server_cert, server.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello hospital")
        except (OSError, ssl.SSLError):
            pass  # the client refused the certificate
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(trusted_ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.recv(64)
    finally:
        thread.join(timeout=10)


def test_tls_handshake_with_the_consortium_ca(consortium: ConsortiumLayout) -> None:
    assert _tls_handshake(consortium, consortium.hospital_ca_cert("hospital-a")) == b"hello hospital"


def test_tls_handshake_fails_with_another_consortiums_ca(
    consortium: ConsortiumLayout, tmp_path: Path
) -> None:
    # Prepare
    other = provision(tmp_path / "other", ["hospital-a"])

    # Execute / Assert
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(consortium, other.ca_cert)


def test_cli_provision_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "provision"
    argv = ["provision", "--out", str(out), "--hospital", "hospital-a", "--hospital", "hospital-b"]

    # Execute
    first = main([*argv, "--host", "superlink"])
    printed = capsys.readouterr().out
    again = main(argv)
    err = capsys.readouterr().err

    # Assert
    assert first == 0
    assert str(out / "hospitals" / "hospital-b") in printed and str(out / "superlink") in printed
    sans = _cert(out / "superlink" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["superlink"]
    assert again == EXIT_USAGE
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0] and "--force" in errors[0], err
