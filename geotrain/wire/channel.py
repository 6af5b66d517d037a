"""gRPC settings both ends of the coordinator's channel share.

Messages: a tensor stream's chunks are 4 MiB (geotrain.wire.transport.CHUNK_BYTES); 16 MiB leaves
room for a header and for senders with larger chunks.

HTTP/2 flow control: gRPC starts every stream with a 64 KiB window and, with its bandwidth-delay
probe on, grows it over round trips: on a fresh connection through 1 Gbit/s x 50 ms the first 40 MB
echo took 1.45-1.53x the minimum (the next ones 1.01-1.03x), whatever ``grpc.http2.lookahead_bytes``
said (the probe decides the window). With the probe off, ``lookahead_bytes`` is the window: 64 MiB
gave 1.02x on the first transfer too (measured with geotrain.wan.link, 2026-12-02). So the probe is
off and the window is sized from the topology's links (:func:`window_for`): twice the largest
bandwidth-delay product between a site and the coordinator, at least 8 MiB, at most 512 MiB. A fixed
64 MiB (until 2026-12-04) capped a stream at 5.4 Gbit/s on a 100 ms RTT, and on short links cost memory
for nothing: what the window bounds is what gRPC buffers for a stream its handler has not read yet, ~0.6x
the model per site streaming at once in the coordinator (docs/results.md, "The coordinator's memory").
The coordinator reads every stream as it arrives and refuses an oversized one at its header; a stalled
handler could hold a window per stream (geotrain.orchestrator.limits bounds the streams per peer).
``grpc.http2.max_frame_size``: the largest DATA frame, fewer frames per byte.
"""

from __future__ import annotations

from collections.abc import Iterable

STREAM_WINDOW_BYTES = 64 << 20
"""Each stream's flow-control window where no topology says more (static: the BDP probe is off)."""
MIN_WINDOW_BYTES = 8 << 20
MAX_WINDOW_BYTES = 512 << 20


def window_for(links: Iterable[tuple[float, float, float]]) -> int:
    """The stream window for links of (bandwidth Mbit/s, one-way latency ms, jitter ms): twice the largest
    bandwidth-delay product (RTT = twice latency + jitter), whole MiB, within [8 MiB, 512 MiB]. None of them (every
    site beside the coordinator): 8 MiB, plenty at a loopback's RTT."""
    bdp = max((mbps * 1e6 / 8 * 2 * (latency + jitter) / 1000 for mbps, latency, jitter in links), default=0.0)
    mib = -(-int(2 * bdp) // (1 << 20))
    return min(MAX_WINDOW_BYTES, max(MIN_WINDOW_BYTES, mib << 20))


def grpc_options(window_bytes: int = STREAM_WINDOW_BYTES) -> list[tuple[str, int]]:
    """Both ends' settings with ``window_bytes`` for every stream's flow-control window."""
    return [
        ("grpc.max_send_message_length", 16 << 20),
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.http2.lookahead_bytes", window_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.max_frame_size", 1 << 20),
    ]


# Reconnect fast after a coordinator restart (gRPC's default backoff grows to two minutes), and
# never through an HTTP proxy from the environment.
CLIENT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]
