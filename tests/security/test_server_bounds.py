"""What one call to the coordinator may hold, and for how long (issue #11, item 5).

The decisions of geotrain.orchestrator.limits as a table, then a real gRPC server on 127.0.0.1 fed
what a hostile or broken client sends: streams that never end, more of them than a peer may hold,
names of a megabyte, streams of empty chunks, updates for rounds that never come. No timing is
asserted: a probe waits with a generous client deadline and checks what came back
(benchmarks/resource_probes.py measures latencies and memory)."""

import json
import threading
from concurrent import futures

import grpc
import pytest
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.orchestrator import limits as L
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.results import Refused, Update
from geotrain.orchestrator.server import create_server
from geotrain.security.pki import init_certs, site_name
from geotrain.security.tls import secure_channel
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome

SITES = ("paris", "tokyo")


# ---- the decisions ----

@pytest.mark.parametrize("name, address, key", [
    ("site.paris", "ipv4:127.0.0.1:5000", ("cert", "site.paris")),
    (None, "ipv4:127.0.0.1:5000", ("host", "127.0.0.1")),
    (None, "ipv6:[::1]:5000", ("host", "[::1]")),
    (None, "unix:/tmp/sock", ("host", "unix:/tmp/sock")),
])
def test_a_peer_is_its_certificate_else_its_host(name, address, key):
    assert L.peer_key(name, address) == key


def test_a_peer_may_hold_so_many_streams_and_unary_calls_are_not_counted():
    limits = L.ServerLimits(streams_per_peer=3)
    assert L.admit_stream("Merge", ("cert", "site.a"), 2, 3)
    refused = L.admit_stream("Merge", ("cert", "site.a"), 3, 3)
    assert not refused and "already holds 3 streams" in refused.reason and "'site.a'" in refused.reason
    assert L.admit_stream("Status", ("cert", "site.a"), 99, 3)
    # a host (plaintext) may run every site of the topology
    assert L.peer_limit("host", limits, sites=4) == 12 and L.peer_limit("cert", limits, sites=4) == 3
    # the pool has a thread for every site's streams and spare ones
    assert L.pool_size(limits, 4) == 12 + limits.spare_threads
    assert L.pool_size(limits, 10_000) == L.MAX_THREADS


def test_peer_streams_count_and_forget():
    streams, peer = L.PeerStreams(), ("cert", "site.a")
    assert streams.enter("Merge", peer, 2) and streams.enter("GetModel", peer, 2)
    assert not streams.enter("Merge", peer, 2) and streams.held(peer) == 2  # a refused one is not counted
    streams.leave(peer)
    streams.leave(peer)
    assert streams.held(peer) == 0 and not streams._open  # a peer without streams is forgotten


def test_names_and_message_counts_have_bounds():
    limits = L.ServerLimits()
    assert L.check_names("Join", {"site": "paris", "model_spec": "[]" * 1000}, limits)
    long = L.check_names("Join", {"site": "x" * (1 << 20)}, limits)
    assert not long and "1048576 characters" in long.reason and len(long.reason) < 200
    assert not L.check_names("Join", {"model_spec": "x" * (limits.max_spec_chars + 1)}, limits)
    assert L.message_budget(0, limits) == 1 and L.message_budget(1, limits) == 2
    assert L.message_verdict("Merge", 17, 16 * limits.min_chunk_bytes, limits)
    assert not L.message_verdict("Merge", 18, 16 * limits.min_chunk_bytes, limits)
    assert not L.message_verdict("Merge", 2, -5, limits)  # a negative size has no room for data


def test_the_server_deadline_is_past_the_sites_own():
    from geotrain.config.derive import RPC_TIMEOUT_FLOOR_S

    assert L.limits_for(2, 60).call_deadline_s > RPC_TIMEOUT_FLOOR_S
    assert L.limits_for(2, 1000).call_deadline_s > 2000
    assert L.limits_for(2, 60, fragments=4).streams_per_peer > L.limits_for(2, 60).streams_per_peer


class _FakeCall:
    def __init__(self):
        self.ended = threading.Event()
        self.code = None

    def cancel(self, code, details):
        self.code = code
        self.ended.set()


