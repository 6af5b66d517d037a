"""DDP keeps its model at the sites: a site killed mid-run cannot rejoin, and the run says so and fails
(it used to restart from the coordinator's initial weights and report success)."""

from __future__ import annotations

import os
import signal

import pytest

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, start_launch, started_pids, summary, wait_for_event

pytestmark = pytest.mark.slow


def test_a_killed_ddp_site_fails_the_run_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(REPO / "topologies" / "demo-ddp.yaml", run_dir, "--set", "training.rounds=6")
    try:
        wait_for_event(run_dir, lambda e: e["event"] == "commit" and e["round"] >= 12, timeout_s=120)
        os.kill(started_pids(run_dir)["worker eu-west/1"], signal.SIGKILL)
        _, err = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, err
    assert "algorithm ddp cannot rejoin a run in progress" in err
    assert not leftover(run_dir)
    assert summary(run_dir)["status"] == "failed"
    evals = [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "eval" and e.get("rejoin")]
    assert not evals  # no eval of the initial weights presented as the model at a later round
