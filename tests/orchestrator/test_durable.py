"""A round's answer streams while the round is made durable, and its last message waits for it.

The coordinator commits a round (the mean, the outer step, the answer's stream and CRC32s), and its
waiters start sending the answer at once; the state is persisted and the run state published in a
thread of its own meanwhile (CoordinatorEngine._make_durable). A site uses nothing of a stream before
its last message (the payload's CRC32 is of the whole), so holding that message back until the round
is durable keeps the rule "a restart never loses a round a site has", and a fenced coordinator's (or one
whose disk failed) round reaches nobody. Nothing else commits, joins or serves the model meanwhile.
"""

import threading

import pytest
import torch

from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.persist import StateStore
from geotrain.orchestrator.results import Refused, Update
from geotrain.wire.outcomes import Outcome
from tests.orchestrator.recorded import Events


class HeldStore(StateStore):
    """The state store, whose saves wait until the test lets them go (or fail, when told to)."""

    def __init__(self, directory, fail: Exception | None = None):
        super().__init__(directory)
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = fail
        self.saved = []

    def save(self, st):
        self.started.set()
        assert self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        self.saved.append((st.round, st.params.clone(), None if st.momentum is None else st.momentum.clone()))
        super().save(st)


def make(tmp_path, sites=("a", "b"), n=3 << 20, on_commit=None, fail=None):
    """An engine whose model is big enough (n floats, 4 bytes each) for its answer to take several messages."""
    store = HeldStore(tmp_path, fail=fail)
    e = CoordinatorEngine(EngineConfig(sites=sites), events=Events(), store=store, on_commit=on_commit)
    e.init_model(sites[0], torch.zeros(n))
    return e, store


def upd(site, rnd, values):
    return Update(site=site, round=rnd, kind="pseudo_grad", version=rnd, values=values)


