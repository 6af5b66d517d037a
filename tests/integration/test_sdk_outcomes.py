"""A user's own script through `geotrain launch --script`: the run's outcome is the truth about it
(issue #12). Each test runs tests/integration/scripts/regress_user.py, a regression MLP written for
these tests, on a small topology with one worker per site."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, summary, wait_for_event

pytestmark = pytest.mark.slow
SCRIPT = REPO / "tests" / "integration" / "scripts" / "regress_user.py"
TOPOLOGY = """
name: regress
sites:
  - {name: paris, workers: 1}
  - {name: tokyo, workers: 1}
links:
  default: {bandwidth: 1gbit, latency: 2ms}
training: {inner_steps: 5, rounds: 4}
recovery: {max_restarts: 5}
"""


@pytest.fixture
def topology(tmp_path):
    path = tmp_path / "regress.yaml"
    path.write_text(TOPOLOGY)
    return path


def launch(topology, run_dir, mode="normal", env=None, wait=True, cwd=None):
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(topology), "--run-dir", str(run_dir), "--quiet",
            "--script", sys.executable, str(SCRIPT)]
    e = dict(os.environ, REGRESS_MODE=mode, **(env or {}))
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=cwd or REPO)
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, env=e, cwd=cwd or REPO)


def final_params(run_dir) -> torch.Tensor:
    """The global parameters of the coordinator's last durable state (what a restart resumes from)."""
    from geotrain.orchestrator.persist import StateStore

    return StateStore(run_dir / "coordinator").load().params


def test_a_clean_script_run_completes(topology, tmp_path):
    run_dir = tmp_path / "run"
    r = launch(topology, run_dir)
    assert r.returncode == 0, r.stderr
    s = summary(run_dir)
    assert s["status"] == "completed" and s["rounds_completed"] == 4
    assert json.loads((run_dir / "launch.json").read_text())["script"][-1] == str(SCRIPT)
    # the script's own metrics (DiLoCo.log / log_eval), and no invented tokens
    assert set(s["metrics"]) == {"train_mse", "lr", "eval/mse"}
    assert set(s["metrics"]["eval/mse"]["sites"]) == {"paris", "tokyo"}
    assert s["metrics"]["lr"]["sites"]["paris"] == 0.05
    assert s["tokens"] is None and s["tokens_per_second"] is None
    assert "mse" in r.stderr.splitlines()[-2] and "4/4 rounds" in r.stderr
    evals = [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert len(evals) == 8 and {e["metric"] for e in evals} == {"mse"}
    from geotrain.analysis.tensorboard_export import read_scalars

    tags = set(read_scalars(run_dir / "tensorboard"))
    assert {"metric/train_mse/paris", "metric/lr/tokyo", "eval/mse/paris"} <= tags, tags
    from geotrain.analysis.report import write_report

    md = write_report([run_dir], run_dir).read_text()  # the script's scalars in the report, under their names
    assert "![eval mse vs inner steps]" in md and "![train_mse vs inner steps]" in md and "| final eval mse |" in md, md


def test_a_script_that_never_steps_fails_with_the_reason(topology, tmp_path):
    run_dir = tmp_path / "run"
    r = launch(topology, run_dir, mode="no-step")
    assert r.returncode == 1, r.stderr
    assert "no site called diloco.step()" in r.stderr
    s = summary(run_dir)
    assert s["status"] == "failed" and "diloco.step()" in s["reason"]
    assert not leftover(run_dir, wait_s=5)


def test_a_script_that_stops_early_fails_with_the_round(topology, tmp_path):
    run_dir = tmp_path / "run"
    r = launch(topology, run_dir, mode="early", env={"REGRESS_ROUNDS": "2"})
    assert r.returncode == 1, r.stderr
    assert "the script exited after round 2 of 4" in r.stderr
    assert summary(run_dir)["status"] == "failed"


def test_a_deterministic_bug_fails_after_its_second_identical_crash(topology, tmp_path):
    run_dir = tmp_path / "run"
    r = launch(topology, run_dir, mode="crash")
    assert r.returncode == 1, r.stderr
    # one restart (the first crash could have been a fault), then the same error again: the user's bug
    assert "failed the same way twice" in r.stderr and "ValueError at regress_user.py" in r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "my batch has the wrong shape" in r.stderr
    events = read_events(run_dir / "metrics.jsonl")
    failures = [e for e in events if e["event"] == "failure"]
    # each site restarted once at most (both have the bug): max_restarts is 5, not spent on a bug
    per_site = [f["target"].split("/")[0] for f in failures]
    assert failures and len(per_site) == len(set(per_site)), failures
    assert len([e for e in events if e["event"] == "worker_crashed"]) >= 2
    assert not leftover(run_dir, wait_s=5)


def test_a_killed_script_run_resumes_exactly_with_its_script(topology, tmp_path):
    base = tmp_path / "base"
    r = launch(topology, base)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    # launched from another folder: resume must run the script where it was launched
    launcher = launch(topology, run_dir, wait=False, cwd=tmp_path)
    try:
        wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_saved" and e["round"] >= 2, timeout_s=120)
        os.kill(launcher.pid, signal.SIGKILL)  # the launcher and, through PDEATHSIG, everything it started
        launcher.wait()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not leftover(run_dir, wait_s=10)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "resume", str(run_dir), "--quiet"],
                       capture_output=True, text=True, timeout=240, cwd="/", env=dict(os.environ, REGRESS_MODE="normal"))
    assert r.returncode == 0, r.stderr
    assert f"with {sys.executable} {SCRIPT}" in r.stderr
    worker_log = (run_dir / "logs" / "worker-paris-0.log").read_text()
    assert "paris done after 4 rounds" in worker_log
    assert torch.equal(final_params(run_dir), final_params(base)), "resumed weights differ from the uninterrupted run"


def test_two_sites_with_different_models_are_refused_naming_both_tensors(topology, tmp_path):
    run_dir = tmp_path / "run"
    r = launch(topology, run_dir, mode="mismatch")
    assert r.returncode == 1, r.stderr
    assert "trains another model than the run's" in r.stderr
    assert "'0.weight' [16, 4] float32" in r.stderr and "'b.weight' [1, 16] float32" in r.stderr
    assert "97 parameters" in r.stderr
    events = read_events(run_dir / "metrics.jsonl")
    assert not [e for e in events if e["event"] == "commit"]  # nothing was averaged
    assert not [e for e in events if e["event"] == "failure"]  # and nothing restarted
    assert not leftover(run_dir, wait_s=5)
