"""`geotrain launch --backend slurm`'s decisions, as transcripts (geotrain.run.slurm_launch.decide), Slurm's
answers parsed, and what the backend refuses. A real Slurm runs it in tests/deploy/test_slurm_cluster.py."""

import pytest

from geotrain.config.topology import FaultSpec, parse_topology
from geotrain.run.faults import FaultScheduler
from geotrain.run.slurm_launch import SLURM_KILL, Job, decide, parse_sacct, parse_scontrol, site_absent, slurm_problem


def jobs(control, **sites):
    """Job states written as 'STATE' or 'STATE:exit'."""
    def job(part, text, i):
        state, _, code = text.partition(":")
        return Job(part, str(100 + i), state, code)
    return job("control", control, 0), {s: job(s, t, i + 1) for i, (s, t) in enumerate(sites.items())}


def actions(control, restarts=None, max_restarts=2, ended_for=0.0, **sites):
    c, s = jobs(control, **sites)
    return [(d.action, d.site) for d in decide(c, s, restarts or {}, max_restarts, control_ended_for_s=ended_for,
                                                settle_s=60)]


def test_a_run_transcript_from_queued_to_done_with_one_requeue():
    assert actions("PENDING", a="PENDING", b="PENDING") == [("wait", None)]
    assert actions("RUNNING", a="RUNNING", b="PENDING") == [("wait", None)]
    assert actions("RUNNING", a="RUNNING", b="CANCELLED:0:15") == [("requeue", "b")]  # a scancel: submitted again
    assert actions("RUNNING", {"b": 1}, a="RUNNING", b="PENDING") == [("wait", None)]  # its new job
    assert actions("RUNNING", {"b": 1}, a="COMPLETED:0:0", b="RUNNING") == [("wait", None)]
    assert actions("COMPLETED:0:0", {"b": 1}, a="COMPLETED:0:0", b="COMPLETING") == [("wait", None)]
    assert actions("COMPLETED:0:0", {"b": 1}, a="COMPLETED:0:0", b="COMPLETED:0:0") == [("done", None)]


@pytest.mark.parametrize("state", ["FAILED:1:0", "NODE_FAIL:0:0", "TIMEOUT:0:0", "PREEMPTED:0:0", "OUT_OF_MEMORY:0:125",
                                   "GONE", "SPECIAL_EXIT:0:0", "REQUEUE_HOLD:0:0", "REVOKED"])
def test_every_way_a_site_job_ends_badly_is_requeued(state):
    assert actions("RUNNING", a="RUNNING", b=state) == [("requeue", "b")]


def test_two_sites_failing_at_once_are_both_requeued():
    assert actions("RUNNING", a="FAILED:1:0", b="NODE_FAIL") == [("requeue", "a"), ("requeue", "b")]


def test_a_site_past_its_restarts_fails_the_run_with_the_reason():
    c, s = jobs("RUNNING", a="RUNNING", b="FAILED:1:0")
    (d,) = decide(c, s, {"b": 2}, 2)
    assert d.action == "fail" and "site b's job 102 FAILED (exit code 1:0)" in d.reason
    assert "recovery.max_restarts = 2" in d.reason


def test_a_control_plane_that_does_not_complete_fails_the_run():
    for state in ("FAILED:1:0", "CANCELLED:0:15", "TIMEOUT"):
        c, s = jobs(state, a="RUNNING", b="RUNNING")
        (d,) = decide(c, s, {}, 2)
        assert d.action == "fail" and d.reason.startswith("the control plane's job 100")


def test_after_the_control_plane_completed_a_failing_site_is_not_requeued():
    assert actions("COMPLETED:0:0", a="COMPLETED:0:0", b="FAILED:1:0") == [("fail", None)]


def test_sites_that_never_end_after_the_control_plane_fail_the_run_once_settle_s_passed():
    assert actions("COMPLETED:0:0", ended_for=59, a="COMPLETED", b="RUNNING") == [("wait", None)]
    c, s = jobs("COMPLETED:0:0", a="COMPLETED", b="RUNNING")
    (d,) = decide(c, s, {}, 2, control_ended_for_s=61, settle_s=60)
    assert d.action == "fail" and "b (job 102 RUNNING)" in d.reason


def test_scontrol_and_sacct_answers_are_parsed():
    line = ("JobId=17 JobName=geotrain-demo-eu-west UserId=root(0) JobState=CANCELLED Reason=None Dependency=(null) "
            "Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:15 RunTime=00:00:09")
    assert parse_scontrol(line) == ("CANCELLED", "0:15")
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified") is None
    assert parse_sacct("CANCELLED by 0|0:15\n") == ("CANCELLED", "0:15")
    assert parse_sacct("") is None


def topo(**extra):
    return parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}], **extra})


