"""Provision a consortium: its CA, the SuperLink's TLS certificate and each hospital's node key.

``carefl provision --out DIR --hospital A --hospital B`` writes, for one consortium::

    DIR/ca/ca.key (0600), ca.crt                       kept by whoever runs the CA, offline
    DIR/superlink/server.key (0600), server.crt, ca.crt,
                  node-keys/<hospital>.pub, node-keys.txt   handed to the SuperLink operator
    DIR/hospitals/<hospital>/node.key (0600), node.pub, ca.crt  handed to that hospital
    DIR/consortium.json                                names, hosts, fingerprints; no secrets

- The CA is an EC P-384 key with a self-signed certificate (``CA:TRUE``, ``keyCertSign``).
- The SuperLink certificate is signed by the CA, names every host as a SubjectAltName (a DNS
  name or an IP address) and may only authenticate a server (``serverAuth``). TLS in Flower is
  server-side only: hospitals check the SuperLink with ``ca.crt``; the SuperLink checks
  hospitals by their node keys.
- A hospital's node key is EC P-384 in OpenSSH format, what ``flower-supernode
  --auth-supernode-private-key`` loads; its public half is what ``flwr supernode register``
  takes. ``node-keys.txt`` lists every public key, one per line, with the hospital as comment.

Private keys are created with mode 0600 (never loosened then tightened) in folders of mode
0700. Everything is written into a staging folder beside ``DIR`` first and moved into place
at the end, so a failure leaves no half-made consortium. Existing files are never replaced
unless ``force=True``, which regenerates *everything* (a new CA: every party needs its new
folder, and the SuperLink must register the new node keys).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from logging import INFO
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import AfterValidator, ValidationError

from shared.atomic import fsync_path
from shared.errors import ConfigError, InputError
from shared.log import log
from shared.schema import Document, problem

__all__ = ["CONSORTIUM_FILE", "DEFAULT_HOSTS", "ConsortiumLayout", "load_layout", "provision"]

CONSORTIUM_FILE = "consortium.json"
FORMAT = "carefl-consortium"
VERSION = 1
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
_TOP_LEVEL = ("ca", "superlink", "hospitals", CONSORTIUM_FILE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CLOCK_SKEW = timedelta(minutes=5)


def _hospital_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("must be letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


class _Hospital(Document):
    """One hospital of ``consortium.json``."""

    name: Annotated[str, AfterValidator(_hospital_name)]
    node_key_fingerprint: str


class _Consortium(Document):
    """``consortium.json``: what was provisioned, for whom, until when (no secrets)."""

    format: Literal["carefl-consortium"]
    version: Literal[1]
    created_utc: str
    not_after_utc: str
    days: int
    hosts: list[str]
    hospitals: list[_Hospital]
    ca_cert_sha256: str
    server_cert_sha256: str


@dataclass(frozen=True)
class ConsortiumLayout:
    """Where the files of one provisioned consortium are.

    Attributes
    ----------
    root : Path
        The folder given to :func:`provision` (``--out``).
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (PEM)."""
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key (PEM, 0600): keep it offline, it signs SuperLink certificates."""
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate (``--ssl-certfile``)."""
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key (``--ssl-keyfile``, 0600)."""
        return self.root / "superlink" / "server.key"

    @property
    def server_ca_cert(self) -> Path:
        """The CA certificate in the SuperLink's folder (``--ssl-ca-certfile``)."""
        return self.root / "superlink" / "ca.crt"

    @property
    def node_keys_dir(self) -> Path:
        """One ``<hospital>.pub`` per hospital, for ``flwr supernode register``."""
        return self.root / "superlink" / "node-keys"

    @property
    def node_keys_list(self) -> Path:
        """All hospitals' public keys, one ``<key> <hospital>`` per line."""
        return self.root / "superlink" / "node-keys.txt"

    @property
    def consortium_file(self) -> Path:
        """``consortium.json``: hospitals, hosts and fingerprints (no secrets)."""
        return self.root / CONSORTIUM_FILE

    def hospital_dir(self, name: str) -> Path:
        """The folder handed to hospital ``name``."""
        return self.root / "hospitals" / name

    def node_key(self, name: str) -> Path:
        """Hospital ``name``'s node private key (OpenSSH, 0600; ``--auth-supernode-private-key``)."""
        return self.hospital_dir(name) / "node.key"

    def node_pub(self, name: str) -> Path:
        """Hospital ``name``'s node public key (OpenSSH)."""
        return self.hospital_dir(name) / "node.pub"

    def hospital_ca_cert(self, name: str) -> Path:
        """The CA certificate in hospital ``name``'s folder (``--root-certificates``)."""
        return self.hospital_dir(name) / "ca.crt"

    def hospitals(self) -> list[str]:
        """Return the hospitals' names, in provisioning order, read from ``consortium.json``.

        Raises
        ------
        InputError
            If ``consortium.json`` is missing or malformed.
        """
        return [h.name for h in _read_consortium(self.consortium_file).hospitals]


