"""gRPC settings both ends of the coordinator's channel share."""

from __future__ import annotations

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]

# Reconnect fast after a coordinator restart (gRPC's default backoff grows to two minutes), and
# never through an HTTP proxy from the environment.
CLIENT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]
