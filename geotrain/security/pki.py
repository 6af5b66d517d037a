"""A run's certificates: one CA, and one certificate per component and per site (mTLS, issue #11).

Layout of a certificate directory (what ``geotrain certs init`` writes)::

    ca.pem               the CA certificate every part trusts (and nothing else)
    ca-key.pem           the CA's key (0600); needed only to issue more certificates, never by a component
    <name>.pem           a leaf certificate, <name>-key.pem its key (0600)

Names (the certificate's common name, and a DNS subjectAltName equal to it):

    coordinator          the coordinator: gRPC server; etcd client with write access to the run's state
    launcher             the launcher and the CLI: coordinator client (Status), etcd client
    etcd                 the etcd server (client and peer URLs)
    site.<name>          a site's processes: coordinator client as that site, ring peer, etcd client

A site's name cannot contain ``.`` (geotrain.config.schema.NAME_RE), so ``site.<name>`` never collides
with another component. Clients verify a server by its *name* (gRPC ``ssl_target_name_override``,
``ssl`` ``server_hostname``), not by the address they dial, so a connection through a link emulator,
a Compose service name or a Slurm node works with the same certificate. Every leaf also carries
``localhost``, ``127.0.0.1``, ``::1`` and the hosts given, for clients that verify by address (etcdctl).

Keys are ECDSA P-256 (small, fast handshakes); leaves are valid ``days`` (default 365) and
signed by the CA with serverAuth and clientAuth usage, so any part can be either end of a channel.
Rotating: ``geotrain certs init --ca DIR/ca.pem --ca-key DIR/ca-key.pem -o NEW`` issues fresh leaves under
the same CA (parts restarted one by one keep trusting each other); a new CA means restarting every part.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geotrain.errors import GeotrainError

COORDINATOR = "coordinator"
LAUNCHER = "launcher"
ETCD = "etcd"
SITE_PREFIX = "site."
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DEFAULT_DAYS = 365
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertificateError(GeotrainError):
    """A certificate directory is missing a file, unreadable, or not made for this run."""

    exit_code = 2


def site_name(site: str) -> str:
    """The certificate name of ``site``'s processes."""
    return f"{SITE_PREFIX}{site}"


def site_of(name: str | None) -> str | None:
    """The site a certificate name stands for (``site.paris`` -> ``paris``), or None for another component."""
    if name and name.startswith(SITE_PREFIX):
        return name[len(SITE_PREFIX):] or None
    return None


@dataclass(frozen=True)
class TlsFiles:
    """What one part needs for mTLS: the CA to trust, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path
    name: str
    """The certificate's common name (``coordinator``, ``site.paris``, ...)."""

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as PEM bytes; a clear error naming the file if one is missing."""
        out = []
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert), ("key", self.key)):
            try:
                out.append(Path(path).read_bytes())
            except OSError as exc:
                raise CertificateError(f"{self.name}: cannot read its {what} {path}: {exc.strerror or exc}") from None
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class CertDir:
    """A directory written by :func:`init_certs`."""

    path: Path

    def files(self, name: str) -> TlsFiles:
        """The files of the part called ``name`` (see the module docstring); checked to exist."""
        files = TlsFiles(ca=self.path / CA_CERT, cert=self.path / f"{name}.pem", key=self.path / f"{name}-key.pem",
                         name=name)
        for p in (files.ca, files.cert, files.key):
            if not p.is_file():
                raise CertificateError(f"certificates {self.path}: no {p.name} for {name!r} "
                                       f"(make them with `geotrain certs init TOPOLOGY -o {self.path}`)")
        return files

    def names(self) -> list[str]:
        """Every leaf certificate's name in the directory."""
        return sorted(p.name[:-len("-key.pem")] for p in self.path.glob("*-key.pem") if p.name != CA_KEY)


def component_names(sites: Iterable[str]) -> list[str]:
    """Every certificate a run of these sites needs."""
    return [COORDINATOR, LAUNCHER, ETCD, *(site_name(s) for s in sites)]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(name: str, hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    seen = set()
    for h in (name, *LOCAL_HOSTS, *hosts):
        if not h or h in seen:
            continue
        seen.add(h)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _load_ca(ca_cert: Path, ca_key: Path):
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot load the CA {ca_cert} / {ca_key}: {exc}") from None
    return cert, key


def _new_ca(run: str, days: int, now: dt.datetime):
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geotrain"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"geotrain CA {run}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca_cert: x509.Certificate, ca_key, name: str, hosts: Iterable[str] = (), days: int = DEFAULT_DAYS,
          now: dt.datetime | None = None):
    """A leaf certificate and key for ``name`` signed by the CA (server and client usage)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    key = _key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geotrain"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                         content_commitment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san(name, hosts), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def init_certs(out: str | Path, sites: Sequence[str], *, run: str = "run", hosts: Sequence[str] = (),
               days: int = DEFAULT_DAYS, ca_cert: Path | None = None, ca_key: Path | None = None,
               names: Sequence[str] | None = None) -> CertDir:
    """Write a CA (or reuse ``ca_cert``/``ca_key``) and a certificate for every part of a run of ``sites``.

    ``hosts``: extra subjectAltNames on every leaf (the machines parts run on, for clients that verify
    by address). ``names``: only these leaves (default: :func:`component_names`)."""
    if not 1 <= days <= 3650:
        raise CertificateError(f"certificate validity must be 1..3650 days, got {days}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    if ca_cert is not None or ca_key is not None:
        if ca_cert is None or ca_key is None:
            raise CertificateError("reusing a CA needs both its certificate and its key")
        cert, key = _load_ca(Path(ca_cert), Path(ca_key))
        if Path(ca_cert).resolve() != (out / CA_CERT).resolve():
            _write_cert(out / CA_CERT, cert)
    else:
        cert, key = _new_ca(run, days, now)
        _write_cert(out / CA_CERT, cert)
        _write_key(out / CA_KEY, key)
    for name in names or component_names(sites):
        leaf, leaf_key = issue(cert, key, name, hosts, days, now)
        _write_cert(out / f"{name}.pem", leaf)
        _write_key(out / f"{name}-key.pem", leaf_key)
    return CertDir(out)


def ensure_run_certs(path: Path | None, sites: Sequence[str], run: str, hosts: Sequence[str] = ()) -> CertDir | None:
    """The certificates of a run at ``path`` (geotrain.config.derive.certs_dir): made there if the directory
    has none yet (a fresh CA per run), checked to hold every part's if it has. None = plaintext."""
    if path is None:
        return None
    path = Path(path)
    if not (path / CA_CERT).is_file():
        return init_certs(path, sites, run=run, hosts=hosts)
    certs = CertDir(path)
    for name in component_names(sites):
        certs.files(name)
    return certs


def common_name(cert_pem: bytes) -> str | None:
    """The common name of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None
