"""``geotrain launch TOPOLOGY --backend slurm``: the run's jobs submitted, watched, a failed site requeued.

    geotrain launch TOPOLOGY --backend slurm --run-dir SHARED [--partition P] [--account A] [--time T]
                    [--geotrain CMD] [--port-base P]

The run directory must lie on a file system every node sees (the jobs read their scripts, the topology
and their certificates from it and write their parts' directories into it). The launcher:

1. renders the scripts into ``RUN/deploy`` (geotrain.run.slurm: the control plane's job, one job per
   site, each site of ``nodes`` > 1 a job of that many nodes) and writes ``RUN/topology.json`` (what
   ``geotrain chaos RUN ...`` reads);
2. submits the control plane's job, then every site's with ``--dependency=after:<control>``;
3. watches the jobs (``scontrol show job``; ``sacct`` once a job has left slurmctld's memory) every
   ``poll_s`` and acts on :func:`decide`: a site's job that ended in anything but COMPLETED while the
   control plane runs (FAILED, NODE_FAIL, a ``scancel``, a time limit...) is submitted again, as a new job
   with the same script, up to ``recovery.max_restarts`` times per site (the new job's ``geotrain site``
   joins the run as a restarted site does; before it is submitted the coordinator is told the site is lost,
   ReportLost, so the round being collected commits with the survivors at once); a control plane that ends
   in anything but COMPLETED fails the run; the run is done when the control plane's job and every site's
   latest job have COMPLETED. A site submitted again that had not rejoined when the control plane's job
   completed (the survivors committed every round without it: its new job was still queued, or starting) is
   *released*: its job is cancelled (nothing is left to rejoin) and the run is judged by its history, where
   that site's failure has no recovery;
4. takes faults from the topology's ``faults:`` and, live, from ``geotrain chaos RUN kill 'site NAME'``:
   ``kill`` of a site is ``scancel`` of its job (what a cluster's operator, or a preemption, does to a
   site); other kinds act on processes or files of the launcher's own host and are refused here, naming
   the fault;
5. on its way out (done, failed, Ctrl-C, SIGTERM) ``scancel`` of every job of the run still queued or
   running: nothing is left on the cluster.

The history it judges the run by is every part's: ``RUN/metrics.jsonl`` (the launcher's own events: jobs
submitted and ended, failures, recoveries, faults), ``RUN/control/metrics.jsonl`` (the coordinator's) and
``RUN/site-*/metrics.jsonl`` (the sites'); ``RUN/summary.json`` is computed from them as for a local launch,
and the run fails, whatever the jobs' states, when the model went non-finite or rounds are missing
(geotrain.run.summary.model_failure, shortfall). Requeueing keeps Slurm's job ids honest: a site's
resubmission is a new job (``scontrol requeue`` would keep the id but needs a requeue-able job and
``JobRequeue``); all ids are in ``RUN/slurm/jobs.json``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from geotrain.config.topology import FaultSpec, Topology, fault_problem
from geotrain.errors import GeotrainError, RunFailed
from geotrain.events import EventLog, EventTail, read_events
from geotrain.run.slurm import RenderError, SlurmOptions, renderable_problem, site_part, write_deployment

HELD = frozenset({"SPECIAL_EXIT", "REQUEUE_HOLD", "RESV_DEL_HOLD"})
"""Slurm job states a job leaves only by a person's ``scontrol release``: requeued and held (SPECIAL_EXIT: its
script exited with the cluster's special exit code). For the run the job has ended (waiting on it would wait
forever); it is cancelled when the site is submitted again, so that a release cannot start a second copy."""

ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                   "OUT_OF_MEMORY", "REVOKED", "GONE"}) | HELD
"""Slurm job states a job does not leave by itself (GONE: neither scontrol nor sacct knows the job any more;
REVOKED: a federated job that runs on another cluster)."""

CONTROL = "control"


# ---- the decision -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One job of the run as Slurm last reported it."""

    part: str  # "control" or a site's name
    job_id: str
    state: str = "PENDING"
    exit_code: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def describe(self) -> str:
        return f"job {self.job_id} {self.state}" + (f" (exit code {self.exit_code})" if self.exit_code else "")


@dataclass(frozen=True)
class Decision:
    action: str  # wait | requeue | release | done | fail
    reason: str
    site: str | None = None


