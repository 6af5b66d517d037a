"""The coordinator servicer with real gRPC on loopback: failed rounds reopen, results are encoded once."""

import threading

import grpc
import pytest
import torch

from geotrain.errors import QuorumLost, StaleRound
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.server import create_server
from geotrain.worker.client import CoordinatorClient


def test_a_failed_round_reopens_and_late_updates_start_a_new_attempt():
    service = CoordinatorEngine(EngineConfig(sites=("a", "b", "c"), algorithm="ddp", round_timeout_s=0.5, min_sites=3))
    server, port = create_server(service)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        with pytest.raises(QuorumLost, match="fewer than the 3 required"):
            a.merge(torch.ones(4), round=0, kind="grad")
        assert service.lanes[0].attempt == 1 and not service.state.arrived  # reopened, nothing left behind
        results = {}

        def send(name, value):
            results[name] = CoordinatorClient(f"127.0.0.1:{port}", name, timeout_s=10).merge(
                torch.full((4,), value), round=0, kind="grad").tensor()

        threads = [threading.Thread(target=send, args=(n, v)) for n, v in (("a", 1.0), ("b", 2.0), ("c", 6.0))]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        assert all(torch.equal(r, torch.full((4,), 3.0)) for r in results.values()) and len(results) == 3
        assert service.state.round == 1
    finally:
        server.stop(0)


def test_async_coordinator_counts_each_sites_merges_across_a_restart(tmp_path):
    """A restarted async site goes on from the merges the coordinator applied for it (persisted with
    every commit), so that it makes `rounds` merges in all, not `rounds` more."""
    from geotrain.orchestrator.persist import StateStore

    cfg = EngineConfig(sites=("a", "b"), algorithm="async-diloco")
    store = StateStore(tmp_path / "state")
    service = CoordinatorEngine(cfg, store=store)
    server, port = create_server(service)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        b = CoordinatorClient(f"127.0.0.1:{port}", "b", timeout_s=10)
        assert a.join(1).site_merges == 0
        a.init_model(torch.zeros(4))
        for i in range(3):  # an async update's round is the site's own merge count
            a.merge(torch.ones(4), round=i, kind="pseudo_grad", version=service.version)
        b.merge(torch.ones(4), round=0, kind="pseudo_grad", version=service.version)
        assert (a.join(1).site_merges, b.join(1).site_merges) == (3, 1)
        with pytest.raises(StaleRound, match="duplicate"):  # a retry of a's update 2: never applied twice
            a.merge(torch.ones(4), round=2, kind="pseudo_grad", version=service.version)
        assert service.version == 4
    finally:
        server.stop(0)
    restarted = CoordinatorEngine(cfg, store=store, resume=store.load())
    server, port = create_server(restarted)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        assert a.join(1).site_merges == 3 and restarted.version == 4
    finally:
        server.stop(0)


def test_async_restart_keeps_delayed_nesterovs_pending_updates(tmp_path):
    """Delayed Nesterov folds every N updates into its momentum; the ones not yet folded in are
    persisted with each commit, so a coordinator restarted between two updates ends where an
    uninterrupted one does, bit for bit."""
    from geotrain.config.topology import OuterOptimizerConfig
    from geotrain.orchestrator.persist import StateStore

    cfg = EngineConfig(sites=("a", "b"), algorithm="async-diloco", outer=OuterOptimizerConfig(lr=0.7, momentum=0.9))
    updates = [("a", 0, torch.tensor([1.0, -2.0, 0.5])), ("b", 0, torch.tensor([0.25, 1.0, -1.0])),
               ("a", 1, torch.tensor([2.0, 0.5, 0.0])), ("b", 1, torch.tensor([-1.0, 3.0, 1.5]))]

    def apply(service, port, todo):
        for site, rnd, delta in todo:
            CoordinatorClient(f"127.0.0.1:{port}", site, timeout_s=10).merge(
                delta, round=rnd, kind="pseudo_grad", version=service.version)

    straight = CoordinatorEngine(cfg)
    server, port = create_server(straight)
    try:
        CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10).init_model(torch.zeros(3))
        apply(straight, port, updates)
    finally:
        server.stop(0)

    store = StateStore(tmp_path / "state")
    first = CoordinatorEngine(cfg, store=store)
    server, port = create_server(first)
    try:
        CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10).init_model(torch.zeros(3))
        apply(first, port, updates[:3])  # the third update is pending: not yet in the momentum
        assert first.async_outer.count == 1
    finally:
        server.stop(0)
    resumed = store.load()
    assert resumed.pending_count == 1 and resumed.pending is not None
    restarted = CoordinatorEngine(cfg, store=store, resume=resumed)
    server, port = create_server(restarted)
    try:
        apply(restarted, port, updates[3:])
    finally:
        server.stop(0)
    assert restarted.version == straight.version == 4
    assert torch.equal(restarted.params, straight.params)
    assert torch.equal(restarted.async_outer.buf, straight.async_outer.buf)


def test_star_answer_tells_ring_leaders_when_to_rebuild_and_serves_the_outer_momentum():
    """In a ring run, a round merged through the star by every site answers with the round at which
    the leaders rebuild their rings; GetModel(what=momentum) gives them the outer momentum to mirror."""
    from geotrain.errors import GeotrainError

    cfg = EngineConfig(sites=("a", "b"), rings=True)
    service = CoordinatorEngine(cfg)
    server, port = create_server(service)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        a.init_model(torch.zeros(4))
        answers = {}

        def send(name, value):
            answers[name] = CoordinatorClient(f"127.0.0.1:{port}", name, timeout_s=10).merge(
                torch.full((4,), value), round=0, kind="pseudo_grad")

        threads = [threading.Thread(target=send, args=(n, v)) for n, v in (("a", 1.0), ("b", 3.0))]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        assert {n: p.ring_round for n, p in answers.items()} == {"a": 1, "b": 1}
        assert a.get_model(min_version=1).ring_round == 1  # for a leader whose Merge answer was lost
        m = a.get_model(min_version=1, what="momentum")
        assert m.version == 1 and torch.equal(m.tensor(), service.outer.buf)
        assert not torch.equal(m.tensor(), torch.zeros(4))
        with pytest.raises(GeotrainError, match="unknown what='grads'"):
            a.get_model(min_version=1, what="grads")
    finally:
        server.stop(0)


def test_star_answer_of_a_round_without_every_site_does_not_rebuild_rings():
    cfg = EngineConfig(sites=("a", "b"), rings=True, round_timeout_s=0.3, min_sites=1)
    service = CoordinatorEngine(cfg)
    server, port = create_server(service)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10)
        a.init_model(torch.zeros(4))
        p = a.merge(torch.ones(4), round=0, kind="pseudo_grad")  # b is silent: committed without it
        assert p.version == 1 and p.ring_round == 0
    finally:
        server.stop(0)
