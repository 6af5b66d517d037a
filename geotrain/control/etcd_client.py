"""How geotrain talks to etcd: the pyetcd (``etcd-sdk-python``) client, its endpoint and its errors.

:func:`parse_endpoint` reads ``[http[s]://]host:port``, :func:`make_client` builds the client with
the gRPC options below (plaintext, or mutual TLS with a :class:`~geotrain.security.pki.TlsFiles` pair:
the run's CA to trust, the part's certificate to present — etcd started with ``--client-cert-auth``
takes its common name as the etcd user, geotrain.control.auth), :func:`reason` turns a pyetcd/gRPC failure into one line
(the callers raise ``ControlPlaneError("etcd at <endpoint>: <what> failed: <reason>")`` from it),
and :data:`ETCD_ERRORS` are the exceptions that mean "the etcd operation failed".

Notes on pyetcd 0.0.7 that shaped this module:

* Its client marks its only endpoint "failed" after one UNAVAILABLE/DEADLINE_EXCEEDED error and
  then refuses every call for 300 s with ``ValueError('Trying to use a failed node')``. The
  clients here are built with ``Endpoint(time_retry=0)`` so that the next call simply retries.
* ``refresh_lease`` is a one-request LeaseKeepAlive stream per call; an expired lease answers
  ``TTL == 0`` (not an error), and revoking an unknown lease is a raw ``NOT_FOUND`` RpcError.
"""


from __future__ import annotations

import json
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions

from geotrain.errors import ControlPlaneError
from geotrain.security.pki import TlsFiles
from geotrain.security.tls import TARGET_NAME_OPTION, channel_credentials

DEFAULT_CLIENT_PORT = 2379

# gRPC channel options: reconnect quickly after etcd comes back (the default backoff grows to
# two minutes), never go through an HTTP proxy from the environment, and notice a dead peer on
# a long-lived watch stream (etcd's default --grpc-keepalive-min-time is 5 s). Not set on
# purpose: grpc.min_reconnect_backoff_ms, which gRPC core also uses as the connect timeout (a
# small value makes connections over a slow emulated WAN link fail after that many ms).
GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]

def permission_denied(exc: BaseException) -> bool:
    """Did etcd refuse the operation for the caller's identity (auth on, no permission for the key)?"""
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    try:
        return isinstance(rpc, grpc.RpcError) and rpc.code() == grpc.StatusCode.PERMISSION_DENIED
    except Exception:  # pragma: no cover - a malformed RpcError
        return False


# Exceptions that mean "the etcd operation failed" (ValueError: pyetcd's failed-node refusal,
# or gRPC's "Cannot invoke RPC on closed channel!").
ETCD_ERRORS = (etcd_exceptions.Etcd3Exception, grpc.RpcError, ValueError)


def endpoint_scheme(endpoint: str) -> str:
    """``"http"``, ``"https"`` or ``""`` (no scheme written: geotrain.control.access decides)."""
    text = str(endpoint).strip()
    return text.split("://", 1)[0].lower() if "://" in text else ""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"http[s]://host:port"``, ``"host:port"`` or ``"host"`` -> ``(host, port)`` (the scheme: :func:`endpoint_scheme`)."""
    text = str(endpoint).strip()
    if not text:
        raise ControlPlaneError("etcd endpoint is empty")
    parts = urlsplit(text if "://" in text else "//" + text)
    if parts.scheme not in ("", "http", "https"):
        raise ControlPlaneError(
            f"etcd endpoint {endpoint!r}: scheme {parts.scheme!r} is not supported (use http:// or https://)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ControlPlaneError(f"etcd endpoint {endpoint!r}: invalid port") from exc
    host = parts.hostname
    if not host or parts.path not in ("", "/"):
        raise ControlPlaneError(f"etcd endpoint {endpoint!r} is not of the form http://host:port")
    return host, port if port is not None else DEFAULT_CLIENT_PORT


def netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason(exc: BaseException, timeout_s: float | None = None) -> str:
    """A one-line reason for a pyetcd/gRPC failure (pyetcd hides the gRPC status in __context__)."""
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if isinstance(rpc, grpc.RpcError) and hasattr(rpc, "code"):
        try:
            code = rpc.code()
            details = rpc.details() or ""
        except Exception:  # pragma: no cover - a malformed RpcError
            code, details = None, ""
        if code is not None:
            text = f"{code.name}: {details}".rstrip(": ")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
                text += f" (no answer within {timeout_s:g} s)"
            return text
    return str(exc) or type(exc).__name__


def encode(value: dict) -> bytes:
    if not isinstance(value, dict):
        raise TypeError(f"control-plane values are JSON objects, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def make_client(host: str, port: int, timeout_s: float, tls: TlsFiles | None = None,
                server_name: str | None = None) -> pyetcd.MultiEndpointEtcd3Client:
    """A pyetcd client of one endpoint. ``tls``: mutual TLS presenting that pair (None: plaintext);
    ``server_name``: verify the server's certificate as that name whatever address is dialled (the
    etcd a launcher starts is ``etcd``, geotrain.security.pki), None: as the host dialled."""
    opts = list(GRPC_OPTIONS)
    if tls is not None and server_name:
        opts.append((TARGET_NAME_OPTION, server_name))
    creds = channel_credentials(tls) if tls is not None else None
    # time_retry=0: never put the (only) endpoint in pyetcd's 300 s "failed node" quarantine.
    ep = pyetcd.Endpoint(host, port, secure=tls is not None, creds=creds, time_retry=0.0, opts=opts)
    return pyetcd.MultiEndpointEtcd3Client(endpoints=[ep], timeout=timeout_s)