def test_only_killing_a_site_is_a_fault_the_slurm_backend_has():
    assert slurm_problem(topo(faults=[{"kind": "kill", "target": "site b", "at_round": 2}])) is None
    problem = slurm_problem(topo(faults=[{"kind": "kill", "target": "site b", "at_round": 1},
                                         {"kind": "partition", "target": "link b", "at_round": 2, "duration": "5s"}]))
    assert problem.startswith("faults[1]: partition 'link b' is not available with --backend slurm")
    assert "faults[0]: kill 'worker a/0'" in slurm_problem(topo(faults=[{"kind": "kill", "target": "worker a/0", "at_round": 1}]))
    assert "fault_rate" in slurm_problem(topo(fault_rate={"mtbf_s": 60, "seed": 1}))


class Events:
    def __init__(self):
        self.got = []

    def emit(self, event, **kw):
        self.got.append((event, kw))


class Env:
    def __init__(self, run_dir):
        self.run_dir = run_dir


def test_a_live_request_the_backend_cannot_do_is_rejected_naming_it(tmp_path):
    from geotrain.run.faults import request_live_fault

    t = topo()
    events = Events()
    sched = FaultScheduler(Env(tmp_path), t, events, started_at=0.0, registry={"kill": SLURM_KILL})
    request_live_fault(tmp_path, {"kind": "freeze", "target": "site a", "at": "0s", "duration": "2s"})
    request_live_fault(tmp_path, {"kind": "kill", "target": "worker a/0", "at": "0s"})
    sched._read_live_requests()
    reasons = [kw["reason"] for e, kw in events.got if e == "fault_rejected"]
    assert len(reasons) == 2 and all("not available with this launcher (it can: kill)" in r for r in reasons)
    assert sched.pending == []
    request_live_fault(tmp_path, {"kind": "kill", "target": "site b", "at": "0s"})
    sched._read_live_requests()
    assert [(s.kind, s.target) for s in sched.pending] == [("kill", "site b")]
    assert SLURM_KILL.available(t, FaultSpec.model_validate({"kind": "kill", "target": "site b", "at": "0s"}))


def test_a_round_committed_without_a_site_counts_as_lost_for_it():
    assert site_absent({"event": "commit", "round": 4, "sites": ["a"]}, "b") == 1
    assert site_absent({"event": "commit", "round": 5, "sites": ["a", "b"]}, "b") == 0


class RecordingSlurm:
    """The Slurm commands the launcher issues, recorded (the real ones: tests/deploy/test_slurm_cluster.py)."""

    def __init__(self):
        self.cancelled, self.submitted = [], []

    def submit(self, script, *extra):
        self.submitted.append(script.name)
        return str(200 + len(self.submitted))

    def cancel(self, job_ids):
        self.cancelled.extend(job_ids)


def test_a_held_site_job_is_cancelled_when_its_site_is_submitted_again_and_on_the_way_out(tmp_path):
    """SPECIAL_EXIT / REQUEUE_HOLD: Slurm keeps the job queued until a person releases it. Waiting on it would
    hang the run; leaving it queued beside its replacement would let a release start a second copy of the site."""
    from geotrain.events import EventLog
    from geotrain.run.slurm import SlurmOptions
    from geotrain.run.slurm_launch import SlurmLaunch

    slurm = RecordingSlurm()
    launch = SlurmLaunch(topo(), tmp_path, SlurmOptions(run_dir=str(tmp_path), deploy_dir=str(tmp_path / "deploy")),
                         slurm=slurm)
    launch.events, launch.pending_recovery = EventLog(None, "launcher (slurm)"), {}  # what start() sets up
    (tmp_path / "slurm").mkdir()
    c, s = jobs("RUNNING", a="RUNNING", b="SPECIAL_EXIT:0:0")
    launch.jobs = {"control": c, **s}
    (d,) = decide(c, s, {}, 2)
    assert (d.action, d.site) == ("requeue", "b")
    launch._requeue(d)
    assert slurm.cancelled == ["102"] and slurm.submitted == ["site-b.sbatch"]
    launch.jobs["a"] = Job("a", "101", "REQUEUE_HOLD")
    launch.stop()
    assert "101" in slurm.cancelled and "100" in slurm.cancelled  # held, and the control plane still running


