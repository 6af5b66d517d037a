"""The launcher never reports success for a run whose global model went non-finite: it fails the run at
the first sign in the history (and does not restart the worker that stopped because of it), and once
more when every worker exited 0 but the history says so."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.config.topology import load_topology
from geotrain.errors import RunFailed
from geotrain.events import EventLog, read_events
from geotrain.run import launch as launch_mod
from geotrain.run.launch import Child, LaunchPlan, Launcher

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"


class NoFaults:
    def tick(self) -> None:
        pass

    def observe(self, event: dict) -> None:
        pass


def launcher_for(run_dir: Path) -> Launcher:
    run_dir.mkdir(parents=True)
    launcher = Launcher(LaunchPlan(topo=load_topology(DEMO), run_dir=run_dir, quiet=True))
    launcher.faults = NoFaults()
    return launcher


def test_a_worker_that_stopped_on_a_nan_eval_fails_the_run_instead_of_restarting(tmp_path, monkeypatch):
    launcher = launcher_for(tmp_path / "run")
    restarted = []
    monkeypatch.setattr(launcher, "_restart", lambda child, reason: restarted.append(child.name))
    # what the built-in trainer does: record the eval, then exit 1 (already exited when the launcher looks)
    EventLog(launcher.run_dir / "metrics.jsonl", "us-east/0").emit("eval", round=1, step=10, loss=math.nan, seconds=0.1)
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    proc.wait()
    launcher.children.append(Child("worker us-east/0", "worker", proc, group="site:us-east"))
    with pytest.raises(RunFailed, match="the global model went non-finite: the eval loss at round 1 is nan"):
        launcher.watch()
    assert restarted == []


def test_a_commit_with_a_nonfinite_model_fails_a_live_run(tmp_path):
    launcher = launcher_for(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        launcher.children.append(Child("worker us-east/0", "worker", proc, group="site:us-east"))
        EventLog(launcher.run_dir / "metrics.jsonl", "coordinator").emit("commit", round=0, version=1, finite=False, norm=None)
        with pytest.raises(RunFailed, match="commit of round 0 left the global model non-finite"):
            launcher.watch()
    finally:
        proc.kill()
        proc.wait()


def test_a_run_whose_workers_all_exit_0_still_fails_on_a_nonfinite_history(tmp_path, monkeypatch):
    """The last word is the history's: launch() reads it once more when the run ends."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    class Quiet(Launcher):
        def start(self):
            self.faults = NoFaults()

        def watch(self, progress=None):  # every worker "exited 0"; the coordinator had recorded this:
            self.events.emit("model_nonfinite", round=2, version=3, fragment=0, reason="the global model after round 2 "
                             "has a non-finite value")

        def stop(self):
            pass

    monkeypatch.setattr(launch_mod, "Launcher", Quiet)
    with pytest.raises(RunFailed, match="non-finite global model \\(round 2\\)"):
        launch_mod.launch(LaunchPlan(topo=load_topology(DEMO), run_dir=run_dir, quiet=True))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["reason"]
    finished = [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "run_finished"]
    assert finished[-1]["status"] == "failed"
