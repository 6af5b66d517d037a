"""The rendered Slurm scripts submitted to a real Slurm: slurmctld, slurmd and munge from Debian's packages,
started by scripts/slurm-local.sh as a cluster of this one host (root; it installs them if missing).
The demo runs to the end: the control plane's job and both sites' jobs COMPLETED with exit code 0:0, and
`geotrain check` passes the coordinator's history. The cluster is stopped afterwards if this test started it."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain.config.topology import load_topology
from geotrain.run.slurm import SlurmOptions, write_deployment
from tests.deploy.test_slurm import free_port_base

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm():
    script = REPO / "scripts" / "slurm-local.sh"
    r = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"slurm-local.sh start: {r.stdout}{r.stderr}"
    try:
        yield
    finally:
        if r.stdout.strip().endswith("started"):  # ours: leave nothing running
            subprocess.run(["bash", str(script), "stop"], capture_output=True, timeout=120)


def job_state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    state = re.search(r"\bJobState=(\S+)", out)
    code = re.search(r"\bExitCode=(\S+)", out)
    return (state.group(1) if state else "UNKNOWN"), (code.group(1) if code else "?")


def submit_and_wait(deploy: Path, run: Path, timeout_s: float = 420) -> dict[str, tuple[str, str]]:
    """submit.sh, then every job's (state, exit code) once all have ended (jobs still running are cancelled)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GEOTRAIN_"))}
    sub = subprocess.run(["bash", str(deploy / "submit.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    jobs = {" ".join(line.split()[:-1]): line.split()[-1] for line in sub.stdout.splitlines()}
    states: dict[str, tuple[str, str]] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {name: job_state(j) for name, j in jobs.items()}
            if all(s in DONE for s, _ in states.values()):
                break
            time.sleep(2)
    finally:
        for j in jobs.values():
            if job_state(j)[0] not in DONE:
                subprocess.run(["scancel", j], timeout=30)
    return states


def options(tmp_path, **kw) -> SlurmOptions:
    base = dict(run_dir=str(tmp_path / "run"), deploy_dir=str(tmp_path / "deploy"), python=sys.executable,
                geotrain=str(Path(sys.executable).parent / "geotrain"), port_base=free_port_base(), linger_s=3.0,
                wait_s=240, time="0:15:00")
    return SlurmOptions(**{**base, **kw})


def test_the_rendered_scripts_run_the_demo_on_a_real_slurm(slurm, repo, tmp_path):
    topo = load_topology(repo / "topologies" / "demo.yaml", ["training.rounds=2", "training.inner_steps=5"])
    o = options(tmp_path)
    write_deployment(topo, Path(o.deploy_dir), o)
    run = Path(o.run_dir)
    states = submit_and_wait(Path(o.deploy_dir), run)
    outputs = {p.name: p.read_text()[-2000:] for p in (run / "slurm").glob("*.out")}
    assert states == {"control": ("COMPLETED", "0:0"), "site us-east": ("COMPLETED", "0:0"),
                      "site eu-west": ("COMPLETED", "0:0")}, outputs
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run / "control")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and " 0 violated" in check.stdout, check.stdout + check.stderr
    assert next((run / "slurm").glob("geotrain-demo-us-east-*.out"), None) is not None
    assert (run / "control" / "links" / "us-east--hub.json").is_file()


def test_a_run_that_cannot_start_is_seen_failed(slurm, repo, tmp_path):
    """The check above can fail: a control plane whose geotrain does not exist fails its job, and the sites
    give up waiting for it."""
    topo = load_topology(repo / "topologies" / "demo.yaml")
    o = options(tmp_path, geotrain="/nonexistent/geotrain", wait_s=5)
    write_deployment(topo, Path(o.deploy_dir), o)
    states = submit_and_wait(Path(o.deploy_dir), Path(o.run_dir), timeout_s=180)
    assert states["control"][0] == "FAILED" and states["control"][1] != "0:0"
    assert {states["site us-east"][0], states["site eu-west"][0]} == {"FAILED"}
