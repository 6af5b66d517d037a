"""The WAN link model of geotrain.wan.link: what one direction of an emulated link does to bytes.

:class:`LinkParams` are one direction's settings (bandwidth, latency, jitter, loss, up);
:class:`Direction` is that direction's state shared by all connections (the bottleneck clock,
byte counts, the loss model); the proxy (geotrain.wan.proxy) moves the bytes on that schedule.

Model, per direction (all times from ``time.monotonic()``):

* A reader thread ``recv``s chunks from the source socket (at most 256 KiB, and about 2 ms of
  serialization at the link rate so delivery is paced smoothly, at least 4 KiB). A writer thread
  delivers them to the destination socket at their delivery time.
* Bottleneck: ``departure = max(arrival, busy_until)``, ``busy_until = departure + bytes*8/rate``.
  ``busy_until`` is shared by all connections of the direction: they share the link's bandwidth.
* ``delivery = busy_until + latency + max(0, N(0, jitter))`` (+ loss penalty), then
  ``delivery = max(delivery, previous delivery of this connection)``: TCP delivers in order, so a
  late chunk holds back the chunks behind it. ``latency`` is therefore the minimum one-way delay and
  the mean extra delay of jitter is about 0.4 * jitter.
* Loss, as TCP feels it: each 1448-byte segment of a chunk is lost with probability ``loss``; every
  lost segment adds one retransmission delay (RTT = forward + backward latency, at least 1 ms) to
  the chunk, and each connection (a TCP flow) is capped at the Mathis et al. bound
  ``MSS*1.22/(RTT*sqrt(loss))`` on a clock of its own (:class:`Flow`), while all share the
  bandwidth: a chunk leaves at ``max(bottleneck done, flow done)``. One flow gets
  ``min(bandwidth, mathis)``; P flows (a transfer striped over P connections, geotrain.wan.stripe)
  get ``min(bandwidth, P * mathis)``. No byte is ever dropped.
* Backpressure: at most ``max(2 * rate * RTT, 4 MiB)`` bytes per connection and direction are
  queued but undelivered; past that the reader stops reading, the sender's socket buffers fill up
  and the sender feels the bottleneck.
* Blackhole (``up=False``): nothing is delivered; bytes are held (up to the backpressure bound)
  and so is a FIN. When the direction comes up again, held chunks are re-sent as if they left the
  proxy at that moment (serialization and latency again, as a retransmission would be).
* Live changes (:meth:`LinkProxy.set_params`, faults) apply to chunks scheduled afterwards; chunks
  already scheduled keep their delivery time (except on a blackhole, see above).
* A FIN (``shutdown(SHUT_WR)``) is delivered after the bytes before it, with the latency of the
  direction. An error or reset on either socket tears the connection down at once (RST both ways).

Assumptions and limits: connection setup is not delayed (no handshake RTT; the proxy connects to
the target when a client connects, even when blackholed); the Mathis bound is a TCP Reno
steady state (no slow start; CUBIC or BBR do better on long fat links); Python threads pace delivery, and waiting is accurate to ~0.1 ms.
Randomness comes from ``random.Random`` seeded with (seed, direction, connection number), so a run
with the same traffic is reproducible.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields

from geotrain.units import parse_bandwidth_mbps, parse_duration_ms

MSS = 1448                      # TCP segment payload used for the loss model
MIN_RTT_S = 0.001               # floor of the retransmission delay
MIN_QUEUE_BYTES = 4 * 1024 * 1024
MIN_CHUNK = 4096
MAX_CHUNK = 256 * 1024
PACING_S = 0.002                # target serialization time of one chunk
COALESCE_BYTES = 1024 * 1024    # due chunks joined into one send
SLEEP_SLACK_S = 0.00015         # waits wake this much early (timed waits overshoot by ~0.1 ms)
DUE_SLACK_S = 0.00005           # a chunk this close to its delivery time is sent now
DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class LinkParams:
    """One direction of a link. ``bandwidth_mbps`` is in 10^6 bit/s; delays in milliseconds."""

    bandwidth_mbps: float
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    up: bool = True

    def __post_init__(self) -> None:
        for fname in ("bandwidth_mbps", "latency_ms", "jitter_ms", "loss"):
            v = getattr(self, fname)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"LinkParams.{fname} must be a finite number, got {v!r}")
        if self.bandwidth_mbps <= 0:
            raise ValueError(f"LinkParams.bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"LinkParams latency/jitter must be >= 0, got {self.latency_ms!r}/{self.jitter_ms!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"LinkParams.loss must be in [0, 1), got {self.loss!r}")
        if not isinstance(self.up, bool):
            raise ValueError(f"LinkParams.up must be a bool, got {self.up!r}")


_FIELDS = {f.name for f in fields(LinkParams)}


def coerce_changes(changes: dict) -> dict:
    """Validate field names; accept unit strings ("10mbit", "50ms") for bandwidth and delays."""
    unknown = set(changes) - _FIELDS
    if unknown:
        raise ValueError(f"unknown LinkParams field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    out = dict(changes)
    if isinstance(out.get("bandwidth_mbps"), str):
        out["bandwidth_mbps"] = parse_bandwidth_mbps(out["bandwidth_mbps"])
    for k in ("latency_ms", "jitter_ms"):
        if isinstance(out.get(k), str):
            out[k] = parse_duration_ms(out[k])
    return out


class Flow:
    """One connection's own clock in one direction (the Mathis bound is per TCP flow)."""

    __slots__ = ("busy_until",)

    def __init__(self) -> None:
        self.busy_until = 0.0


