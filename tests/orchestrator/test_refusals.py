"""Every refusal crosses the wire as a typed Refusal: the client raises the right exception with the
right ``outcome``, whatever the message says (a server whose reasons are reworded changes nothing)."""

import threading
import time

import grpc
import pytest
import torch

from geotrain import errors
from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.orchestrator import server as server_module
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.server import create_server
from geotrain.wire import transport
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome
from geotrain.worker.client import CoordinatorClient


@pytest.fixture
def coordinator():
    started = []

    def start(**cfg):
        engine = CoordinatorEngine(EngineConfig(**cfg))
        server, port = create_server(engine)
        started.append(server)
        return engine, f"127.0.0.1:{port}"

    yield start
    for s in started:
        s.stop(0)


def client(address, site, timeout_s=10.0):
    return CoordinatorClient(address, site, timeout_s=timeout_s, retry_deadline_s=0.5)


def refused(fn, cls, outcome):
    with pytest.raises(errors.GeotrainError) as info:
        fn()
    assert type(info.value) is cls and info.value.outcome is outcome, (type(info.value), info.value.outcome, info.value)
    return info.value


def in_background(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end
        time.sleep(0.01)


def check_every_refusal(start):
    engine, address = start(sites=("a", "b"), round_timeout_s=30.0)
    a, b = client(address, "a"), client(address, "b")
    refused(lambda: client(address, "mars").join(1), errors.GeotrainError, Outcome.NOT_IN_TOPOLOGY)
    a.init_model(torch.zeros(4))
    in_background(lambda: a.merge(torch.ones(4), round=0, kind="pseudo_grad"))
    wait_for(lambda: "a" in engine.state.arrived)
    refused(lambda: a.merge(torch.ones(4), round=0, kind="pseudo_grad"), errors.StaleRound, Outcome.DUPLICATE)
    refused(lambda: b.merge(torch.ones(4), round=3, kind="pseudo_grad"), errors.StaleRound, Outcome.FUTURE)
    refused(lambda: b.merge(torch.ones(4), round=0, kind="pseudo_grad", fragment=2), errors.GeotrainError,
            Outcome.INVALID)
    b.merge(torch.ones(4), round=0, kind="pseudo_grad")
    refused(lambda: b.merge(torch.ones(4), round=0, kind="pseudo_grad"), errors.StaleRound, Outcome.STALE)
    refused(lambda: a.get_model(what="grads"), errors.GeotrainError, Outcome.INVALID)
    impatient = client(address, "a", timeout_s=0.2)
    exc = refused(lambda: impatient.get_model(min_version=9), errors.CoordinatorUnavailable, Outcome.UNAVAILABLE)
    assert "DEADLINE_EXCEEDED" in str(exc)  # the server's deadline, retried until the client's ran out

    engine, address = start(sites=("a", "b"), round_timeout_s=0.2, min_sites=1)
    a, b = client(address, "a"), client(address, "b")
    a.init_model(torch.zeros(4))
    a.merge(torch.ones(4), round=0, kind="pseudo_grad")  # committed without b: b leaves the membership
    refused(lambda: b.merge(torch.ones(4), round=1, kind="pseudo_grad"), errors.StaleRound, Outcome.NOT_MEMBER)

    engine, address = start(sites=("a", "b"), round_timeout_s=0.3, min_sites=2)
    a = client(address, "a")
    a.init_model(torch.zeros(4))
    refused(lambda: a.merge(torch.ones(4), round=0, kind="pseudo_grad"), errors.QuorumLost, Outcome.ROUND_FAILED)

    engine, address = start(sites=("a",), rings=True)
    a = client(address, "a")
    a.init_model(torch.zeros(4))
    a.merge(torch.ones(4), round=0, kind="pseudo_grad")
    refused(lambda: a.merge(torch.ones(4), round=0, kind="ring_mean", claimed_crc32=1), errors.RingAbandoned,
            Outcome.RING_ABANDONED)

    engine, address = start(sites=("a",))
    engine.on_commit = lambda rnd, version: False  # a newer coordinator exists
    a = client(address, "a")
    a.init_model(torch.zeros(4))
    refused(lambda: a.merge(torch.ones(4), round=0, kind="pseudo_grad"), errors.QuorumLost, Outcome.ROUND_FAILED)
    refused(lambda: a.merge(torch.ones(4), round=1, kind="pseudo_grad"), errors.CoordinatorUnavailable, Outcome.FENCED)

    bad = list(transport.encode(torch.ones(4), site="a", kind="pseudo_grad"))
    bad[0].crc32 ^= 1
    refused(lambda: a._call("Merge", lambda: a._decode(a._stub.Merge(iter(bad), timeout=5), "Merge")),
            errors.TransferCorrupt, Outcome.CORRUPT)

    engine, address = start(sites=("a",))
    a = client(address, "a")
    a.init_model(torch.zeros(4))
    refused(lambda: a.merge(torch.full((4,), float("nan")), round=0, kind="pseudo_grad"), errors.UpdateRefused,
            Outcome.INVALID_UPDATE)
    lying = list(transport.encode(torch.ones(1), site="a", kind="pseudo_grad"))  # declares 1 GiB, sends 4 bytes
    lying[0].header.total_bytes, lying[0].header.numel = 1 << 30, 0
    exc = refused(lambda: a._call("Merge", lambda: a._decode(a._stub.Merge(iter(lying), timeout=5), "Merge")),
                  errors.GeotrainError, Outcome.INVALID)
    assert "declares 1073741824 bytes" in str(exc) or "ceci" in str(exc)
    assert a.status().round == 0  # still answering


def test_each_refusal_arrives_as_its_exception_with_its_outcome(coordinator):
    check_every_refusal(coordinator)


def test_reworded_reasons_change_nothing(coordinator, monkeypatch):
    original, calls = server_module.refuse, []

    def reworded(context, r):
        calls.append(r.outcome)
        r.message = "ceci n'est pas une raison: stale duplicate round_failed"
        original(context, r)

    monkeypatch.setattr(server_module, "refuse", reworded)
    check_every_refusal(coordinator)
    assert len(set(calls)) == 12  # every outcome but OK went through the rewording


def test_the_refusal_travels_in_the_trailing_metadata(coordinator):
    engine, address = coordinator(sites=("a",))
    channel = grpc.insecure_channel(address)
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(site="mars"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        (value,) = [v for k, v in info.value.trailing_metadata() if k == REFUSAL_KEY]
        r = pb.Refusal.FromString(value)
        assert (r.outcome, r.site, r.round) == (pb.OUTCOME_NOT_IN_TOPOLOGY, "mars", -1) and "mars" in r.reason
    finally:
        channel.close()


def test_errors_without_a_refusal_are_known_by_status_code_only():
    engine = CoordinatorEngine(EngineConfig(sites=("a",)))
    server, port = create_server(engine)
    try:
        a = client(f"127.0.0.1:{port}", "a")
        a.init_model(torch.zeros(4))
        engine.model = lambda *args: (_ for _ in ()).throw(RuntimeError("a bug in the coordinator"))
        exc = refused(lambda: a.get_model(), errors.GeotrainError, None)  # UNKNOWN: no outcome, not retried
        assert "UNKNOWN" in str(exc)
    finally:
        server.stop(0).wait()
    refused(lambda: a.status(), errors.CoordinatorUnavailable, Outcome.UNAVAILABLE)  # nobody answers any more
