"""Scheduled and live faults through `geotrain launch`, checked from the recorded history."""

import json
import subprocess
import sys

import pytest

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, start_launch, summary, wait_for_event

pytestmark = pytest.mark.slow


def launch(topology, run_dir, *sets):
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(topology), "--run-dir", str(run_dir), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return summary(run_dir)


def test_shipped_fault_topology_finishes_and_passes_check(tmp_path):
    twin = tmp_path / "twin"
    launch(REPO / "topologies" / "demo.yaml", twin, "training.rounds=8")
    run = tmp_path / "faults"
    s = launch(REPO / "topologies" / "demo-faults.yaml", run)
    assert s["rounds_completed"] == 8 and s["failures"] >= 2 and s["recoveries"] >= 2
    injected = [e["fault"] for e in read_events(run / "metrics.jsonl") if e["event"] == "fault_injected"]
    assert {"partition", "kill", "degrade"} <= set(injected)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run), "--twin", str(twin), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    verdicts = {v["invariant"]: v["status"] for v in json.loads(r.stdout)["verdicts"]}
    assert "violated" not in verdicts.values(), verdicts
    assert verdicts["final_loss_matches_twin"] == "held" and verdicts["faults_survived"] == "held"


def test_live_chaos_against_a_running_launch(tmp_path):
    run = tmp_path / "run"
    launcher = start_launch(REPO / "topologies" / "demo.yaml", run, "--set", "training.rounds=40")
    try:
        wait_for_event(run, lambda e: e["event"] == "commit" and e["round"] >= 1)

        def chaos(*args):
            return subprocess.run([sys.executable, "-m", "geotrain.cli", "chaos", str(run), *args],
                                  capture_output=True, text=True, timeout=60, cwd=REPO)

        r = chaos("partition", "link mars", "--duration", "2s")
        assert r.returncode == 2 and "unknown site 'mars'" in r.stderr and "Traceback" not in r.stderr
        r = chaos("degrade", "link eu-west", "--duration", "2s")
        assert r.returncode == 2 and "needs at least one of" in r.stderr
        r = chaos("degrade", "link eu-west", "--latency", "150ms", "--duration", "2s")
        assert r.returncode == 0, r.stderr
        r = chaos("freeze", "site us-east", "--duration", "2s")
        assert r.returncode == 0, r.stderr
        wait_for_event(run, lambda e: e["event"] == "fault_healed" and e["fault"] == "freeze", timeout_s=60)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    events = read_events(run / "metrics.jsonl")
    assert [e["fault"] for e in events if e["event"] == "fault_injected"] == ["degrade", "freeze"]
    assert summary(run)["rounds_completed"] == 40
    assert not leftover(run)