class _FakeContext:
    def __init__(self):
        self._rpc_event = type("E", (), {})()
        self._rpc_event.call = _FakeCall()


def test_call_deadlines_end_a_call_unless_it_is_done_first():
    deadlines = L.CallDeadlines()
    late, early = _FakeContext(), _FakeContext()
    done = deadlines.watch(early, 0.05, "early")
    deadlines.done(done)
    deadlines.watch(late, 0.05, "late")
    assert late._rpc_event.call.ended.wait(10)
    assert late._rpc_event.call.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert not early._rpc_event.call.ended.is_set() and deadlines.expired == 1 and deadlines.open() == 0


# ---- refused updates leave nothing behind ----

def test_refused_updates_for_new_rounds_leave_no_state():
    """A member's updates for rounds that are not being collected (and a stranger's) are refused and
    change nothing: no round record, no pinned merge mode, however many arrive."""
    engine = CoordinatorEngine(EngineConfig(sites=SITES, rings=True))
    engine.init_model("paris", torch.zeros(4))
    for rnd in list(range(1, 2000)) + [-5, 2**62]:
        with pytest.raises(Refused) as info:
            engine.merge(Update(site="paris", round=rnd, kind="pseudo_grad", version=0, values=torch.ones(4)),
                         0.0, lambda: True)
        assert info.value.outcome in (Outcome.FUTURE, Outcome.STALE)
    with pytest.raises(Refused):
        engine.merge(Update(site="mars", round=0, kind="pseudo_grad", version=0, values=torch.ones(4)), 0.0, lambda: True)
    lane = engine.lanes[0]
    assert lane.log.rounds() == [] and not lane.updates and not lane.state.arrived
    # round 1's mode was not pinned to the star by a refused update: its ring updates are taken
    assert lane.mode(1) is None


# ---- a real server ----

def _raw(address, certs=None, name="paris"):
    channel = secure_channel(address, certs.files(site_name(name))) if certs else grpc.insecure_channel(address)
    return pb_grpc.CoordinatorStub(channel), channel


def _refusal(exc: grpc.RpcError):
    for key, value in exc.trailing_metadata() or ():
        if key == REFUSAL_KEY:
            return pb.Refusal.FromString(value)
    return None


def _never_ending(site="paris", declared=256 << 20, stop: threading.Event | None = None):
    """A stream that declares ``declared`` bytes, sends 4, and never ends (until ``stop``)."""
    data = b"\0\0\0\0"
    import zlib

    yield pb.TensorChunk(header=pb.TensorHeader(site=site, kind="pseudo_grad", total_bytes=declared, dtype="float32"),
                         offset=0, data=data, crc32=zlib.crc32(data))
    (stop or threading.Event()).wait(60)


@pytest.fixture
def tls_server(tmp_path):
    certs = init_certs(tmp_path / "certs", SITES, run="t")
    engine = CoordinatorEngine(EngineConfig(sites=SITES, round_timeout_s=30),
                               events=EventLog(tmp_path / "metrics.jsonl", "coordinator"))
    limits = L.ServerLimits(call_deadline_s=3.0, streams_per_peer=4)
    server, port = create_server(engine, tls=certs.files("coordinator"), limits=limits)
    yield certs, engine, f"127.0.0.1:{port}", server, tmp_path / "metrics.jsonl"
    server.stop(grace=0)


def test_a_stream_that_never_ends_is_ended_by_the_server(tls_server):
    certs, engine, address, server, _ = tls_server
    stub, channel = _raw(address, certs)
    with futures.ThreadPoolExecutor(1) as pool:  # no client deadline: only the server's can end it
        call = pool.submit(lambda: stub.Merge(_never_ending()).next())
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "server-side deadline" in info.value.details()
    assert server.geotrain_service.deadlines.expired >= 1
    assert stub.Status(pb.StatusRequest(), timeout=10).sites == list(SITES)
    channel.close()


