"""The star exchange's handling of a refused or failed Merge, against a scripted client.

The client raises what geotrain.wire.outcomes.error_for makes of each outcome (the one place a
refusal becomes an exception), so these tests follow the typed path, never message text.
"""

from dataclasses import dataclass, field

import pytest
import torch

from geotrain.errors import CoordinatorUnavailable, GeotrainError, StaleRound
from geotrain.events import EventLog
from geotrain.wire.outcomes import Outcome, error_for
from geotrain.worker.exchange import star as star_mod
from geotrain.worker.exchange.star import StarExchange


@dataclass
class FakePayload:
    values: torch.Tensor
    version: int
    kind: str = "params"
    ring_round: int = 0

    def tensor(self) -> torch.Tensor:
        return self.values

    @property
    def wire_bytes(self) -> int:
        return self.values.numel() * 4


@dataclass
class FakeJoin:
    start_version: int
    fragment_rounds: tuple = ()
    has_model: bool = True
    site_merges: int = 0
    round: int = 0
    epoch: int = 0


@dataclass
class FakeClient:
    """Answers Merge from ``script`` (an exception to raise or a payload to return), records every call."""

    script: list
    model: torch.Tensor
    model_version: int = 7
    join_answer: FakeJoin = field(default_factory=lambda: FakeJoin(start_version=7))
    calls: list = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0

    def merge(self, flat, round, kind, version=0, *, encoded=None, fragment=0, claimed_crc32=0):
        self.calls.append(("merge", round, version, fragment, None if encoded is None else encoded.payload,
                           None if flat is None else flat.clone()))
        what = self.script.pop(0)
        if isinstance(what, BaseException):
            raise what
        return what

    def get_model(self, min_version=0, what="params"):
        self.calls.append(("get_model", min_version))
        return FakePayload(self.model.clone(), self.model_version, ring_round=3)

    def join(self, workers, model_spec=""):
        self.calls.append(("join", workers))
        return self.join_answer

    def close(self):
        self.calls.append(("close",))


class Events(EventLog):
    def __init__(self):
        super().__init__(None, "test")
        self.seen = []

    def emit(self, event, **fields):
        self.seen.append((event, fields))
        return {}

    def kinds(self):
        return [e for e, _ in self.seen]


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(star_mod.time, "sleep", slept.append)
    return slept


def star(client, codec="fp32", deadline_s=60.0):
    events = Events()
    return StarExchange(client, site="eu", workers=2, codec=codec, block=4, error_feedback=True,
                        retry_deadline_s=deadline_s, events=events), events


UPDATE = torch.arange(6, dtype=torch.float32) / 10
BASE = torch.ones(6)


def test_a_committed_merge_returns_the_new_model_and_its_bytes():
    answer = FakePayload(torch.full((6,), 2.0), 5, ring_round=4)
    ex, events = star(FakeClient([answer], model=torch.zeros(6)))
    got = ex.exchange(UPDATE, BASE, round=4, base_version=4)
    assert torch.equal(got.new, torch.full((6,), 2.0)) and got.version == 5
    assert (got.payload_bytes, got.wire_bytes, got.resumes_at) == (24, 24, None)
    assert ex.ring_round == 4 and events.seen == []


def test_a_delta_answer_is_added_to_the_base():
    ex, _ = star(FakeClient([FakePayload(torch.full((6,), 0.5), 5, kind="delta")], model=torch.zeros(6)))
    assert torch.equal(ex.exchange(UPDATE, BASE, round=4, base_version=4).new, torch.full((6,), 1.5))


def test_quorum_lost_sends_the_same_update_again_with_a_round_retry_event(no_sleep):
    client = FakeClient([error_for(Outcome.ROUND_FAILED, "round 4 failed"), FakePayload(torch.ones(6), 5)],
                        model=torch.zeros(6))
    ex, events = star(client, codec="int8")
    got = ex.exchange(UPDATE, BASE, round=4, base_version=4)
    assert got.version == 5
    sent = [c for c in client.calls if c[0] == "merge"]
    assert len(sent) == 2 and sent[0][4] == sent[1][4]  # the same encoded bytes, error feedback not applied twice
    assert events.kinds() == ["round_retry"] and no_sleep == [0.2]


def test_an_unreachable_coordinator_is_retried_with_one_failure_and_one_recovery(no_sleep):
    down = [error_for(Outcome.UNAVAILABLE, "down") for _ in range(3)]
    client = FakeClient([*down, FakePayload(torch.ones(6), 5)], model=torch.zeros(6))
    ex, events = star(client)
    assert ex.exchange(UPDATE, BASE, round=4, base_version=4).version == 5
    assert events.kinds() == ["failure", "recovery"] and no_sleep == [0.2, 0.4, 0.8]
    assert events.seen[1][1]["rounds_lost"] == 0