def test_a_site_whose_job_ended_is_reported_lost_to_the_coordinator_before_it_is_submitted_again(tmp_path):
    """The local launcher tells the coordinator at once when a site's process dies (ReportLost); on Slurm the
    same happens when a site's job ends: the coordinator drops the site's member before the new job exists, so the
    open round commits with the survivors instead of waiting for the old leader's etcd lease to lapse."""
    import time

    from geotrain.events import EventLog, read_events
    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.server import create_server
    from geotrain.run.slurm import SlurmOptions
    from geotrain.run.slurm_launch import SlurmLaunch

    engine = CoordinatorEngine(EngineConfig(sites=("a", "b"), min_sites=1))
    server, port = create_server(engine)
    try:
        for pid, site in enumerate(("a", "b"), start=4000):
            engine.join(site, 1, pid, time.time())
        assert engine.site_pids == {"a": 4000, "b": 4001}
        slurm = RecordingSlurm()
        launch = SlurmLaunch(topo(security={"tls": False}), tmp_path,
                             SlurmOptions(run_dir=str(tmp_path), deploy_dir=str(tmp_path / "deploy"), port_base=port),
                             slurm=slurm)
        launch.events, launch.pending_recovery = EventLog(tmp_path / "metrics.jsonl", "launcher (slurm)"), {}
        (tmp_path / "slurm").mkdir()
        (tmp_path / "control").mkdir()
        c, s = jobs("RUNNING", a="RUNNING", b="NODE_FAIL:0:0")
        launch.jobs = {"control": c, **s}
        (d,) = decide(c, s, {}, 2)
        launch._requeue(d)  # no control.env yet: nothing to report to, the site is submitted all the same
        assert slurm.submitted == ["site-b.sbatch"] and "b" in engine.site_pids
        (tmp_path / "control" / "control.env").write_text("GEOTRAIN_CONTROL_HOST=127.0.0.1\n")
        launch.jobs["b"] = Job("b", "201", "FAILED", "1:0")
        launch._requeue(decide(c, {**s, "b": launch.jobs["b"]}, {"b": 1}, 2)[0])
        assert slurm.submitted == ["site-b.sbatch"] * 2 and engine.site_pids == {"a": 4000}
        (reported,) = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "lost_reported"]
        assert reported["site"] == "b" and reported["action"] == "drop_lost", reported
    finally:
        server.stop(0)


def test_a_site_submitted_again_that_missed_the_end_of_the_run_is_released_not_failed():
    """The survivors committed every round while a requeued site's new job was still queued or starting (seen on a
    real Slurm once ReportLost let them go on at once): the control plane's job completes, and the new job has
    nothing left to rejoin. It is released (cancelled), not waited for until settle_s and failed."""
    c, s = jobs("COMPLETED:0:0", a="COMPLETED:0:0", b="PENDING")
    (d,) = decide(c, s, {"b": 1}, 2, recovering=frozenset({"b"}))
    assert d.action == "release" and d.site == "b" and "had not rejoined" in d.reason and "job 102 PENDING" in d.reason
    # its job cancelled: the run is done whatever state it ends in
    for state in ("CANCELLED:0:15", "RUNNING", "FAILED:1:0"):
        c, s = jobs("COMPLETED:0:0", a="COMPLETED:0:0", b=state)
        assert decide(c, s, {"b": 1}, 2, recovering=frozenset(), released=frozenset({"b"})) == [
            decide(*jobs("COMPLETED:0:0", a="COMPLETED:0:0", b="COMPLETED:0:0"), {}, 2)[0]]
    # a site that rejoined (no longer recovering) is waited for as before, and fails the run past settle_s
    c, s = jobs("COMPLETED:0:0", a="COMPLETED:0:0", b="RUNNING")
    assert [d.action for d in decide(c, s, {"b": 1}, 2, control_ended_for_s=10)] == ["wait"]
    assert [d.action for d in decide(c, s, {"b": 1}, 2, control_ended_for_s=61, settle_s=60)] == ["fail"]
    # while the control plane runs, a recovering site is only waited for
    c, s = jobs("RUNNING", a="RUNNING", b="PENDING")
    assert [d.action for d in decide(c, s, {"b": 1}, 2, recovering=frozenset({"b"}))] == ["wait"]


def test_the_launcher_cancels_a_released_sites_job_and_records_why(tmp_path):
    from geotrain.events import EventLog, read_events
    from geotrain.run.slurm import SlurmOptions
    from geotrain.run.slurm_launch import SlurmLaunch

    slurm = RecordingSlurm()
    launch = SlurmLaunch(topo(security={"tls": False}), tmp_path,
                         SlurmOptions(run_dir=str(tmp_path), deploy_dir=str(tmp_path / "deploy")), slurm=slurm)
    launch.events = EventLog(tmp_path / "metrics.jsonl", "launcher (slurm)")
    launch.pending_recovery = {"b": {"failure_t": 1.0, "job": "202", "site": "b", "rounds_lost": 5}}
    c, s = jobs("COMPLETED:0:0", a="COMPLETED:0:0", b="PENDING")
    launch.jobs = {"control": c, **s}
    (d,) = decide(c, s, {"b": 1}, 2, recovering=frozenset(launch.pending_recovery))
    launch._release(d)
    assert slurm.cancelled == ["102"] and launch.released == {"b"} and not launch.pending_recovery
    (released,) = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "site_released"]
    assert released["site"] == "b" and released["job"] == "102" and released["rounds_lost"] == 5