def provision(
    out: Path,
    hospitals: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
) -> ConsortiumLayout:
    """Create the CA, the SuperLink certificate and every hospital's node key under ``out``.

    Parameters
    ----------
    out : Path
        Folder to write (created if missing).
    hospitals : Sequence[str]
        Hospital names (unique; letters, digits, ``.``, ``_``, ``-``; not starting with a
        punctuation mark): each becomes a folder name and its key's comment.
    hosts : Sequence[str]
        Names and IP addresses under which hospitals reach the SuperLink; each becomes a
        SubjectAltName of its certificate.
    days : int
        Validity of the certificates, in days (> 0).
    force : bool
        Replace an existing consortium in ``out`` (everything is regenerated).

    Returns
    -------
    ConsortiumLayout
        The layout of what was written.

    Raises
    ------
    ConfigError
        If a hospital name, a host or ``days`` is invalid.
    InputError
        If ``out`` already holds a consortium's files and ``force`` is False, or is not a folder.
    """
    names = _check_hospitals(hospitals)
    host_list = _check_hosts(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ConfigError(f"`days` must be a whole number of days > 0, got {days!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    layout = ConsortiumLayout(out)
    existing = _existing_files(layout)
    if existing and not force:
        raise InputError(
            f"{existing} already exists; pass --force to replace the whole consortium "
            "(a new CA and new keys for every party), or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_consortium(ConsortiumLayout(stage), names, host_list, days)
        _move_into_place(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(INFO, "provisioned %d hospitals in %s (hosts %s)", len(names), out, ", ".join(host_list))
    return layout


def load_layout(root: Path) -> ConsortiumLayout:
    """Return the layout of the consortium provisioned in ``root``.

    Raises
    ------
    InputError
        If ``root/consortium.json`` is missing or malformed.
    """
    layout = ConsortiumLayout(Path(root))
    _read_consortium(layout.consortium_file)
    return layout


# ------------------------------------------------------------------------------- validation
def _check_hospitals(hospitals: Sequence[str]) -> list[str]:
    if isinstance(hospitals, str):
        raise ConfigError("`hospitals` must be a list of names, not one string")
    names = list(hospitals)
    if not names:
        raise ConfigError("at least one hospital is needed (--hospital NAME)")
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"hospital name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit (it becomes a folder name)"
            )
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise ConfigError(f"hospital name {name!r} is given twice (names are case-insensitive)")
        seen.add(name.lower())
    return names


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, str):
        raise ConfigError("`hosts` must be a list of names or addresses, not one string")
    result: list[str] = []
    for host in hosts:
        if not isinstance(host, str) or not (_is_ip(host) or _is_dns_name(host)):
            raise ConfigError(
                f"host {host!r} is neither an IP address nor a DNS name (letters, digits and '-' "
                "in dot-separated labels)"
            )
        if host not in result:
            result.append(host)
    if not result:
        raise ConfigError("at least one host is needed (--host NAME_OR_IP)")
    return result


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_dns_name(host: str) -> bool:
    return 0 < len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in host.split("."))


def _existing_files(layout: ConsortiumLayout) -> Path | None:
    """Return the first file (or top-level entry) of a consortium already in ``layout.root``."""
    if not layout.root.is_dir():
        return None
    for top in _TOP_LEVEL:
        entry = layout.root / top
        if entry.is_symlink() or entry.is_file():
            return entry
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if not p.is_dir())
            return files[0] if files else entry
    return None


