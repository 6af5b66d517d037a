"""What one call to the coordinator may hold, and for how long (issue #11, item 5).

Every bound is either one of gRPC's own (set in :func:`geotrain.orchestrator.server.create_server`) or
a pure decision here that returns a :class:`Verdict` with its reason; the servicer only feeds them
what arrived and refuses when they say no. Two small mechanisms apply the decisions that need state:
:class:`PeerStreams` (who holds how many streams now) and :class:`CallDeadlines` (one thread that
ends calls past their server-side deadline).

    bound                               applied by                                    a call past it gets
    calls in flight, all callers        grpc.server(maximum_concurrent_rpcs=)         RESOURCE_EXHAUSTED (gRPC's, no Refusal)
    message size                        grpc.max_receive_message_length (16 MiB)      RESOURCE_EXHAUSTED (gRPC's)
    streams per peer                    admit_stream: a certificate's name, else      RESOURCE_EXHAUSTED, Refusal UNAVAILABLE
                                        the caller's host (plaintext)                 (retry later)
    a call's lifetime                   CallDeadlines: call_deadline_s from its start DEADLINE_EXCEEDED (client: UNAVAILABLE)
    name lengths                        check_names (site, kind, dtype, codec, what)  INVALID_ARGUMENT, Refusal INVALID
    model fingerprint length            check_names (Join.model_spec)                 INVALID_ARGUMENT, Refusal INVALID
    messages per stream                 message_verdict, from the header's size       INVALID_ARGUMENT, Refusal INVALID
    declared size                       transport.decode(max_bytes=), before alloc    INVALID_ARGUMENT, Refusal INVALID

Why these numbers: an honest site holds at most one Merge per fragment (streaming DiLoCo overlaps
them), one GetModel and a call or two still draining after its own deadline (a partition), so
``streams_per_peer`` is fragments + 8. The thread pool has a slot for every stream every site of the
topology may hold plus ``spare_threads`` more, so that Status, Join and health checks always find a
thread however many streams peers hold. ``call_deadline_s`` is a minute more than the sites' own call
deadline (geotrain.config.derive.rpc_timeout_s: max(300 s, 2 x round_timeout_s)), so an honest site
always reaches its own deadline first, and a stream that never ends (no deadline of its own, or
one of days) is ended by the server. On plaintext (security.tls: false) a peer is a host: every
site of a one-host run is the same peer, so that host may hold every site's streams, and a stranger
on it shares them (it cannot be told apart; docs/security.md).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass

import grpc

from geotrain.config.derive import RPC_TIMEOUT_FLOOR_S
from geotrain.orchestrator.authz import Verdict  # the same allowed/reason decision as authorize()

STREAMING_CALLS = frozenset({"InitModel", "GetModel", "Merge"})
"""The calls that hold a server thread for long (a stream in, or a wait and a stream out)."""

MAX_THREADS = 1024
"""The thread pool never grows past this, whatever the topology (a thread is made only when needed)."""


@dataclass(frozen=True)
class ServerLimits:
    """The coordinator server's bounds (see the module docstring for why each is what it is)."""

    call_deadline_s: float = RPC_TIMEOUT_FLOOR_S + 60.0
    """A streaming call is ended with DEADLINE_EXCEEDED this long after it started, whatever its client asked."""
    streams_per_peer: int = 9
    """InitModel/GetModel/Merge calls one peer may have open at once."""
    spare_threads: int = 8
    """Threads beyond every site's streams: Status, Join and health checks always find one."""
    max_name_chars: int = 64
    """Site names, a header's kind/dtype/codec, GetModel's what (topology names have at most 32)."""
    max_spec_chars: int = 1 << 20
    """Join's model fingerprint (a JSON list of parameter names, shapes and dtypes)."""
    min_chunk_bytes: int = 64 << 10
    """The smallest chunk a stream's message budget allows for (senders use 4 MiB: 64 times fewer)."""


def limits_for(sites: int, round_timeout_s: float, fragments: int = 1) -> ServerLimits:
    """The bounds for a topology of ``sites`` sites, its round deadline and its fragments."""
    site_deadline_s = max(RPC_TIMEOUT_FLOOR_S, 2 * round_timeout_s)
    return ServerLimits(call_deadline_s=site_deadline_s + 60.0, streams_per_peer=max(1, fragments) + 8)


def pool_size(limits: ServerLimits, sites: int) -> int:
    """Threads of the server: every site's streams and the spare ones (at most MAX_THREADS)."""
    return min(MAX_THREADS, limits.streams_per_peer * max(1, sites) + limits.spare_threads)


def peer_key(certificate_name: str | None, address: str) -> tuple[str, str]:
    """Who a caller is for the stream limit: ``("cert", name)`` on TLS, else ``("host", host)``.

    ``address`` is gRPC's peer string (``ipv4:127.0.0.1:51234``, ``ipv6:[::1]:51234``); its port differs
    per connection, so a plaintext peer is its host."""
    if certificate_name is not None:
        return "cert", certificate_name
    host = address
    if host.startswith(("ipv4:", "ipv6:")):
        host = host.split(":", 1)[1]
        host = host[:host.rindex(":")] if ":" in host else host
    return "host", host