def decide(control: Job, sites: dict[str, Job], restarts: dict[str, int], max_restarts: int, *,
           control_ended_for_s: float = 0.0, settle_s: float = 60.0, recovering: frozenset[str] = frozenset(),
           released: frozenset[str] = frozenset()) -> list[Decision]:
    """What to do about the jobs now: a pure function of their states (see the module docstring).

    ``restarts``: how often each site was submitted again already; ``control_ended_for_s``: how long ago
    the control plane's job was seen ended (the sites' jobs get ``settle_s`` more to end after it);
    ``recovering``: the sites submitted again whose new job has not rejoined the run yet; ``released``: the
    sites the launcher let go (their job cancelled on a ``release``), done for the run whatever their state."""
    if control.ended and control.state != "COMPLETED":
        return [Decision("fail", f"the control plane's {control.describe()}")]
    if control.state == "COMPLETED":
        late = [(n, j) for n, j in sorted(sites.items()) if n in recovering and n not in released]
        if late:  # the run ended without them: nothing to rejoin, neither a reason to wait nor to fail
            return [Decision("release", f"site {n} was submitted again and had not rejoined when the control plane's "
                                        f"job completed (every round committed without it); its {j.describe()} "
                                        f"is let go", site=n) for n, j in late]
    out = []
    for name, job in sorted(sites.items()):
        if name in released or not job.ended or job.state == "COMPLETED":
            continue
        if control.ended:
            return [Decision("fail", f"site {name}'s {job.describe()} after the control plane's job had ended")]
        if restarts.get(name, 0) >= max_restarts:
            return [Decision("fail", f"site {name}'s {job.describe()}, and it was submitted again "
                                     f"{restarts.get(name, 0)} times already (recovery.max_restarts = {max_restarts})")]
        out.append(Decision("requeue", f"site {name}'s {job.describe()}; submitting it again", site=name))
    if out:
        return out
    if control.state == "COMPLETED":
        if all(j.state == "COMPLETED" or n in released for n, j in sites.items()):
            return [Decision("done", "the control plane's job and every site's completed")]
        if control_ended_for_s >= settle_s:
            late = ", ".join(f"{n} ({j.describe()})" for n, j in sorted(sites.items())
                             if not j.ended and n not in released)
            return [Decision("fail", f"the control plane's job completed {control_ended_for_s:.0f} s ago and "
                                     f"these sites' jobs have not ended: {late}")]
    return [Decision("wait", "jobs queued or running")]


def site_absent(commit: dict, site: str) -> int:
    """1 when a commit event's round went without ``site``'s update (a round that site lost), else 0."""
    return 0 if site in (commit.get("sites") or ()) else 1


def slurm_problem(topo: Topology) -> str | None:
    """What of ``topo`` the Slurm backend cannot do (None: nothing)."""
    for i, spec in enumerate(topo.faults):
        if not SLURM_KILL.available(topo, spec):
            return (f"faults[{i}]: {spec.kind} {spec.target!r} is not available with --backend slurm (only kill of "
                    "'site NAME', which is scancel of its job; the other kinds act on this host's processes)")
    if topo.fault_rate is not None:
        return "fault_rate: drawn faults are not available with --backend slurm yet (schedule kill of 'site NAME')"
    return None


# ---- Slurm's commands ---------------------------------------------------------------------------------


_FIELD = re.compile(r"\b(JobState|ExitCode)=(\S+)")


def parse_scontrol(text: str) -> tuple[str, str] | None:
    """(state, exit code) from one line of ``scontrol show job -o ID``; None if it names no job."""
    found = dict(_FIELD.findall(text))
    return (found["JobState"], found.get("ExitCode", "")) if "JobState" in found else None


def parse_sacct(text: str) -> tuple[str, str] | None:
    """(state, exit code) from ``sacct -n -P -X -o State,ExitCode -j ID``: "CANCELLED by 0|0:15"."""
    for line in text.splitlines():
        if "|" in line:
            state, code = line.split("|", 1)
            return state.split()[0], code.strip()
    return None