# ------------------------------------------------------------------------------- generation
def _write_consortium(layout: ConsortiumLayout, names: list[str], hosts: list[str], days: int) -> None:
    """Generate every key and certificate into ``layout`` (a fresh, empty folder)."""
    now = datetime.now(UTC).replace(microsecond=0)
    not_after = now + timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, now, not_after)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, hosts, now, not_after)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    for folder in (layout.ca_key.parent, layout.server_key.parent):
        _mkdir(folder, 0o700)
    _write_private(layout.ca_key, _pem_private(ca_key))
    _write_public(layout.ca_cert, ca_pem)
    _write_private(layout.server_key, _pem_private(server_key))
    _write_public(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(layout.server_ca_cert, ca_pem)
    _mkdir(layout.node_keys_dir, 0o755)
    _mkdir(layout.hospital_dir(names[0]).parent, 0o755)

    lines: list[str] = []
    records: list[dict[str, str]] = []
    for name in names:
        node_key = ec.generate_private_key(ec.SECP384R1())
        openssh = node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        line = f"{public.decode('ascii')} {name}\n"
        _mkdir(layout.hospital_dir(name), 0o700)
        _write_private(layout.node_key(name), openssh)
        _write_public(layout.node_pub(name), line.encode("ascii"))
        _write_public(layout.hospital_ca_cert(name), ca_pem)
        _write_public(layout.node_keys_dir / f"{name}.pub", line.encode("ascii"))
        lines.append(line)
        records.append({"name": name, "node_key_fingerprint": _ssh_fingerprint(public)})
    _write_public(layout.node_keys_list, "".join(lines).encode("ascii"))

    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created_utc": now.isoformat(),
        "not_after_utc": not_after.isoformat(),
        "days": days,
        "hosts": hosts,
        "hospitals": records,
        "ca_cert_sha256": ca_cert.fingerprint(hashes.SHA256()).hex(),
        "server_cert_sha256": server_cert.fingerprint(hashes.SHA256()).hex(),
    }
    _write_public(layout.consortium_file, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    for folder in _folders(layout.root):
        fsync_path(folder)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime, not_after: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CareFL consortium CA")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    now: datetime,
    not_after: datetime,
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts
    ]
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ssh_fingerprint(openssh_public: bytes) -> str:
    """Return the key's fingerprint as ``ssh-keygen -l`` prints it (``SHA256:...``)."""
    blob = base64.b64decode(openssh_public.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


# ---------------------------------------------------------------------------------- writing
def _mkdir(path: Path, mode: int) -> None:
    """Create ``path`` with ``mode`` (the umask may narrow it, never widen it)."""
    os.mkdir(path, mode)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 from the start, never an existing file."""
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _folders(root: Path) -> Iterator[Path]:
    yield from (p for p in root.rglob("*") if p.is_dir())
    yield root


def _move_into_place(stage: Path, out: Path) -> None:
    """Move the staged consortium to ``out``, replacing an old one's entries if present.

    A missing ``out`` is one rename. Otherwise the old top-level entries are first moved aside
    (and restored if a later step fails), then the new ones moved in; other files in ``out``
    are left alone.
    """
    if not out.exists():
        os.rename(stage, out)
        fsync_path(out.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for top in _TOP_LEVEL:
            if (out / top).exists() or (out / top).is_symlink():
                os.rename(out / top, aside / top)
                moved_aside.append(top)
        for top in _TOP_LEVEL:
            os.rename(stage / top, out / top)
            moved_in.append(top)
    except BaseException:
        for top in moved_in:
            os.rename(out / top, stage / top)
        for top in moved_aside:
            os.rename(aside / top, out / top)
        raise
    finally:
        fsync_path(out)
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------- reading
def _read_consortium(path: Path) -> _Consortium:
    if not path.is_file():
        raise InputError(
            f"{path} not found: {path.parent} is not a provisioned consortium "
            "(create one with `carefl provision --out DIR --hospital NAME ...`)"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as JSON ({exc})") from exc
    try:
        return _Consortium.model_validate(doc)
    except ValidationError as err:
        where = err.errors(include_url=False)[0]["loc"][:1]
        if where in ((), ("format",)):
            raise InputError(f"{path} is not a CareFL consortium file (format {FORMAT!r} expected)") from None
        if where == ("version",):
            raise InputError(
                f"{path}: unsupported consortium file version {doc.get('version')!r}, expected {VERSION}"
            ) from None
        raise InputError(f"{path}: {problem(err, spell=_Consortium.key_of)}") from None
