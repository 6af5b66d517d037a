"""The chaos suite: every part of a run on its own host (a container), faults injected through Docker.

Run it (docs/chaos.md):  .venv/bin/pytest tests/chaos -m chaos

Regression scenarios are named and kept forever; the exploratory one draws a failpoint, a target,
a moment and a duration from a seed (printed in the session header and the report; replay with
CHAOS_SEED). Every scenario ends with ``geotrain check`` on the recorded history: nothing may be
violated, and every fault must be followed by commits (``faults_survived`` held, not unknown).
Scenario-specific expectations are checked from the same history and name their evidence.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.failpoints import FAILPOINTS, FaultRecord
from tests.chaos.harness import (
    Deployment,
    ReportRow,
    ScenarioFailed,
    chaos_seed,
    chaos_topology,
    commits,
    history_notes,
    invariants_summary,
    recovery,
    results_dir,
    rounds_completed,
)

pytestmark = [pytest.mark.chaos, pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(420)]

SITES_TIMEOUT_S = 180.0  # from the fault's undo (or `up`) until every site container has exited
TRIGGER_TIMEOUT_S = 120.0


# ---- expectations: (events, record, deployment) -> None, or raise ScenarioFailed with evidence ----

Expectation = Callable[[list, "FaultRecord | None", Deployment], None]


def _brief(events: list[dict], kinds: tuple[str, ...], limit: int = 12) -> str:
    picked = [e for e in events if e.get("event") in kinds][-limit:]
    return "; ".join(f"{e['event']}(" + ", ".join(f"{k}={e[k]}" for k in ("round", "site", "sites", "action", "version",
                                                                             "epoch", "resumed") if k in e) + ")"
                     for e in picked)


def every_round_with_every_site(events, record, dep) -> None:
    """No fault: no commit may lack a site (nobody was dropped)."""
    sites = set(dep.topo.site_names)
    partial = [e for e in commits(events) if set(e.get("sites", [])) != sites]
    if partial:
        raise ScenarioFailed(f"{len(partial)} commits lacked a site with no fault injected; first: round "
                             f"{partial[0].get('round')} with {partial[0].get('sites')}; failures: "
                             f"{_brief(events, ('failure',))}")


def site_rejoined(events, record, dep) -> None:
    """The faulted site contributes to a commit after the fault was undone."""
    back = [e for e in commits(events) if e["t"] >= record.healed_t and record.target in e.get("sites", [])]
    if not back:
        raise ScenarioFailed(f"site {record.target} never contributed to a commit after the fault was undone "
                             f"(t={record.healed_t:.1f}); events around it: "
                             f"{_brief([e for e in events if e['t'] >= record.injected_t], ('commit', 'site_joined', 'site_ready', 'merge_refused', 'merge_discarded', 'failure'))}")


def late_update_refused(events, record, dep) -> None:
    """The faulted site's update for a round committed without it was refused (never applied late)."""
    refused = [e for e in events if e["t"] >= record.injected_t and (
        (e.get("event") == "merge_refused" and e.get("site") == record.target)
        or (e.get("event") == "merge_discarded" and e.get("site") == record.target))]
    if not refused:
        raise ScenarioFailed(f"no merge_refused/merge_discarded for {record.target} after the fault: its late update "
                             f"was neither refused nor discarded; events: "
                             f"{_brief([e for e in events if e['t'] >= record.injected_t], ('commit', 'merge', 'merge_refused', 'site_joined'))}")


def coordinator_resumed(events, record, dep) -> None:
    """A new coordinator incarnation started after the kill, from its persisted state, with a larger epoch."""
    before = [e for e in events if e.get("event") == "coordinator_started" and e["t"] < record.injected_t]
    after = [e for e in events if e.get("event") == "coordinator_started" and e["t"] >= record.injected_t]
    if not after:
        raise ScenarioFailed("no coordinator_started after the coordinator was killed")
    first = after[0]
    if not first.get("resumed"):
        raise ScenarioFailed(f"the restarted coordinator did not resume from its persisted state: {first}")
    if before and first.get("epoch", 0) <= before[-1].get("epoch", 0):
        raise ScenarioFailed(f"the restarted coordinator's epoch {first.get('epoch')} is not above "
                             f"{before[-1].get('epoch')}")


