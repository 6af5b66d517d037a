"""Live recovery and exact resume, on real processes (issue: fault-tolerant checkpointing).

Each fault test runs the demo topology, injects one fault mid-training, and checks that the run
completes all its rounds, that its final eval loss is within 2% of the fault-free run, and that
after every merge all surviving sites hold the same weights (the merge crc32 equals the commit's).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, start_launch, started_pids, summary, wait_for_event

pytestmark = pytest.mark.slow
DEMO = REPO / "topologies" / "demo.yaml"
ROUNDS = 6
COMMON = (f"training.rounds={ROUNDS}",)


def launch_args(*extra: str) -> list[str]:
    out = []
    for o in COMMON + extra:
        out += ["--set", o]
    return out


def run_to_end(run_dir, *extra) -> dict:
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--run-dir", str(run_dir), "--quiet",
                        *launch_args(*extra)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return summary(run_dir)


def final_params(run_dir) -> torch.Tensor:
    """The global parameters of the coordinator's last durable state (what a restart resumes from)."""
    from geotrain.orchestrator.persist import StateStore

    return StateStore(run_dir / "coordinator").load().params


def evals_by_round(run_dir) -> dict[int, float]:
    out = {}
    for e in read_events(run_dir / "metrics.jsonl"):
        if e["event"] == "eval":
            out[e["round"]] = e["loss"]  # the last eval of a round wins (a resumed run re-evaluates)
    return out


def assert_sites_agree(run_dir):
    events = read_events(run_dir / "metrics.jsonl")
    commits = {e["round"]: e["crc32"] for e in events if e["event"] == "commit"}
    rounds = [e["round"] for e in events if e["event"] == "commit"]
    assert len(rounds) == len(set(rounds)), f"a round was committed twice: {rounds}"
    merges = [e for e in events if e["event"] == "merge"]
    assert merges
    for m in merges:
        assert m["crc32"] == commits[m["version"] - 1], f"{m['site']} holds other weights after round {m['version'] - 1}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    s = run_to_end(run_dir)
    return run_dir, s


def inject_and_finish(tmp_path, fault, *extra, after_round=2, timeout=300):
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, *launch_args(*extra))
    try:
        wait_for_event(run_dir, lambda e: e["event"] == "commit" and e["round"] >= after_round - 1, timeout_s=120)
        fault(run_dir)
        out, err = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err
    assert not leftover(run_dir)
    return run_dir, summary(run_dir)


def check_outcome(run_dir, s, baseline_summary):
    assert s["rounds_completed"] == ROUNDS
    base = baseline_summary["final_eval_loss"]
    assert abs(s["final_eval_loss"] - base) / base <= 0.02, (s["final_eval_loss"], base)
    assert_sites_agree(run_dir)


def test_exact_resume_after_sigkill(tmp_path, baseline):
    base_dir, _ = baseline
    run_dir = tmp_path / "run"
    launcher = start_launch(DEMO, run_dir, *launch_args())
    wait_for_event(run_dir, lambda e: e["event"] == "checkpoint_saved" and e["round"] >= 3, timeout_s=120)
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher and, through PDEATHSIG, everything it started
    launcher.wait()
    assert not leftover(run_dir, wait_s=10)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "resume", str(run_dir), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "continuing demo from round" in r.stderr
    assert torch.equal(final_params(run_dir), final_params(base_dir)), "resumed weights differ from the uninterrupted run"
    assert evals_by_round(run_dir) == evals_by_round(base_dir)
    # The resumed site evaluates the model it joined with, so an eval lost to the kill (between the
    # commit and its eval) is made again, and it is the uninterrupted run's eval bit for bit.
    rejoin = [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "eval" and e.get("rejoin")]
    assert len(rejoin) == 1
    assert rejoin[0]["loss"] == evals_by_round(base_dir)[rejoin[0]["round"]]


def test_resume_compares_bitwise_so_it_can_fail(tmp_path, baseline):
    """The exact-resume check notices a different run (another seed)."""
    base_dir, _ = baseline
    other = tmp_path / "other"
    run_to_end(other, "seed=1")
    assert not torch.equal(final_params(other), final_params(base_dir))


def test_sigkill_worker_restarts_its_site(tmp_path, baseline):
    def fault(run_dir):
        os.kill(started_pids(run_dir)["worker eu-west/1"], signal.SIGKILL)

    run_dir, s = inject_and_finish(tmp_path, fault)
    check_outcome(run_dir, s, baseline[1])
    events = read_events(run_dir / "metrics.jsonl")
    assert any(e["event"] == "failure" and e["target"] == "worker eu-west/1" for e in events)
    assert any(e["event"] == "recovery" and e["target"] == "worker eu-west/1" for e in events)
    assert s["failures"] >= 1 and s["recoveries"] >= 1


