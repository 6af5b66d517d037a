"""Property-based tests of every coordinator gRPC handler (issue #11, item 8): whatever a client sends,
the call ends with a clear typed error (a status code of the coordinator's table with its Refusal in
the trailing metadata) or succeeds; never UNKNOWN (an exception escaped a handler), never a hang (every
call has a client deadline, and the server its own), and the server answers Status afterwards.

A real coordinator on 127.0.0.1 (real gRPC, plaintext so that every message reaches the handler's
checks rather than stopping at the identity check; tests/security covers TLS) with a model of 64
values and a short round deadline, so that an update that is accepted waits at most that long. Inputs:
requests with random fields (names of any length, sizes negative, huge, odd), tensor streams built
from random headers and chunks, valid streams cut short, reordered, duplicated or with a chunk
changed, and raw bytes that are no protobuf at all. ``derandomize``: the same examples every run.
"""

import zlib

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.limits import ServerLimits
from geotrain.orchestrator.server import STATUS, create_server
from geotrain.wire import transport
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome

SITES = ("a", "b")
NUMEL = 64
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CALL_TIMEOUT_S = 3.0
TYPED = frozenset(STATUS.values()) | {grpc.StatusCode.RESOURCE_EXHAUSTED}
"""The codes the coordinator refuses with (each with a Refusal)."""


def _engine() -> CoordinatorEngine:
    engine = CoordinatorEngine(EngineConfig(sites=SITES, round_timeout_s=0.3))
    engine.init_model("a", torch.zeros(NUMEL))
    return engine


@pytest.fixture(scope="module")
def server():
    server, port = create_server(_engine(), limits=ServerLimits(call_deadline_s=5.0))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, pb_grpc.CoordinatorStub(channel), channel
    channel.close()
    server.stop(grace=0)


@pytest.fixture
def coordinator(server):
    """The server with a fresh engine for each example (an accepted update that times out its round
    drops sites from the membership: later examples would then only meet NOT_MEMBER)."""
    grpc_server, stub, channel = server

    def fresh():
        engine = grpc_server.geotrain_service.engine = _engine()
        return engine, stub, channel
    return fresh


def _outcome(call, undecodable: bool = False) -> grpc.StatusCode:
    """Run one call; it succeeds or ends with a typed refusal. Returns its status code. ``undecodable``:
    the request may be bytes gRPC cannot deserialize, which it refuses itself (INTERNAL, no handler ran)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)) and not hasattr(result, "ListFields"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert code != grpc.StatusCode.UNKNOWN, f"a handler raised: {exc.details()}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the client's deadline or the server's: both bound it
            return code
        refusals = [v for k, v in (exc.trailing_metadata() or ()) if k == REFUSAL_KEY]
        if undecodable and not refusals and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            return code  # gRPC's own: INTERNAL for a unary request, a reset stream for a streaming one
        assert code in TYPED, (code, exc.details())
        assert refusals, f"{code.name} without a Refusal: {exc.details()}"
        refusal = pb.Refusal.FromString(refusals[0])
        assert refusal.outcome in set(Outcome) - {Outcome.OK} and refusal.reason
        assert len(exc.details()) < 2000, "a refusal's message echoes what it refused"
        return code


def _still_serving(stub) -> None:
    assert stub.Status(pb.StatusRequest(), timeout=10).version >= 0


names = st.one_of(st.sampled_from(["a", "b", "", "mars", "a" * 33, "params", "momentum", "float32", "fp32",
                                   "int8", "topk", "encoded", "pseudo_grad", "grad", "ring_ack", "ring_mean"]),
                  st.text(max_size=80), st.builds(lambda n: "x" * n, st.sampled_from([65, 4096, 1 << 20])))
sizes = st.one_of(st.sampled_from([-1, -(2**63), 0, 1, 3, 4, 4 * NUMEL, 4 * NUMEL + 4, 256 << 20, 2**62, 2**63 - 1]),
                  st.integers(-(2**63), 2**63 - 1))
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def headers(draw):
    return pb.TensorHeader(site=draw(names), round=draw(st.one_of(st.integers(-2, 3), int64)), kind=draw(names),
                           total_bytes=draw(sizes), dtype=draw(names), crc32=draw(st.integers(0, 2**32 - 1)),
                           version=draw(int64), codec=draw(names), block=draw(int32), numel=draw(sizes),
                           fragment=draw(int32), staleness=draw(int64), claimed_crc32=draw(st.integers(0, 2**32 - 1)),
                           ring_round=draw(int64))


@st.composite
def chunks(draw):
    data = draw(st.binary(max_size=300))
    crc = zlib.crc32(data) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
    return pb.TensorChunk(offset=draw(st.one_of(st.integers(-4, 600), int64)), data=data, crc32=crc)


@st.composite
def random_streams(draw):
    """A header (or none) and random chunks."""
    first = draw(chunks())
    if draw(st.booleans()):
        first.header.CopyFrom(draw(headers()))
    return [first, *draw(st.lists(chunks(), max_size=6))]


@st.composite
def damaged_streams(draw):
    """A valid stream of the model's size (or another), then cut, reordered, duplicated or changed."""
    numel = draw(st.sampled_from([NUMEL, NUMEL - 1, 1, 0, 3 * NUMEL]))
    kind = draw(st.sampled_from(["pseudo_grad", "params", "grad", "ring_ack"]))
    values = torch.tensor(draw(st.lists(st.floats(width=32), min_size=numel, max_size=numel)), dtype=torch.float32)
    msgs = list(transport.encode(values, site=draw(st.sampled_from(SITES)), round=draw(st.integers(-1, 2)), kind=kind,
                                 chunk_bytes=draw(st.sampled_from([16, 64, 1 << 20]))))
    how = draw(st.sampled_from(["as is", "cut", "reorder", "duplicate", "flip", "drop header"]))
    if how == "cut" and len(msgs) > 1:
        msgs = msgs[:draw(st.integers(1, len(msgs) - 1))]
    elif how == "reorder" and len(msgs) > 2:
        msgs = [msgs[0], *reversed(msgs[1:])]
    elif how == "duplicate":
        msgs = msgs + [msgs[-1]]
    elif how == "flip" and msgs[-1].data:
        last = msgs[-1]
        last.data = bytes([last.data[0] ^ 1]) + last.data[1:]
    elif how == "drop header":
        msgs[0].ClearField("header")
    return msgs


