"""Faults at a rate (geotrain.run.fault_rate) and goodput (geotrain.run.summary.goodput)."""

import pytest

from geotrain.config.topology import parse_topology
from geotrain.run.fault_rate import FaultDraws, targets
from geotrain.run.summary import goodput

BASE = {"name": "t", "sites": [{"name": "a", "workers": 2}, {"name": "b", "workers": 1}],
        "links": {"default": {"bandwidth": "100mbit", "latency": "10ms"}}}


def topo(**fault_rate):
    return parse_topology({**BASE, "fault_rate": {"mtbf_s": 30, **fault_rate}})


def test_draws_are_seeded_spread_and_valid():
    t = topo(seed=7, kinds=["kill_worker", "freeze_site", "partition_link"])
    a = [d for _, d in zip(range(400), FaultDraws(t.fault_rate, t))]
    b = [d for _, d in zip(range(400), FaultDraws(t.fault_rate, t))]
    assert a == b
    times = [x for x, _ in a]
    assert times == sorted(times) and times[0] > 5.0  # start_after_s
    gaps = [y - x for x, y in zip(times, times[1:])]
    assert 24 < sum(gaps) / len(gaps) < 36  # mean gap ~ mtbf_s (400 draws)
    kinds = {s.kind for _, s in a}
    assert kinds == {"kill", "freeze", "partition"}
    assert all(s.duration_ms == 5000 for _, s in a if s.kind != "kill")
    other = [d for _, d in zip(range(5), FaultDraws(topo(seed=8).fault_rate, t))]
    assert other != a[:5]


def test_targets_follow_the_topology():
    t = topo()
    assert targets(t, "kill_worker") == [("kill", "worker a/0"), ("kill", "worker a/1"), ("kill", "worker b/0")]
    assert targets(t, "partition_link") == [("partition", "link a"), ("partition", "link b")]


def test_a_bad_rate_is_refused():
    from geotrain.errors import TopologyError

    with pytest.raises(TopologyError, match="fault_rate.mtbf_s"):
        parse_topology({**BASE, "fault_rate": {"mtbf_s": 0}})
    with pytest.raises(TopologyError, match="fault_rate.kinds"):
        parse_topology({**BASE, "fault_rate": {"mtbf_s": 5, "kinds": ["meteor"]}})


def test_goodput_counts_only_steps_whose_round_was_committed_with_the_site():
    t = parse_topology(BASE)
    steps = [{"event": "inner_step", "site": s, "round": r, "step": r + 1, "compute_s": 1.0}
             for s in ("a", "b") for r in (0, 1)]
    commits = [{"event": "commit", "round": 0, "sites": ["a", "b"]}, {"event": "commit", "round": 1, "sites": ["a"]}]
    g, u = goodput(steps + commits, t, wall_seconds=4.0)
    assert u == 0.5 and g == 0.375  # 3 useful of 4 compute seconds, over 2 sites x 4 s
    assert goodput(steps, t, wall_seconds=4.0)[0] == 0.0


def test_goodput_counts_a_step_redone_after_a_restart_once():
    """b dies during round 1 after its step 2 and, restarted, takes steps 2 and 3 of round 1 again: the first
    step 2 was lost work (compute, not goodput)."""
    t = parse_topology(BASE)
    step = lambda site, n, r: {"event": "inner_step", "site": site, "round": r, "step": n, "compute_s": 1.0}  # noqa: E731
    events = [step("a", 1, 0), step("b", 1, 0), {"event": "commit", "round": 0, "sites": ["a", "b"]},
              step("a", 2, 1), step("b", 2, 1), step("b", 2, 1), step("a", 3, 1), step("b", 3, 1),
              {"event": "commit", "round": 1, "sites": ["a", "b"]}]
    g, u = goodput(events, t, wall_seconds=4.0)
    assert u == 7 / 8 and g == 6 / 8