def commits_after_undo(events, record, dep) -> None:
    """Training went on once the fault was undone."""
    if not [e for e in commits(events) if e["t"] > record.healed_t]:
        raise ScenarioFailed(f"no commit after {record.fault} was undone")


def _delivery_lags(events, site: str, t0: float, t1: float) -> list[float]:
    """Seconds from each commit to the moment ``site`` recorded the merged model (same version),
    for merges recorded in [t0, t1]: about one one-way latency of the site's link."""
    committed = {e.get("version"): e["t"] for e in commits(events)}
    return [round(e["t"] - committed[e.get("version")], 3) for e in events
            if e.get("event") == "merge" and e.get("site") == site and t0 <= e["t"] <= t1
            and e.get("version") in committed]


def link_degraded_then_restored(events, record, dep) -> None:
    """The link applied the control file (its stats file says so; that it restored its own parameters
    once the file was removed is `fault_undone`), and the history agrees: while degraded, the merged
    model reached the site at least one degraded latency after the commit; once restored, well under it."""
    latency_s = record.params["latency_ms"] / 1000.0
    problems = []
    if record.evidence.get("applied_s") is None:
        problems.append("the link never reported the degraded latency: " + "; ".join(record.notes))
    during = _delivery_lags(events, record.target, record.injected_t + 0.5, record.healed_t)
    after = _delivery_lags(events, record.target, record.healed_t + 1.0, float("inf"))
    if not during:
        problems.append(f"no merge of {record.target} while its link was degraded: the fault proved nothing")
    elif max(during) < 0.9 * latency_s:
        problems.append(f"commit-to-merge lags of {record.target} while degraded were {during} s, none near the "
                        f"degraded one-way latency ({latency_s:g} s)")
    if after and sorted(after)[len(after) // 2] >= latency_s / 2:
        problems.append(f"commit-to-merge lags of {record.target} after the fault was undone are still {after} s "
                        f"(median at least {latency_s / 2:g} s): the link stayed degraded")
    if problems:
        raise ScenarioFailed("; ".join(problems))


def fault_undone(events, record, dep) -> None:
    """The failpoint's undo took effect (a container runs again, a link is back to its own parameters)."""
    if record is not None and record.evidence.get("undone") is False:
        raise ScenarioFailed(f"the undo of {record.fault}({record.target}) did not take effect: {'; '.join(record.notes)}")


def checkpoints_failed_then_resumed(events, record, dep) -> None:
    """While the volume was full, checkpoint writes failed (and said so); after it, checkpoints were written again."""
    during = [e for e in events if e.get("event") == "checkpoint_failed" and record.injected_t <= e["t"] <= record.healed_t + 1]
    after = [e for e in events if e.get("event") == "checkpoint_saved" and e["t"] > record.healed_t]
    if not during:
        raise ScenarioFailed("no checkpoint write failed while the checkpoint volume was full")
    if not after:
        raise ScenarioFailed("no checkpoint was saved after the volume was freed")


def no_worker_died(events, record, dep) -> None:
    """No fault here targets a worker process: none may have died (the site would restart it)."""
    dead = [e for e in events if e.get("event") == "failure" and e.get("what") == "worker"]
    if dead:
        logs = dep.run_dir / "logs"
        tails = []
        for f in sorted(logs.glob("worker-*.log")) if logs.is_dir() else []:
            lines = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("[W")]
            if any("Error" in ln for ln in lines[-3:]):
                tails.append(f"{f.name}: {lines[-1][:200]}")
        raise ScenarioFailed(f"{len(dead)} worker failures ({'; '.join(str(e.get('target')) + ': ' + str(e.get('reason')) for e in dead[:3])}); "
                             f"last log lines: {' | '.join(tails) or 'none'}")


