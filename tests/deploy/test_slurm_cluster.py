"""The rendered Slurm scripts submitted to a real Slurm: slurmctld, slurmd and munge from Debian's packages,
started by scripts/slurm-local.sh as a cluster of this one host (root; it installs them if missing).
The demo runs to the end: the control plane's job and both sites' jobs COMPLETED with exit code 0:0, and
`geotrain check` passes the coordinator's history. The cluster is stopped afterwards if this test started it."""

import json
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


def wait_file_event(path: Path, pred, timeout_s: float):
    from geotrain.events import read_events

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = next((e for e in read_events(path) if pred(e)), None)
        if found is not None:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no such event in {path} within {timeout_s:.0f} s")


def launch_and_kill_eu_west(repo: Path, run: Path, extra: list[str], timeout_s: float) -> tuple[int, str, float]:
    """`geotrain launch demo.yaml --backend slurm ...extra`, `geotrain chaos RUN kill 'site eu-west'` once round 2
    has committed; (the launcher's exit status, its stderr, when it ended). Ctrl-C on the way out if it still runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GEOTRAIN_"))}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "geotrain.cli", "launch", str(repo / "topologies" / "demo.yaml"), "--backend", "slurm",
         "--run-dir", str(run), "--port-base", str(free_port_base()), "--time", "0:15:00", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_file_event(run / "control" / "metrics.jsonl", lambda e: e["event"] == "commit" and e["round"] >= 2, 300)
        chaos = subprocess.run([sys.executable, "-m", "geotrain.cli", "chaos", str(run), "kill", "site eu-west"],
                               capture_output=True, text=True, timeout=60)
        assert chaos.returncode == 0, chaos.stderr
        _, err = launcher.communicate(timeout=timeout_s)
        return launcher.returncode, err, time.time()
    finally:
        if launcher.poll() is None:
            launcher.send_signal(2)  # its way out cancels the run's jobs
            launcher.communicate(timeout=60)


def test_launch_backend_slurm_requeues_a_site_that_chaos_cancelled(slurm, repo, tmp_path):
    """`geotrain launch --backend slurm` on a real Slurm: `geotrain chaos RUN kill 'site eu-west'` is an scancel
    of its job; the launcher sees it CANCELLED, submits the site again, the new job's site rejoins, and the run
    completes every round with the coordinator's history checked. Nothing of the run is left queued."""
    from geotrain.events import read_events

    run = tmp_path / "run"
    rounds = 30  # the survivor goes on alone at once (ReportLost): rounds enough for the new job to rejoin
    returncode, err, _ = launch_and_kill_eu_west(repo, run, ["--linger", "3", "--set", f"training.rounds={rounds}"], 420)
    events = read_events(run / "metrics.jsonl")
    assert returncode == 0, err + "\n" + "\n".join(str(e) for e in events)
    kinds = [e["event"] for e in events]
    (fault,) = [e for e in events if e["event"] == "fault_injected"]
    assert fault["target"] == "site eu-west" and fault["record"]["how"] == "scancel"
    cancelled = next(e for e in events if e["event"] == "job_ended" and e["job"] == fault["record"]["job"])
    assert cancelled["state"] == "CANCELLED" and cancelled["by_fault"] is True
    (requeued,) = [e for e in events if e["event"] == "site_requeued"]
    assert requeued["site"] == "eu-west" and requeued["previous"] == fault["record"]["job"]
    assert "recovery" in kinds and kinds[-1] == "run_finished"
    ended = {e["job"]: e["state"] for e in events if e["event"] == "job_ended"}
    assert ended[requeued["job"]] == "COMPLETED" and list(ended.values()).count("COMPLETED") == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    # the launcher's failure (the job CANCELLED); the coordinator may record the same loss too, from the site's
    # etcd lease, before the new job is back (seen in CI): each failure has its recovery
    assert any(f["target"] == "site eu-west" and "CANCELLED" in f["reason"] for f in summary["failure_log"])
    assert 1 <= summary["failures"] <= 2 and summary["recoveries"] == summary["failures"]
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run / "control")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and " 0 violated" in check.stdout, check.stdout + check.stderr
    jobs = [j["job"] for j in json.loads((run / "slurm" / "jobs.json").read_text())]
    assert len(jobs) == 4
    assert all(job_state(j)[0] in DONE for j in jobs)


def test_a_site_requeued_near_the_end_never_fails_or_holds_the_run(slurm, repo, tmp_path):
    """A site's job cancelled two rounds before the end: the launcher reports it lost (ReportLost), the survivor
    commits the last rounds alone at once, and the site's new job races the end of the run. Either way the run
    completes with every round and a checked history: the new job rejoins (a recovery), or it missed the end and
    is released (scancel; its failure without a recovery) instead of waited for and failed ('these sites' jobs
    have not ended', 60 s after the control plane: seen before the release). Nothing is left queued. (The
    release itself, deterministically: tests/run/test_slurm_launch.py.)"""
    from geotrain.events import read_events

    run = tmp_path / "run"
    rounds = 5  # rounds 0-4, ~3 s each with 40 inner steps: the kill lands in round 3
    returncode, err, t_end = launch_and_kill_eu_west(
        repo, run, ["--linger", "1", "--set", f"training.rounds={rounds}", "--set", "training.inner_steps=40"], 300)
    events = read_events(run / "metrics.jsonl")
    assert returncode == 0, err + "\n" + "\n".join(str(e) for e in events)
    (requeued,) = [e for e in events if e["event"] == "site_requeued"]
    released = [e for e in events if e["event"] == "site_released"]
    recovered = [e for e in events if e["event"] == "recovery"]
    assert len(released) + len(recovered) == 1, events  # one or the other
    if released:
        assert released[0]["site"] == "eu-west" and released[0]["job"] == requeued["job"]
        assert "had not rejoined" in released[0]["reason"]
    control_done = next(e["t"] for e in events if e["event"] == "job_ended" and e["part"] == "control")
    assert t_end - control_done < 30, "a site's job was waited for after the end of the run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds, summary["reason"]
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run / "control")], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and " 0 violated" in check.stdout, check.stdout + check.stderr
    jobs = [j["job"] for j in json.loads((run / "slurm" / "jobs.json").read_text())]
    assert len(jobs) == 4 and all(job_state(j)[0] in DONE for j in jobs)


def test_launch_backend_slurm_cancels_its_jobs_when_stopped(slurm, repo, tmp_path):
    """SIGTERM to the launcher: every job of the run is cancelled, the run is reported interrupted (130)."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GEOTRAIN_"))}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "geotrain.cli", "launch", str(repo / "topologies" / "demo.yaml"), "--backend", "slurm",
         "--run-dir", str(run), "--port-base", str(free_port_base()), "--set", "training.rounds=50"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_file_event(run / "metrics.jsonl", lambda e: e["event"] == "job_submitted" and e["part"] == "eu-west", 120)
        launcher.terminate()
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, err
    jobs = [j["job"] for j in json.loads((run / "slurm" / "jobs.json").read_text())]
    deadline = time.monotonic() + 90
    while not all(job_state(j)[0] in DONE for j in jobs):
        assert time.monotonic() < deadline, {j: job_state(j) for j in jobs}
        time.sleep(1)
    assert {job_state(j)[0] for j in jobs} == {"CANCELLED"}
