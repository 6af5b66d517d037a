"""User-space WAN link emulator: a TCP proxy that imposes bandwidth, latency, jitter and loss.

The kernel here has no ``netem``, so every byte between a site and the coordinator goes through a
:class:`LinkProxy`: a client connects to the proxy's listening port, the proxy connects to the
target, and copies bytes both ways through an emulated link. ``forward`` is client -> target
("up"), ``backward`` is target -> client ("down"); each direction has its own :class:`LinkParams`.

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
  the chunk, and the direction's rate is capped at the Mathis et al. bound
  ``MSS*1.22/(RTT*sqrt(loss))``: ``rate = min(bandwidth, mathis)``. No byte is ever dropped.
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
the target when a client connects, even when blackholed); Mathis is per flow but applied to the
direction as a whole; Python threads pace delivery, and waiting is accurate to ~0.1 ms.
Randomness comes from ``random.Random`` seeded with (seed, direction, connection number), so a run
with the same traffic is reproducible.

``main`` is the process entry point of ``geotrain link`` (one process per WAN link).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace

from geotrain.errors import LinkError
from geotrain.units import parse_bandwidth_mbps, parse_duration_ms

log = logging.getLogger(__name__)

MSS = 1448                      # TCP segment payload used for the loss model
MIN_RTT_S = 0.001               # floor of the retransmission delay
MIN_QUEUE_BYTES = 4 * 1024 * 1024
MIN_CHUNK = 4096
MAX_CHUNK = 256 * 1024
PACING_S = 0.002                # target serialization time of one chunk
COALESCE_BYTES = 1024 * 1024    # due chunks joined into one send
SLEEP_SLACK_S = 0.00015         # waits wake this much early (timed waits overshoot by ~0.1 ms)
DUE_SLACK_S = 0.00005           # a chunk this close to its delivery time is sent now
_DIRECTIONS = ("forward", "backward")


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


def _coerce_changes(changes: dict) -> dict:
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


class _Direction:
    """State of one direction shared by all connections: params, bottleneck clock, byte count."""

    def __init__(self, label: str, params: LinkParams) -> None:
        self.label = label
        self.initial = params
        self.params = params
        self.peer: _Direction = self
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

    def rate_bytes_per_s(self, p: LinkParams) -> float:
        rate = p.bandwidth_mbps * 1e6 / 8.0
        if p.loss > 0:
            rate = min(rate, MSS * 1.22 / (self.rtt_s(p) * math.sqrt(p.loss)))
        return rate

    def queue_limit(self) -> int:
        p = self.params
        return max(int(2 * self.rate_bytes_per_s(p) * self.rtt_s(p)), MIN_QUEUE_BYTES)

    def recv_size(self) -> int:
        return min(MAX_CHUNK, max(MIN_CHUNK, int(self.rate_bytes_per_s(self.params) * PACING_S)))

    def schedule(self, nbytes: int, floor: float, rng: random.Random) -> tuple[float, int] | None:
        """Claim the bottleneck for ``nbytes``; return (delivery time, epoch), or None when down."""
        with self.lock:
            p = self.params
            if not p.up:
                return None
            start = max(floor, self.busy_until)
            self.busy_until = start + nbytes / self.rate_bytes_per_s(p)
            delivery = self.busy_until + p.latency_ms / 1000.0
            if p.jitter_ms > 0:
                delivery += max(0.0, rng.gauss(0.0, p.jitter_ms / 1000.0))
            if p.loss > 0 and nbytes:
                lost = sum(1 for _ in range(-(-nbytes // MSS)) if rng.random() < p.loss)
                delivery += lost * self.rtt_s(p)
            return delivery, self.epoch

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n


class _Chunk:
    __slots__ = ("data", "delivery", "epoch")

    def __init__(self, data: bytes) -> None:
        self.data = data            # b"" is the FIN
        self.delivery: float | None = None
        self.epoch = -1


class _Pipe:
    """One direction of one connection: a reader thread, a queue, a writer thread."""

    def __init__(self, direction: _Direction, src: socket.socket, dst: socket.socket, rng: random.Random) -> None:
        self.dir, self.src, self.dst, self.rng = direction, src, dst, rng
        self.lock = threading.Lock()
        self.data_cv = threading.Condition(self.lock)
        self.space_cv = threading.Condition(self.lock)
        self.queue: deque[_Chunk] = deque()
        self.queued = 0             # bytes read but not yet delivered
        self.last_delivery = 0.0    # delivery time of the last scheduled chunk (in-order delivery)
        self.last_sent = 0.0        # delivery time of the last delivered chunk
        self.stopping = False

    def wake(self, stop: bool = False) -> None:
        with self.lock:
            self.stopping = self.stopping or stop
            self.data_cv.notify_all()
            self.space_cv.notify_all()

    def _schedule(self, chunk: _Chunk, floor: float) -> bool:
        r = self.dir.schedule(len(chunk.data), floor, self.rng)
        if r is None:
            chunk.delivery = None
            return False
        chunk.delivery, chunk.epoch = max(r[0], self.last_delivery), r[1]
        self.last_delivery = chunk.delivery
        return True

    def read_loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and self.queued >= self.dir.queue_limit():
                    self.space_cv.wait()
                if self.stopping:
                    return
            data = self.src.recv(self.dir.recv_size())
            arrival = time.monotonic()
            chunk = _Chunk(data)
            with self.lock:
                if self.stopping:
                    return
                tail = self.queue[-1] if self.queue else None
                # Schedule now unless chunks ahead of it are held (blackhole): those go first.
                if tail is None or (tail.delivery is not None and tail.epoch == self.dir.epoch):
                    self._schedule(chunk, arrival)
                self.queue.append(chunk)
                self.queued += len(data)
                if tail is None or chunk.delivery is None:
                    self.data_cv.notify()
            if not data:
                return

    def write_loop(self) -> None:
        while True:
            batch: list[bytes] = []
            size, eof = 0, False
            with self.lock:
                while True:
                    if self.stopping:
                        return
                    if not self.queue:
                        self.data_cv.wait()
                        continue
                    head = self.queue[0]
                    if head.delivery is None or head.epoch != self.dir.epoch:
                        if not self.dir.params.up:
                            self.data_cv.wait()          # blackholed: hold
                            continue
                        # Back up after a blackhole: re-send everything held from now on.
                        now = time.monotonic()
                        self.last_delivery = self.last_sent
                        if not all(self._schedule(c, now) for c in self.queue):
                            continue
                    now = time.monotonic()
                    wait = head.delivery - now
                    if wait > DUE_SLACK_S:
                        self.data_cv.wait(max(wait - SLEEP_SLACK_S, DUE_SLACK_S))
                        continue
                    epoch = self.dir.epoch
                    due = now + DUE_SLACK_S
                    while self.queue and size < COALESCE_BYTES:
                        c = self.queue[0]
                        if c.delivery is None or c.epoch != epoch or c.delivery > due:
                            break
                        self.queue.popleft()
                        self.last_sent = c.delivery
                        if not c.data:
                            eof = True
                            break
                        batch.append(c.data)
                        size += len(c.data)
                    break
            if batch:
                self.dst.sendall(batch[0] if len(batch) == 1 else b"".join(batch))
                self.dir.add_bytes(size)
                with self.lock:
                    self.queued -= size
                    self.space_cv.notify()
            if eof:
                self.dst.shutdown(socket.SHUT_WR)
                return


class _Connection:
    def __init__(self, proxy: LinkProxy, index: int, client: socket.socket, upstream: socket.socket,
                 peer: str) -> None:
        self.proxy, self.index, self.client, self.upstream, self.peer = proxy, index, client, upstream, peer
        seed = proxy.seed
        self.pipes = (
            _Pipe(proxy._dirs["forward"], client, upstream, random.Random(f"{seed}:forward:{index}")),
            _Pipe(proxy._dirs["backward"], upstream, client, random.Random(f"{seed}:backward:{index}")),
        )
        self._lock = threading.Lock()
        self._alive = 0
        self._aborted = False
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for label, pipe in zip(_DIRECTIONS, self.pipes):
            for role, fn in (("reader", pipe.read_loop), ("writer", pipe.write_loop)):
                self.threads.append(threading.Thread(
                    target=self._run, args=(fn, f"{label} {role}"), daemon=True,
                    name=f"link-{self.proxy.name}-c{self.index}-{label}-{role}"))
        self._alive = len(self.threads)
        for t in self.threads:
            t.start()

    def _run(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except OSError as exc:
            if not self._aborted:
                log.debug("link %s: connection %d from %s: %s: %s", self.proxy.name, self.index, self.peer, what, exc)
                self.abort()
        except Exception:
            log.exception("link %s: connection %d: %s failed", self.proxy.name, self.index, what)
            self.abort()
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                for s in (self.client, self.upstream):
                    with suppress(OSError):
                        s.close()
                self.proxy._forget(self)

    def abort(self, rst: bool = True) -> None:
        """Tear the connection down now (RST both ways); threads exit and the last one closes the sockets."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        for p in self.pipes:
            p.wake(stop=True)
        for s in (self.client, self.upstream):
            if rst:
                with suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _set_nodelay(s: socket.socket) -> None:
    with suppress(OSError):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LinkProxy:
    """A TCP proxy emulating one WAN link between ``listen`` (the client side) and ``target``."""

    def __init__(self, name: str, target: tuple[str, int], forward: LinkParams, backward: LinkParams | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), seed: int = 0) -> None:
        if not isinstance(forward, LinkParams) or not isinstance(backward or forward, LinkParams):
            raise TypeError("forward/backward must be LinkParams")
        self.name = name
        self.target = (target[0], int(target[1]))
        self.listen = (listen[0], int(listen[1]))
        self.seed = seed
        self._dirs = {"forward": _Direction("forward", forward),
                      "backward": _Direction("backward", backward if backward is not None else forward)}
        self._dirs["forward"].peer, self._dirs["backward"].peer = self._dirs["backward"], self._dirs["forward"]
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._n_conns = 0
        self._connect_errors = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._port: int | None = None
        self._stopped = False

    def _where(self) -> str:
        return f"link {self.name} ({self.listen[0]}:{self._port if self._port is not None else self.listen[1]}" \
               f" -> {self.target[0]}:{self.target[1]})"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> int:
        """Bind the listening socket, start accepting; return the listening port."""
        with self._lock:
            if self._stopped:
                raise LinkError(f"{self._where()}: cannot start a stopped link")
            if self._listener is not None:
                return self._port  # type: ignore[return-value]
            try:
                family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
                ls = socket.socket(family, socket.SOCK_STREAM)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind(self.listen)
                ls.listen(128)
            except OSError as exc:
                with suppress(NameError, OSError):
                    ls.close()
                raise LinkError(f"{self._where()}: cannot listen on {self.listen[0]}:{self.listen[1]}: {exc}") from exc
            ls.settimeout(0.5)
            self._listener = ls
            self._port = ls.getsockname()[1]
            self._accept_thread = threading.Thread(target=self._accept_loop, name=f"link-{self.name}-accept",
                                                   daemon=True)
            self._accept_thread.start()
        log.info("%s: listening; forward %s, backward %s", self._where(), self._dirs["forward"].params,
                 self._dirs["backward"].params)
        return self._port

    @property
    def port(self) -> int:
        if self._port is None:
            raise LinkError(f"{self._where()}: not started")
        return self._port

    def _accept_loop(self) -> None:
        ls = self._listener
        assert ls is not None
        while not self._stopped:
            try:
                client, addr = ls.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopped:
                    return
                log.warning("%s: accept failed: %s", self._where(), exc)
                time.sleep(0.05)
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError as exc:
                err = LinkError(f"{self._where()}: cannot connect to target {self.target[0]}:{self.target[1]}: {exc}")
                log.warning("%s", err)
                with self._lock:
                    self._connect_errors += 1
                client.close()
                continue
            _set_nodelay(client)
            _set_nodelay(upstream)
            with self._lock:
                if self._stopped:
                    client.close()
                    upstream.close()
                    return
                conn = _Connection(self, self._n_conns, client, upstream, f"{addr[0]}:{addr[1]}")
                self._n_conns += 1
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self) -> None:
        """Close the listener and every connection, join the threads. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            conns = list(self._conns)
        if self._listener is not None:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            if self._accept_thread is not None:
                self._accept_thread.join(timeout=2.0)
            with suppress(OSError):
                self._listener.close()
        for c in conns:
            c.abort()
        deadline = time.monotonic() + 3.0
        for c in conns:
            for t in c.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    log.warning("%s: thread %s did not stop", self._where(), t.name)

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation -------------------------------------------------------------------------
    def params(self, direction: str) -> LinkParams:
        """Current params of ``direction`` ("forward" or "backward")."""
        return self._select(direction)[0].params

    def initial_params(self, direction: str) -> LinkParams:
        return self._select(direction)[0].initial

    def stats(self) -> dict:
        """Payload bytes delivered per direction (WAN bytes), connections accepted in total
        (``connections``) and open now (``active_connections``), failed target connects, and the
        current params of each direction as dicts."""
        fwd, bwd = self._dirs["forward"], self._dirs["backward"]
        with self._lock:
            conns, active, errors = self._n_conns, len(self._conns), self._connect_errors
        return {
            "name": self.name,
            "listen": f"{self.listen[0]}:{self._port if self._port is not None else self.listen[1]}",
            "target": f"{self.target[0]}:{self.target[1]}",
            "bytes_forward": fwd.bytes,
            "bytes_backward": bwd.bytes,
            "connections": conns,
            "active_connections": active,
            "connect_errors": errors,
            "forward": asdict(fwd.params),
            "backward": asdict(bwd.params),
        }

    # -- faults ------------------------------------------------------------------------------
    def _select(self, direction: str) -> list[_Direction]:
        if direction == "both":
            return [self._dirs["forward"], self._dirs["backward"]]
        if direction in self._dirs:
            return [self._dirs[direction]]
        raise ValueError(f'direction must be "forward", "backward" or "both", got {direction!r}')

    def _update(self, direction: str, fn: Callable[[_Direction, LinkParams], LinkParams]) -> None:
        dirs = self._select(direction)
        for d in dirs:
            d.update(lambda p, d=d: fn(d, p))
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            for p in c.pipes:
                p.wake()
        log.info("%s: %s now forward %s, backward %s", self._where(), direction, self._dirs["forward"].params,
                 self._dirs["backward"].params)

    def set_params(self, direction: str, params: LinkParams) -> None:
        """Replace the params of ``direction`` ("forward", "backward" or "both") on live connections too."""
        if not isinstance(params, LinkParams):
            raise TypeError("params must be LinkParams")
        self._update(direction, lambda d, p: params)

    def degrade(self, direction: str = "both", **changes: object) -> None:
        """Change some fields of the current params, e.g. ``degrade(latency_ms=200, loss=0.01)``."""
        changes = _coerce_changes(changes)
        self._select(direction)
        self._update(direction, lambda d, p: replace(p, **changes))

    def restore(self) -> None:
        """Both directions back to the params given at construction (undoes degrade and blackhole)."""
        self._update("both", lambda d, p: d.initial)

    def blackhole(self, direction: str = "both") -> None:
        """Partition: hold every byte of ``direction`` until :meth:`unblackhole`."""
        self._update(direction, lambda d, p: replace(p, up=False))

    def unblackhole(self, direction: str = "both") -> None:
        self._update(direction, lambda d, p: replace(p, up=True))

    @contextmanager
    def degraded(self, direction: str = "both", **changes: object) -> Iterator[LinkProxy]:
        self.degrade(direction, **changes)
        try:
            yield self
        finally:
            self.restore()

    @contextmanager
    def partitioned(self, direction: str = "both") -> Iterator[LinkProxy]:
        self.blackhole(direction)
        try:
            yield self
        finally:
            self.unblackhole(direction)


# -- process entry point ---------------------------------------------------------------------

def _hostport(value: str, allow_zero: bool) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        n = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a numeric port, got {value!r}") from None
    if not (0 if allow_zero else 1) <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, n


def _write_stats(proxy: LinkProxy, path: str) -> None:
    data = proxy.stats()
    data.update(pid=os.getpid(), time=time.time())
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("link %s: cannot write stats to %s: %s", proxy.name, path, exc)


def _apply_control(proxy: LinkProxy, text: str | None) -> None:
    """Apply a control document: {"forward": {...}|null, "backward": {...}|null}.

    A dict gives fields over the construction params of that direction; null/absent (or a
    deleted file) means the construction params.
    """
    doc = {} if text is None else json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the control file must hold a JSON object")
    new = {}
    for d in _DIRECTIONS:
        spec = doc.get(d)
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"control file: {d!r} must be an object or null")
        new[d] = replace(proxy.initial_params(d), **_coerce_changes(spec)) if spec else proxy.initial_params(d)
    for d in _DIRECTIONS:
        proxy.set_params(d, new[d])


def main(argv: list[str] | None = None) -> int:
    """``geotrain link``: run one link until SIGTERM/SIGINT. Prints ``READY <port>`` once listening."""
    ap = argparse.ArgumentParser(prog="geotrain link", description="Emulate one WAN link as a TCP proxy.")
    ap.add_argument("--name", default="link")
    ap.add_argument("--listen", default="127.0.0.1:0", type=lambda v: _hostport(v, True),
                    help="HOST:PORT, port 0 = any")
    ap.add_argument("--target", required=True, type=lambda v: _hostport(v, False), help="HOST:PORT")
    ap.add_argument("--bandwidth", required=True, help='e.g. "100mbit" (forward, and backward unless --down-*)')
    ap.add_argument("--latency", default="0ms", help='one-way, e.g. "50ms"')
    ap.add_argument("--jitter", default="0ms")
    ap.add_argument("--loss", type=float, default=0.0, help="segment loss probability, e.g. 0.001")
    ap.add_argument("--down-bandwidth")
    ap.add_argument("--down-latency")
    ap.add_argument("--down-jitter")
    ap.add_argument("--down-loss", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-file")
    ap.add_argument("--control-file", help='JSON {"forward": {fields}|null, "backward": ...}, polled every 0.2 s')
    ap.add_argument("--log-level", default=os.environ.get("GEOTRAIN_LOG_LEVEL", "WARNING"))
    args = ap.parse_args(argv)
    try:
        fwd = LinkParams(parse_bandwidth_mbps(args.bandwidth), parse_duration_ms(args.latency),
                         parse_duration_ms(args.jitter), args.loss)
        bwd = LinkParams(
            parse_bandwidth_mbps(args.down_bandwidth) if args.down_bandwidth is not None else fwd.bandwidth_mbps,
            parse_duration_ms(args.down_latency) if args.down_latency is not None else fwd.latency_ms,
            parse_duration_ms(args.down_jitter) if args.down_jitter is not None else fwd.jitter_ms,
            args.down_loss if args.down_loss is not None else fwd.loss)
    except ValueError as exc:
        ap.error(str(exc))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # A SIGINT ignored on purpose (geotrain.run.procs: the launcher decides) stays ignored.
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: no signal handling
        pass

    proxy = LinkProxy(args.name, args.target, fwd, bwd, listen=args.listen, seed=args.seed)
    try:
        try:
            port = proxy.start()
        except LinkError as exc:
            print(f"geotrain link: {exc}", file=sys.stderr, flush=True)
            return 1
        if args.stats_file:
            _write_stats(proxy, args.stats_file)
        print(f"READY {port}", flush=True)
        last_control: str | None = None
        _nothing = object()  # a control text never seen (None means: no control file, i.e. restore)
        bad_control: object = _nothing
        next_stats = time.monotonic() + 0.5
        while True:
            if args.control_file:
                try:
                    with open(args.control_file) as f:
                        text: str | None = f.read()
                except FileNotFoundError:
                    text = None
                except OSError as exc:
                    log.warning("link %s: cannot read control file %s: %s", args.name, args.control_file, exc)
                    text = last_control
                if text != last_control and text != bad_control:
                    try:
                        _apply_control(proxy, text)
                        last_control, bad_control = text, _nothing
                    except (ValueError, TypeError) as exc:
                        bad_control = text
                        log.warning("link %s: ignoring control file %s: %s", args.name, args.control_file, exc)
            if args.stats_file and time.monotonic() >= next_stats:
                _write_stats(proxy, args.stats_file)
                next_stats = time.monotonic() + 0.5
            if stop.wait(0.2):
                break
    finally:
        proxy.stop()
        if args.stats_file:
            _write_stats(proxy, args.stats_file)
        for sig, handler in previous.items():
            with suppress(ValueError, TypeError):
                signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
