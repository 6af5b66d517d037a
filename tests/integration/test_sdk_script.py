"""A user's own script runs through `geotrain launch --script` as every worker's entrypoint."""

import subprocess
import sys

import pytest

from tests.integration.helpers import REPO, leftover, summary

pytestmark = pytest.mark.slow


def test_example_script_through_launch(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(REPO / "topologies" / "demo.yaml"),
                        "--run-dir", str(run_dir), "--quiet", "--set", "training.rounds=3",
                        "--script", sys.executable, str(REPO / "docs" / "examples" / "train_sdk.py")],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr
    s = summary(run_dir)
    assert s["rounds_completed"] == 3
    for site in ("us-east", "eu-west"):
        log = (run_dir / "logs" / f"worker-{site}-0.log").read_text()
        losses = [float(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "held-out loss" in line]
        assert len(losses) == 3, log
    # the two sites hold the same global model after each merge: identical held-out losses
    a = (run_dir / "logs" / "worker-us-east-0.log").read_text().split("held-out loss")[1:]
    b = (run_dir / "logs" / "worker-eu-west-0.log").read_text().split("held-out loss")[1:]
    assert [x.split()[0] for x in a] == [x.split()[0] for x in b]
    assert not leftover(run_dir, wait_s=0)


def test_script_outside_launch_gets_a_clear_error():
    r = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "train_sdk.py")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "GEOTRAIN_SITE" in r.stderr and "geotrain launch" in r.stderr
