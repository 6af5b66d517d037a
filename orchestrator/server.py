"""The coordinator's gRPC service: it only moves bytes.

Each RPC decodes its request (a tensor stream is reassembled and checked, geotrain.wire.transport),
calls the :class:`~geotrain.orchestrator.engine.CoordinatorEngine`, and encodes the answer. A
:class:`~geotrain.orchestrator.results.Refused` becomes a gRPC status code (the table below) and
a ``Refusal`` (protos/geotrain/v1/coordinator.proto) serialized in the trailing metadata under
:data:`REFUSAL_KEY`, which the client converts to the exception tree in one place
(geotrain.worker.client). The status message is the engine's message, for people only.

What one call may hold is bounded before the engine sees it (geotrain.orchestrator.limits): names
and the model fingerprint by length, a stream's messages by its declared size, each peer's open
streams (a peer is its certificate's name, else its host), and every streaming call's lifetime by a
server-side deadline; gRPC's own options bound calls in flight, streams per connection and message
size. The order in every handler: names, identity (authz), the stream limit, then the data.

The data path: the tensor streams' messages are bytes to gRPC, not protobuf
objects (:func:`handlers`): each request chunk is parsed into a memoryview of what gRPC received
(geotrain.wire.chunks) and copied once, into a buffer of the payload's size allocated when its
header arrives (geotrain.wire.receive); a Merge's float32 values are checked as they arrive
(geotrain.orchestrator.ingest: finite, the norm's sum, in this call's thread, outside the engine's
lock), and a stream is refused at its first non-finite piece. A synchronous round's answer is
serialized once (``CoordinatorEngine.answer_once``) and the same bytes go to every waiting site.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import GeotrainError
from geotrain.orchestrator.engine import CoordinatorEngine, answer_stream
from geotrain.orchestrator.ingest import NonFiniteValues, Received, ValueCheck
from geotrain.orchestrator.results import CommitResult, Refused, Update
from geotrain.orchestrator.authz import authorize
from geotrain.orchestrator.limits import (CallDeadlines, PeerStreams, ServerLimits, check_names, limits_for,
                                          message_verdict, peer_key, peer_limit, pool_size)
from geotrain.security.pki import TlsFiles, site_of
from geotrain.security.tls import peer_name, server_credentials
from geotrain.wire import transport
from geotrain.wire.channel import STREAM_WINDOW_BYTES, grpc_options
from geotrain.wire.chunks import as_chunk, parse_chunk
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome, error_for, outcome_of

STATUS = {
    Outcome.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.FUTURE: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.DUPLICATE: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.NOT_MEMBER: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.NOT_IN_TOPOLOGY: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.ROUND_FAILED: grpc.StatusCode.ABORTED,
    Outcome.RING_ABANDONED: grpc.StatusCode.ABORTED,
    Outcome.FENCED: grpc.StatusCode.UNAVAILABLE,
    # the coordinator refuses UNAVAILABLE only when what was asked for did not come within the deadline
    Outcome.UNAVAILABLE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Outcome.CORRUPT: grpc.StatusCode.DATA_LOSS,
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.INVALID_UPDATE: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.MODEL_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
}
"""The gRPC status code each refusal travels with."""


def refuse(context, refused: Refused, code: grpc.StatusCode | None = None):
    """End the call: the Refusal in the trailing metadata, then the status (raises, as context.abort does).
    ``code``: another status than the outcome's usual one (a stream limit: RESOURCE_EXHAUSTED)."""
    refusal = pb.Refusal(outcome=int(refused.outcome), reason=refused.message, round=refused.round, site=refused.site)
    context.set_trailing_metadata(((REFUSAL_KEY, refusal.SerializeToString()),))
    context.abort(code or STATUS[refused.outcome], refused.message)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """The Coordinator RPCs over one engine."""

    def __init__(self, engine: CoordinatorEngine, tls: bool = False, limits: ServerLimits | None = None):
        self.engine = engine
        self.tls = tls
        self.limits = limits or default_limits(engine)
        self.streams = PeerStreams()
        self.deadlines = CallDeadlines()

    def _names(self, context, call: str, **fields: str) -> None:
        """Refuse INVALID a request whose names are longer than they may be (limits.check_names)."""
        verdict = check_names(call, fields, self.limits)
        if not verdict:
            refuse(context, Refused(Outcome.INVALID, f"{verdict.reason} (from {context.peer()})"))

    def _open_stream(self, context, call: str) -> None:
        """Count the call against its peer's streams (limits.admit_stream; refused RESOURCE_EXHAUSTED with
        outcome UNAVAILABLE: retry later) and end it at its server-side deadline; both are released when
        the call terminates, however it ends."""
        peer = peer_key(peer_name(context) if self.tls else None, context.peer())
        verdict = self.streams.enter(call, peer, peer_limit(peer[0], self.limits, len(self.engine.cfg.sites)))
        if not verdict:
            refuse(context, Refused(Outcome.UNAVAILABLE, verdict.reason), code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        deadline_s = self.limits.call_deadline_s
        handle = self.deadlines.watch(context, deadline_s, f"{call}: ended by the coordinator {deadline_s:g} s after "
                                                           f"it started (its server-side deadline)")
        released = []

        def release():
            if not released:
                released.append(True)
                self.streams.leave(peer)
                self.deadlines.done(handle)

        if not context.add_callback(release):  # the call is already over
            release()

    def _bounded(self, messages, call: str):
        """The request stream, its header's names and its message count checked as they arrive
        (refused INVALID through transport.decode, which lets geotrain errors through)."""
        declared = 0
        for count, msg in enumerate(messages, start=1):
            msg = as_chunk(msg)
            if count == 1 and msg.header is not None:
                h = msg.header
                verdict = check_names(call, {"site": h.site, "kind": h.kind, "dtype": h.dtype, "codec": h.codec},
                                      self.limits)
                if not verdict:
                    raise error_for(Outcome.INVALID, verdict.reason)
                declared = h.total_bytes
            verdict = message_verdict(call, count, declared, self.limits)
            if not verdict:
                raise error_for(Outcome.INVALID, verdict.reason)
            yield msg

    def _allow(self, context, call: str, claimed: str | None) -> None:
        """Refuse FORBIDDEN unless the caller's certificate allows ``call`` for ``claimed`` (authz.authorize)."""
        if not self.tls:
            return
        caller = peer_name(context)
        members = self.engine.members() if call == "GetModel" else frozenset()
        verdict = authorize(call, caller, claimed, sites=frozenset(self.engine.cfg.sites), members=members)
        if not verdict:
            refuse(context, Refused(Outcome.FORBIDDEN, f"{verdict.reason} (from {context.peer()})",
                                    site=(claimed or "")[:64]))

    def _caller_site(self, context) -> str | None:
        return site_of(peer_name(context)) if self.tls else None

    def Join(self, request, context):
        self._names(context, "Join", site=request.site, model_spec=request.model_spec)
        self._allow(context, "Join", request.site)
        try:
            a = self.engine.join(request.site, request.workers, request.pid, time.time(),
                                 model_spec=request.model_spec or None)
        except Refused as refused:
            refuse(context, refused)
        return pb.JoinResponse(round=a.round, version=a.version, start_version=a.start_version, has_model=a.has_model,
                               algorithm=a.algorithm, epoch=a.epoch, fragment_rounds=list(a.fragment_rounds),
                               site_merges=a.site_merges)

    def InitModel(self, request_iterator, context):
        self._allow(context, "InitModel", self._caller_site(context))  # a site, before reading its stream
        self._open_stream(context, "InitModel")
        update = self._receive(request_iterator, context, "InitModel", inspect=False)
        self._allow(context, "InitModel", update.site)
        if update.values is None:
            refuse(context, Refused(Outcome.INVALID, f"InitModel from {context.peer()}: a {update.kind} carries no model"))
        try:
            accepted, version = self.engine.init_model(update.site, update.values.clone())
        except Refused as refused:
            refuse(context, refused)
        return pb.InitModelResponse(accepted=accepted, version=version)

    def GetModel(self, request, context):
        self._names(context, "GetModel", site=request.site, what=request.what)
        self._allow(context, "GetModel", request.site)
        self._open_stream(context, "GetModel")
        # the client's deadline (gRPC gives a huge one when it set none), never past the server's own
        timeout_s = min(context.time_remaining() or self.limits.call_deadline_s, self.limits.call_deadline_s)
        try:
            answer = self.engine.model(request.min_version, request.what, timeout_s, context.is_active)
        except Refused as refused:
            refuse(context, refused)
        self.engine.sent(answer.values.numel() * 4)
        yield from transport.encode_wire(answer.values, site="coordinator", round=answer.version, kind=answer.kind,
                                         version=answer.version, ring_round=answer.ring_round)

    def Merge(self, request_iterator, context):
        result = self._merge(request_iterator, context)
        if result is None:  # the site went away while its round was collected
            return
        if self.engine.is_async:  # one answer per update
            self.engine.sent(result.wire_bytes)
            yield from _encode(result)
        else:  # every waiting site gets the same bytes: encode them once per commit
            try:  # the last message waits until the round is durable (CoordinatorEngine._make_durable)
                yield from self.engine.answer_once(result, lambda: _encode(result))
            except Refused as refused:  # it could not be: fenced, or its state not persisted
                refuse(context, refused)

    def _merge(self, request_iterator, context) -> CommitResult | None:
        """Receive the update and have the engine merge it. The update's buffer is let go before the answer
        is streamed (the engine's pool hands it out again for the next round once nothing holds it)."""
        self._allow(context, "Merge", self._caller_site(context))
        self._open_stream(context, "Merge")
        update = self._receive(request_iterator, context, "Merge")
        self._allow(context, "Merge", update.site)
        try:
            return self.engine.merge(update, time.time(), context.is_active, durable=False)
        except Refused as refused:
            refuse(context, refused)

    def ReportLost(self, request, context):
        self._names(context, "ReportLost", site=request.site)  # the reason is for people: cut, not refused
        self._allow(context, "ReportLost", request.site)
        if request.site not in self.engine.cfg.sites:
            refuse(context, Refused(Outcome.NOT_IN_TOPOLOGY, f"ReportLost: site {request.site!r} is not in the topology",
                                    site=request.site))
        who = peer_name(context) if self.tls else context.peer()
        decision = self.engine.member_lost(request.site, request.pid or None,
                                           f"{who} reported: {request.reason[:512] or 'its process died'}",
                                           time.time(), source="supervisor")
        return pb.LostResponse(action=decision.action, reason=decision.reason)

    def Status(self, request, context):
        self._allow(context, "Status", None)
        s = self.engine.status()
        return pb.StatusResponse(round=s.round, version=s.version, sites=list(s.sites), pending=list(s.pending),
                                 bytes_in=s.bytes_in, bytes_out=s.bytes_out)

    def _receive(self, request_iterator, context, what: str, inspect: bool = True) -> Update:
        """Reassemble and check a tensor stream and count its bytes. A corrupt one is refused CORRUPT;
        one that declares more than the model's size (or a negative size), or whose values cannot be
        decoded from what it declares, INVALID (transport.decode refuses the size before allocating).
        ``inspect``: a float32 update's values are checked as they arrive (ingest.ValueCheck); one that
        is not finite stops the stream, and the engine refuses it (CoordinatorEngine.refuse_values)."""
        checks = []

        def inspector(header):
            if header.kind == "ring_ack":
                return None
            checks.append((header, ValueCheck(f"{what} from {context.peer()}: update from {header.site[:64]!r} "
                                              f"for round {header.round}")))
            return checks[-1][1]

        try:
            payload = transport.decode(self._bounded(request_iterator, what), where=f"{what} from {context.peer()}",
                                       max_bytes=self.engine.max_stream_bytes(), expect_bytes=self.engine.model_bytes(),
                                       allocate=self.engine.buffers.take, inspector=inspector if inspect else None)
            values = None if payload.kind == "ring_ack" else payload.tensor()
        except NonFiniteValues:
            h = checks[0][0]
            stopped = Update(site=h.site, round=h.round, kind=h.kind, version=h.version, values=None,
                             fragment=h.fragment, claimed_crc32=h.claimed_crc32, declared_numel=h.total_bytes // 4)
            try:
                self.engine.refuse_values(stopped, time.time())
            except Refused as refused:
                refuse(context, refused)
            raise  # never reached: refuse_values always raises Refused
        except GeotrainError as exc:
            refuse(context, Refused(outcome_of(exc) or Outcome.CORRUPT, str(exc)))
        except (ValueError, ZeroDivisionError, OverflowError, RuntimeError) as exc:  # a header the codec cannot use
            refuse(context, Refused(Outcome.INVALID, f"{what} from {context.peer()}: cannot decode the "
                                                     f"{payload.codec!r} payload its header declares: {exc}"))
        self.engine.received(payload.wire_bytes)
        # the norm of values checked as they arrived; a compressed update's values are its decoding
        norm = checks[0][1].norm if checks and payload.codec == "fp32" and values is not None else None
        return Received(site=payload.site, round=payload.round, kind=payload.kind, version=payload.version,
                        values=values, fragment=payload.fragment, claimed_crc32=payload.claimed_crc32,
                        declared_numel=payload.numel if values is not None else -1, norm=norm, owned=True)


def _encode(result: CommitResult):
    """The serialized messages of a commit's answer."""
    return answer_stream(result).messages()


SERVICE = "geotrain.v1.Coordinator"


def handlers(service: CoordinatorService) -> dict:
    """The Coordinator's method handlers: the generated ones' protobuf (de)serializers for the small
    messages; for the tensor streams, requests parsed by geotrain.wire.chunks.parse_chunk (a memoryview
    of the chunk's data, no copy) and responses that are already bytes (geotrain.wire.transport.encode_wire).
    The wire format is the same: any gRPC client of coordinator.proto may call it."""
    return {
        "Join": grpc.unary_unary_rpc_method_handler(service.Join, request_deserializer=pb.JoinRequest.FromString,
                                                    response_serializer=pb.JoinResponse.SerializeToString),
        "InitModel": grpc.stream_unary_rpc_method_handler(service.InitModel, request_deserializer=parse_chunk,
                                                          response_serializer=pb.InitModelResponse.SerializeToString),
        "GetModel": grpc.unary_stream_rpc_method_handler(service.GetModel,
                                                         request_deserializer=pb.GetModelRequest.FromString,
                                                         response_serializer=None),
        "Merge": grpc.stream_stream_rpc_method_handler(service.Merge, request_deserializer=parse_chunk,
                                                       response_serializer=None),
        "Status": grpc.unary_unary_rpc_method_handler(service.Status, request_deserializer=pb.StatusRequest.FromString,
                                                      response_serializer=pb.StatusResponse.SerializeToString),
        "ReportLost": grpc.unary_unary_rpc_method_handler(service.ReportLost,
                                                          request_deserializer=pb.LostRequest.FromString,
                                                          response_serializer=pb.LostResponse.SerializeToString),
    }


def default_limits(engine: CoordinatorEngine) -> ServerLimits:
    """The bounds for ``engine``'s topology (limits.limits_for: its sites, round deadline, fragments)."""
    cfg = engine.cfg
    return limits_for(len(cfg.sites), cfg.round_timeout_s, cfg.fragments if cfg.algorithm == "streaming-diloco" else 1)


def create_server(engine: CoordinatorEngine, bind: str = "127.0.0.1:0", max_workers: int | None = None,
                  tls: TlsFiles | None = None, limits: ServerLimits | None = None,
                  window_bytes: int = STREAM_WINDOW_BYTES):
    """Serve ``engine`` over gRPC with the standard health service; returns (server, port).

    ``tls``: the coordinator's certificate files; the server then demands a client certificate of the
    run's CA on every call (the health service included) and takes each caller's identity from it
    (geotrain.orchestrator.authz). None: plaintext (tests, and security.tls: false).
    ``limits``: what one call may hold (geotrain.orchestrator.limits; default: from the topology). The
    pool has a thread for every stream every site may hold and spare ones for Status, Join and health
    (limits.pool_size); gRPC refuses calls beyond the pool at once (``maximum_concurrent_rpcs``,
    RESOURCE_EXHAUSTED) instead of queueing them without bound. ``window_bytes``: each stream's HTTP/2 window
    (geotrain.wire.channel; a run's comes from its links, geotrain.config.derive.stream_window_bytes)."""
    limits = limits or default_limits(engine)
    workers = max_workers or pool_size(limits, len(engine.cfg.sites))
    # Not grpc.max_concurrent_streams: in grpc 1.85's Python server a stream whose request cannot be
    # deserialized is never released from its connection's count, so that after N such requests the
    # connection refuses every new stream (REFUSED_STREAM, measured); the per-peer limit bounds streams.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coord"),
                         options=grpc_options(window_bytes), maximum_concurrent_rpcs=workers)
    service = CoordinatorService(engine, tls=tls is not None, limits=limits)
    methods = handlers(service)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_registered_method_handlers(SERVICE, methods)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(bind, server_credentials(tls)) if tls is not None else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"coordinator: cannot bind {bind}")
    server.start()
    server.geotrain_service = service  # tests and probes read its bounds' state (open streams, expired calls)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("geotrain.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
    return server, port
