"""The coordinator engine without sockets: typed results, typed refusals, one bounded round log."""

import pytest
import torch

from geotrain.config.topology import OuterOptimizerConfig
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.lanes import KEEP_ROUNDS, RoundLog
from geotrain.orchestrator.outer import OuterOptimizer
from geotrain.orchestrator.results import Refused, Update
from geotrain.wire import transport
from geotrain.wire.compress import decode
from geotrain.wire.outcomes import Outcome
from tests.orchestrator.recorded import Events


def engine(**cfg):
    e = CoordinatorEngine(EngineConfig(**{"sites": ("a",), **cfg}), events=Events(), clock=lambda: 100.0)
    return e


def update(rnd, values=None, site="a", kind="pseudo_grad", **kw):
    return Update(site=site, round=rnd, kind=kind, version=rnd, values=values, **kw)


def merge(e, u):
    return e.merge(u, now=100.0, is_active=lambda: True)


def test_a_star_commit_is_the_outer_step_of_the_mean():
    e = engine()
    e.init_model("a", torch.zeros(4))
    r = merge(e, update(0, torch.ones(4)))
    ref = OuterOptimizer(OuterOptimizerConfig()).step(torch.zeros(4), torch.ones(4))
    assert (r.kind, r.round, r.version, r.encoded) == ("params", 0, 1, None)
    assert torch.equal(r.values, ref) and r.crc32 == transport.fingerprint(ref) and r.wire_bytes == 16
    assert e.state.round == 1 and e.events.kinds()[-1] == "commit"


def test_a_compressed_commit_sends_the_encoded_change_and_applies_exactly_its_decoding():
    e = engine(codec="int8", block=4)
    e.init_model("a", torch.zeros(4))
    r = merge(e, update(0, torch.tensor([1.0, -2.0, 0.5, 0.25])))
    assert r.kind == "delta" and r.values is None and r.wire_bytes == len(r.encoded.payload)
    assert torch.equal(e.params, torch.zeros(4) + decode(r.encoded))


def test_a_ddp_commit_is_the_mean_gradient():
    e = engine(algorithm="ddp")
    r = merge(e, update(0, torch.full((3,), 2.0), kind="grad"))
    assert r.kind == "grad" and torch.equal(r.values, torch.full((3,), 2.0)) and e.params is None


def test_a_ring_round_commits_the_fingerprint_only_when_the_claims_match():
    e = engine(rings=True)
    e.init_model("a", torch.zeros(4))
    mean = torch.ones(4)
    r = merge(e, update(0, mean, kind="ring_mean", claimed_crc32=transport.fingerprint(mean)))
    assert r.kind == "ring_commit" and r.params_crc32 == transport.fingerprint(e.params) and r.wire_bytes == 0
    with pytest.raises(Refused) as info:  # a claim that is not the uploaded mean's: back to the star
        merge(e, update(1, mean, kind="ring_mean", claimed_crc32=7))
    assert info.value.outcome is Outcome.RING_ABANDONED
    assert [f["reason"] for k, f in e.events.seen if k == "round_failed"][0].startswith("ring round 1 cannot commit")
    with pytest.raises(Refused) as info:  # the round is now merged through the star: ring updates are refused
        merge(e, update(1, mean, kind="ring_mean", claimed_crc32=transport.fingerprint(mean)))
    assert info.value.outcome is Outcome.RING_ABANDONED
    assert merge(e, update(1, mean)).kind == "params"


def test_refusals_are_typed():
    e = engine(sites=("a", "b"))
    e.init_model("a", torch.zeros(2))
    cases = [(update(0, torch.ones(2), site="mars"), Outcome.NOT_MEMBER),
             (update(5, torch.ones(2)), Outcome.FUTURE),
             (update(0, torch.ones(2), fragment=3), Outcome.INVALID)]
    for u, outcome in cases:
        with pytest.raises(Refused) as info:
            merge(e, u)
        assert info.value.outcome is outcome and info.value.site == u.site
    with pytest.raises(Refused) as info:
        e.join("mars", 1, 1, now=0.0)
    assert info.value.outcome is Outcome.NOT_IN_TOPOLOGY
    with pytest.raises(Refused) as info:
        e.model(min_version=0, what="grads", timeout_s=1.0, is_active=lambda: True)
    assert info.value.outcome is Outcome.INVALID
    with pytest.raises(Refused) as info:
        e.model(min_version=9, what="", timeout_s=0.05, is_active=lambda: True)
    assert info.value.outcome is Outcome.UNAVAILABLE


def test_a_fenced_commit_fails_its_round_and_refuses_what_follows():
    e = CoordinatorEngine(EngineConfig(sites=("a",)), events=Events(), on_commit=lambda rnd, version: False)
    e.init_model("a", torch.zeros(2))
    with pytest.raises(Refused) as info:
        merge(e, update(0, torch.ones(2)))
    assert info.value.outcome is Outcome.ROUND_FAILED and "fenced off" in info.value.message and e.fenced
    with pytest.raises(Refused) as info:
        merge(e, update(1, torch.ones(2)))
    assert info.value.outcome is Outcome.FENCED


def test_async_duplicates_are_refused_and_results_carry_the_staleness():
    e = engine(sites=("a", "b"), algorithm="async-diloco")
    e.init_model("a", torch.zeros(2))
    merge(e, Update(site="a", round=0, kind="pseudo_grad", version=0, values=torch.ones(2)))
    r = merge(e, Update(site="b", round=0, kind="pseudo_grad", version=0, values=torch.ones(2)))
    assert (r.kind, r.round, r.version, r.staleness) == ("params", 1, 2, 1)
    with pytest.raises(Refused) as info:
        merge(e, Update(site="a", round=0, kind="pseudo_grad", version=2, values=torch.ones(2)))
    assert info.value.outcome is Outcome.DUPLICATE


def test_the_round_log_keeps_only_the_rounds_near_the_one_collected_whatever_arrives():
    e = engine()
    e.init_model("a", torch.zeros(2))
    lane = e.lanes[0]
    for rnd in range(12):
        merge(e, update(rnd, torch.ones(2)))
        for far in (rnd - 5, rnd + 7):  # a very stale and a far-future update: refused, nothing kept
            with pytest.raises(Refused):
                merge(e, update(far, torch.ones(2)))
        assert all(abs(r - lane.state.round) <= KEEP_ROUNDS for r in lane.log.rounds()), lane.log.rounds()
    assert lane.log.rounds() == [10, 11]


def test_the_round_log_rule_itself():
    log = RoundLog(keep=2)
    log.at(5, current=5).mode = "ring"
    assert log.at(0, current=5).mode is None and log.get(0) is None  # outside the window: not kept
    log.at(7, current=5)
    log.prune(current=8)
    assert log.rounds() == [7]
    log.prune(current=10)
    assert log.rounds() == []