def test_a_killed_worker_is_taken_over_by_its_warm_standby(tmp_path, baseline):
    """recovery.warm_standby: once the site trains, the launcher keeps an imported standby per worker (it
    says READY in the worker's log); the killed worker's replacement is that standby, not a fresh process."""
    def fault(run_dir):
        log = run_dir / "logs" / "worker-eu-west-1.log"
        deadline = time.monotonic() + 90
        while "READY standby" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert time.monotonic() < deadline, "no warm standby of worker eu-west/1 became ready"
            time.sleep(0.2)
        fault.t = time.time()
        os.kill(started_pids(run_dir)["worker eu-west/1"], signal.SIGKILL)

    # us-east 4x slower (a sleep: the arithmetic is the baseline's): a standby needs ~5 s of CPU to be READY
    # (torch, geotrain, torch._dynamo), and a loaded CI machine once finished the whole run before that
    run_dir, s = inject_and_finish(tmp_path, fault, "recovery.warm_standby=true", "sites[0].slowdown=4",
                                   after_round=1)
    check_outcome(run_dir, s, baseline[1])
    started = [e for e in read_events(run_dir / "metrics.jsonl")
               if e["event"] == "process_started" and e["name"] == "worker eu-west/1" and e["t"] > fault.t]
    assert started and started[0].get("standby") is True, started


def test_sigkill_site_leader(tmp_path, baseline):
    def fault(run_dir):
        os.kill(started_pids(run_dir)["worker us-east/0"], signal.SIGKILL)

    run_dir, s = inject_and_finish(tmp_path, fault)
    check_outcome(run_dir, s, baseline[1])


def test_sigkill_coordinator(tmp_path, baseline):
    def fault(run_dir):
        os.kill(started_pids(run_dir)["coordinator"], signal.SIGKILL)

    run_dir, s = inject_and_finish(tmp_path, fault)
    check_outcome(run_dir, s, baseline[1])
    events = read_events(run_dir / "metrics.jsonl")
    starts = [e for e in events if e["event"] == "coordinator_started"]
    assert len(starts) == 2 and starts[1]["epoch"] > starts[0]["epoch"]
    assert any(e["event"] == "recovery" and e["what"] == "coordinator" for e in events)


def test_sigstop_site_past_the_round_deadline(tmp_path, baseline):
    deadline = 6.0

    def fault(run_dir):
        pids = started_pids(run_dir)
        site = [pids["worker eu-west/0"], pids["worker eu-west/1"]]
        for p in site:
            os.kill(p, signal.SIGSTOP)
        time.sleep(deadline + 6)
        for p in site:
            os.kill(p, signal.SIGCONT)

    run_dir, s = inject_and_finish(tmp_path, fault, f"training.round_timeout_s={deadline}", "recovery.min_sites=1")
    assert s["rounds_completed"] == ROUNDS
    assert_sites_agree(run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    dropped = [e for e in events if e["event"] == "failure" and e["what"] == "site" and e["target"] == "eu-west"]
    assert dropped, "the frozen site was not dropped after the deadline"
    commits = [e for e in events if e["event"] == "commit"]
    assert any(c["sites"] == ["us-east"] for c in commits), "no round committed without the frozen site"
    # when it came back its late update was refused, never applied, and it rejoined
    assert any(e["event"] == "merge_refused" and e["site"] == "eu-west" for e in events) or \
        any(e["event"] == "merge_discarded" and e["site"] == "eu-west" for e in events)
    assert any(e["event"] == "recovery" and e["target"] == "eu-west" for e in events)
    assert any(e["event"] == "site_joined" and e["site"] == "eu-west" and e["t"] > dropped[0]["detected_t"] for e in events)


def test_etcd_briefly_unreachable_training_goes_on(tmp_path, baseline):
    def fault(run_dir):
        pid = started_pids(run_dir)["etcd"]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(pid, signal.SIGCONT)

    run_dir, s = inject_and_finish(tmp_path, fault)
    check_outcome(run_dir, s, baseline[1])
    assert s["failures"] == 0  # nobody was declared dead: membership changes waited for etcd


def test_frozen_coordinator_is_detected_by_heartbeat_and_replaced(tmp_path, baseline):
    def fault(run_dir):
        os.kill(started_pids(run_dir)["coordinator"], signal.SIGSTOP)  # its TCP connections stay open

    run_dir, s = inject_and_finish(tmp_path, fault)
    check_outcome(run_dir, s, baseline[1])
    events = read_events(run_dir / "metrics.jsonl")
    assert any(e["event"] == "heartbeat_lost" and e["target"] == "coordinator" for e in events)
    assert len([e for e in events if e["event"] == "coordinator_started"]) == 2
