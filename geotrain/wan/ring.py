"""Ring all-reduce among site leaders over the site-to-site WAN links (``merge: ring``/``hierarchical``).

A star merge sends every site's full pseudo-gradient to the coordinator and the full result back,
so the hub's access link carries ``2 * sites * N`` bytes per round. A ring all-reduce has no hub:
the ``k`` leaders form a ring (leader ``i`` sends to ``i+1``), split the vector into ``k`` chunks
and run

* reduce-scatter, ``k-1`` steps: send a chunk to the successor, receive one from the predecessor,
  add it (float32) into the local copy. Afterwards leader ``r`` holds the complete sum of chunk
  ``(r+1) % k`` (its "owned" chunk; for ``mean`` the owner divides it by ``k``);
* all-gather, ``k-1`` steps: pass the finished chunks around; a received chunk is copied, never
  re-added.

Every leader sends (and receives) ``2(k-1)/k * N`` bytes, every ring edge carries that much in
parallel, whatever ``k`` is (:func:`ring_all_reduce_bytes`). Each finished chunk is computed by
exactly one owner and then copied, so every peer ends with IDENTICAL bits (the sum of chunk ``c``
is always associated in ring order starting at leader ``c``).

``hierarchical`` (a ring inside each region, then across region leaders, then back down) is
composed from :class:`RingPeer` rings in geotrain.wan.hierarchical.

The wire format (a HELLO/ACK handshake per ring edge, pieces of at most :data:`PIECE` elements
passed on as soon as they arrive, a 56-byte checked header per message) is described in
geotrain.wan.ring_wire.

Failures: no byte from the predecessor for ``timeout_s`` (inactivity, not a total deadline), a
closed connection, or a send that cannot make progress for ``timeout_s`` raises
:class:`~geotrain.errors.LinkError` naming the peer rank and address. A peer that fails closes
both of its connections at once, so its neighbours fail fast too instead of waiting for their
timeout; the ring cannot be reused after an error (build a new one).

Authentication (``tls``, geotrain.security): each ring edge is a mutual TLS session; the dialler
verifies its successor's certificate by name (``expect_successor``, ``site.<successor>`` in a run:
the address dialled is the link emulator's, which forwards the encrypted bytes untouched), the
acceptor requires a certificate of the run's CA whose name is ``expect_predecessor``. A caller
whose handshake fails (no certificate, another CA, plaintext) is dropped and the acceptor keeps
waiting for its predecessor (a stranger cannot break a ring by calling first; the timeout's error
names what was refused meanwhile); a caller with another part's certificate is refused at once,
both ends raising :class:`~geotrain.errors.LinkError` naming the certificate presented and the one
expected. ``tls=None`` is plaintext.

Send and receive overlap: frames go out on a per-peer sender thread while the caller receives, so
chunks larger than the TCP buffers do not deadlock the ring.

Modules: this one (:class:`RingPeer`: connections and collectives), geotrain.wan.ring_wire (the
wire format, chunking, codecs, :func:`ring_all_reduce_bytes`) and geotrain.wan.hierarchical
(:func:`hierarchical_groups`, :func:`hierarchical_all_reduce`); their public names are
importable from here.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING

import numpy as np
import torch

from geotrain.errors import LinkError, TransferCorrupt

from geotrain.wan.hierarchical import hierarchical_all_reduce, hierarchical_groups
from geotrain.wan.ring_wire import (ACK, ACK_BYTES, ACK_MAGIC, HDR, HDR_CRC, HEADER_BYTES, HELLO, HELLO_BYTES, HELLO_MAGIC,
                                    KIND_ALL_GATHER, KIND_BROADCAST, KIND_NAMES, KIND_REDUCE_SCATTER, MSG_MAGIC, OPS, PIECE,
                                    PROTOCOL, RECV_SLICE, REFUSE_MAGIC, SEND_SLICE, Codec, check_vector, chunk_bounds,
                                    piece_bounds, recv_exact, ring_all_reduce_bytes)

if TYPE_CHECKING:
    from geotrain.security.pki import TlsFiles

__all__ = ["ACK_BYTES", "HEADER_BYTES", "HELLO_BYTES", "KIND_ALL_GATHER", "KIND_BROADCAST", "KIND_REDUCE_SCATTER", "PIECE",
           "PROTOCOL", "RingPeer", "hierarchical_all_reduce", "hierarchical_groups", "ring_all_reduce_bytes"]

log = logging.getLogger(__name__)


class RingPeer:
    """One site leader's end of a ring. Listens on its own TCP port; connects to its successor's address
    (which, in a real run, is the address of the link emulator in front of the successor).

    Usage, on every peer ``rank`` of ``world``::

        peer = RingPeer(rank, world, listen=("127.0.0.1", 0), timeout_s=60,
                        tls=files, expect_predecessor="site.a", expect_successor="site.c")   # or tls=None
        port = peer.start()                       # publish it; the link to us targets it
        peer.connect(successor_address)           # dial i+1, accept i-1
        out = peer.all_reduce(pseudo_grad, op="mean", round=r)
        peer.close()

    ``timeout_s`` bounds connecting (the whole handshake) and, afterwards, any wait without progress
    on either connection. One collective at a time per peer (calls are serialized).

    ``tls`` (geotrain.security.pki.TlsFiles): this peer's certificate, key and the run's CA; then
    ``expect_predecessor`` and ``expect_successor`` are the certificate names of the neighbours
    (required when ``world > 1``). None: plaintext.
    """

    def __init__(self, rank: int, world: int, listen: tuple[str, int] = ("127.0.0.1", 0),
                 timeout_s: float = 120.0, *, tls: TlsFiles | None = None, expect_predecessor: str | None = None,
                 expect_successor: str | None = None) -> None:
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world must be an int >= 1, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
        if world > 0xFFFF:
            raise ValueError(f"world must be <= 65535, got {world}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        if tls is not None and world > 1 and not (expect_predecessor and expect_successor):
            raise ValueError("with tls, expect_predecessor and expect_successor (the neighbours' certificate "
                             f"names) are required, got {expect_predecessor!r} and {expect_successor!r}")
        self.tls = tls
        self.expect_predecessor = expect_predecessor
        self.expect_successor = expect_successor
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._refused: str | None = None    # the last caller dropped while waiting for the predecessor, and why
        self.rank = rank
        self.world = world
        self.listen = (listen[0], int(listen[1]))
        self.timeout_s = float(timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.successor: tuple[str, int] | None = None
        self.predecessor_addr: str | None = None
        self._port: int | None = None
        self._listener: socket.socket | None = None
        self._send_sock: socket.socket | None = None
        self._recv_sock: socket.socket | None = None
        self._sender: ThreadPoolExecutor | None = None
        self._send_error: LinkError | None = None
        self._broken: BaseException | None = None
        self._connected = False
        self._closed = False
        self._op_lock = threading.Lock()
        self._state_lock = threading.Lock()

    # -- naming --------------------------------------------------------------------------------
    @property
    def successor_rank(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def predecessor_rank(self) -> int:
        return (self.rank - 1) % self.world

    @property
    def port(self) -> int:
        if self._port is None:
            raise LinkError(f"{self._me()}: not started")
        return self._port

    def _me(self) -> str:
        return f"ring peer {self.rank}/{self.world}"

    def _succ(self) -> str:
        addr = f"{self.successor[0]}:{self.successor[1]}" if self.successor else "?"
        return f"successor rank {self.successor_rank} at {addr}"

    def _pred(self) -> str:
        return f"predecessor rank {self.predecessor_rank} at {self.predecessor_addr or '?'}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and listen on ``listen``; return the port. Idempotent."""
        with self._state_lock:
            if self._closed:
                raise LinkError(f"{self._me()}: closed")
            if self._port is not None:
                return self._port
            if self.tls is not None and self._server_ctx is None:
                self._server_ctx, self._client_ctx = self._contexts()
            family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
            ls = socket.socket(family, socket.SOCK_STREAM)
            try:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.bind(self.listen)
                ls.listen(16)
            except OSError as exc:
                ls.close()
                raise LinkError(f"{self._me()}: cannot listen on {self.listen[0]}:{self.listen[1]}: {exc}") from exc
            self._listener = ls
            self._port = ls.getsockname()[1]
            return self._port

    def _contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        from geotrain.security.tls import ssl_client_context, ssl_server_context

        files = self.tls
        assert files is not None
        try:
            return ssl_server_context(files), ssl_client_context(files)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"{self._me()}: cannot load its certificate {files.cert}, key {files.key} or CA {files.ca}: "
                            f"{_why(exc)}") from None

    def connect(self, successor: tuple[str, int]) -> None:
        """Dial the successor (retrying until ``timeout_s``) and accept the predecessor's connection.

        Both happen concurrently; returns when both handshakes are done. Raises :class:`LinkError`
        naming the peer that could not be reached (or did not call in) within the timeout.
        """
        if self._closed:
            raise LinkError(f"{self._me()}: closed")
        if self._connected:
            raise LinkError(f"{self._me()}: already connected")
        self.successor = (successor[0], int(successor[1]))
        if self.world == 1:
            self._connected = True
            return
        self.start()
        deadline = time.monotonic() + self.timeout_s
        cancel = threading.Event()
        accepted: dict[str, object] = {}

        def accept() -> None:
            try:
                accepted["sock"] = self._accept_predecessor(deadline, cancel)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                accepted["error"] = exc
                cancel.set()

        t = threading.Thread(target=accept, name=f"ring{self.rank}-accept", daemon=True)
        t.start()
        try:
            send_sock = self._dial(deadline, cancel)
        except BaseException:
            cancelled_by_accept = cancel.is_set()  # the accept side failed first and stopped the dial
            cancel.set()
            t.join()
            if isinstance(accepted.get("sock"), socket.socket):
                accepted["sock"].close()  # type: ignore[union-attr]
            if cancelled_by_accept and isinstance(accepted.get("error"), BaseException):
                raise accepted["error"]  # type: ignore[misc]  # the cause, not "dial cancelled"
            raise
        t.join()
        if "error" in accepted:
            send_sock.close()
            raise accepted["error"]  # type: ignore[misc]
        recv_sock = accepted["sock"]
        assert isinstance(recv_sock, socket.socket)
        for s in (send_sock, recv_sock):
            with suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(self.timeout_s)
        with self._state_lock:
            if self._closed:
                send_sock.close()
                recv_sock.close()
                raise LinkError(f"{self._me()}: closed while connecting")
            self._send_sock, self._recv_sock = send_sock, recv_sock
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ring{self.rank}-send")
            self._connected = True
            if self._listener is not None:   # the ring is formed: nobody else may call in
                with suppress(OSError):
                    self._listener.close()
                self._listener = None
        log.debug("%s: connected (%s, %s)", self._me(), self._succ(), self._pred())

    def _dial(self, deadline: float, cancel: threading.Event) -> socket.socket:
        host, port = self.successor  # type: ignore[misc]
        hello = HELLO.pack(HELLO_MAGIC, PROTOCOL, self.rank, self.world, 0)
        hello = hello[:-4] + struct.pack("!I", zlib.crc32(hello[:-4]))
        delay, last = 0.02, "no attempt"
        while True:
            if cancel.is_set():
                raise LinkError(f"{self._me()}: connecting to {self._succ()} cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                refused = f"; refused meanwhile: {self._refused}" if self._refused else ""
                raise LinkError(f"{self._me()}: cannot connect to {self._succ()} within {self.timeout_s:g}s "
                                f"(last attempt: {last}{refused})")
            s = None
            try:
                s = socket.create_connection((host, port), timeout=min(left, 5.0))
                s.settimeout(max(0.05, min(deadline - time.monotonic(), 0.5)))
                if self._client_ctx is not None:
                    s = self._tls_dial(s, deadline, cancel)
                s.sendall(hello)
                # The successor answers once its connect() runs; wait for it in short slices so a
                # cancel (our own accept failed) is noticed.
                ack = bytearray()
                while len(ack) < ACK_BYTES:
                    try:
                        part = s.recv(ACK_BYTES - len(ack))
                    except socket.timeout:
                        if cancel.is_set() or time.monotonic() >= deadline:
                            raise
                        continue
                    except ssl.SSLError as exc:
                        if _is_alert(exc):  # the successor's TLS refused our certificate: final
                            raise LinkError(f"{self._me()}: {self._succ()} refused this peer's certificate "
                                            f"{self.tls.name if self.tls else None!r}: {_why(exc)}") from None
                        raise
                    if not part:
                        raise ConnectionError("closed before the handshake was acknowledged")
                    ack += part
                magic, rank, world = ACK.unpack(bytes(ack))
                if magic == REFUSE_MAGIC:
                    s.close()
                    raise LinkError(f"{self._me()}: {self._succ()} refused this peer's certificate "
                                    f"{self.tls.name if self.tls else None!r}: it is not the predecessor it expects")
                if magic != ACK_MAGIC:
                    raise ConnectionError(f"not a ring peer (handshake answer {bytes(ack)!r})")
                if rank != self.successor_rank or world != self.world:
                    s.close()
                    raise LinkError(f"{self._me()}: {self._succ()} is rank {rank} of a ring of {world}, "
                                    f"expected rank {self.successor_rank} of {self.world}")
                return s
            except LinkError:
                raise
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if s is not None:
                    s.close()
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    def _tls_dial(self, raw: socket.socket, deadline: float, cancel: threading.Event) -> ssl.SSLSocket:
        """The TLS handshake on a fresh connection to the successor, in short slices (it completes once
        the successor's connect() accepts; a cancel is noticed meanwhile). A certificate that is not
        the successor's is final (LinkError); anything else (the link emulator closing because its
        target is not up yet) is an OSError the dial retries."""
        assert self._client_ctx is not None
        s = self._client_ctx.wrap_socket(raw, server_hostname=self.expect_successor, do_handshake_on_connect=False)
        while True:
            try:
                s.do_handshake()
                break
            except socket.timeout:
                if cancel.is_set() or time.monotonic() >= deadline:
                    s.close()
                    raise
            except ssl.SSLCertVerificationError as exc:
                s.close()
                raise LinkError(f"{self._me()}: {self._succ()} is not {self.expect_successor!r}: its certificate "
                                f"failed verification ({exc.verify_message or _why(exc)})") from None
            except OSError as exc:
                s.close()
                if isinstance(exc, ssl.SSLError) and _is_alert(exc):   # TLS 1.2: refused during the handshake
                    raise LinkError(f"{self._me()}: {self._succ()} refused this peer's certificate "
                                    f"{self.tls.name if self.tls else None!r}: {_why(exc)}") from None
                raise
        got = _peer_name(s)
        if got != self.expect_successor:    # the name is checked by hostname already; the common name too
            s.close()
            raise LinkError(f"{self._me()}: {self._succ()} presented the certificate of {got!r}, "
                            f"expected {self.expect_successor!r}")
        return s

    def _tls_accept(self, c: socket.socket, addr) -> ssl.SSLSocket | None:
        """The TLS handshake with a caller. None: it failed (no certificate, another CA, not TLS) and the
        caller was dropped. Its certificate's name is checked once its HELLO is read (:meth:`_refuse`)."""
        assert self._server_ctx is not None
        try:
            s = self._server_ctx.wrap_socket(c, server_side=True)
        except (OSError, ValueError) as exc:
            self._refused = f"{addr[0]}:{addr[1]}: TLS handshake failed ({_why(exc)})"
            # a caller that went away (an earlier dial attempt) is routine; one that failed TLS is not
            gone = isinstance(exc, (ssl.SSLEOFError, ConnectionError, socket.timeout))
            log.log(logging.DEBUG if gone else logging.WARNING, "%s: dropped a caller: %s", self._me(), self._refused)
            c.close()
            return None
        return s

    def _refuse(self, s: ssl.SSLSocket, addr) -> LinkError | None:
        """A caller with a certificate of the run's CA that is not the predecessor's: answer REFUSE (after
        its HELLO was read, so the close is orderly and the REFUSE arrives) and say who it was."""
        got = _peer_name(s)
        if got == self.expect_predecessor:
            return None
        with suppress(OSError):
            s.sendall(ACK.pack(REFUSE_MAGIC, self.rank, self.world))
        s.close()
        return LinkError(f"{self._me()}: the caller at {addr[0]}:{addr[1]} presented the certificate of {got!r}, "
                         f"expected its predecessor rank {self.predecessor_rank} {self.expect_predecessor!r}; refused")

    def _accept_predecessor(self, deadline: float, cancel: threading.Event) -> socket.socket:
        ls = self._listener
        assert ls is not None
        ls.settimeout(0.1)
        while True:
            if cancel.is_set():
                raise LinkError(f"{self._me()}: waiting for {self._pred()} cancelled")
            if time.monotonic() >= deadline:
                refused = f" (refused meanwhile: {self._refused})" if self._refused else ""
                raise LinkError(f"{self._me()}: predecessor rank {self.predecessor_rank} did not connect to "
                                f"port {self._port} within {self.timeout_s:g}s{refused}")
            try:
                c, addr = ls.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                raise LinkError(f"{self._me()}: accepting the predecessor's connection failed: {exc}") from exc
            try:
                c.settimeout(max(0.05, min(deadline - time.monotonic(), 10.0)))
                if self._server_ctx is not None:
                    c = self._tls_accept(c, addr)
                    if c is None:
                        continue
                raw = recv_exact(c, HELLO_BYTES)
            except (OSError, EOFError) as exc:
                log.debug("%s: dropped a connection from %s before its handshake: %s", self._me(), addr, exc)
                c.close()
                continue
            magic, proto, rank, world, crc = HELLO.unpack(raw)
            if magic != HELLO_MAGIC or crc != zlib.crc32(raw[:-4]):
                log.warning("%s: dropped a connection from %s:%s that is not a ring peer", self._me(), addr[0], addr[1])
                c.close()
                continue
            if self._server_ctx is not None and (refused := self._refuse(c, addr)) is not None:
                raise refused
            with suppress(OSError):
                c.sendall(ACK.pack(ACK_MAGIC, self.rank, self.world))
            if proto != PROTOCOL or rank != self.predecessor_rank or world != self.world:
                c.close()
                raise LinkError(f"{self._me()}: a peer at {addr[0]}:{addr[1]} called in as rank {rank} of a ring of "
                                f"{world} (protocol {proto}); expected rank {self.predecessor_rank} of {self.world} "
                                f"(protocol {PROTOCOL})")
            self.predecessor_addr = f"{addr[0]}:{addr[1]}"
            return c

    def close(self) -> None:
        """Close both connections and the listener; stop the sender thread. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            socks = [s for s in (self._send_sock, self._recv_sock, self._listener) if s is not None]
            sender = self._sender
        for s in socks:
            _shutdown(s)
        if sender is not None:
            sender.shutdown(wait=True, cancel_futures=True)
        for s in socks:
            with suppress(OSError):
                s.close()

    def __enter__(self) -> RingPeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, op: str = "mean", round: int = 0, codec: str = "fp32",
                   block: int = 256) -> torch.Tensor:
        """Sum or mean of ``x`` over the ring; returns a new tensor, bitwise identical on every peer.

        ``x`` (1-D float32 CPU, the same numel on every peer) is not modified. ``round`` tags every
        message: a peer at another round raises :class:`TransferCorrupt`. ``codec`` (fp16, bf16,
        int8, int4; :mod:`geotrain.wire.compress`, every peer must use the same): each piece travels
        encoded. In reduce-scatter a peer decodes the partial sum it receives, adds its own part in
        float32 and encodes the new partial sum for its successor; the owner of a finished chunk
        encodes it once, keeps exactly what it encoded (decoded), and all-gather passes those same
        bytes on, so every peer still ends with identical bits.
        """
        check_vector(x, f"{self._me()}: all_reduce")
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        from geotrain.wire.compress import _check_codec

        _check_codec(codec)
        work = x.detach().contiguous().clone().numpy()
        if self.world == 1:
            return torch.from_numpy(work)
        with self._op_lock:
            self._check_usable()
            try:
                self._all_reduce(work, op, int(round), Codec(codec, block))
            except BaseException as exc:
                self._fail(exc)
                raise
        return torch.from_numpy(work)

    def broadcast(self, x: torch.Tensor, root: int = 0, round: int = 0, codec: str = "fp32",
                  block: int = 256) -> torch.Tensor:
        """``root``'s ``x`` on every peer (pipelined down the ring in 256 KiB frames); returns a new tensor.

        Every peer passes a tensor of the same numel (non-roots' values are ignored). With a ``codec``
        the root encodes ``x`` once and every peer, the root included, returns the decoded bytes.
        """
        check_vector(x, f"{self._me()}: broadcast")
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.world:
            raise ValueError(f"root must be an int in [0, {self.world}), got {root!r}")
        from geotrain.wire.compress import Encoded, decode, encode, wire_bytes

        n = x.numel()
        if self.world == 1:
            return x.detach().contiguous().clone()
        if codec == "fp32":
            out = x.detach().contiguous().clone().numpy() if self.rank == root else np.empty(n, dtype=np.float32)
        elif self.rank == root:
            out = np.frombuffer(bytearray(encode(x.detach().contiguous(), codec, block).payload), dtype=np.uint8)
        else:
            out = np.empty(wire_bytes(n, codec, block), dtype=np.uint8)
        with self._op_lock:
            self._check_usable()
            try:
                self._broadcast(out, root, int(round))
            except BaseException as exc:
                self._fail(exc)
                raise
        if codec != "fp32":
            return decode(Encoded(codec, n, block, out.tobytes()))
        return torch.from_numpy(out)

    def _all_reduce(self, work: np.ndarray, op: str, rnd: int, codec: Codec) -> None:
        """Reduce-scatter then all-gather, pipelined: each chunk travels as pieces, and a piece is passed
        on as soon as it has arrived (and, in reduce-scatter, been added to), so the links stay busy
        instead of idling one latency per step."""
        w, r, n = self.world, self.rank, work.size
        steps = w - 1
        pieces = [piece_bounds(lo, hi) for lo, hi in chunk_bounds(n, w)]
        scratch = np.empty(max(hi - lo for lo, hi in pieces[0]), dtype=np.float32)  # chunk 0 is the largest
        pending: list[Future] = []
        rs_sent: dict[tuple[int, int], Future] = {}     # (chunk, piece) -> its reduce-scatter send

        def post(kind: int, step: int, chunk: int, j: int, arr: np.ndarray) -> None:
            f = self._post(kind, rnd, step, chunk, j, n, arr)
            pending.append(f)
            if kind == KIND_REDUCE_SCATTER:
                rs_sent[(chunk, j)] = f

        def recv(kind: int, step: int, chunk: int, j: int, out: np.ndarray) -> np.ndarray | None:
            """Receive a piece into ``out`` (float32); with a codec return the bytes as received."""
            if codec.plain:
                self._recv(kind, rnd, step, chunk, j, n, out)
                return None
            raw = np.empty(codec.size(out.size), dtype=np.uint8)
            self._recv(kind, rnd, step, chunk, j, n, raw)
            out[:] = codec.decode(raw, out.size)
            return raw

        # reduce-scatter: at step s send chunk (r-s), receive chunk (r-s-1) and add our own part into it;
        # a received piece is the piece we send at step s+1. After the last step chunk (r+1) is final.
        for j, (lo, hi) in enumerate(pieces[r]):
            post(KIND_REDUCE_SCATTER, 0, r, j, codec.wire(work[lo:hi]))
        for s in range(steps):
            rc = (r - s - 1) % w
            for j, (lo, hi) in enumerate(pieces[rc]):
                incoming = scratch[:hi - lo]
                recv(KIND_REDUCE_SCATTER, s, rc, j, incoming)
                mine = work[lo:hi]
                np.add(incoming, mine, out=mine)
                if s + 1 < steps:
                    post(KIND_REDUCE_SCATTER, s + 1, rc, j, codec.wire(mine))
                else:
                    # chunk (r+1) is ours: computed here once, then only copied around
                    if op == "mean":
                        np.divide(mine, np.float32(w), out=mine)
                    wire = codec.wire(mine)
                    if not codec.plain:  # keep exactly what the others will decode
                        mine[:] = codec.decode(wire, hi - lo)
                    post(KIND_ALL_GATHER, steps, rc, j, wire)
        # all-gather: at step s send chunk (r+1-s), receive chunk (r-s) (final) and copy it
        for s in range(steps):
            rc = (r - s) % w
            step = steps + s
            for j, (lo, hi) in enumerate(pieces[rc]):
                sent = rs_sent.get((rc, j))
                if sent is not None:        # we sent this piece in reduce-scatter: it must be out first
                    sent.result()
                raw = recv(KIND_ALL_GATHER, step, rc, j, work[lo:hi])
                if s + 1 < steps:  # pass on the bytes as received: never re-encoded
                    post(KIND_ALL_GATHER, step + 1, rc, j, work[lo:hi] if raw is None else raw)
        self._drain(pending)

    def _broadcast(self, out: np.ndarray, root: int, rnd: int) -> None:
        n = out.size
        last = (root - 1) % self.world        # the peer before the root does not forward
        pending: list[Future] = []
        for j, (lo, hi) in enumerate(piece_bounds(0, n)):
            if self.rank != root:
                self._recv(KIND_BROADCAST, rnd, 0, 0, j, n, out[lo:hi])
            if self.rank != last:
                pending.append(self._post(KIND_BROADCAST, rnd, 0, 0, j, n, out[lo:hi]))
        self._drain(pending)

    # -- framing -------------------------------------------------------------------------------
    def _post(self, kind: int, rnd: int, step: int, chunk: int, piece: int, numel: int, arr: np.ndarray) -> Future:
        """Queue one frame for the sender thread (FIFO). ``arr`` must not change until it is sent."""
        assert self._sender is not None
        return self._sender.submit(self._send_frame, kind, rnd, step, chunk, piece, numel, arr)

    def _send_frame(self, kind: int, rnd: int, step: int, chunk: int, piece: int, numel: int,
                    arr: np.ndarray) -> None:
        if self._send_error is not None:
            raise self._send_error
        payload = memoryview(np.ascontiguousarray(arr)).cast("B")
        hdr = HDR.pack(MSG_MAGIC, kind, self.world, rnd, self.rank, step, chunk, piece, numel, len(payload),
                        zlib.crc32(payload))
        hdr += HDR_CRC.pack(zlib.crc32(hdr))
        sock = self._send_sock
        assert sock is not None
        try:
            if len(payload) <= 65536:
                sock.sendall(hdr + payload.tobytes())
            else:
                sock.sendall(hdr)
                for off in range(0, len(payload), SEND_SLICE):
                    sock.sendall(payload[off:off + SEND_SLICE])
        except OSError as exc:
            why = f"no progress for {self.timeout_s:g}s" if isinstance(exc, socket.timeout) else \
                (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            err = LinkError(f"{self._me()}: sending round {rnd} step {step} ({KIND_NAMES[kind]}) to "
                            f"{self._succ()} failed: {why}")
            if self._send_error is None:
                self._send_error = err
            self._abort_sockets()       # unblock the receiving caller at once
            raise err from exc
        self.bytes_sent += len(hdr) + len(payload)

    def _recv(self, kind: int, rnd: int, step: int, chunk: int, piece: int, numel: int, out: np.ndarray) -> None:
        """Receive one frame into ``out`` and check every header field and the payload crc32."""
        where = f"round {rnd} step {step} ({KIND_NAMES[kind]})"
        raw = self._recv_bytes(HEADER_BYTES, where)
        hdr, (hcrc,) = raw[:HDR.size], HDR_CRC.unpack(raw[HDR.size:])
        if zlib.crc32(hdr) != hcrc:
            raise TransferCorrupt(f"{self._me()}: corrupt message header from {self._pred()} at {where} "
                                  f"(header crc32 mismatch)")
        magic, k, world, r_rnd, sender, r_step, r_chunk, r_piece, r_numel, nbytes, pcrc = HDR.unpack(hdr)
        expected = {"magic": (MSG_MAGIC, magic), "kind": (kind, k), "world": (self.world, world),
                    "round": (rnd, r_rnd), "sender": (self.predecessor_rank, sender), "step": (step, r_step),
                    "chunk": (chunk, r_chunk), "piece": (piece, r_piece), "numel": (numel, r_numel),
                    "bytes": (out.nbytes, nbytes)}
        bad = [f"{name} {got!r} (expected {want!r})" for name, (want, got) in expected.items() if want != got]
        if bad:
            hint = ""
            if r_numel != numel:
                hint = f"; the predecessor reduces a vector of {r_numel} elements, this peer {numel}"
            elif r_rnd != rnd:
                hint = f"; the predecessor is at round {r_rnd}"
            raise TransferCorrupt(f"{self._me()}: unexpected message from {self._pred()} at {where}: "
                                  f"{', '.join(bad)}{hint}")
        view = memoryview(out).cast("B")
        self._recv_into(view, where)
        if zlib.crc32(view) != pcrc:
            raise TransferCorrupt(f"{self._me()}: payload from {self._pred()} failed its crc32 at {where} "
                                  f"(chunk {chunk} piece {piece}, {nbytes} bytes)")
        self.bytes_received += HEADER_BYTES + nbytes

    def _recv_bytes(self, n: int, where: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf), where)
        return bytes(buf)

    def _recv_into(self, view: memoryview, where: str) -> None:
        sock = self._recv_sock
        assert sock is not None
        got, total = 0, len(view)
        while got < total:
            try:
                k = sock.recv_into(view[got:], min(total - got, RECV_SLICE))
            except OSError as exc:
                raise self._recv_failure(exc, where) from exc
            if k == 0:
                raise self._recv_failure(None, where)
            got += k

    def _recv_failure(self, exc: OSError | None, where: str) -> LinkError:
        if self._send_error is not None:
            return self._send_error
        if exc is None or isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            why = "closed the connection (it died or gave up)"
        elif isinstance(exc, socket.timeout):
            why = f"sent nothing for {self.timeout_s:g}s (dead, stalled or partitioned)"
        else:
            why = f"connection failed: {type(exc).__name__}: {exc}" if str(exc) else \
                f"connection failed: {type(exc).__name__}"
        return LinkError(f"{self._me()}: {self._pred()} {why}, at {where}")

    def _drain(self, pending: list[Future]) -> None:
        """Wait for queued frames to be written (each send has its own inactivity timeout)."""
        for f in pending:
            f.result()
        pending.clear()

    # -- failure -------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise LinkError(f"{self._me()}: closed")
        if not self._connected:
            raise LinkError(f"{self._me()}: not connected (call start() and connect() first)")
        if self._broken is not None:
            raise LinkError(f"{self._me()}: unusable after an earlier failure ({self._broken}); build a new ring")

    def _abort_sockets(self) -> None:
        for s in (self._send_sock, self._recv_sock):
            if s is not None:
                _shutdown(s)

    def _fail(self, exc: BaseException) -> None:
        """After any error the stream position is unknown: close both connections so the neighbours
        fail fast too, and refuse further collectives."""
        self._broken = exc
        self._abort_sockets()
        if self._sender is not None:
            self._sender.shutdown(wait=False, cancel_futures=True)


# -- helpers -----------------------------------------------------------------------------------

def _shutdown(sock: socket.socket) -> None:
    """Shut the connection down at the descriptor, from any thread. For a TLS socket this keeps its
    TLS state (``SSLSocket.shutdown`` drops it first, and a send racing with it would go out in
    plaintext); reads and writes then fail, which is what unblocks the other threads."""
    with suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _peer_name(sock: ssl.SSLSocket) -> str | None:
    from geotrain.security.tls import socket_peer_name

    return socket_peer_name(sock)


def _is_alert(exc: ssl.SSLError) -> bool:
    """A TLS alert from the other end: it refused our certificate (``TLSV13_ALERT_CERTIFICATE_REQUIRED``,
    ``TLSV1_ALERT_UNKNOWN_CA``, ``SSLV3_ALERT_BAD_CERTIFICATE``, ...)."""
    return "ALERT" in (getattr(exc, "reason", None) or "")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(exc)
    if isinstance(exc, ssl.SSLError) and reason:
        return f"{type(exc).__name__}: {reason}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
