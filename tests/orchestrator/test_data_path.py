"""The coordinator's data path through real gRPC: updates received into their buffers, checked as they
arrive, folded into the round's running sum; the bad cases leave the running sum as it was."""

import threading
import time
import zlib

import grpc
import pytest
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.config.topology import OuterOptimizerConfig
from geotrain.events import EventLog, read_events
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.ingest import ValueCheck
from geotrain.orchestrator.limits import ServerLimits
from geotrain.orchestrator.outer import OuterOptimizer, mean_of
from geotrain.orchestrator.server import create_server
from geotrain.wire import transport
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome
from geotrain.worker.client import CoordinatorClient

N = 64


@pytest.fixture
def coordinator(tmp_path):
    started = []

    def start(sites=("a", "b", "c")):
        events = tmp_path / "events.jsonl"
        engine = CoordinatorEngine(EngineConfig(sites=sites, round_timeout_s=30.0), events=EventLog(events, "coordinator"))
        engine.init_model("a", torch.zeros(N))
        server, port = create_server(engine, limits=ServerLimits(min_chunk_bytes=16))  # the small chunks below
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return engine, f"127.0.0.1:{port}", pb_grpc.CoordinatorStub(channel), events

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)


def update(site, seed):
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 10 ** seed


def merge_in_background(address, site, values, results):
    def run():
        client = CoordinatorClient(address, site, timeout_s=30)
        try:
            results[site] = client.merge(values, round=0, kind="pseudo_grad").tensor()
        except Exception as exc:  # noqa: BLE001
            results[site] = exc
        finally:
            client.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def refusal_of(exc: grpc.RpcError) -> pb.Refusal:
    [raw] = [v for k, v in exc.trailing_metadata() or () if k == REFUSAL_KEY]
    return pb.Refusal.FromString(raw)


def expected_params(ups):
    return OuterOptimizer(OuterOptimizerConfig()).step(torch.zeros(N), mean_of(ups), round=0)


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a"), ("b", "c", "a")])
def test_three_sites_in_any_order_give_the_outer_step_of_the_sorted_mean_bit_for_bit(coordinator, order):
    engine, address, _, _ = coordinator()
    ups = {s: update(s, i) for i, s in enumerate(("a", "b", "c"))}
    results, threads = {}, []
    for k, site in enumerate(order):
        threads.append(merge_in_background(address, site, ups[site], results))
        if k < 2:
            wait_for(lambda: site in engine.state.arrived)
    for t in threads:
        t.join(30)
    want = expected_params(ups)
    assert all(torch.equal(results[s], want) for s in ups), results
    assert torch.equal(engine.params, want)


def nan_stream(values, at_chunk, chunk_bytes, release, taken):
    """Values whose chunk ``at_chunk`` holds a NaN; the stream blocks before its last message until ``release``."""
    bad = values.clone()
    bad[at_chunk * chunk_bytes // 4 + 1] = float("nan")
    msgs = list(transport.encode(bad, site="b", round=0, kind="pseudo_grad", chunk_bytes=chunk_bytes))
    for i, m in enumerate(msgs):
        if i == len(msgs) - 1:
            release.wait(20)
        taken.append(i)
        yield m


def test_a_nan_arriving_mid_stream_is_refused_before_the_stream_ends_and_the_sum_is_untouched(coordinator, monkeypatch):
    monkeypatch.setattr(ValueCheck, "piece", 4)  # pieces of 16 bytes: one per chunk below
    engine, address, stub, events = coordinator()
    ups = {s: update(s, i) for i, s in enumerate(("a", "b", "c"))}
    results = {}
    ta = merge_in_background(address, "a", ups["a"], results)
    wait_for(lambda: "a" in engine.state.arrived)
    lane = engine.lanes[0]
    before = lane.sum.total.clone()
    assert torch.equal(before, ups["a"])
    release, taken = threading.Event(), []
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Merge(nan_stream(ups["b"], 2, 16, release, taken), timeout=20))
    release.set()
    refusal = refusal_of(info.value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refusal.outcome == Outcome.INVALID_UPDATE
    assert "non_finite" in refusal.reason and len(taken) < N * 4 // 16  # refused before the end of the stream
    assert torch.equal(lane.sum.total, before) and lane.sum.sites() == {"a"}  # the running sum is untouched
    assert "b" not in engine.state.expected  # b failed the round (it may rejoin)
    refused = [e for e in read_events(events) if e["event"] == "merge_refused"]
    assert [(e["site"], e["action"]) for e in refused] == [("b", "non_finite")]
    tc = merge_in_background(address, "c", ups["c"], results)
    for t in (ta, tc):
        t.join(30)
    want = expected_params({"a": ups["a"], "c": ups["c"]})  # the round goes on with a and c
    assert torch.equal(results["a"], want) and torch.equal(results["c"], want)


def damaged(how):
    values = update("b", 1)
    msgs = list(transport.encode(values, site="b", round=0, kind="pseudo_grad", chunk_bytes=64))
    if how == "short":
        return msgs[:-1]
    if how == "oversized chunk":
        data = msgs[-1].data + b"\0" * 64
        msgs[-1] = pb.TensorChunk(offset=msgs[-1].offset, data=data, crc32=zlib.crc32(data))
    elif how == "wrong dtype":
        msgs[0].header.dtype = "float16"
    elif how == "damaged chunk":
        msgs[1].data = bytes([msgs[1].data[0] ^ 1]) + msgs[1].data[1:]
    return msgs


@pytest.mark.parametrize("how", ["short", "oversized chunk", "wrong dtype", "damaged chunk"])
def test_a_bad_stream_is_refused_corrupt_and_leaves_the_running_sum_as_it_was(coordinator, how):
    engine, address, stub, _ = coordinator()
    results = {}
    merge_in_background(address, "a", update("a", 0), results)
    wait_for(lambda: "a" in engine.state.arrived)
    before = engine.lanes[0].sum.total.clone()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Merge(iter(damaged(how)), timeout=20))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS and refusal_of(info.value).outcome == Outcome.CORRUPT
    lane = engine.lanes[0]
    assert torch.equal(lane.sum.total, before) and lane.sum.sites() == {"a"}
    assert engine.state.expected == {"a", "b", "c"}  # a damaged transfer is not a refused update: b may resend


def test_the_answer_is_serialized_once_for_every_site(coordinator):
    engine, address, _, _ = coordinator(sites=("a", "b"))
    results = {}
    threads = [merge_in_background(address, s, update(s, i), results) for i, s in enumerate(("a", "b"))]
    for t in threads:
        t.join(30)
    record = engine.lanes[0].log.get(0)
    made = list(record.wire.messages())
    assert len(made) == 1 and isinstance(made[0], bytes) and made[0] is next(record.wire.messages())
    assert torch.equal(results["a"], results["b"]) and engine.bytes_out == 2 * N * 4
    assert record.result.crc32 == transport.fingerprint(engine.params)


@pytest.mark.parametrize("value,finite", [(1e20, True), (3.4e38, True), (float("nan"), False), (float("inf"), False)])
def test_the_commit_digest_of_a_huge_but_finite_model_is_finite(value, finite):
    """The digest's float32 norm overflows for values above ~1e19; it is then summed in float64, so a
    finite model is never reported non-finite (and a non-finite one always is)."""
    engine = CoordinatorEngine(EngineConfig(sites=("a",)))
    values = torch.ones(16)
    values[3] = value
    digest = engine._digest(values, 0, 0, 0)
    assert digest["finite"] is finite and (digest["norm"] is None) is (not finite)
