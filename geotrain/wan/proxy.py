"""The TCP proxy of the WAN link emulator: :class:`LinkProxy` (see geotrain.wan.link for the model).

A client connects to the proxy's listening port, the proxy connects to the target, and copies
bytes both ways through an emulated link: per connection and direction a :class:`_Pipe` (a reader
thread that schedules chunks on the direction's :class:`~geotrain.wan.shaping.Direction`, a writer
thread that delivers them at their time). Every fault has its undo, and a context manager
guarantees it (:meth:`LinkProxy.blackholed`, ...).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace

from geotrain.errors import LinkError
from geotrain.wan.shaping import (COALESCE_BYTES, DIRECTIONS, DUE_SLACK_S, SLEEP_SLACK_S, Direction, Flow, LinkParams,
                                  coerce_changes)

log = logging.getLogger(__name__)


class _Chunk:
    __slots__ = ("data", "delivery", "epoch")

    def __init__(self, data: bytes) -> None:
        self.data = data            # b"" is the FIN
        self.delivery: float | None = None
        self.epoch = -1


class _Pipe:
    """One direction of one connection: a reader thread, a queue, a writer thread."""

    def __init__(self, direction: Direction, src: socket.socket, dst: socket.socket, rng: random.Random) -> None:
        self.dir, self.src, self.dst, self.rng = direction, src, dst, rng
        self.flow = Flow()          # this connection's own clock (the loss bound is per TCP flow)
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
        r = self.dir.schedule(len(chunk.data), floor, self.rng, self.flow)
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
        for label, pipe in zip(DIRECTIONS, self.pipes):
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
        self._dirs = {"forward": Direction("forward", forward),
                      "backward": Direction("backward", backward if backward is not None else forward)}
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
    def _select(self, direction: str) -> list[Direction]:
        if direction == "both":
            return [self._dirs["forward"], self._dirs["backward"]]
        if direction in self._dirs:
            return [self._dirs[direction]]
        raise ValueError(f'direction must be "forward", "backward" or "both", got {direction!r}')

    def _update(self, direction: str, fn: Callable[[Direction, LinkParams], LinkParams]) -> None:
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
        changes = coerce_changes(changes)
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