@dataclass
class Slurm:
    """The Slurm commands the launcher runs (names or paths, so a test may point them elsewhere)."""

    sbatch: str = "sbatch"
    scontrol: str = "scontrol"
    sacct: str = "sacct"
    scancel: str = "scancel"
    env: dict | None = None

    def _run(self, argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=self.env)
        except FileNotFoundError:
            raise GeotrainError(f"--backend slurm: {argv[0]!r} not found (is this a Slurm submit host?)") from None
        except subprocess.TimeoutExpired:
            raise GeotrainError(f"--backend slurm: {' '.join(argv)} did not answer within {timeout_s:.0f} s") from None

    def submit(self, script: Path, *extra: str) -> str:
        r = self._run([self.sbatch, "--parsable", *extra, str(script)])
        if r.returncode != 0:
            raise GeotrainError(f"sbatch {script.name}: {r.stderr.strip() or r.stdout.strip() or f'exit {r.returncode}'}")
        return r.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> tuple[str, str]:
        r = self._run([self.scontrol, "show", "job", "-o", job_id])
        found = parse_scontrol(r.stdout) if r.returncode == 0 else None
        if found is None:  # left slurmctld's memory (MinJobAge): the accounting may still know it
            try:
                a = self._run([self.sacct, "-n", "-P", "-X", "-o", "State,ExitCode", "-j", job_id])
                found = parse_sacct(a.stdout) if a.returncode == 0 else None
            except GeotrainError:
                found = None
        return found or ("GONE", "")

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            try:
                self._run([self.scancel, *job_ids])
            except GeotrainError:
                pass


# ---- the launcher ---------------------------------------------------------------------------------------


class _SlurmKill:
    """``kill`` of ``site NAME`` with --backend slurm: scancel of the site's job (a FaultScheduler failpoint)."""

    name = "kill"

    @staticmethod
    def available(topo: Topology, spec: FaultSpec) -> bool:
        return (spec.kind == "kill" and spec.target.startswith("site ") and fault_problem(topo, spec) is None)

    @staticmethod
    def inject(env: "SlurmLaunch", spec: FaultSpec):
        site = spec.target.split(" ", 1)[1]
        job = env.jobs[site]
        env.slurm.cancel([job.job_id])
        env.cancelled_by_fault.add(job.job_id)
        return {"job": job.job_id, "how": "scancel"}, None


SLURM_KILL = _SlurmKill()