def peer_limit(kind: str, limits: ServerLimits, sites: int) -> int:
    """Streams a peer of ``kind`` may hold: a certificate is one part; a host may run every site."""
    return limits.streams_per_peer if kind == "cert" else limits.streams_per_peer * max(1, sites)


def admit_stream(call: str, peer: tuple[str, str], open_now: int, limit: int) -> Verdict:
    """May ``peer``, holding ``open_now`` streaming calls, open one more (``call``)?"""
    kind, who = peer
    label = f"{'certificate' if kind == 'cert' else 'host'} {_quote(who)}"
    if call not in STREAMING_CALLS:
        return Verdict(True, f"{call} is not a streaming call: no stream limit")
    if open_now >= limit:
        return Verdict(False, f"{call}: {label} already holds {open_now} streams, the most one peer may "
                              f"hold at once ({limit}); try again when one has ended")
    return Verdict(True, f"{call}: {label} holds {open_now} of {limit} streams")


def check_names(call: str, fields: dict[str, str], limits: ServerLimits) -> Verdict:
    """Each name a request carries is at most ``max_name_chars`` (``model_spec``: ``max_spec_chars``)."""
    for field, value in fields.items():
        limit = limits.max_spec_chars if field == "model_spec" else limits.max_name_chars
        if len(value) > limit:
            return Verdict(False, f"{call}: {field} has {len(value)} characters, more than the {limit} it may have "
                                  f"({_quote(value)})")
    return Verdict(True, f"{call}: every name within its bound")


def message_budget(total_bytes: int, limits: ServerLimits) -> int:
    """Messages a stream that declares ``total_bytes`` may take: its chunks at ``min_chunk_bytes`` each, and the header."""
    return math.ceil(max(0, total_bytes) / limits.min_chunk_bytes) + 1


def message_verdict(call: str, count: int, total_bytes: int, limits: ServerLimits) -> Verdict:
    """Is the ``count``-th message of a stream that declared ``total_bytes`` still within its budget?"""
    budget = message_budget(total_bytes, limits)
    if count > budget:
        return Verdict(False, f"{call}: the stream sent {count} messages; one of {total_bytes} bytes may take at most "
                              f"{budget} (chunks of at least {limits.min_chunk_bytes} bytes, and its header)")
    return Verdict(True, f"{call}: message {count} of at most {budget}")


def _quote(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


class PeerStreams:
    """How many streaming calls each peer holds now (a peer without one is forgotten: bounded by callers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], int] = {}

    def enter(self, call: str, peer: tuple[str, str], limit: int) -> Verdict:
        """Count one more stream of ``peer`` if admit_stream allows it."""
        with self._lock:
            verdict = admit_stream(call, peer, self._open.get(peer, 0), limit)
            if verdict:
                self._open[peer] = self._open.get(peer, 0) + 1
            return verdict

    def leave(self, peer: tuple[str, str]) -> None:
        with self._lock:
            left = self._open.get(peer, 0) - 1
            if left > 0:
                self._open[peer] = left
            else:
                self._open.pop(peer, None)

    def held(self, peer: tuple[str, str]) -> int:
        with self._lock:
            return self._open.get(peer, 0)


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread than its handler's, with ``code``.

    gRPC's Python server has no public way to do this: ``context.abort`` works only in the handler's
    own thread, and ``context.cancel()`` ends the call as CANCELLED. The core call underneath takes a
    status (grpc_call_cancel_with_status); this uses it, and falls back to ``cancel()`` if a gRPC
    release moves it (tests/security/test_server_bounds.py pins the code a client sees). Either way the
    handler's blocked read or write returns at once and its waits see ``is_active()`` false."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details[:200])
    except (AttributeError, TypeError):
        context.cancel()


class CallDeadlines:
    """One daemon thread that ends each watched call ``call_deadline_s`` after it started (:func:`end_call`)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._calls: dict[int, tuple[grpc.ServicerContext, str]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.expired = 0
        """Calls ended by their server-side deadline (for tests and probes)."""

    def watch(self, context: grpc.ServicerContext, after_s: float, what: str) -> int:
        """End ``context`` in ``after_s`` seconds unless :meth:`done` is called first; returns a handle."""
        with self._cond:
            handle = next(self._ids)
            self._calls[handle] = (context, what)
            heapq.heappush(self._heap, (self._clock() + after_s, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return handle

    def done(self, handle: int) -> None:
        with self._cond:
            self._calls.pop(handle, None)  # its heap entry is skipped when it comes up

    def open(self) -> int:
        with self._cond:
            return len(self._calls)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._calls:
                    heapq.heappop(self._heap)
                wait = self._heap[0][0] - self._clock() if self._heap else None
                if wait is None or wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                _, handle = heapq.heappop(self._heap)
                context, what = self._calls.pop(handle)
                self.expired += 1
            end_call(context, grpc.StatusCode.DEADLINE_EXCEEDED, what)
