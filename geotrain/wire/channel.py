"""gRPC settings both ends of the coordinator's channel share.

Messages: a tensor stream's chunks are 4 MiB (geotrain.wire.transport.CHUNK_BYTES); 16 MiB leaves
room for a header and for senders with larger chunks.

HTTP/2 flow control: gRPC starts every stream with a 64 KiB window and, with its bandwidth-delay
probe on, grows it over round trips: on a fresh connection through 1 Gbit/s x 50 ms the first 40 MB
echo took 1.45-1.53x the minimum (the next ones 1.01-1.03x), whatever ``grpc.http2.lookahead_bytes``
said (the probe decides the window). With the probe off, ``lookahead_bytes`` is the window: 64 MiB
gave 1.02x on the first transfer too (measured with geotrain.wan.link, 2026-12-02). So the probe is
off and every stream may have 64 MiB in flight: the bandwidth-delay product of 5.4 Gbit/s at 100 ms
RTT (a longer fatter link is capped at 64 MiB per RTT per stream: what parallel streams are for). What
the window bounds is what gRPC buffers for a stream its handler does not read: the coordinator reads
every stream as it arrives and refuses an oversized one at its header; a stalled handler could hold up
to 64 MiB per stream (geotrain.orchestrator.limits bounds the streams per peer).
``grpc.http2.max_frame_size``: the largest DATA frame, fewer frames per byte.
"""

from __future__ import annotations

STREAM_WINDOW_BYTES = 64 << 20
"""Each stream's flow-control window (static: the BDP probe is off)."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ("grpc.http2.bdp_probe", 0),
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
