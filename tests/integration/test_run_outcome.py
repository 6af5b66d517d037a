"""A run never lies about its outcome: `geotrain launch` of a run whose global model goes non-finite
ends `failed` with the reason, exits non-zero, leaves no process behind, and `geotrain check` on its
run directory fails."""

import json
import subprocess
import sys

import pytest

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, processes_mentioning, summary

pytestmark = pytest.mark.slow
DEMO = REPO / "topologies" / "demo.yaml"
ROUNDS = 4


def test_a_run_whose_model_goes_nonfinite_fails(tmp_path):
    run_dir = tmp_path / "run"
    # An outer learning rate beyond float32's range (3.4e38) is infinite once applied to the fp32
    # parameters: the first outer step makes every moved parameter ±inf (and 0·inf NaN), whatever the
    # seed. The updates themselves are ordinary, so nothing refuses them: only the outcome shows it.
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--run-dir", str(run_dir),
                        "--set", f"training.rounds={ROUNDS}", "--set", "training.outer_optimizer.lr=1e39",
                        # no outer warmup: its first rounds' lr (1e39/3) would still be finite in float32
                        "--set", "training.outer_optimizer.schedule.warmup_steps=0", "--quiet"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "geotrain launch: run failed: the global model went non-finite" in r.stderr, r.stderr
    assert "Traceback (most recent call last)" not in r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)

    s = summary(run_dir)
    assert s["status"] == "failed" and "non-finite" in s["reason"], s["reason"]
    assert not leftover(run_dir), "processes left behind"
    assert not processes_mentioning(str(run_dir))

    events = read_events(run_dir / "metrics.jsonl")
    commits = [e for e in events if e["event"] == "commit"]
    assert len({c["round"] for c in commits}) < ROUNDS, "the run went on after its model diverged"
    assert not [e for e in events if e["event"] == "failure"], "a site was restarted instead of the run failing"
    finished = [e for e in events if e["event"] == "run_finished"]
    assert finished[-1]["status"] == "failed" and "non-finite" in finished[-1]["reason"]

    c = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run_dir), "--json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert c.returncode == 1, c.stdout + c.stderr
    by = {v["invariant"]: v for v in json.loads(c.stdout)["verdicts"]}
    violated = {n for n in ("global_model_finite", "eval_loss_no_unexplained_jump") if by[n]["status"] == "violated"}
    assert violated, by
    if any("finite" in e for e in commits):  # the coordinator records the digest: its invariant names the round
        assert by["global_model_finite"]["status"] == "violated"
        assert "round 0" in by["global_model_finite"]["evidence"], by["global_model_finite"]
