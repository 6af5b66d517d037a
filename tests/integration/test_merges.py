"""Ring and hierarchical merges through `geotrain launch`: same training as the star, less hub traffic,
and a fall-back to the star when a ring breaks, then the rings rebuilt."""

import json
import subprocess
import sys

import pytest

from geotrain.events import read_events
from tests.integration.helpers import REPO, summary

pytestmark = pytest.mark.slow
DEMO = REPO / "topologies" / "demo.yaml"
FOUR_SITES = ["sites=[{name: a, workers: 1, region: eu}, {name: b, workers: 1, region: eu}, "
              "{name: c, workers: 1, region: us}, {name: d, workers: 1, region: us}]"]


def launch(run_dir, *sets):
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--run-dir", str(run_dir), "--quiet"]
    for s in ("training.rounds=3", *sets):
        argv += ["--set", s]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stderr
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run_dir), "--json"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert check.returncode == 0, check.stdout
    return summary(run_dir)


def hub_bytes(s):
    return sum(v["bytes_forward"] + v["bytes_backward"] for k, v in s["links"].items() if "<->" in k)


@pytest.mark.parametrize("merge", ["ring", "hierarchical"])
def test_ring_merges_train_like_the_star_with_less_hub_traffic(tmp_path, merge):
    star = launch(tmp_path / "star", *FOUR_SITES)
    other = launch(tmp_path / merge, *FOUR_SITES, f"training.merge={merge}")
    assert other["rounds_completed"] == 3
    assert abs(other["final_eval_loss"] - star["final_eval_loss"]) / star["final_eval_loss"] < 1e-3
    # star: every site sends and receives the model each round; ring: one upload of the mean
    assert hub_bytes(other) < 0.5 * hub_bytes(star)
    events = read_events(tmp_path / merge / "metrics.jsonl")
    assert len([e for e in events if e["event"] == "rings_ready"]) == 4
    assert not [e for e in events if e["event"] == "ring_abandoned"]


@pytest.mark.parametrize("merge", ["ring", "hierarchical"])
def test_a_broken_ring_falls_back_to_the_star_and_is_rebuilt(tmp_path, merge):
    """A killed site leader breaks the rings: that round goes through the star, the site comes back,
    and the coordinator has every leader rebuild its rings (hierarchical: the region rings and the
    ring of region leaders; the killed site `c` leads region `us`). ``recovery.min_sites`` is every site:
    the others wait for the restarted one (rounds.lose: keep_waiting), so that it is back before the last
    round whatever the host's load (with the default 1 they go on without it, and a 5-round run may end
    before its restart: run_done)."""
    if merge == "ring":
        sites, victim, names = [], "worker eu-west/0", {"us-east", "eu-west"}
    else:
        sites, victim, names = FOUR_SITES, "worker c/0", {"a", "b", "c", "d"}
    s = launch(tmp_path / "run", *sites, f"training.merge={merge}", "training.rounds=5",
               f"recovery.min_sites={len(names)}",
               f"faults=[{{kind: kill, target: {victim}, at_round: 2}}]")
    assert s["rounds_completed"] == 5
    events = read_events(tmp_path / "run" / "metrics.jsonl")
    assert any(e["event"] == "ring_abandoned" for e in events)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["recoveries"] >= 1
    modes = [e["merge"] for e in events if e["event"] == "commit"]
    assert "star" in modes and modes[-1] == "ring", modes
    assert {e["site"] for e in events if e["event"] == "rings_ready" and e.get("rebuilt")} == names


def ring_bytes(s):
    return sum(v["bytes_forward"] + v["bytes_backward"] for k, v in s["links"].items() if k.startswith("link all:"))


def test_int8_ring_trains_like_the_fp32_ring_with_a_quarter_of_the_ring_bytes(tmp_path):
    """`compression.codec: int8` with `merge: ring`: every ring hop carries int8 pieces."""
    fp32 = launch(tmp_path / "fp32", "training.merge=ring", "training.rounds=4")
    int8 = launch(tmp_path / "int8", "training.merge=ring", "training.rounds=4", "training.compression.codec=int8")
    assert int8["rounds_completed"] == 4
    assert abs(int8["final_eval_loss"] - fp32["final_eval_loss"]) / fp32["final_eval_loss"] < 0.01
    assert int8["final_eval_loss"] != fp32["final_eval_loss"]  # the codec was really used
    assert ring_bytes(int8) < 0.27 * ring_bytes(fp32), (ring_bytes(int8), ring_bytes(fp32))
    events = read_events(tmp_path / "int8" / "metrics.jsonl")
    assert {e["merge"] for e in events if e["event"] == "commit"} == {"ring"}


def test_striped_links_change_no_bit_and_survive_a_link_kill(tmp_path):
    """`links.default.streams: 4` on a lossy link: every connection crosses the emulated WAN as four TCP flows
    (geotrain.wan.stripe). The striping is below gRPC: the run trains bit for bit as over one connection, also when
    the link process is SIGKILLed mid-run (the launcher restarts it on its port; the site's calls go through the
    new stripes; every site is waited for, so no round goes without one)."""
    import os
    import signal

    from tests.integration.helpers import start_launch, started_pids, wait_for_event

    lossy = ("links.default.loss=0.001", "recovery.min_sites=2", "training.rounds=4")
    one = launch(tmp_path / "one", *lossy)
    run = tmp_path / "four"
    argv = [x for s in (*lossy, "links.default.streams=4") for x in ("--set", s)]
    launcher = start_launch(DEMO, run, *argv)
    try:
        wait_for_event(run, lambda e: e["event"] == "commit" and e["round"] >= 1, 180)
        os.kill(started_pids(run)["link eu-west<->hub"], signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run)], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert check.returncode == 0, check.stdout
    four = summary(run)
    assert one["rounds_completed"] == four["rounds_completed"] == 4
    assert four["final_eval_loss"] == one["final_eval_loss"]
    events = read_events(run / "metrics.jsonl")
    assert any(e["event"] == "recovery" and e["what"] == "link" for e in events)
    stats = json.loads((run / "links" / "eu-west--hub.json").read_text())  # the restarted link's own count
    assert stats["streams"] == 4 and stats["connections"] >= 4 and stats["connections"] % 4 == 0
    assert json.loads((tmp_path / "one" / "links" / "eu-west--hub.json").read_text())["connections"] < 4