@dataclass(frozen=True)
class Scenario:
    name: str
    failpoint: str | None = None
    target: str | None = None
    after_round: int = 2        # inject once this round is committed
    hold_s: float = 0.0         # how long the fault lasts before its undo
    expect: tuple[Expectation, ...] = ()
    doc: str = ""
    settings: tuple[str, ...] = field(default=())

    @property
    def faults(self) -> str:
        return f"{self.failpoint}({self.target}) for {self.hold_s:g}s after round {self.after_round}" if self.failpoint else "none"


REGRESSION = [
    # A longer round deadline: with no fault, even a site that starts late (a loaded machine) is waited for.
    Scenario("baseline", expect=(every_round_with_every_site,), settings=("training.round_timeout_s=60",),
             doc="no fault: every round commits with every site"),
    Scenario("kill-site", "kill_site", "eu-west", hold_s=2, expect=(site_rejoined,),
             doc="SIGKILL a site's container, start it again: the run completes and the site rejoins"),
    Scenario("pause-site", "pause_site", "eu-west", hold_s=12, expect=(late_update_refused, site_rejoined),
             doc="freeze a site past the round deadline (8 s): the other site goes on alone; the late update "
                 "is refused, never applied; the site rejoins"),
    Scenario("disconnect-site", "disconnect_site", "us-east", hold_s=12, expect=(site_rejoined,),
             doc="cut a site off the network past the round deadline, reconnect it: it rejoins"),
    Scenario("kill-coordinator", "kill_coordinator", "coordinator", hold_s=2, expect=(coordinator_resumed,),
             doc="SIGKILL the coordinator's container, start it again: it resumes from its persisted state, "
                 "no round committed twice, no committed round lost"),
    Scenario("kill-etcd", "kill_etcd", "etcd", hold_s=5, expect=(commits_after_undo,),
             doc="SIGKILL etcd's container, start it again: training goes on"),
    Scenario("fill-checkpoint-volume", "fill_checkpoint_volume", "checkpoints", hold_s=4,
             expect=(checkpoints_failed_then_resumed, commits_after_undo),
             doc="the checkpoint volume is full for a while: writes fail and are reported, training goes on, "
                 "checkpoints resume afterwards and every one on disk verifies"),
    Scenario("delay-link", "delay_link", "us-east", after_round=3, hold_s=6, expect=(link_degraded_then_restored,),
             doc="raise a WAN link's latency to 200 ms in the middle of merges through its control file, then "
                 "remove the file: the link applies and then drops the change, the run completes"),
]


def exploratory(seed: int) -> Scenario:
    """A seeded random fault: failpoint, target, moment and duration all come from ``seed``."""
    rng = random.Random(seed)
    topo, _ = chaos_topology()
    name = rng.choice(sorted(FAILPOINTS))
    target = rng.choice(FAILPOINTS[name].targets(topo))
    return Scenario(f"exploratory-{seed}", name, target, after_round=rng.randint(1, 6), hold_s=round(rng.uniform(1, 12), 1),
                    doc=f"seed {seed}: {name} on {target}")


# ---- running one scenario -----------------------------------------------------------------------