def test_sixteen_never_ending_streams_do_not_take_the_server(tls_server):
    """One site's certificate opens 16 never-ending Merges: 4 are held (its limit), 12 are refused at
    once (RESOURCE_EXHAUSTED, outcome UNAVAILABLE: retry later); meanwhile Status answers and the
    other site joins, uploads the model and fetches it."""
    certs, engine, address, server, _ = tls_server
    stub, channel = _raw(address, certs)
    stop = threading.Event()
    errors = []

    def hold():
        try:
            list(stub.Merge(_never_ending(stop=stop), timeout=30))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold) for _ in range(16)]
    [t.start() for t in threads]
    try:
        for _ in range(300):
            if len(errors) >= 12 and server.geotrain_service.streams.held(("cert", "site.paris")) == 4:
                break
            threading.Event().wait(0.1)
        refused = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(refused) == 12
        assert _refusal(refused[0]).outcome == Outcome.UNAVAILABLE and "already holds 4 streams" in refused[0].details()
        assert server.geotrain_service.streams.held(("cert", "site.paris")) == 4
        assert stub.Status(pb.StatusRequest(), timeout=10).round == 0
        from geotrain.worker.client import CoordinatorClient

        tokyo = CoordinatorClient(address, "tokyo", tls=certs.files(site_name("tokyo")), timeout_s=10)
        assert tokyo.join(1).round == 0
        assert tokyo.init_model(torch.zeros(8))
        assert tokyo.get_model(0).tensor().numel() == 8
        tokyo.close()
    finally:
        stop.set()
        [t.join(60) for t in threads]
    channel.close()


def test_a_megabyte_name_is_refused_before_anything_echoes_it(tls_server):
    certs, engine, address, server, metrics = tls_server
    stub, channel = _raw(address, certs)
    huge = "x" * (1 << 20)
    calls = [lambda: stub.Join(pb.JoinRequest(site=huge, workers=1), timeout=10),
             lambda: list(stub.GetModel(pb.GetModelRequest(site=huge), timeout=10)),
             lambda: list(stub.GetModel(pb.GetModelRequest(site="paris", what=huge), timeout=10)),
             lambda: list(stub.Merge(iter([pb.TensorChunk(header=pb.TensorHeader(site=huge, kind="pseudo_grad",
                                                                                  dtype="float32"))]), timeout=10)),
             lambda: stub.InitModel(iter([pb.TensorChunk(header=pb.TensorHeader(site="paris", kind=huge,
                                                                                 dtype="float32"))]), timeout=10)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert _refusal(info.value).outcome == Outcome.INVALID and len(info.value.details()) < 500
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    assert all(len(line) < 4096 for line in lines)
    assert stub.Status(pb.StatusRequest(), timeout=10).round == 0
    channel.close()


def test_a_stream_of_empty_chunks_is_cut_at_its_budget(tls_server):
    certs, engine, address, server, _ = tls_server
    stub, channel = _raw(address, certs)

    def empties():
        yield pb.TensorChunk(header=pb.TensorHeader(site="paris", kind="params", total_bytes=16, dtype="float32"))
        for _ in range(10_000):
            yield pb.TensorChunk(offset=0, data=b"", crc32=0)

    with pytest.raises(grpc.RpcError) as info:
        stub.InitModel(empties(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "may take at most 2" in info.value.details()
    assert engine.params is None
    channel.close()


def test_plaintext_peers_are_hosts(tmp_path):
    """Without TLS a peer is its host: every site of a one-host run shares one limit, sites x streams."""
    engine = CoordinatorEngine(EngineConfig(sites=SITES))
    server, port = create_server(engine, limits=L.ServerLimits(call_deadline_s=30, streams_per_peer=2))
    stub, channel = _raw(f"127.0.0.1:{port}")
    stop = threading.Event()
    errors = []

    def hold():
        try:
            list(stub.Merge(_never_ending(stop=stop), timeout=30))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold) for _ in range(6)]
    [t.start() for t in threads]
    try:
        for _ in range(300):
            if len(errors) >= 2 and server.geotrain_service.streams.held(("host", "127.0.0.1")) == 4:
                break
            threading.Event().wait(0.1)
        assert len(errors) == 2 and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
        assert server.geotrain_service.streams.held(("host", "127.0.0.1")) == 4
        assert stub.Status(pb.StatusRequest(), timeout=10).round == 0
    finally:
        stop.set()
        [t.join(60) for t in threads]
        server.stop(0)
        channel.close()
