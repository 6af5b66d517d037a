"""`geotrain run-local`: a user's script as one site in one process, no etcd or gRPC (issue #12)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from geotrain.events import read_events

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "integration" / "scripts" / "regress_user.py"


def run_local(tmp_path, *args, mode="normal"):
    return subprocess.run([sys.executable, "-m", "geotrain.cli", "run-local", "--run-dir", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, REGRESS_MODE=mode))


def test_a_script_runs_locally_with_the_coordinators_logic(tmp_path):
    r = run_local(tmp_path, "--set", "training.rounds=3", str(SCRIPT))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 3 and s["eval_metric"] == "mse"
    assert "3/3 rounds" in r.stderr and "mse" in r.stderr
    events = read_events(tmp_path / "run" / "metrics.jsonl")
    assert not [e for e in events if e["event"] == "process_started"]  # nothing else was started
    commits = [e for e in events if e["event"] == "commit"]
    assert [c["round"] for c in commits] == [0, 1, 2] and all(c["finite"] for c in commits)
    (setup,) = [e for e in events if e["event"] == "site_setup"]  # where the site's start-up went
    parts = setup["connect_s"] + setup["join_s"] + setup["restore_s"]
    assert min(setup["connect_s"], setup["join_s"], setup["restore_s"]) >= 0 and parts <= setup["seconds"] + 3e-6
    (ready,) = [e for e in events if e["event"] == "site_ready"]
    assert 0 <= ready["join_rpc_s"] + ready["model_fetch_s"] <= setup["join_s"] + 2e-6


def test_a_topologys_site_runs_with_one_worker(tmp_path):
    r = run_local(tmp_path, "--topology", str(REPO / "topologies" / "demo.yaml"), "--site", "eu-west",
                  "--set", "training.rounds=1", str(SCRIPT))
    assert r.returncode == 0, r.stderr
    topo = json.loads((tmp_path / "run" / "topology.json").read_text())
    assert [(s["name"], s["workers"]) for s in topo["sites"]] == [("eu-west", 1)]


def test_run_local_fails_like_a_launch(tmp_path):
    r = run_local(tmp_path, str(SCRIPT), mode="no-step")
    assert r.returncode == 1 and "no site called diloco.step()" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_a_bug_in_the_script_shows_its_traceback(tmp_path):
    r = run_local(tmp_path, str(SCRIPT), mode="crash")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "my batch has the wrong shape" in r.stderr and "regress_user.py" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_user_mistakes_are_one_line(tmp_path):
    r = run_local(tmp_path, "--topology", str(REPO / "topologies" / "demo.yaml"), "--site", "mars", str(SCRIPT))
    assert r.returncode == 2 and "--site: 'mars' is not a site" in r.stderr and "Traceback" not in r.stderr
    r = run_local(tmp_path, str(tmp_path / "missing.py"))
    assert r.returncode == 1 and "no script" in r.stderr and "Traceback" not in r.stderr
