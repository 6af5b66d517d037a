"""`geotrain launch` for real: processes per worker, a real etcd, the gRPC coordinator, link emulators."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import (REPO, leftover, processes_mentioning, start_launch, started_pids, summary,
                                       wait_for_event)

pytestmark = pytest.mark.slow
DEMO = REPO / "topologies" / "demo.yaml"


def test_demo_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--run-dir", str(run_dir),
                        "--set", "training.rounds=4", "--quiet"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)  # the last line is the run directory
    s = summary(run_dir)
    for key in ("rounds_completed", "initial_eval_loss", "final_eval_loss", "wan_bytes", "wall_seconds", "sites"):
        assert s[key] is not None, key
    assert s["status"] == "completed" and s["rounds_completed"] == 4
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert len(s["sites"]) >= 2 and all(v["workers"] >= 2 for v in s["sites"].values())
    for site in s["sites"].values():
        assert site["compute_seconds"] > 0 and site["wan_wait_seconds"] > 0 and site["merges"] == 4
    # every site-to-coordinator byte crossed an emulated link, and the links counted them
    assert s["wan_bytes"] >= sum(v["bytes_sent"] + v["bytes_received"] for v in s["sites"].values())
    names = started_pids(run_dir)
    assert {"etcd", "coordinator", "worker us-east/0", "worker us-east/1", "worker eu-west/0", "worker eu-west/1"} <= set(names)
    assert sum(1 for n in names if n.startswith("link ")) == 2
    assert not leftover(run_dir, wait_s=0)
    assert not processes_mentioning(str(run_dir))


@pytest.mark.parametrize("victim", ["worker eu-west/1", "worker us-east/0", "coordinator", "etcd", "link eu-west<->hub"])
def test_killing_any_process_stops_the_run_cleanly(tmp_path, victim):
    """With no restarts allowed (recovery.max_restarts=0), any death fails the run, cleanly and explained."""
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, "--set", "training.rounds=50", "--set", "recovery.max_restarts=0")
    try:
        wait_for_event(run_dir, lambda e: e["event"] == "inner_step" and e["step"] >= 3)
        pid = started_pids(run_dir)[victim]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, err = launcher.communicate(timeout=30)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, err
    assert victim in err and f"pid {pid}" in err and "SIGKILL" in err, err
    assert "Traceback (most recent call last)" not in err.split("last lines of")[0]
    assert elapsed < 15, f"took {elapsed:.1f}s to notice"
    assert not leftover(run_dir), "processes left behind"
    assert not processes_mentioning(str(run_dir))
    assert summary(run_dir)["status"] == "failed"


def test_ctrl_c_stops_everything(tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, "--set", "training.rounds=50")
    try:
        wait_for_event(run_dir, lambda e: e["event"] == "inner_step" and e["step"] >= 2)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, err
    assert "interrupted" in err
    assert not leftover(run_dir) and not processes_mentioning(str(run_dir))


def test_sigkilled_launcher_leaves_no_orphan(tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, "--set", "training.rounds=50")
    wait_for_event(run_dir, lambda e: e["event"] == "inner_step" and e["step"] >= 2)
    launcher.kill()
    launcher.wait()
    assert not leftover(run_dir, wait_s=10), "children outlived a SIGKILLed launcher"
