"""mTLS for geotrain's channels: gRPC credentials, ``ssl`` contexts for raw sockets, and who is calling.

Every channel is mutual: the server demands a certificate signed by the run's CA, and the client
verifies the server's certificate *by name* (see geotrain.security.pki): a coordinator client checks
that it talks to ``coordinator``, a ring peer that its successor is ``site.<successor>``. The caller's
identity is the common name of the certificate it presented, which a handler reads with
:func:`peer_name` — never a name from the request.
"""

from __future__ import annotations

import ssl

import grpc

from geotrain.security.pki import COORDINATOR, TlsFiles

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """A gRPC server's credentials: its certificate, and a client certificate from the CA required."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """A gRPC client's credentials: trust only the run's CA, present ``files``' certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(server_name: str = COORDINATOR) -> list[tuple[str, str]]:
    """Channel options that verify the server as ``server_name`` whatever address is dialled."""
    return [(TARGET_NAME_OPTION, server_name)]


def secure_channel(address: str, files: TlsFiles, server_name: str = COORDINATOR, options=()) -> grpc.Channel:
    """A gRPC channel to ``address`` that presents ``files`` and expects the server to be ``server_name``."""
    return grpc.secure_channel(address, channel_credentials(files), options=[*options, *channel_options(server_name)])


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the certificate the caller presented; None on a plaintext channel."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


def ssl_server_context(files: TlsFiles) -> ssl.SSLContext:
    """An ``ssl`` context for the accepting end of a raw TCP connection (a ring edge): mutual, CA only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def ssl_client_context(files: TlsFiles) -> ssl.SSLContext:
    """An ``ssl`` context for the dialling end; pass ``server_hostname=<expected name>`` to wrap_socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def socket_peer_name(sock: ssl.SSLSocket) -> str | None:
    """The common name of the certificate the other end of an ``ssl`` socket presented."""
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