def test_past_the_retry_deadline_the_error_is_raised():
    client = FakeClient([error_for(Outcome.UNAVAILABLE, "down")], model=torch.zeros(6))
    ex, events = star(client, deadline_s=0.0)
    with pytest.raises(CoordinatorUnavailable):
        ex.exchange(UPDATE, BASE, round=4, base_version=4)
    assert events.kinds() == ["failure"]


def test_a_duplicate_fetches_the_commit_after_the_known_version():
    client = FakeClient([error_for(Outcome.DUPLICATE, "duplicate update")], model=torch.arange(6.0), model_version=5)
    ex, events = star(client, codec="int8")
    ex.encoder.encode(UPDATE, 0)  # error feedback from an earlier round
    got = ex.exchange(UPDATE, BASE, round=4, base_version=4, fetch_after=4)
    assert ("get_model", 5) in client.calls and ("join", 2) not in client.calls
    assert torch.equal(got.new, torch.arange(6.0)) and got.version == 5 and got.payload_bytes == 0
    assert events.kinds() == [] and ex.ring_round == 3
    assert 0 not in ex.encoder._feedback  # what error feedback held belonged to the refused update


@pytest.mark.parametrize("outcome", [Outcome.STALE, Outcome.FUTURE, Outcome.NOT_MEMBER])
def test_a_refused_update_is_discarded_and_the_site_rejoins(outcome):
    client = FakeClient([error_for(outcome, "refused")], model=torch.arange(12.0), model_version=9,
                        join_answer=FakeJoin(start_version=9, fragment_rounds=(3, 2)))
    ex, events = star(client)
    got = ex.exchange(UPDATE, BASE, round=2, base_version=2, fragment=1, part=slice(6, 12))
    assert client.calls[1:] == [("join", 2), ("get_model", 9)]
    assert torch.equal(got.new, torch.arange(6.0, 12.0)) and got.version == 9 and got.resumes_at == 2
    assert events.kinds() == ["merge_discarded"] and events.seen[0][1]["round"] == 2


def test_an_error_without_an_outcome_is_raised_at_once():
    client = FakeClient([GeotrainError("a bug"), FakePayload(torch.ones(6), 5)], model=torch.zeros(6))
    ex, events = star(client)
    with pytest.raises(GeotrainError, match="a bug"):
        ex.exchange(UPDATE, BASE, round=4, base_version=4)
    assert len(client.calls) == 1 and events.seen == []


def test_the_refusal_is_read_from_the_outcome_not_the_message():
    """A StaleRound whose text says 'duplicate' but whose outcome is STALE rejoins (and the other way round)."""
    client = FakeClient([error_for(Outcome.STALE, "duplicate?")], model=torch.zeros(6))
    ex, events = star(client)
    ex.exchange(UPDATE, BASE, round=4, base_version=4)
    assert events.kinds() == ["merge_discarded"]
    bare = StaleRound("stale: no outcome attached")
    client = FakeClient([bare], model=torch.zeros(6))
    ex, _ = star(client)
    with pytest.raises(StaleRound):
        ex.exchange(UPDATE, BASE, round=4, base_version=4)


def test_join_provides_the_initial_model_when_the_coordinator_has_none():
    client = FakeClient([], model=torch.arange(6.0), model_version=0,
                        join_answer=FakeJoin(start_version=0, fragment_rounds=(0,), has_model=False, site_merges=2))
    inits = []
    client.init_model = lambda flat: inits.append(flat.clone()) or True
    ex, events = star(client)
    joined = ex.join(torch.ones(6))
    assert len(inits) == 1 and torch.equal(inits[0], torch.ones(6))
    assert (joined.version, joined.site_merges, joined.fragment_rounds) == (0, 2, (0,))
    assert events.kinds() == ["site_ready"] and ex.ring_round == 3


def test_sync_diloco_after_a_duplicate_waits_for_the_commit_of_its_own_round():
    """A site that joined at version 0 and is at round 3 when its update comes back DUPLICATE (the
    coordinator has it; the answer was lost) must wait for version 4, the commit of round 3, not take
    whatever version > 0 the coordinator holds now (that made the site redo round 3)."""
    from geotrain.worker.algorithms import Site, SyncDiLoCo
    from geotrain.worker.context import SiteContext
    from geotrain.worker.site_group import SiteGroup

    model = torch.nn.Linear(2, 3)
    params = list(model.parameters())
    client = FakeClient([error_for(Outcome.DUPLICATE, "eu already contributed to round 3")],
                        model=torch.zeros(9), model_version=4)
    ex, events = star(client)
    ctx = SiteContext(run="r", site="eu", rank=0, workers=1, coordinator="127.0.0.1:1")
    algo = SyncDiLoCo(Site(ctx, SiteGroup(1, 0, "cpu"), params, 2, events, ex, ex))
    algo.global_flat = torch.zeros(9)
    algo.version, algo.round, algo.local_step = 0, 3, 8  # joined at version 0, now merging round 3
    assert algo.due() and algo.sync()
    assert ("get_model", 4) in client.calls
    assert algo.round == 4
