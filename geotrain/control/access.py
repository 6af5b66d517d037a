"""How one part of a run reaches etcd: plaintext or mutual TLS, with which certificate — a pure decision.

:func:`etcd_access` is asked by every etcd client of a run (the launcher, the coordinator, ``geotrain
site``'s lookup of the coordinator, each worker's member registration) with the endpoint it was
given, its certificate name, the run's certificate directory (None when ``security.tls`` is false)
and the topology's ``etcd`` section. The answer, with its reason, in this order:

===========================================  ================================================================
the endpoint is written ``http://``          plaintext: asked for explicitly
``etcd.ca_file`` is set (an external etcd)   TLS with ``etcd.ca_file/cert_file/key_file``, the server checked
                                             by the address dialled (it is not the run's certificate)
``etcd.endpoint`` is set, no ``ca_file``     plaintext to that external etcd (summary.json warns; a written
                                             ``https://`` is refused: no certificate to present)
``security.tls`` is false                    plaintext (the run's plaintext warning covers etcd)
otherwise: an etcd of this run               TLS with the part's own pair from the run's certificates (its
                                             common name is its etcd user, geotrain.control.auth), the
                                             server checked by the name ``etcd``, whatever address is dialled
===========================================  ================================================================

The last row is the etcd ``geotrain launch`` starts (and one started with
``EtcdServer(tls=..., auth=...)`` for parts on separate hosts, given to them with ``--etcd``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geotrain.control.etcd_client import endpoint_scheme, netloc, parse_endpoint
from geotrain.errors import ControlPlaneError
from geotrain.security.pki import ETCD, CertDir, TlsFiles

EXTERNAL_CLIENT = "etcd.cert_file"
"""The name :func:`etcd_access` gives the external etcd's client pair (one pair for every part: the schema has one)."""


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd: ``endpoint`` ("host:port"), ``tls`` (None: plaintext), ``server_name`` (verify the
    server's certificate as this name; None: as the host dialled), and why."""

    endpoint: str
    tls: TlsFiles | None
    server_name: str | None
    reason: str

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.endpoint}"


def etcd_access(endpoint: str | None, name: str, *, certs_dir: Path | str | None, etcd=None) -> EtcdAccess:
    """How the part called ``name`` (``coordinator``, ``launcher``, ``site.<s>``) reaches etcd (module docstring).

    ``endpoint``: what it was given (``--etcd``, ``GEOTRAIN_ETCD``), else ``etcd.endpoint``. ``certs_dir``: the
    run's certificates (None: ``security.tls`` is false). ``etcd``: the topology's
    :class:`~geotrain.config.schema.EtcdConfig` (None: no external etcd). Raises ControlPlaneError when the
    choice cannot be honoured (no endpoint; https with no certificate to present; a missing file)."""
    given = endpoint or (etcd.endpoint if etcd is not None else None)
    if not given:
        raise ControlPlaneError("no etcd endpoint (--etcd HOST:PORT or etcd.endpoint in the topology)")
    scheme = endpoint_scheme(given)
    where = netloc(*parse_endpoint(given))
    external = etcd is not None and etcd.endpoint is not None
    if scheme == "http":
        return EtcdAccess(where, None, None, "the endpoint is written http://: plaintext, as asked")
    if etcd is not None and etcd.ca_file:
        files = TlsFiles(ca=Path(etcd.ca_file), cert=Path(etcd.cert_file), key=Path(etcd.key_file), name=EXTERNAL_CLIENT)
        files.read()  # a clear error naming the file now, not a TLS failure later
        return EtcdAccess(where, files, None, "an external etcd with etcd.ca_file: TLS with the topology's files")
    if external:
        if scheme == "https":
            raise ControlPlaneError(f"etcd endpoint {given!r} is https but the topology gives no client certificate "
                                    "(set etcd.ca_file, etcd.cert_file and etcd.key_file)")
        return EtcdAccess(where, None, None, "an external etcd without etcd.ca_file: plaintext (summary.json warns)")
    if certs_dir is None:
        if scheme == "https":
            raise ControlPlaneError(f"etcd endpoint {given!r} is https but security.tls is false (no certificates)")
        return EtcdAccess(where, None, None, "security.tls is false: plaintext")
    return EtcdAccess(where, CertDir(Path(certs_dir)).files(name), ETCD,
                      f"an etcd of this run: TLS as {name}, the server checked as {ETCD!r}")
