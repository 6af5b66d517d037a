"""async-diloco, streaming-diloco, compressed (int8) and ring merges survive the failures of the
checkpointing issue: a killed
worker (its site restarts and rejoins) and a killed coordinator (replaced from its per-commit state
with a higher epoch). Each run must finish every site's merges, leave no process behind, reach a
loss near its own fault-free run's, and pass `geotrain check` (every invariant held or unknown,
none violated): rounds or versions never go backwards, only committed versions are served, sites
agree after each merge, no stale update was applied.
"""

import os
import signal

import pytest

from geotrain.analysis.check import VIOLATED, check_run
from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, start_launch, started_pids, summary, wait_for_event

pytestmark = pytest.mark.slow
DEMO = REPO / "topologies" / "demo.yaml"
ROUNDS = 6
ALGORITHMS = {
    "async-diloco": ("training.algorithm=async-diloco",),
    "async-overlapped": ("training.algorithm=async-diloco", "training.async.overlap_steps=5"),
    "streaming-diloco": ("training.algorithm=streaming-diloco", "training.inner_steps=20",
                         "training.streaming.fragments=4", "training.streaming.overlap_steps=2"),
    "int8": ("training.compression.codec=int8",),
    "ring": ("training.merge=ring", "recovery.min_sites=2"),  # waits for the restart: the rings are rebuilt
}
# async and streaming are not bitwise reproducible (arrival order decides); a fault costs the
# restarted site its in-flight work, so the bound is looser than the 2% of synchronous DiLoCo.
# Async is the noisiest: over repeated 6-round runs here, fault-free 2.91-2.99, with a fault
# 2.78-3.22 (which update is stale, and by how much, changes with timing); the initial loss is 5.35.
LOSS_TOLERANCE = {"async-diloco": 0.12, "async-overlapped": 0.12}
DEFAULT_LOSS_TOLERANCE = 0.06


def args(algorithm: str) -> list[str]:
    out = []
    for o in (f"training.rounds={ROUNDS}", *ALGORITHMS[algorithm]):
        out += ["--set", o]
    return out


def run(tmp_path, algorithm: str, fault=None) -> tuple:
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, *args(algorithm))
    try:
        if fault is not None:
            wait_for_event(run_dir, lambda e: e["event"] == "commit" and e["version"] >= 3, timeout_s=120)
            fault(run_dir)
        _, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    assert not leftover(run_dir)
    return run_dir, summary(run_dir), read_events(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def clean_loss(tmp_path_factory):
    """Fault-free final eval loss of each algorithm (run on first use)."""
    cache = {}

    def get(algorithm: str) -> float:
        if algorithm not in cache:
            _, s, _ = run(tmp_path_factory.mktemp(algorithm), algorithm)
            cache[algorithm] = s["final_eval_loss"]
        return cache[algorithm]

    return get


def kill_worker(run_dir):
    os.kill(started_pids(run_dir)["worker eu-west/1"], signal.SIGKILL)


def kill_coordinator(run_dir):
    os.kill(started_pids(run_dir)["coordinator"], signal.SIGKILL)


@pytest.mark.parametrize("fault", [kill_worker, kill_coordinator], ids=["kill-worker", "kill-coordinator"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_algorithm_survives(tmp_path, clean_loss, algorithm, fault):
    run_dir, s, events = run(tmp_path, algorithm, fault)
    done = {e["site"]: e for e in events if e["event"] == "site_done"}
    assert set(done) == {"us-east", "eu-west"}
    assert all(d["rounds"] >= ROUNDS for d in done.values()), done
    assert any(e["event"] == "failure" for e in events) and any(e["event"] == "recovery" for e in events)
    if fault is kill_coordinator:
        starts = [e for e in events if e["event"] == "coordinator_started"]
        assert len(starts) == 2 and starts[1]["epoch"] > starts[0]["epoch"]
    if algorithm.startswith("async"):  # each site makes `rounds` merges in all, restarts included, none twice
        assert len([e for e in events if e["event"] == "commit"]) == 2 * ROUNDS
        assert any(e["event"] == "eval" and e.get("final") for e in events)
    if algorithm == "ring":  # the ring broke, the star took over, and the rings were rebuilt
        commits = [e for e in events if e["event"] == "commit"]
        modes = [c["merge"] for c in commits]
        assert "star" in modes and modes[-1] == "ring", modes
        assert any(e["event"] == "ring_reform" for e in events)
        rebuilt = {e["site"] for e in events if e["event"] == "rings_ready" and e.get("rebuilt")}
        assert rebuilt == {"us-east", "eu-west"}
    base = clean_loss(algorithm)
    tolerance = LOSS_TOLERANCE.get(algorithm, DEFAULT_LOSS_TOLERANCE)
    assert abs(s["final_eval_loss"] - base) / base <= tolerance, (s["final_eval_loss"], base)
    violated = [v for v in check_run(run_dir) if v.status == VIOLATED]
    assert not violated, violated


def test_resumed_ring_run_rebuilds_its_rings(tmp_path, clean_loss):
    """`geotrain resume` of a ring run: its first round goes through the star (the leaders' mirrored
    outer momentum is not in their checkpoints), then the coordinator has them rebuild the rings."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, *args("ring"))
    try:
        # early enough that the resumed run has a star round and ring rounds after it, even if the kill is late
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_saved" and e["round"] >= 2, timeout_s=120)
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher and, through PDEATHSIG, everything it started
        launcher.wait()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not leftover(run_dir, wait_s=10)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "resume", str(run_dir), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    events = read_events(run_dir / "metrics.jsonl")
    resumed_at = max(i for i, e in enumerate(events) if e["event"] == "coordinator_started")
    after = events[resumed_at:]
    modes = [e["merge"] for e in after if e["event"] == "commit"]
    assert modes and modes[0] == "star" and modes[-1] == "ring", modes
    assert {e["site"] for e in after if e["event"] == "rings_ready" and e.get("rebuilt")} == {"us-east", "eu-west"}
    s = summary(run_dir)
    assert s["rounds_completed"] == ROUNDS
    base = clean_loss("ring")
    assert abs(s["final_eval_loss"] - base) / base <= DEFAULT_LOSS_TOLERANCE, (s["final_eval_loss"], base)
    violated = [v for v in check_run(run_dir) if v.status == VIOLATED]
    assert not violated, violated


def test_a_killed_ring_link_is_restarted_and_the_rings_rebuilt(tmp_path, clean_loss):
    """The link emulator of one ring edge dies: the launcher starts it again on the same ports, the
    round goes through the star, and the rings are rebuilt over the new link."""
    def kill_ring_link(run_dir):
        os.kill(started_pids(run_dir)["link all: us-east->eu-west"], signal.SIGKILL)

    run_dir, s, events = run(tmp_path, "ring", kill_ring_link)
    assert any(e["event"] == "failure" and e["target"] == "link all: us-east->eu-west" for e in events)
    assert len([e for e in events if e["event"] == "process_started" and e["name"] == "link all: us-east->eu-west"]) == 2
    modes = [e["merge"] for e in events if e["event"] == "commit"]
    assert "star" in modes and modes[-1] == "ring", modes
    assert s["rounds_completed"] == ROUNDS
    base = clean_loss("ring")
    assert abs(s["final_eval_loss"] - base) / base <= DEFAULT_LOSS_TOLERANCE, (s["final_eval_loss"], base)
    violated = [v for v in check_run(run_dir) if v.status == VIOLATED]
    assert not violated, violated