class Direction:
    """State of one direction shared by all connections: params, bottleneck clock, byte count."""

    def __init__(self, label: str, params: LinkParams, flows: int = 1) -> None:
        self.label = label
        self.initial = params
        self.params = params
        self.flows = flows
        """How many connections a transfer is striped over (``links.streams``), where one clock stands for
        them all (:meth:`schedule` without a ``flow``: the simulator)."""
        self.peer: Direction = self
        self.epoch = 0              # incremented when the direction goes down
        self.busy_until = 0.0
        self.bytes = 0
        self.lock = threading.Lock()

    def update(self, fn: Callable[[LinkParams], LinkParams]) -> None:
        with self.lock:
            new = fn(self.params)
            if self.params.up and not new.up:
                self.epoch += 1
            self.params = new

    def rtt_s(self, p: LinkParams) -> float:
        return max((p.latency_ms + self.peer.params.latency_ms) / 1000.0, MIN_RTT_S)

    def mathis_bytes_per_s(self, p: LinkParams) -> float:
        """One TCP flow's loss-limited throughput (inf without loss)."""
        return MSS * 1.22 / (self.rtt_s(p) * math.sqrt(p.loss)) if p.loss > 0 else math.inf

    def rate_bytes_per_s(self, p: LinkParams, flows: int = 1) -> float:
        """What ``flows`` TCP flows together get: ``min(bandwidth, flows * mathis)``."""
        return min(p.bandwidth_mbps * 1e6 / 8.0, flows * self.mathis_bytes_per_s(p))

    def queue_limit(self) -> int:
        p = self.params
        return max(int(2 * self.rate_bytes_per_s(p) * self.rtt_s(p)), MIN_QUEUE_BYTES)

    def recv_size(self) -> int:
        return min(MAX_CHUNK, max(MIN_CHUNK, int(self.rate_bytes_per_s(self.params) * PACING_S)))

    def schedule(self, nbytes: int, floor: float, rng: random.Random,
                 flow: Flow | None = None) -> tuple[float, int] | None:
        """Claim the bottleneck for ``nbytes``; return (delivery time, epoch), or None when down.

        ``flow``: the connection's own clock (the proxy: each connection is a flow, capped at the Mathis
        bound on its own while all share the bandwidth). None: the direction's clock alone, at the rate
        of its :attr:`flows` together (the simulator, which moves a striped transfer as one)."""
        with self.lock:
            p = self.params
            if not p.up:
                return None
            start = max(floor, self.busy_until)
            if flow is None:
                self.busy_until = start + nbytes / self.rate_bytes_per_s(p, self.flows)
                done = self.busy_until
            else:
                self.busy_until = start + nbytes / self.rate_bytes_per_s(p, math.inf)
                flow.busy_until = max(floor, flow.busy_until) + nbytes / self.mathis_bytes_per_s(p)
                done = max(self.busy_until, flow.busy_until)
            delivery = done + p.latency_ms / 1000.0
            if p.jitter_ms > 0:
                delivery += max(0.0, rng.gauss(0.0, p.jitter_ms / 1000.0))
            if p.loss > 0 and nbytes:
                lost = sum(1 for _ in range(-(-nbytes // MSS)) if rng.random() < p.loss)
                delivery += lost * self.rtt_s(p)
            return delivery, self.epoch

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n