@dataclass
class SlurmLaunch:
    """One run on Slurm (see the module docstring); :meth:`run` from start to its summary."""

    topo: Topology
    run_dir: Path
    opts: SlurmOptions
    slurm: Slurm = field(default_factory=Slurm)
    poll_s: float = 1.0
    settle_s: float = 60.0
    jobs: dict[str, Job] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    cancelled_by_fault: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)
    """Sites let go after the run ended without them (decide's ``release``)."""

    @property
    def deploy(self) -> Path:
        return Path(self.opts.deploy_dir)

    def site_dirs(self, site: str) -> list[Path]:
        s = self.topo.site(site)
        base = self.run_dir / site_part(site)
        return [base] + [Path(f"{base}-node{k}") for k in range(1, s.nodes)]

    # ---- start ----
    def start(self) -> None:
        from geotrain.run.faults import FaultScheduler

        problem = slurm_problem(self.topo)
        if problem:
            raise GeotrainError(problem)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "topology.json").write_text(json.dumps(self.topo.model_dump(mode="json"), indent=2))
        write_deployment(self.topo, self.deploy, self.opts, source=str(self.run_dir / "topology.json"))
        (self.run_dir / "slurm").mkdir(exist_ok=True)
        (self.run_dir / "control").mkdir(exist_ok=True)
        (self.run_dir / "control" / "control.env").unlink(missing_ok=True)
        self.events = EventLog(self.run_dir / "metrics.jsonl", "launcher (slurm)")
        self.events.emit("run_started", run=self.topo.name, topology_sha256=self.topo.digest(),
                         sites=self.topo.site_names, algorithm=self.topo.training.algorithm, backend="slurm")
        self.tails = [EventTail(self.run_dir / "control" / "metrics.jsonl")] + \
            [EventTail(d / "metrics.jsonl") for s in self.topo.site_names for d in self.site_dirs(s)[:1]]
        self._submit(CONTROL, self.deploy / "control.sbatch")
        for s in self.topo.site_names:
            self._submit(s, self.deploy / f"site-{s}.sbatch", f"--dependency=after:{self.jobs[CONTROL].job_id}")
        self.faults = FaultScheduler(self, self.topo, self.events, started_at=time.time(), registry={"kill": SLURM_KILL})
        self.pending_recovery: dict[str, dict] = {}

    def _submit(self, part: str, script: Path, *extra: str) -> Job:
        job = Job(part, self.slurm.submit(script, *extra))
        self.jobs[part] = job
        self.history.append({"part": part, "job": job.job_id, "submitted_t": time.time()})
        self._write_jobs()
        self.events.emit("job_submitted", part=part, job=job.job_id, script=script.name)
        return job

    def _write_jobs(self) -> None:
        tmp = self.run_dir / "slurm" / "jobs.json.tmp"
        tmp.write_text(json.dumps(self.history, indent=2) + "\n")
        tmp.replace(self.run_dir / "slurm" / "jobs.json")

    # ---- watch ----
    def watch(self, progress=None) -> None:
        control_ended_t = None
        while True:
            self._poll()
            self._observe()
            self.faults.tick()
            control = self.jobs[CONTROL]
            if control.ended and control_ended_t is None:
                control_ended_t = time.time()
            sites = {s: self.jobs[s] for s in self.topo.site_names}
            for d in decide(control, sites, self.restarts, self.topo.recovery.max_restarts,
                            control_ended_for_s=time.time() - control_ended_t if control_ended_t else 0.0,
                            settle_s=self.settle_s, recovering=frozenset(self.pending_recovery),
                            released=frozenset(self.released)):
                if d.action == "done":
                    return
                if d.action == "fail":
                    raise RunFailed(d.reason + self._output_tail(d))
                if d.action == "requeue":
                    self._requeue(d)
                if d.action == "release":
                    self._release(d)
            if progress is not None:
                progress()
            time.sleep(self.poll_s)

    def _poll(self) -> None:
        for part, job in list(self.jobs.items()):
            if job.ended:
                continue
            state, code = self.slurm.state(job.job_id)
            if state != job.state:
                self.jobs[part] = Job(part, job.job_id, state, code)
                if state in ENDED:
                    for h in self.history:
                        if h["job"] == job.job_id:
                            h.update(state=state, exit_code=code, ended_t=time.time())
                    self._write_jobs()
                    self.events.emit("job_ended", part=part, job=job.job_id, state=state, exit_code=code,
                                     by_fault=job.job_id in self.cancelled_by_fault)

    def _requeue(self, d: Decision) -> None:
        site, old = d.site, self.jobs[d.site]
        if old.state in HELD:  # still in the queue: a release would start it beside the new job
            self.slurm.cancel([old.job_id])
            self.events.emit("jobs_cancelled", jobs=[old.job_id], reason=f"site {site}'s {old.describe()} is held; "
                                                                          f"its site is submitted again")
        now = time.time()
        self.events.emit("failure", what="site", target=f"site {site}", happened_t=now, detected_t=now,
                         reason=f"{old.describe()}")
        self.restarts[site] = self.restarts.get(site, 0) + 1
        self._report_lost(site, f"its {old.describe()}")
        job = self._submit(site, self.deploy / f"site-{site}.sbatch")
        self.pending_recovery[site] = {"failure_t": now, "job": job.job_id, "site": site, "rounds_lost": 0}
        self.events.emit("site_requeued", site=site, job=job.job_id, previous=old.job_id, reason=d.reason)

    def _release(self, d: Decision) -> None:
        """Let a site go that was submitted again and missed the end of the run (decide's ``release``)."""
        site, job = d.site, self.jobs[d.site]
        if not job.ended or job.state in HELD:
            self.slurm.cancel([job.job_id])
            self.events.emit("jobs_cancelled", jobs=[job.job_id], reason=d.reason)
        self.released.add(site)
        f = self.pending_recovery.pop(site, {})
        self.events.emit("site_released", site=site, job=job.job_id, reason=d.reason,
                         rounds_lost=f.get("rounds_lost", 0))

    def coordinator_address(self) -> str | None:
        """Where the control plane's job serves the coordinator (its control.env; None before it is ready)."""
        try:
            text = (self.run_dir / "control" / "control.env").read_text()
        except OSError:
            return None
        host = next((line.split("=", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("GEOTRAIN_CONTROL_HOST=")), "")
        return f"{host}:{self.opts.coordinator_port}" if host else None

    def _report_lost(self, site: str, reason: str) -> None:
        """Tell the coordinator that ``site``'s job ended (ReportLost, as the local launcher does on a worker's
        exit), before its new job is submitted: the round being collected commits with the survivors now
        (rounds.lose) instead of when the site's etcd lease lapses, and the loss is the launcher's failure
        alone. Any leader of the site (pid 0): the ended job's, since the new one is not submitted yet. An
        unreachable coordinator is no reason to fail (its lease watch, or the deadline, decides then)."""
        from geotrain.run.launch import report_lost
        from geotrain.security.pki import LAUNCHER, CertDir

        address = self.coordinator_address()
        if address is None:
            return
        files = CertDir(self.deploy / "certs").files(LAUNCHER) if self.topo.security.tls else None
        report_lost(address, files, site, 0, reason, self.events, timeout_s=5.0)

    def _observe(self) -> None:
        """The parts' histories: faults triggered by rounds and steps; a requeued site's return."""
        for tail in self.tails:
            for e in tail.read():
                self.faults.observe(e)
                site = e.get("site")
                if e.get("event") == "commit":
                    for f in self.pending_recovery.values():  # committed while that site was away
                        f["rounds_lost"] += site_absent(e, f["site"])
                if e.get("event") == "site_ready" and site in self.pending_recovery:
                    f = self.pending_recovery.pop(site)
                    self.events.emit("recovery", what="site", target=f"site {site}", failure_t=f["failure_t"],
                                     recovered_t=e["t"], seconds=round(e["t"] - f["failure_t"], 3),
                                     rounds_lost=f["rounds_lost"])

    def _output_tail(self, d: Decision, lines: int = 8) -> str:
        """The end of the Slurm output of the job a failure names (where its error is)."""
        m = re.search(r"job (\d+)", d.reason)
        if not m:
            return ""
        outs = sorted((self.run_dir / "slurm").glob(f"*-{m.group(1)}.out"))
        if not outs:
            return ""
        tail = outs[0].read_text(errors="replace").splitlines()[-lines:]
        return f"\n  {outs[0]}:\n" + "\n".join("    " + t for t in tail)

    # ---- stop ----
    def stop(self) -> None:
        """scancel every job of the run that has not ended (nothing is left queued or running)."""
        live = [j.job_id for j in self.jobs.values() if not j.ended or j.state in HELD]
        self.slurm.cancel(live)
        if live:
            self.events.emit("jobs_cancelled", jobs=live, reason="the launcher is stopping")

    def all_events(self) -> list[dict]:
        paths = [self.run_dir / "metrics.jsonl", self.run_dir / "control" / "metrics.jsonl"]
        paths += [d / "metrics.jsonl" for s in self.topo.site_names for d in self.site_dirs(s)]
        events = [e for p in paths for e in read_events(p)]
        return sorted(events, key=lambda e: e.get("t", 0.0))


def launch_on_slurm(topo: Topology, run_dir: Path, opts: SlurmOptions, *, slurm: Slurm | None = None,
                    poll_s: float = 1.0, settle_s: float = 60.0) -> dict:
    """Run ``topo`` on Slurm to the end; its summary (``RUN/summary.json``). Raises RunFailed (the summary
    is written first) when a job failed past the restarts, the model went non-finite or rounds are missing."""
    from geotrain.run.launch import run_guarded
    from geotrain.run.summary import compute_summary, history_failure

    problem = slurm_problem(topo) or renderable_problem(topo, opts)
    if problem:  # the user's topology or options: exit 2, nothing submitted
        raise RenderError(problem)
    run = SlurmLaunch(topo, run_dir, opts, slurm=slurm or Slurm(), poll_s=poll_s, settle_s=settle_s)
    t0 = time.time()
    error = run_guarded(lambda: (run.start(), run.watch()), lambda: hasattr(run, "events") and run.stop(),
                        "every job of the run was cancelled")
    if not hasattr(run, "events"):  # nothing was submitted
        raise error
    history = run.all_events()
    if error is None:  # every job completed: the history still has the last word on the model
        failed = history_failure(history, topo)
        error = RunFailed(failed) if failed else None
    status = "failed" if error else "completed"
    run.events.emit("run_finished", status=status, reason=str(error) if error else None)
    links = {}
    for s in topo.site_names:
        for p in (run_dir / "control" / "links").glob(f"{s}--*.json"):
            if not p.name.endswith(".control.json"):
                try:
                    links[p.stem] = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    links[p.stem] = {}
    summary = {"status": status, "reason": str(error) if error else None, "backend": "slurm",
               "jobs": run.history,
               **compute_summary(history, topo, wall_seconds=time.time() - t0, link_stats=links)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if error:
        raise error
    return summary

