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
