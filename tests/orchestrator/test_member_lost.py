"""A member declared dead does not hold up the round (issue #14): the engine's member_lost, the etcd
membership watch's bookkeeping (orchestrator.membership), and ReportLost's authorization."""

import threading

import torch

from geotrain.orchestrator.authz import authorize
from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.membership import Members
from geotrain.orchestrator.results import Update
from tests.orchestrator.recorded import Events


def two_sites(**cfg):
    # the clock stands still: the round's 120 s deadline never passes, only member_lost can end the wait
    e = CoordinatorEngine(EngineConfig(sites=("a", "b"), min_sites=1, **cfg), events=Events(), clock=lambda: 2.0)
    e.join("a", 1, pid=11, now=0.0)
    e.join("b", 1, pid=22, now=0.0)
    e.init_model("a", torch.zeros(4))
    return e


def waiting_merge(e, site="a"):
    """``site``'s update for round 0, merged on a thread (it blocks until the round commits)."""
    out = {}
    u = Update(site=site, round=0, kind="pseudo_grad", version=0, values=torch.ones(4))
    t = threading.Thread(target=lambda: out.setdefault("r", e.merge(u, now=1.0, is_active=lambda: "stop" not in out)))
    t.start()
    return t, out


def test_the_round_commits_with_the_survivor_when_the_other_is_reported_dead():
    e = two_sites()
    t, out = waiting_merge(e)
    t.join(timeout=0.5)
    assert t.is_alive(), "the merge must wait for b while b is a member"
    d = e.member_lost("b", 22, "signal SIGKILL", now=2.0, source="supervisor")
    t.join(timeout=10)
    assert d.action == "drop_lost" and not t.is_alive()
    assert out["r"].round == 0 and e.state.round == 1 and e.state.expected == frozenset({"a"})
    assert e.events.of("commit")[0]["sites"] == ["a"]
    assert e.events.of("member_lost")[0]["action"] == "drop_lost"


def test_a_report_about_an_older_incarnation_changes_nothing():
    e = two_sites()
    e.join("b", 1, pid=33, now=0.5)  # b restarted and joined again as pid 33
    t, out = waiting_merge(e)
    d = e.member_lost("b", 22, "its lease ended", now=2.0, source="lease")
    t.join(timeout=0.5)
    assert d.action == "ignore" and "older incarnation" in d.reason and t.is_alive()
    out["stop"] = True  # the waiting merge gives up (the caller went away)
    t.join(timeout=10)
    assert e.state.expected == frozenset({"a", "b"})


def test_min_sites_keeps_the_round_waiting():
    e = CoordinatorEngine(EngineConfig(sites=("a", "b"), min_sites=2), events=Events())
    e.join("a", 1, pid=11, now=0.0)
    e.join("b", 1, pid=22, now=0.0)
    d = e.member_lost("b", 22, "killed", now=1.0, source="supervisor")
    assert d.action == "keep_waiting" and e.state.expected == frozenset({"a", "b"})


def test_async_and_ddp_have_no_round_to_go_on_without_it():
    for algorithm in ("async-diloco", "ddp"):
        e = CoordinatorEngine(EngineConfig(sites=("a", "b"), min_sites=1, algorithm=algorithm), events=Events())
        e.join("b", 1, pid=22, now=0.0)
        assert e.member_lost("b", 22, "killed", now=1.0, source="supervisor").action == "ignore"


def test_a_second_report_of_the_same_death_is_ignored():
    e = two_sites()
    assert e.member_lost("b", 22, "killed", now=1.0, source="supervisor").action == "drop_lost"
    assert e.member_lost("b", 22, "lease ended", now=4.0, source="lease").action == "ignore"


def test_streaming_lanes_each_stop_waiting():
    e = CoordinatorEngine(EngineConfig(sites=("a", "b"), min_sites=1, algorithm="streaming-diloco", fragments=2),
                          events=Events())
    e.join("a", 1, pid=11, now=0.0)
    e.join("b", 1, pid=22, now=0.0)
    e.member_lost("b", 22, "killed", now=1.0, source="supervisor")
    assert all(lane.state.expected == frozenset({"a"}) for lane in e.lanes)


# ---- the etcd watch's bookkeeping ----

def test_a_leader_key_deleted_is_a_death_of_the_pid_last_put():
    m = Members(ttl_s=3.0)
    m.seed({"eu": {0: {"pid": 5}, 1: {"pid": 6}}})
    assert m.observe("put", "members/eu/0", {"pid": 7}) is None  # a restarted leader took the key over
    lost = m.observe("delete", "members/eu/0", None)
    assert (lost.site, lost.pid) == ("eu", 7) and "3s" in lost.reason
    assert m.observe("delete", "members/eu/0", None) is None  # nothing left to judge: not twice
    assert m.observe("delete", "members/eu/1", None) is None  # a non-leader: its leader's key decides
    assert m.observe("delete", "members/us/0", None) is None  # never seen put: cannot tell which incarnation
    assert m.observe("delete", "state", None) is None and m.observe("delete", "members/x", None) is None


def test_seeding_never_overrides_a_newer_put():
    m = Members(ttl_s=3.0)
    m.observe("put", "members/eu/0", {"pid": 9})
    m.seed({"eu": {0: {"pid": 5}}})
    assert m.observe("delete", "members/eu/0", None).pid == 9


def test_a_value_without_a_usable_pid_is_not_remembered():
    m = Members(ttl_s=3.0)
    for value in ({"pid": "7"}, {"pid": True}, None, {}):
        m.observe("put", "members/eu/0", value)
        assert m.observe("delete", "members/eu/0", None) is None


# ---- who may report a death ----

def test_report_lost_is_for_the_launcher_and_a_site_about_itself():
    sites = frozenset({"eu", "us"})
    assert authorize("ReportLost", "launcher", "eu", sites=sites)
    assert authorize("ReportLost", "site.eu", "eu", sites=sites)
    assert not authorize("ReportLost", "site.us", "eu", sites=sites)  # a site cannot drop another
    assert not authorize("ReportLost", "launcher", "mars", sites=sites)
    assert not authorize("ReportLost", "coordinator", "eu", sites=sites)
    assert not authorize("ReportLost", None, "eu", sites=sites)


class FakeControl:
    """The two ControlPlane calls watch_members makes (a test seam; the real watch is in the recovery tests)."""

    def __init__(self, members):
        self._members = members
        self.callback = None

    def watch_prefix(self, prefix, callback):
        assert prefix == "members/"
        self.callback = callback
        return lambda: None

    def members(self):
        return self._members


def test_a_lease_loss_counts_only_if_the_key_stays_gone_for_the_grace():
    import time

    from geotrain.orchestrator.membership import watch_members

    control, seen = FakeControl({"eu": {0: {"pid": 5}}, "us": {0: {"pid": 6}}}), []
    cancel = watch_members(control, ttl_s=3.0, on_lost=seen.append, grace_s=0.3)
    control.callback("delete", "members/eu/0", None)  # etcd was frozen: every lease ended at once ...
    control.callback("delete", "members/us/0", None)
    control.callback("put", "members/eu/0", {"pid": 5})  # ... and eu, alive, registered again at once
    time.sleep(1.0)
    cancel()
    assert [(lost.site, lost.pid) for lost in seen] == [("us", 6)]
