"""One TCP connection carried over several (PCCL's parallel streams): :class:`Splitter` and :class:`Joiner`.

Why: with loss, one TCP flow is capped at ``MSS*1.22/(RTT*sqrt(loss))`` (Mathis et al.) however wide
the link: 9.4 Mbit/s at 150 ms and 0.01 % loss on a 500 Mbit/s link. P flows get up to P times that.
gRPC puts every call of a channel on one connection, so the striping is below it, transparent to it:

    client --TCP--> Splitter ==P TCP connections (the WAN)==> Joiner --TCP--> target

The protocol (both ends are geotrain's; nothing else speaks it):

- the Splitter accepts a client and opens ``streams`` connections to its target (the Joiner, through
  the WAN); each starts with a hello: ``b"GTS1"``, a 16-byte random connection id, the stripe's index
  and the stripe count (two big-endian u16);
- the Joiner groups stripes by id; once all of an id are there (in any order, within
  :data:`HELLO_TIMEOUT_S`) it connects to its target and relays. A hello that is not one (wrong magic,
  count 0 or above :data:`MAX_STREAMS`, an index twice, counts that disagree) closes that stripe;
- then, both ways, the bytes read from the local socket travel as numbered frames: ``seq`` (u64),
  ``length`` (u32), ``length`` bytes; length 0 ends that direction (a FIN: the far end shuts its local
  socket's write side after the frames before it);
- each direction: one reader (local socket -> frames, each to the stripe given the fewest bytes so far,
  into that stripe's queue of :data:`QUEUE_FRAMES`), one sender per stripe, one receiver per stripe and
  one writer (frames to the local socket in ``seq`` order; a
  frame may wait in the reorder buffer, at most :data:`REORDER_BYTES` unless it is the next one, so
  the frame the writer waits for is never held up);
- any error on any socket, a stripe that ends before its direction's FIN, or a Joiner that cannot
  reach its target tears the whole connection down at both ends (RST), as one TCP connection's reset.

Assumptions: the stripes of a connection run at about the same rate (flows of one path: balancing by
bytes, not by backlog, which the buffers on the way hide); the stripes' order holds only within a
stripe (TCP's); frames are at most
:data:`FRAME` bytes; the 12-byte frame header is the striping's cost on the wire (0.005 % at full frames).
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from contextlib import suppress

from geotrain.errors import LinkError

log = logging.getLogger(__name__)

MAGIC = b"GTS1"
HELLO = struct.Struct(">4s16sHH")
HEADER = struct.Struct(">QI")
FRAME = 256 * 1024
MAX_STREAMS = 64
QUEUE_FRAMES = 2
REORDER_BYTES = 32 * 1024 * 1024
HELLO_TIMEOUT_S = 10.0


class _Torn(Exception):
    """The striped connection was torn down (by an error here or at the far end)."""


def _nodelay(s: socket.socket) -> None:
    with suppress(OSError):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at a clean end before the first; an end inside them raises."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise _Torn(f"a stripe ended inside a frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


class _Striped:
    """One relayed connection at one end: its local socket and its stripes (the same at both ends)."""

    def __init__(self, name: str, local: socket.socket, stripes: list[socket.socket]) -> None:
        self.name, self.local, self.stripes = name, local, stripes
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.out: list[deque[tuple[int, bytes] | None]] = [deque() for _ in stripes]  # per stripe; None: no more
        self.assigned = [0] * len(stripes)  # bytes given to each stripe so far
        self.inbox: dict[int, bytes] = {}  # received, not yet written (by seq)
        self.inbox_bytes = 0
        self.next_seq = 0  # the frame the writer waits for
        self.receivers_left = len(stripes)
        self.torn = False
        self.threads_left = 0
        self.on_done = None

    def start(self, on_done=None) -> None:
        self.on_done = on_done
        roles = [("reader", self._read_local), ("writer", self._write_local)]
        roles += [(f"sender{i}", lambda i=i: self._send(i)) for i in range(len(self.stripes))]
        roles += [(f"receiver{i}", lambda i=i: self._receive(i)) for i in range(len(self.stripes))]
        self.threads_left = len(roles)
        for role, fn in roles:
            threading.Thread(target=self._run, args=(fn, role), name=f"stripe-{self.name}-{role}", daemon=True).start()

    def _run(self, fn, role: str) -> None:
        try:
            fn()
        except (OSError, _Torn) as exc:
            if not self.torn:
                log.debug("stripe %s: %s: %s", self.name, role, exc)
            self.tear()
        except Exception:
            log.exception("stripe %s: %s failed", self.name, role)
            self.tear()
        finally:
            with self.lock:
                self.threads_left -= 1
                last = self.threads_left == 0
            if last:
                for s in (self.local, *self.stripes):
                    with suppress(OSError):
                        s.close()
                if self.on_done is not None:
                    self.on_done(self)

    def tear(self) -> None:
        """Everything down now (RST): every thread sees an error or the flag and ends."""
        with self.lock:
            if self.torn:
                return
            self.torn = True
            self.cv.notify_all()
        for s in (self.local, *self.stripes):
            with suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    # ---- local -> stripes ----
    def _read_local(self) -> None:
        seq = 0
        n = len(self.stripes)
        while True:
            data = self.local.recv(FRAME)
            # The stripe given the fewest bytes so far (ties: in turn): equal flows finish together. (Not the
            # first stripe free: the buffers on the way, the emulator's queue included, would let the first
            # stripes swallow a whole transfer before any back-pressure, and the transfer then runs at their pace.)
            i = min(range(n), key=lambda k: (self.assigned[k], (k - seq) % n))
            with self.lock:
                while not self.torn and len(self.out[i]) >= QUEUE_FRAMES:
                    self.cv.wait()
                if self.torn:
                    return
                self.out[i].append((seq, data))
                self.assigned[i] += len(data) + HEADER.size
                seq += 1
                if not data:  # the end of this direction: one FIN frame, then the senders stop
                    for q in self.out:
                        q.append(None)
                self.cv.notify_all()
            if not data:
                return

    def _send(self, i: int) -> None:
        stripe = self.stripes[i]
        queue = self.out[i]
        while True:
            with self.lock:
                while not self.torn and not queue:
                    self.cv.wait()
                if self.torn:
                    return
                item = queue.popleft()
                self.cv.notify_all()
            if item is None:  # no more frames from this end on this stripe
                stripe.shutdown(socket.SHUT_WR)
                return
            seq, data = item
            if len(data) < 65536:  # a small frame in one send (one segment on the wire, not two)
                stripe.sendall(HEADER.pack(seq, len(data)) + data)
            else:
                stripe.sendall(HEADER.pack(seq, len(data)))
                stripe.sendall(data)

    # ---- stripes -> local ----
    def _receive(self, i: int) -> None:
        stripe = self.stripes[i]
        try:
            while True:
                head = _recv_exact(stripe, HEADER.size)
                if head is None:  # this stripe is done (the far end sent its FIN on some stripe)
                    return
                seq, length = HEADER.unpack(head)
                if length > FRAME:
                    raise _Torn(f"a frame of {length} bytes (at most {FRAME})")
                data = _recv_exact(stripe, length) if length else b""
                if data is None:
                    raise _Torn("a stripe ended after a frame's header")
                with self.lock:
                    while not self.torn and seq != self.next_seq and self.inbox_bytes >= REORDER_BYTES:
                        self.cv.wait()
                    if self.torn:
                        return
                    if seq < self.next_seq or seq in self.inbox:
                        raise _Torn(f"frame {seq} twice")
                    self.inbox[seq] = data
                    self.inbox_bytes += len(data)
                    self.cv.notify_all()
        finally:
            with self.lock:
                self.receivers_left -= 1
                self.cv.notify_all()

    def _write_local(self) -> None:
        while True:
            with self.lock:
                while not self.torn and self.next_seq not in self.inbox:
                    if self.receivers_left == 0:
                        raise _Torn("every stripe ended before this direction's end")
                    self.cv.wait()
                if self.torn:
                    return
                data = self.inbox.pop(self.next_seq)
                self.inbox_bytes -= len(data)
                self.next_seq += 1
                self.cv.notify_all()
            if not data:
                self.local.shutdown(socket.SHUT_WR)
                return
            self.local.sendall(data)


class _Listener(abc.ABC):
    """A listening socket and its accept thread; :meth:`handle` takes each accepted socket."""

    role = "listener"

    def __init__(self, name: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.name = name
        self.listen = (listen[0], int(listen[1]))
        self.target = (target[0], int(target[1]))
        self._lock = threading.Lock()
        self._live: set[_Striped] = set()
        self._sock: socket.socket | None = None
        self._stopped = False
        self.connections = 0
        self.refused = 0
        self.shares: deque[list[int]] = deque(maxlen=16)
        """The bytes each stripe carried from this end, for the latest connections that ended."""

    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(self.listen)
            s.listen(256)
        except OSError as exc:
            s.close()
            raise LinkError(f"{self.role} {self.name}: cannot listen on {self.listen[0]}:{self.listen[1]}: {exc}") from exc
        s.settimeout(0.5)
        self._sock = s
        threading.Thread(target=self._accept_loop, name=f"{self.role}-{self.name}-accept", daemon=True).start()
        return self.port

    @property
    def port(self) -> int:
        if self._sock is None:
            raise LinkError(f"{self.role} {self.name}: not started")
        return self._sock.getsockname()[1]

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopped:
                    return
                time.sleep(0.05)
                continue
            conn.settimeout(None)
            _nodelay(conn)
            threading.Thread(target=self._handle_safely, args=(conn,), name=f"{self.role}-{self.name}-open",
                             daemon=True).start()

    def _handle_safely(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except (OSError, _Torn, LinkError) as exc:
            log.warning("%s %s: %s", self.role, self.name, exc)
            with suppress(OSError):
                conn.close()

    @abc.abstractmethod
    def handle(self, conn: socket.socket) -> None:
        """One accepted connection: the Splitter's (a local client, striped out) or the Joiner's (a stripe in)."""

    def _relay(self, local: socket.socket, stripes: list[socket.socket]) -> None:
        relay = _Striped(f"{self.name}-{self.connections}", local, stripes)
        with self._lock:
            if self._stopped:
                for s in (local, *stripes):
                    s.close()
                return
            self.connections += 1
            self._live.add(relay)
        relay.start(on_done=self._forget)

    def _forget(self, relay: _Striped) -> None:
        with self._lock:
            self._live.discard(relay)
            self.shares.append(list(relay.assigned))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            live = list(self._live)
        if self._sock is not None:
            with suppress(OSError):
                self._sock.close()
        for relay in live:
            relay.tear()


class Splitter(_Listener):
    """The client's end: each accepted connection goes to ``target`` (a :class:`Joiner`) over ``streams``
    connections."""

    role = "stripe splitter"

    def __init__(self, name: str, listen: tuple[str, int], target: tuple[str, int], streams: int) -> None:
        if not 1 <= streams <= MAX_STREAMS:
            raise LinkError(f"stripe splitter {name}: streams must be 1..{MAX_STREAMS}, got {streams}")
        super().__init__(name, listen, target)
        self.streams = streams

    def handle(self, conn: socket.socket) -> None:
        conn_id = os.urandom(16)
        stripes: list[socket.socket] = []
        try:
            for i in range(self.streams):
                s = socket.create_connection(self.target, timeout=5.0)
                s.settimeout(None)
                _nodelay(s)
                stripes.append(s)
                s.sendall(HELLO.pack(MAGIC, conn_id, i, self.streams))
        except OSError as exc:
            for s in (conn, *stripes):
                with suppress(OSError):
                    s.close()
            raise LinkError(f"cannot open stripe {len(stripes)} of {self.streams} to "
                            f"{self.target[0]}:{self.target[1]}: {exc}") from exc
        self._relay(conn, stripes)


class Joiner(_Listener):
    """The target's end: stripes grouped by their hello's id, relayed to ``target`` once all are there."""

    role = "stripe joiner"

    def __init__(self, name: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
        super().__init__(name, listen, target)
        self._groups: dict[bytes, tuple[float, list[socket.socket | None]]] = {}

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            raw = _recv_exact(conn, HELLO.size)
        except (socket.timeout, _Torn):
            raw = None
        conn.settimeout(None)
        problem = None
        if raw is None:
            problem = "no hello"
        else:
            magic, conn_id, index, count = HELLO.unpack(raw)
            if magic != MAGIC:
                problem = "not a stripe (wrong magic)"
            elif not 1 <= count <= MAX_STREAMS or index >= count:
                problem = f"stripe {index} of {count}"
        complete = None
        with self._lock:
            now = time.monotonic()
            for gid, (t0, members) in list(self._groups.items()):  # groups that never completed
                if now - t0 > HELLO_TIMEOUT_S:
                    del self._groups[gid]
                    for s in members:
                        if s is not None:
                            with suppress(OSError):
                                s.close()
            if problem is None:
                t0, members = self._groups.setdefault(conn_id, (now, [None] * count))
                if len(members) != count or members[index] is not None:
                    problem = f"stripe {index} of {count} does not fit its connection's others"
                else:
                    members[index] = conn
                    if all(s is not None for s in members):
                        complete = self._groups.pop(conn_id)[1]
            if problem is not None:
                self.refused += 1
        if problem is not None:
            with suppress(OSError):
                conn.close()
            raise LinkError(f"refused a connection: {problem}")
        if complete is None:
            return
        try:
            local = socket.create_connection(self.target, timeout=5.0)
        except OSError as exc:
            for s in complete:
                with suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
            raise LinkError(f"cannot connect to target {self.target[0]}:{self.target[1]}: {exc}") from exc
        local.settimeout(None)
        _nodelay(local)
        self._relay(local, complete)
