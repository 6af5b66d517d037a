"""gRPC settings both ends of the coordinator's channel share.

Messages: a tensor stream's chunks are 4 MiB (geotrain.wire.transport.CHUNK_BYTES); 16 MiB leaves
room for a header and for senders with larger chunks.

HTTP/2 flow control: gRPC starts every stream with a 64 KiB window and grows it from its
bandwidth-delay-product probe, which takes round trips to settle: on a fresh connection over a long
fat link (1 Gbit/s x 100 ms holds 12.5 MB in flight) the first transfers would be window-bound.
``grpc.http2.lookahead_bytes`` is the window a stream starts from (the probe still grows it), and
``grpc.http2.max_frame_size`` the largest DATA frame: fewer frames, less framing work per byte.
"""

from __future__ import annotations

STREAM_WINDOW_BYTES = 16 << 20
"""Each stream's initial flow-control window: 16 MiB, the bandwidth-delay product of 1.3 Gbit/s at
100 ms RTT (beyond it the BDP probe grows the window)."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ("grpc.http2.max_frame_size", 1 << 20),
]

SERVER_OPTIONS = list(GRPC_OPTIONS)
"""The coordinator's server (geotrain.orchestrator.server)."""

# Reconnect fast after a coordinator restart (gRPC's default backoff grows to two minutes), and
# never through an HTTP proxy from the environment.
CLIENT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]