streams = st.one_of(random_streams(), damaged_streams())


@FUZZ
@given(site=names, workers=int32, pid=int64, spec=st.one_of(names, st.sampled_from(["[]", "[[\"w\", [4], \"float32\"]]",
                                                                                  "{", "[1, 2]", "null"])))
def test_join(coordinator, site, workers, pid, spec):
    _, stub, _ = coordinator()
    _outcome(lambda: stub.Join(pb.JoinRequest(site=site, workers=workers, pid=pid, model_spec=spec),
                               timeout=CALL_TIMEOUT_S))
    _still_serving(stub)


@FUZZ
@given(site=names, min_version=st.one_of(st.integers(-3, 0), st.sampled_from([1, 2**62])), what=names)
def test_get_model(coordinator, site, min_version, what):
    _, stub, _ = coordinator()
    _outcome(lambda: stub.GetModel(pb.GetModelRequest(site=site, min_version=min_version, what=what), timeout=0.5))
    _still_serving(stub)


@FUZZ
@given(msgs=streams)
def test_merge(coordinator, msgs):
    engine, stub, _ = coordinator()
    before = engine.params.clone()
    code = _outcome(lambda: stub.Merge(iter(msgs), timeout=CALL_TIMEOUT_S))
    if code != grpc.StatusCode.OK:  # a refused or unanswered update never moves the model
        assert torch.equal(engine.params, before) or engine.version > 0
    _still_serving(stub)


@FUZZ
@given(msgs=streams)
def test_init_model(coordinator, msgs):
    _, stub, _ = coordinator()
    _outcome(lambda: stub.InitModel(iter(msgs), timeout=CALL_TIMEOUT_S))
    _still_serving(stub)


@FUZZ
@given(method=st.sampled_from(["Join", "GetModel", "Status", "InitModel", "Merge"]), raw=st.binary(max_size=200))
def test_bytes_that_are_no_protobuf(coordinator, method, raw):
    """gRPC refuses a request it cannot deserialize itself (INTERNAL, or a reset stream), before any
    handler; bytes that happen to parse reach the handler and get its typed answer; the server goes on."""
    _, stub, channel = coordinator()
    path = f"/geotrain.v1.Coordinator/{method}"
    if method in ("InitModel", "Merge"):
        call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        make = lambda: call(iter([raw, raw]), timeout=CALL_TIMEOUT_S)  # noqa: E731
    elif method == "GetModel":
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        make = lambda: call(raw, timeout=0.5)  # noqa: E731
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        make = lambda: call(raw, timeout=CALL_TIMEOUT_S)  # noqa: E731
    _outcome(make, undecodable=True)
    _still_serving(stub)
