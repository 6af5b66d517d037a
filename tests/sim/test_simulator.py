"""The simulator (geotrain.sim): hand-computed timings, the coordinator's own decisions, faults, the
front door, and calibration from a history."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from geotrain.analysis.check import VIOLATED, check_run
from geotrain.config.topology import parse_topology
from geotrain.errors import TopologyError
from geotrain.sim.calibrate import calibrate
from geotrain.sim.engine import Simulator
from geotrain.sim.model import SimParams

MB = 1_000_000


def topo(**training):
    sites = training.pop("sites", [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}])
    extra = training.pop("extra", {})
    return parse_topology({"name": "sim", "sites": sites, "links": {"default": {"bandwidth": "100mbit", "latency": "10ms"}},
                           "training": {"inner_steps": 5, "rounds": 2, **training}, **extra}, source="t.yaml")


def params(t, **kw):
    # 1 M fp32 parameters: 4 MB a merge each way = 0.32 s at 100 Mbit/s, plus 10 ms
    return SimParams.given(t, 1_000_000, 0.1, startup_s=2.0, restart_s=3.0, shutdown_s=1.0, init_bytes=0, **kw)


def of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_sync_rounds_take_compute_plus_the_links_model():
    t = topo()
    sim = Simulator(t, params(t))
    events = sim.run()
    merges = of(events, "merge")
    assert len(of(events, "commit")) == 2 and len(merges) == 4
    # up: 4 MB at 100 Mbit/s + 10 ms; down the same. Joining costs a's InitModel and fetch (10 ms each way) and
    # b's fetch (10 ms): a starts 10 ms after b, so b's first merge waits 10 ms for a's update, a's never waits
    merge = 2 * (4 * MB * 8 / 100e6 + 0.010)
    assert [m["seconds"] for m in merges if m["site"] == "a"] == pytest.approx([merge, merge], abs=1e-6)
    assert [m["seconds"] for m in merges if m["site"] == "b"][0] == pytest.approx(merge + 0.010, abs=1e-6)
    assert sim.now == pytest.approx(2.0 + 0.020 + 2 * (5 * 0.1 + merge) + 1.0, abs=1e-6)
    assert sim.link_stats()["link a<->hub"] == {"bytes_forward": 8 * MB, "bytes_backward": 8 * MB}


@pytest.mark.parametrize("streams", [1, 4, 64])
def test_a_lossy_link_is_the_flows_bound_and_streams_multiply_it(streams):
    """With loss each TCP flow gets MSS*1.22/(RTT*sqrt(loss)) (the emulator's model, per flow); a link striped over
    `streams` flows gets `streams` times that, never more than its bandwidth."""
    import math

    t = parse_topology({"name": "sim", "sites": [{"name": "a", "workers": 1}],
                        "links": {"default": {"bandwidth": "100mbit", "latency": "10ms", "loss": 0.0001,
                                              "streams": streams}},
                        "training": {"inner_steps": 5, "rounds": 1}}, source="t.yaml")
    sim = Simulator(t, params(t))
    events = sim.run()
    (merge,) = of(events, "merge")
    rate = min(100e6 / 8, streams * 1448 * 1.22 / (0.020 * math.sqrt(0.0001)))  # 8.8 MB/s per flow: 1 flow < 100 Mbit/s
    assert merge["seconds"] == pytest.approx(2 * (4 * MB / rate + 0.010), rel=0.02)  # + the retransmissions drawn


def test_a_slower_site_makes_the_other_wait_and_a_quorum_does_not():
    sites = [{"name": "a", "workers": 1}, {"name": "b", "workers": 1, "slowdown": 3.0}]
    t = topo(sites=sites)
    sync = Simulator(t, params(t)).run()
    wait_a = [m["seconds"] for m in of(sync, "merge") if m["site"] == "a"]
    assert wait_a[1] == pytest.approx(0.66 + 5 * 0.2, abs=1e-6)  # b's 1.0 s more of compute per round
    tq = topo(sites=sites, quorum={"min_sites": 1, "grace_s": 0.0})
    quorum = Simulator(tq, params(tq)).run()
    refused = of(quorum, "merge_refused")
    assert refused and all(r["site"] == "b" and r["action"] == "stale" for r in refused)  # round_ready's quorum
    assert all(c["sites"] == ["a"] for c in of(quorum, "commit"))


def test_a_killed_site_restarts_rejoins_and_the_history_passes_check(tmp_path):
    t = topo(rounds=4, extra={"faults": [{"kind": "kill", "target": "worker b/0", "at": "3s"}]})
    sim = Simulator(t, params(t))
    events = sim.run()
    assert [e["event"] for e in events if e["event"] in ("fault_injected", "failure", "recovery")] == \
        ["fault_injected", "failure", "recovery"]
    assert len({c["round"] for c in of(events, "commit")}) == 4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "topology.json").write_text(json.dumps(t.model_dump(mode="json")))
    verdicts = check_run(tmp_path)
    assert not [v for v in verdicts if v.status == VIOLATED], verdicts


def test_async_merges_one_site_at_a_time():
    t = topo(algorithm="async-diloco", rounds=3)
    events = Simulator(t, params(t)).run()
    commits = of(events, "commit")
    assert len(commits) == 6 and all(len(c["sites"]) == 1 for c in commits)
    assert [c["version"] for c in commits] == list(range(1, 7))


def test_streaming_sends_fragments_and_overlaps_them():
    t = topo(algorithm="streaming-diloco", inner_steps=8, rounds=2, streaming={"fragments": 4, "overlap_steps": 1})
    events = Simulator(t, params(t)).run()
    merges = of(events, "merge")
    assert len(merges) == 2 * 2 * 4 and {m["fragment"] for m in merges} == {0, 1, 2, 3}
    assert all(m["bytes_sent"] == MB for m in merges)  # a quarter of the model each


@pytest.mark.parametrize("extra, words", [
    ({"training": {"merge": "hierarchical"}}, "training.merge: hierarchical merges are not simulated"),
    ({"faults": [{"kind": "kill", "target": "etcd", "at": "1s"}]}, r"faults\[0\]: a failure of the etcd"),
    ({"training": {"merge": "ring"}, "faults": [{"kind": "kill", "target": "coordinator", "at": "1s"}]},
     "a coordinator failure in a merge: ring run is not simulated"),
    ({"faults": [{"kind": "freeze", "target": "coordinator", "at": "1s", "duration": "1s"}]},
     r"faults\[0\].kind: freeze of the coordinator is not simulated"),
    ({"faults": [{"kind": "degrade", "target": "link a", "at": "1s", "bandwidth": "1mbit", "duration": "1s"}]},
     r"faults\[0\].kind: degrade is not simulated"),
])
def test_what_is_not_simulated_is_refused_by_name(extra, words):
    raw = {"name": "sim", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}], **extra}
    t = parse_topology(raw, source="t.yaml")
    with pytest.raises(TopologyError, match=words):
        Simulator(t, params(t))


def test_calibration_reads_times_and_sizes_from_a_history(tmp_path):
    t = topo()
    events = Simulator(t, params(t, apply_s=0.02)).run()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got = calibrate(tmp_path, t)
    assert got.step_s == {"a": pytest.approx(0.1), "b": pytest.approx(0.1)}
    assert (got.up_bytes, got.down_bytes) == (4 * MB, 4 * MB) and got.apply_s == pytest.approx(0.02)
    assert got.overhead_s["a"] == pytest.approx(0.0, abs=1e-6) and got.shutdown_s == pytest.approx(1.0)


def test_the_front_door_writes_a_run_dir_that_report_and_check_read(tmp_path):
    from tests.integration.helpers import REPO

    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "simulate", str(REPO / "topologies" / "three-continents.yaml"),
                        "--params", "1e9", "--step-s", "0.8", "--set", "training.rounds=3", "--set",
                        "training.round_timeout_s=100000", "--run-dir", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["simulated"] and s["status"] == "completed" and s["rounds_completed"] == 3
    # a 1B-parameter fp32 model: 4 GB a merge each way on the 2 sites' links (the coordinator's site has none),
    # 3 rounds, and the initial model fetched by both
    assert s["wan_bytes"] == 2 * (3 * 2 + 1) * 4_000_000_000
    assert all(len(c["sites"]) == 3 for c in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
               if c["event"] == "commit")
    rep = subprocess.run([sys.executable, "-m", "geotrain.cli", "report", str(out)], capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0, rep.stderr
    bad = subprocess.run([sys.executable, "-m", "geotrain.cli", "simulate", str(REPO / "topologies" / "demo.yaml"),
                          "--calibrate", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not a run directory" in bad.stderr


def test_a_kill_during_a_restart_starts_the_restart_over():
    t = topo(rounds=4, extra={"faults": [{"kind": "kill", "target": "worker b/0", "at": "3s"},
                                         {"kind": "kill", "target": "worker b/0", "at": "4s"}]})
    events = Simulator(t, params(t)).run()
    recoveries = of(events, "recovery")
    assert len(of(events, "failure")) == 2 and len(recoveries) == 1
    assert recoveries[0]["recovered_t"] == pytest.approx(4.0 + 3.0)  # restart_s after the second kill
    assert len(of(events, "site_ready")) == 3  # a, b at start; b once after the restarts


# ---- the failures the simulator models since issue #17's second part: ddp, rings, the coordinator ----

UP = 4 * MB * 8 / 100e6 + 0.010  # a whole 1 M-parameter fp32 model over 100 Mbit/s, 10 ms: 0.33 s


def test_a_killed_coordinator_costs_its_restart_and_the_retry_backoff_and_no_round(tmp_path):
    # fault-free: round 1's updates leave at 3.68 s and the run ends at 5.34 s (the first test's transcript)
    t = topo(extra={"faults": [{"kind": "kill", "target": "coordinator", "at": "3.7s"}]})
    sim = Simulator(t, params(t, coordinator_restart_s=1.0))
    events = sim.run()
    # cut at 3.7 s, the sites retry on the worker's backoff (geotrain.worker.retry): 3.9 and 4.3 find it down,
    # 5.1 finds it back (up at 4.7) and sends round 1's update again: 5.1 + 0.33 up, commit, 0.33 down, 1 s shutdown
    assert sim.now == pytest.approx(5.1 + 2 * UP + 1.0, abs=1e-6)
    commits = of(events, "commit")
    assert [(c["round"], c["sites"], c["epoch"]) for c in commits] == [(0, ["a", "b"], 1), (1, ["a", "b"], 2)]
    assert [e["resumed"] for e in of(events, "coordinator_started")] == [False, True]
    assert {e["site"] for e in of(events, "recovery") if e["what"] == "coordinator"} == {"a", "b"}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "topology.json").write_text(json.dumps(t.model_dump(mode="json")))
    assert not [v for v in check_run(tmp_path) if v.status == VIOLATED]


def test_a_coordinator_out_of_restarts_fails_the_run():
    t = topo(extra={"faults": [{"kind": "kill", "target": "coordinator", "at": "3.7s"}],
                    "recovery": {"coordinator_failure": "fail"}})
    sim = Simulator(t, params(t))
    events = sim.run()
    assert events[-1]["status"] == "failed" and "coordinator_failure = fail" in events[-1]["reason"]


def test_ddp_merges_every_step_and_a_dead_site_costs_the_steps_it_misses():
    t = topo(algorithm="ddp", round_timeout_s=1.0, extra={"faults": [{"kind": "kill", "target": "worker b/0",
                                                                      "at": "3s"}]})
    events = Simulator(t, params(t)).run()
    commits = of(events, "commit")
    # one commit per step (10); step k commits at 2.45 + 0.76 k s. b dies at 3.0 s with step 1's gradient on
    # the wire (ddp: the coordinator's member_lost ignores it, there is no round to go on without); a's arrived
    # at 3.21, so step 1 commits at its 1 s deadline (4.21) with a alone and b leaves. Steps 2 and 3 are a's
    # alone (commits 4.97, 5.73); b is back at 6.0 (restart 3 s), 0.27 s into step 4, within rounds.join's window
    # (0.1 of the last step's 0.76 s, but at least JOIN_FLOOR_S 0.5 s): it joins step 4
    assert [c["round"] for c in commits] == list(range(10))
    assert [c["sites"] for c in commits] == [["a", "b"]] + [["a"]] * 3 + [["a", "b"]] * 6
    assert commits[1]["t"] == pytest.approx(3.21 + 1.0, abs=1e-5)
    assert [e["target"] for e in of(events, "failure")] == ["worker b/0", "b"]


def test_a_ring_round_takes_the_all_reduce_then_the_uploaders_upload():
    t = topo(merge="ring", rounds=1)
    sim = Simulator(t, params(t))
    events = sim.run()
    # both at the ring at 2.52 (a joined 10 ms after b); 2 steps of half the model (2 MB) on each ring edge:
    # 2 x (0.16 + 0.01); then a (the uploader) uploads the mean (0.33), b its 64-byte claim; the answer is 64 bytes
    ack = 64 * 8 / 100e6 + 0.010
    assert [c["merge"] for c in of(events, "commit")] == ["ring"]
    assert of(events, "commit")[0]["t"] == pytest.approx(2.52 + 2 * 0.17 + UP, abs=1e-6)
    assert sim.now == pytest.approx(2.52 + 2 * 0.17 + UP + ack + 1.0, abs=1e-6)
    stats = sim.link_stats()
    assert stats["link a<->b"]["bytes_forward"] == 2 * 2 * MB and stats["link a<->hub"]["bytes_forward"] == 4 * MB
    assert stats["link b<->hub"]["bytes_forward"] == 64


def test_a_site_killed_in_a_ring_run_is_dropped_at_once_and_the_rings_come_back_after_one_star_round():
    t = topo(merge="ring", rounds=8, extra={"faults": [{"kind": "kill", "target": "worker b/0", "at": "3.5s"}]})
    events = Simulator(t, params(t)).run()
    commits = of(events, "commit")
    # round 1 is being computed when b dies: the launcher reports it (rounds.lose: drop_lost), its ring cannot
    # form, and round 1 commits through the star with a alone as soon as a's update lands (4.03 s); rounds
    # 2-3 are a's (commits 5.19, 6.35). b is back at 6.5, 0.15 s into round 4, within the join window (0.1 of
    # the last round's 1.16 s, but at least JOIN_FLOOR_S 0.5 s): it joins round 4, which goes through the star
    # with every site (ring_reform: b missed round 3), after which the rings are rebuilt for round 5
    assert [(c["round"], c["merge"], c["sites"]) for c in commits] == \
        [(0, "ring", ["a", "b"])] + [(r, "star", ["a"]) for r in (1, 2, 3)] + \
        [(4, "star", ["a", "b"]), (5, "ring", ["a", "b"]), (6, "ring", ["a", "b"]), (7, "ring", ["a", "b"])]
    assert commits[1]["t"] == pytest.approx(3.70 + UP, abs=1e-5)
    assert [e["action"] for e in of(events, "member_lost")] == ["drop_lost"]
    assert [e["round"] for e in of(events, "ring_reform")] == [5]


def test_with_min_sites_every_site_the_round_waits_for_the_dead_site_and_it_redoes_its_round():
    t = topo(merge="ring", rounds=4, extra={"faults": [{"kind": "kill", "target": "worker b/0", "at": "3.5s"}],
                                            "recovery": {"min_sites": 2}})
    events = Simulator(t, params(t)).run()
    # rounds.lose: keep_waiting (without b fewer than min_sites would remain); b is back at 6.5 as a member of
    # round 1 (rounds.join), fetches the model (10 ms), redoes round 1 (0.5 s) and merges through the star
    # (0.33 s): round 1 commits with both at 7.34; every site reported, so round 2 is a ring again
    commits = of(events, "commit")
    assert [e["action"] for e in of(events, "member_lost")] == ["keep_waiting"]
    assert [(c["round"], c["merge"], c["sites"]) for c in commits] == \
        [(0, "ring", ["a", "b"]), (1, "star", ["a", "b"]), (2, "ring", ["a", "b"]), (3, "ring", ["a", "b"])]
    assert commits[1]["t"] == pytest.approx(6.5 + 0.01 + 0.5 + UP, abs=1e-5)


def test_a_site_frozen_past_its_lease_is_dropped_by_the_coordinators_watch():
    t = topo(rounds=3, extra={"faults": [{"kind": "freeze", "target": "site b", "at": "2.1s", "duration": "7s"}]})
    events = Simulator(t, params(t)).run()
    # frozen at 2.1 s for 7 s: at 5.1 its leader's lease (recovery.heartbeat_ttl_s 3 s) has ended, and its key
    # stays gone for the watch's grace of one more TTL: at 8.1 the coordinator stops waiting for it (member_lost,
    # source lease) and round 0 commits with a alone
    lost = of(events, "member_lost")
    assert [(e["t"], e["source"], e["action"]) for e in lost] == [(pytest.approx(8.1), "lease", "drop_lost")]
    assert of(events, "commit")[0]["sites"] == ["a"] and of(events, "commit")[0]["t"] == pytest.approx(8.1)


def test_a_freeze_shorter_than_the_lease_and_its_grace_is_waited_for():
    t = topo(rounds=1, extra={"faults": [{"kind": "freeze", "target": "site b", "at": "2.1s", "duration": "5s"}]})
    events = Simulator(t, params(t)).run()
    # 5 s < 2 x 3 s: the lease lapses at 5.1 but b is back (and puts its key again) before the watch's grace ends
    assert not of(events, "member_lost")
    assert of(events, "commit")[0]["sites"] == ["a", "b"]


def test_a_freeze_mid_step_delays_the_round_and_counts_in_that_steps_compute_as_a_real_run_measures_it():
    t = topo(rounds=1, extra={"faults": [{"kind": "freeze", "target": "site a", "at": "2.25s", "duration": "1s"}]})
    sim = Simulator(t, params(t))
    events = sim.run()
    a = [e for e in of(events, "inner_step") if e["site"] == "a"]
    # a computes 2.02 .. 2.52; frozen at 2.25 (in its 3rd step) for 1 s: that step's wall time is 1.1 s
    assert [e["compute_s"] for e in a] == pytest.approx([0.1, 0.1, 1.1, 0.1, 0.1])
    assert a[-1]["t"] == pytest.approx(3.52) and sim.now == pytest.approx(3.52 + 2 * UP + 1.0, abs=1e-6)


def test_steps_while_the_standbys_import_are_slower_by_the_fitted_factor_and_calibration_reads_it_back(tmp_path):
    # b is ready at 2.01 s (a 10 ms later: it provides the model); its first step ends at 2.11, its standbys
    # start 0.5 s later and import for 1 s, steps meanwhile take twice as long: of its first 20 steps, 6 run
    # before the window (0.6 s), 5 inside it (1.0 s), 9 after (0.9 s): the round's steps end 2.5 s after 2.01
    t = topo(inner_steps=20, rounds=3)
    p = params(t, standby_after_s=0.5, standby_warm_s=1.0, standby_slowdown=2.0)
    events = Simulator(t, p).run()
    b = [e for e in of(events, "inner_step") if e["site"] == "b"]
    assert b[19]["t"] == pytest.approx(2.01 + 2.5, abs=1e-9)
    assert [round(e["compute_s"], 9) for e in b[:20]] == [0.1] * 6 + [0.2] * 5 + [0.1] * 9
    started = [e for e in of(events, "standby_started") if e["site"] == "b"]
    assert [e["t"] for e in started] == pytest.approx([2.61]) and started[0]["name"] == "worker b/0"
    assert [e["t"] for e in of(events, "standby_ready") if e["site"] == "b"] == pytest.approx([3.61])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got = calibrate(tmp_path, t)
    assert got.step_s == {"a": pytest.approx(0.1), "b": pytest.approx(0.1)}
    assert (got.standby_slowdown, got.standby_warm_s, got.standby_after_s) == pytest.approx((2.0, 1.0, 0.5))
    # without warm standbys there is no window: the same run's steps all take 0.1 s
    off = topo(inner_steps=20, rounds=3, extra={"recovery": {"warm_standby": False}})
    plain = [e for e in of(Simulator(off, p).run(), "inner_step") if e["site"] == "b"]
    assert plain[19]["t"] == pytest.approx(2.01 + 2.0, abs=1e-9)


def test_a_calibration_run_that_never_left_its_standby_window_fits_no_transient(tmp_path):
    # every step inside the window: there is nothing steady to compare with, so the slowdown is not guessed
    t = topo(inner_steps=5, rounds=2)
    p = params(t, standby_after_s=0.0, standby_warm_s=60.0, standby_slowdown=2.0)
    events = Simulator(t, p).run()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    got = calibrate(tmp_path, t)
    assert (got.standby_warm_s, got.standby_slowdown) == (0.0, 1.0)
    assert got.step_s["b"] == pytest.approx(0.2)  # the later half's median: the transient is in the step


def test_the_evaluating_sites_eval_is_in_its_next_steps_time_and_calibration_takes_it_out(tmp_path):
    # a (the first site) evaluates after every round, 0.3 s, between two inner steps as the built-in trainer
    # does: a real run counts it in the next step's compute_s (geotrain.sdk), so the simulated one does too.
    # Round 1: a's first step takes 0.1 + 0.3 s, b waits 0.3 s longer for a's update; after the last round a
    # evaluates once more before it is done (in no step's time)
    t = topo()
    merge = 2 * (4 * MB * 8 / 100e6 + 0.010)
    sim = Simulator(t, params(t, eval_s=0.3))
    events = sim.run()
    a = [e for e in of(events, "inner_step") if e["site"] == "a"]
    assert [round(e["compute_s"], 9) for e in a] == [0.1] * 5 + [0.4] + [0.1] * 4  # round 0's eval: in startup
    b_waits = [m["seconds"] for m in of(events, "merge") if m["site"] == "b"]
    assert b_waits[1] == pytest.approx(merge + 0.3, abs=1e-6)
    done = {e["site"]: e["t"] for e in of(events, "site_done")}
    assert done["a"] - done["b"] == pytest.approx(0.3, abs=1e-6)
    assert sim.now == pytest.approx(2.02 + 2 * (0.5 + merge) + 0.3 + 0.3 + 1.0, abs=1e-6)
    # a real history has the eval as its own event too, inside the step that holds it: calibration takes it out
    # of that step (else the eval counts twice: in the step time and as eval_s). 4 rounds and a short standby
    # window, so that the steady step is the mean of the calm steps (geotrain.sim.calibrate.steady_step)
    t4 = topo(rounds=4)
    events = Simulator(t4, params(t4, eval_s=0.3, standby_after_s=0.5, standby_warm_s=0.01, standby_slowdown=1.5)).run()
    real = list(events)
    for e in of(events, "inner_step"):
        if e["site"] == "a" and e["compute_s"] > 0.35:
            real.append({"t": e["t"] - 0.1, "event": "eval", "proc": "a/0", "seconds": 0.3, "loss": 5.0})
    assert len(real) == len(events) + 3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sorted(real, key=lambda e: e["t"])))
    got = calibrate(tmp_path, t4)
    assert got.step_s == {"a": pytest.approx(0.1), "b": pytest.approx(0.1)} and got.eval_s == pytest.approx(0.3)


def test_an_eval_of_another_process_or_outside_the_step_is_not_taken_out_of_it():
    from geotrain.sim.calibrate import net_of_evals

    step = {"t": 10.0, "event": "inner_step", "proc": "a/0", "site": "a", "compute_s": 0.4}
    other = {"t": 9.9, "event": "eval", "proc": "b/0", "seconds": 0.3}
    before = {"t": 9.5, "event": "eval", "proc": "a/0", "seconds": 0.3}  # ended before the step began (9.6)
    inside = {"t": 9.9, "event": "eval", "proc": "a/0", "seconds": 0.3}
    assert net_of_evals([other, step])[1]["compute_s"] == 0.4
    assert net_of_evals([before, step])[1]["compute_s"] == 0.4
    assert net_of_evals([inside, step])[1]["compute_s"] == pytest.approx(0.1)
    assert step["compute_s"] == 0.4  # the history read is not changed in place


def test_sites_n_simulates_copies_of_the_first_site_past_a_files_cap(tmp_path, capsys):
    from geotrain.sim.cli import main

    f = tmp_path / "one.yaml"
    f.write_text("name: one\nsites: [{name: a, workers: 1}]\nlinks: {default: {bandwidth: 1gbit, latency: 20ms}}\n"
                 "training: {inner_steps: 10, rounds: 2}\n")
    out = tmp_path / "sim"
    assert main([str(f), "--sites", "300", "--params", "1e6", "--step-events", "round", "--run-dir", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and sorted(s["sites"]) == sorted(f"site{i}" for i in range(300))
    assert all(v["merges"] == 2 and v["inner_steps"] == 20 for v in s["sites"].values())
    capsys.readouterr()
    assert main([str(f), "--sites", "0"]) == 2
    assert "--sites 0: expected 1 .. 100,000" in capsys.readouterr().err
    f.write_text(f.read_text() + "faults: [{kind: kill, target: worker a/0, at: 1s}]\n")
    assert main([str(f), "--sites", "5"]) == 2
    assert "the topology's faults and links.pairs name sites the copies do not have" in capsys.readouterr().err


def _history(path, t, p):
    path.mkdir()
    events = Simulator(t, p).run()
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (path / "topology.json").write_text(json.dumps(t.model_dump(mode="json")))
    return path


def test_several_calibration_runs_give_each_time_as_the_median_of_those_that_measured_it(tmp_path, capsys):
    from geotrain.sim.calibrate import fit, pool
    from geotrain.sim.cli import main

    t = topo(rounds=4)
    killed = topo(rounds=4, extra={"faults": [{"kind": "kill", "target": "worker b/0", "at": "3s"}]})
    runs = [_history(tmp_path / "a", t, SimParams.given(t, 1_000_000, 0.1, startup_s=2.0, init_bytes=0)),
            _history(tmp_path / "b", killed, SimParams.given(killed, 1_000_000, 0.2, startup_s=4.0, restart_s=3.0,
                                                             init_bytes=0)),
            _history(tmp_path / "c", t, SimParams.given(t, 1_000_000, 0.5, startup_s=3.0, init_bytes=0))]
    fits = [fit(r, tt) for r, tt in zip(runs, (t, killed, t))]
    got = pool(fits, [str(r) for r in runs])
    assert got.step_s == {"a": pytest.approx(0.2), "b": pytest.approx(0.2)}  # the median of 0.1, 0.2, 0.5
    assert got.startup_s == pytest.approx(fits[2][0].startup_s)  # the median of ~2, ~4, ~3: run c's
    assert "restart_s" in fits[1][1] and "restart_s" not in fits[0][1]
    assert got.restart_s == pytest.approx(fits[1][0].restart_s)  # only b restarted: a and c say nothing of it
    # the front door takes --calibrate more than once; runs of two models are refused by name
    out = tmp_path / "sim"
    assert main([str(tmp_path / "a" / "topology.json"), "--calibrate", str(runs[0]),
                 "--calibrate", str(runs[2]), "--run-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["sim_params"]["step_s"]["a"] == pytest.approx(0.3)
    other = topo(rounds=4)
    _history(tmp_path / "d", other, SimParams.given(other, 2_000_000, 0.1, init_bytes=0))
    capsys.readouterr()
    assert main([str(tmp_path / "a" / "topology.json"), "--calibrate", str(runs[0]), "--calibrate",
                 str(tmp_path / "d")]) == 2
    assert f"--calibrate {tmp_path / 'd'}: another model than" in capsys.readouterr().err


def test_a_shared_host_scales_the_cpu_bound_times_by_the_workers_per_core(tmp_path, capsys):
    from geotrain.sim.calibrate import calibrate
    from geotrain.sim.cli import main
    from geotrain.sim.model import on_shared_host

    t = topo()  # 2 sites x 1 worker: the calibration run's host held 2 workers
    run = _history(tmp_path / "run", t, params(t, eval_s=0.2))
    p = calibrate(run, t)
    assert p.host_workers == 2
    # 3 workers on 1 core against 2 on 1: each gets a third of a core instead of a half
    q = on_shared_host(p, target_workers=3, cores=1)
    assert q.cpu_factor == pytest.approx(1.5) and q.step_s["a"] == pytest.approx(1.5 * p.step_s["a"])
    assert (q.startup_s, q.eval_s) == pytest.approx((1.5 * p.startup_s, 1.5 * p.eval_s))
    assert q.numel == p.numel and q.up_bytes == p.up_bytes  # bytes are not CPU
    assert on_shared_host(p, target_workers=3, cores=2).cpu_factor == pytest.approx(1.5)  # 1.5 per core against 1
    assert on_shared_host(p, target_workers=3, cores=4).cpu_factor == 1.0  # a core each, before and after
    three = tmp_path / "three.yaml"
    three.write_text(json.dumps(topo(sites=[{"name": n, "workers": 1} for n in "abc"]).model_dump(mode="json")))
    out = tmp_path / "sim"
    assert main([str(three), "--calibrate", str(run), "--shared-host", "1", "--run-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["sim_params"]["cpu_factor"] == pytest.approx(1.5)
    assert main([str(three), "--calibrate", str(run), "--shared-host", "4", "--run-dir", str(tmp_path / "s4")]) == 0
    assert json.loads((tmp_path / "s4" / "summary.json").read_text())["sim_params"]["cpu_factor"] == 1.0
    capsys.readouterr()
    assert main([str(three), "--shared-host", "1"]) == 2
    assert "--shared-host scales a calibration" in capsys.readouterr().err
    assert main([str(three), "--calibrate", str(run), "--shared-host", "0"]) == 2
    assert "--shared-host 0: expected the host's cores (1 or more)" in capsys.readouterr().err