def run_scenario(sc: Scenario, docker_client, chaos_image, report, session_prefix: str) -> None:
    topo, _ = chaos_topology(sc.settings)
    row = ReportRow(sc.name, sc.faults)
    workdir = Path(tempfile.mkdtemp(prefix=f"gtchaos-{sc.name}-"))
    dep: Deployment | None = None
    record: FaultRecord | None = None
    t0 = time.monotonic()
    try:
        dep = Deployment(sc.name, f"{session_prefix}-{sc.name}", workdir, topo, docker_client,
                         image=chaos_image.name, offline=chaos_image.offline)
        dep.up()
        if sc.failpoint:
            dep.wait_for(lambda e: e.get("event") == "commit" and e.get("round", -1) >= sc.after_round, TRIGGER_TIMEOUT_S,
                         f"commit of round {sc.after_round} to inject {sc.failpoint} after")
            record = FAILPOINTS[sc.failpoint].inject(dep, sc.target, sc.hold_s)
            row.faults = record.describe() + (f" ({'; '.join(record.notes)})" if record.notes else "")
        codes = dep.wait_sites_exit(SITES_TIMEOUT_S)
        completed = all(c == 0 for c in codes.values())
        dep.chaos.emit("run_finished", status="completed" if completed else "failed",
                       reason=None if completed else f"site exit codes {codes}")
        check = dep.check()
        events = dep.events()
        rounds = topo.training.rounds
        row.rounds_completed = f"{rounds_completed(events)}/{rounds}"
        rec_s, lost = recovery(events, topo.site_names, sc.target if sc.target in topo.site_names else None)
        row.rounds_lost = lost
        row.recovery_s = rec_s if rec_s is not None else ("-" if record is None else "never")
        row.invariants = invariants_summary(check)
        row.notes = history_notes(events)

        problems: list[str] = []
        if not completed:
            problems.append(f"the run did not complete: site containers exited with {codes} "
                            f"(None: still running after {SITES_TIMEOUT_S:.0f}s)")
        if rounds_completed(events) != rounds:
            problems.append(f"{rounds_completed(events)} of {rounds} rounds committed "
                            f"(committed: {sorted({e.get('round') for e in commits(events)})})")
        violated = [v for v in check.get("verdicts", []) if v["status"] == "violated"]
        if check.get("exit_code") != 0 or violated:
            problems.append("geotrain check: " + ("; ".join(f"{v['invariant']} violated: {v['evidence']}" for v in violated)
                                                  or f"exit {check.get('exit_code')}: {check.get('error', '')}"))
        must_hold = ["faults_survived"] if record else []
        if sc.failpoint == "kill_coordinator":
            must_hold.append("no_committed_round_lost")
        for v in check.get("verdicts", []):
            if v["invariant"] in must_hold and v["status"] != "held":
                problems.append(f"geotrain check: {v['invariant']} is {v['status']}, not held: {v['evidence']}")
        for expectation in (fault_undone, no_worker_died, *sc.expect):
            try:
                expectation(events, record, dep)
            except ScenarioFailed as exc:
                problems.append(f"{expectation.__name__}: {exc}")
        if problems:
            raise ScenarioFailed(f"scenario {sc.name} ({sc.doc}):\n  - " + "\n  - ".join(problems))
        row.result = "pass"
    except BaseException as exc:
        row.result = "FAIL"
        lines = str(exc).splitlines()
        first = lines[1 if str(exc).startswith("scenario ") and len(lines) > 1 else 0].strip(" -")[:300] if lines \
            else type(exc).__name__
        row.notes = f"{first}; {row.notes}" if row.notes else first
        if dep is not None:
            try:
                dest = dep.save_artifacts(results_dir() / sc.name)
                (dest / "failure.txt").write_text(f"{exc}\n\n{traceback.format_exc()}")
                row.notes += f" (artifacts: {dest})"
            except Exception as save_exc:  # noqa: BLE001
                row.notes += f" (artifacts not saved: {save_exc})"
        raise
    finally:
        if dep is not None:
            dep.down()
        row.wall_s = round(time.monotonic() - t0, 1)
        report.add(row)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("scenario", REGRESSION, ids=[s.name for s in REGRESSION])
def test_regression(scenario, docker_client, chaos_image, report, session_prefix):
    run_scenario(scenario, docker_client, chaos_image, report, session_prefix)


def test_exploratory(docker_client, chaos_image, report, session_prefix):
    seed = chaos_seed()
    scenario = exploratory(seed)
    print(f"chaos exploratory seed {seed} (replay: CHAOS_SEED={seed}): {scenario.faults}")
    run_scenario(scenario, docker_client, chaos_image, report, session_prefix)