def commit_round_0(e, n):
    """Both sites' round-0 updates, merged as the servicer does (durable=False): their results, at once."""
    results = {}

    def send(site):
        results[site] = e.merge(upd(site, 0, torch.full((n,), 1.0 if site == "a" else 3.0)), 100.0, lambda: True,
                                durable=False)

    threads = [threading.Thread(target=send, args=(s,)) for s in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert set(results) == {"a", "b"}
    return results


def test_the_answer_streams_before_the_round_is_durable_and_its_last_message_waits_for_it(tmp_path):
    n = 3 << 20  # 12 MiB: three 4 MiB messages
    e, store = make(tmp_path, n=n)
    results = commit_round_0(e, n)
    assert store.started.wait(5) and not store.saved  # the commit is being persisted, and is not yet
    messages = iter(e.answer_once(results["a"], lambda: pytest.fail("the round's record is kept")))
    first = [next(messages), next(messages)]  # all but the last go out now
    assert all(first) and e.lanes[0].log.get(0).durable is None
    got = []
    last = threading.Thread(target=lambda: got.append(next(messages)))
    last.start()
    last.join(0.3)
    assert last.is_alive() and not got  # the last message waits for the state to be durable
    assert not e.events.of("commit")  # the commit event says what is durable
    # meanwhile nothing is served of the new version, and nothing joins
    with pytest.raises(Refused) as info:
        e.model(min_version=1, what="", timeout_s=0.2, is_active=lambda: True)
    assert info.value.outcome is Outcome.UNAVAILABLE
    store.release.set()
    last.join(5)
    assert got and store.saved[0][0] == 1
    assert e.settle(5) and e.events.of("commit")[0]["round"] == 0
    commit = e.events.of("commit")[0]
    assert commit["answer_s"] <= commit["apply_s"] and "persist_s" in commit and "publish_s" in commit
    assert e.model(min_version=1, what="", timeout_s=1, is_active=lambda: True).version == 1
    with pytest.raises(StopIteration):
        next(messages)


def test_the_next_round_does_not_commit_before_the_last_is_durable_and_what_was_persisted_stays_its_own(tmp_path):
    """The next outer step writes the momentum in place: it must wait until the last one's state is written."""
    n = 1 << 10
    e, store = make(tmp_path, n=n)
    commit_round_0(e, n)
    momentum_0 = e.outer.buf.clone()
    params_0 = e.params.clone()
    done = []
    threads = [threading.Thread(target=lambda s=s: done.append(e.merge(upd(s, 1, torch.ones(n)), 100.0, lambda: True)))
               for s in ("a", "b")]
    for t in threads:
        t.start()
    threads[0].join(0.3)
    assert not done and e.version == 1  # both round-1 updates are in; the commit waits for round 0's durability
    store.release.set()
    for t in threads:
        t.join(10)
    assert len(done) == 2 and e.version == 2 and e.settle(5)
    rnd, params, momentum = store.saved[0]
    assert rnd == 1 and torch.equal(params, params_0) and torch.equal(momentum, momentum_0)
    assert [c["round"] for c in e.events.of("commit")] == [0, 1]


def test_a_fenced_commit_never_sends_its_last_message(tmp_path):
    n = 3 << 20
    e, store = make(tmp_path, n=n, on_commit=lambda rnd, version: False)
    results = commit_round_0(e, n)
    messages = iter(e.answer_once(results["b"], lambda: pytest.fail("the round's record is kept")))
    next(messages), next(messages)
    store.release.set()
    with pytest.raises(Refused) as info:
        next(messages)
    assert info.value.outcome is Outcome.ROUND_FAILED and "fenced off" in info.value.message
    assert e.fenced and e.events.of("fenced") and not e.events.of("commit")


def test_a_state_that_cannot_be_persisted_fails_the_round_names_why_and_stops_the_coordinator(tmp_path):
    n = 1 << 10
    e, store = make(tmp_path, n=n, fail=OSError(28, "No space left on device"))
    results = commit_round_0(e, n)
    store.release.set()
    messages = e.answer_once(results["a"], lambda: pytest.fail("the round's record is kept"))
    with pytest.raises(Refused) as info:
        list(messages)
    assert info.value.outcome is Outcome.ROUND_FAILED and "could not persist its state after round 0" in info.value.message
    assert "No space left on device" in e.failed  # geotrain coordinator exits on it; its restart resumes
    failure = e.events.of("failure")[-1]
    assert failure["what"] == "coordinator" and "No space left" in failure["reason"] and not e.events.of("commit")
    with pytest.raises(Refused) as info:  # the version that was never durable is never served
        e.model(min_version=1, what="", timeout_s=0.2, is_active=lambda: True)
    assert info.value.outcome is Outcome.UNAVAILABLE


def test_an_in_process_merge_returns_once_its_round_is_durable(tmp_path):
    n = 1 << 10
    e, store = make(tmp_path, sites=("a",), n=n)
    out = []
    t = threading.Thread(target=lambda: out.append(e.merge(upd("a", 0, torch.ones(n)), 100.0, lambda: True)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not out
    store.release.set()
    t.join(5)
    assert out[0].round == 0 and store.saved and e.events.of("commit")


def test_over_grpc_a_site_whose_round_could_not_be_persisted_is_told_why_and_holds_nothing_of_it(tmp_path):
    """The servicer's path (Merge answered through answer_once): the answer's first messages have gone out when the
    persist fails; the site gets a typed ROUND_FAILED naming the cause, never the round's weights."""
    from geotrain import errors
    from geotrain.orchestrator.server import create_server
    from geotrain.worker.client import CoordinatorClient

    n = 3 << 20
    store = HeldStore(tmp_path / "state", fail=OSError(5, "Input/output error"))
    e = CoordinatorEngine(EngineConfig(sites=("a",)), events=Events(), store=store)
    server, port = create_server(e)
    try:
        a = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=10.0, retry_deadline_s=0.5)
        a.init_model(torch.zeros(n))
        threading.Timer(0.3, store.release.set).start()
        with pytest.raises(errors.GeotrainError) as info:
            a.merge(torch.ones(n), round=0, kind="pseudo_grad")
        assert info.value.outcome is Outcome.ROUND_FAILED and "Input/output error" in str(info.value)
        with pytest.raises(errors.GeotrainError) as info:  # and nothing more from this coordinator
            a.merge(torch.ones(n), round=1, kind="pseudo_grad")
        assert info.value.outcome is Outcome.UNAVAILABLE
    finally:
        server.stop(0)


def _history(path, events, without_commits=False):
    import json

    path.write_text("".join(json.dumps({"t": 0.0, "event": k, **f}) + "\n" for k, f in events.seen
                            if not (without_commits and k == "commit")))
    return path


@pytest.mark.parametrize("algorithm", ["diloco", "async-diloco"])
def test_a_round_persisted_by_a_coordinator_killed_before_its_event_gets_the_event_at_the_restart(tmp_path, algorithm):
    # the window: the state is on disk (the round is committed for good) and the commit event is not yet written
    # when the coordinator is SIGKILLed; the history then counts a round too few. The state keeps the event, and
    # the restarted coordinator writes it when the history lacks it.
    from geotrain.orchestrator.main import lost_commit

    store = StateStore(tmp_path / "state")
    e = CoordinatorEngine(EngineConfig(sites=("a", "b"), algorithm=algorithm), events=Events(), store=store)
    e.init_model("a", torch.zeros(64))
    if algorithm == "diloco":
        commit_round_0(e, 64)
    else:
        e.merge(upd("a", 0, torch.full((64,), 1.0)), 100.0, lambda: True)
    assert e.settle(10)
    original = e.events.of("commit")[0]
    resume = StateStore(tmp_path / "state").load()
    assert resume.commit is not None and resume.commit["version"] == 1 and resume.commit["sites"] == original["sites"]
    full = _history(tmp_path / "full.jsonl", e.events)
    cut = _history(tmp_path / "cut.jsonl", e.events, without_commits=True)
    assert lost_commit(resume, full) is None  # the event was written: nothing to replay
    assert lost_commit(resume, cut) == resume.commit
    assert lost_commit(resume, tmp_path / "none.jsonl") == resume.commit
    again = CoordinatorEngine(EngineConfig(sites=("a", "b"), algorithm=algorithm, epoch=2), events=Events(),
                              store=StateStore(tmp_path / "state"), resume=resume)
    again.replay_commit(lost_commit(resume, cut))
    replayed = again.events.of("commit")[0]
    assert replayed["replayed"] is True and replayed["epoch"] == original["epoch"] == 0
    for k in ("round", "version", "sites", "crc32", "finite", "norm"):
        assert replayed[k] == original[k], k
