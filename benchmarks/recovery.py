"""What fault tolerance costs and how fast it recovers, on the demo topology, from one run of each.

    .venv/bin/python benchmarks/recovery.py        (about 5-6 minutes on a two-core machine)

1. Checkpoint cost (a bigger model than the demo's, so that checkpoints are not trivial), from one
   run with ``checkpoint.every_rounds=1`` and one with ``checkpoint.every_rounds=0``:

   * stall: ``checkpoint_stall_seconds`` (training time spent snapshotting state for the background
     writer) / the sum of the sites' ``compute_seconds``, in % (target: at most 2%);
   * overhead: (wall with checkpoints - wall without) / wall without, in %. One run of each on a
     shared machine: this is noisy (easily +-10%), both walls are printed;
   * bytes per round (every part of the newest round on disk: coordinator + one per worker) and the
     coordinator part's write seconds (from ``checkpoint_saved`` events; workers' parts emit none).

2. Recovery: a fault-free run, then one run per fault, injected once the round 1 commit is seen
   (as tests/integration/test_recovery.py does). Per fault, relative to the moment the signal was
   sent: detection (first ``failure`` / ``heartbeat_lost`` event), recovered (first ``recovery``
   event, preferring the launcher's/coordinator's over the sites' own), training resumed (first
   ``commit`` after the fault), rounds lost (summary), whether all rounds completed, and the final
   eval loss over the fault-free run's. The last scenario kills a site leader of a ring merge: also
   how many rounds went through the star, and when (and at which round) the rings were back.

A run that does not complete is printed as FAILED with the tail of its stderr; the benchmark goes on.
Writes benchmarks/results/recovery.json. No timing assertions: it is a benchmark.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, save  # noqa: E402

from geotrain.events import read_events  # noqa: E402
from geotrain.run.procs import pid_alive  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
CKPT_ROUNDS = 10
CKPT_MODEL = ("model.n_embd=128", "model.n_layer=4")
FAULT_ROUNDS = 6
RUN_TIMEOUT_S = 240
SITE_DEADLINE_S = 6.0
_EXC_RE = re.compile(r"^(?:\[rank\d+\]: )?(\w*(?:Error|Exception)\b.*)$")


# ---- running ----
def _argv(run_dir: Path, overrides) -> list[str]:
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--run-dir", str(run_dir), "--quiet"]
    for o in overrides:
        argv += ["--set", o]
    return argv


def _tail(text: str, n: int = 4) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no stderr)"


def _summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _events(run_dir: Path) -> list[dict]:
    try:
        return read_events(run_dir / "metrics.jsonl")
    except FileNotFoundError:
        return []


def _pids(run_dir: Path) -> dict[str, int]:
    return {e["name"]: e["pid"] for e in _events(run_dir) if e["event"] == "process_started"}


def _wait_for(run_dir: Path, predicate, proc: subprocess.Popen, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for e in _events(run_dir):
            if predicate(e):
                return e
        time.sleep(0.1)
    return None


def run(name: str, overrides, fault=None) -> dict:
    """One launch; with ``fault(run_dir) -> (fault_t, info)``, injected after the round 1 commit.

    Returns {ok, reason, summary, run_dir, events, fault_t, fault}."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"geotrain-recovery-{name}-")) / "run"
    proc = subprocess.Popen(_argv(run_dir, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    out = {"name": name, "run_dir": str(run_dir), "fault_t": None, "fault": None}
    reason = None
    try:
        if fault is not None:
            e = _wait_for(run_dir, lambda e: e["event"] == "commit" and e["round"] >= 1, proc, 120)
            if e is None:
                reason = "the run never committed round 1, no fault injected"
            else:
                out["fault_t"], out["fault"] = fault(run_dir)
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()  # children die with it (PR_SET_PDEATHSIG)
            _, err = proc.communicate()
            reason = reason or f"timed out after {RUN_TIMEOUT_S}s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = _summary(run_dir)
    if proc.returncode != 0 and reason is None:
        reason = f"launcher exit {proc.returncode}: {_tail(err)}"
    elif reason is not None:
        reason = f"{reason}: {_tail(err)}"
    if s is not None and s.get("status") != "completed" and reason is None:
        reason = f"status {s.get('status')}: {s.get('reason')}"
    out.update(ok=reason is None and s is not None, reason=reason, summary=s, events=_events(run_dir))
    return out


# ---- faults: each returns (the time the signal was sent, what was done) ----
def kill(name: str):
    def fault(run_dir):
        pid = _pids(run_dir)[name]
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        return t, f"SIGKILL {name} (pid {pid})"
    return fault


def freeze_coordinator(run_dir):
    pid = _pids(run_dir)["coordinator"]
    t = time.time()
    os.kill(pid, signal.SIGSTOP)  # the launcher's heartbeat check kills it; SIGKILL works on a stopped process
    return t, f"SIGSTOP coordinator (pid {pid}), left stopped"


def freeze(names: list[str], seconds: float, label: str):
    def fault(run_dir):
        pids = _pids(run_dir)
        ps = [pids[n] for n in names]
        t = time.time()
        try:
            for p in ps:
                os.kill(p, signal.SIGSTOP)
            time.sleep(seconds)
        finally:
            for p in ps:
                if pid_alive(p):
                    os.kill(p, signal.SIGCONT)
        return t, f"SIGSTOP {label} (pids {ps}) for {seconds:g}s, then SIGCONT"
    return fault


# (name, what is hit, fault, extra overrides, the failure targets this fault should produce: any other
# failure or heartbeat_lost after it is reported as a secondary failure)
SCENARIOS = [
    ("SIGKILL worker", "worker eu-west/1 (not a leader)", kill("worker eu-west/1"), (), {"worker eu-west/1"}),
    ("SIGKILL site leader", "worker us-east/0", kill("worker us-east/0"), (), {"worker us-east/0"}),
    ("SIGKILL coordinator", "coordinator", kill("coordinator"), (), {"coordinator"}),
    ("SIGSTOP coordinator", "coordinator (etcd heartbeat)", freeze_coordinator, (), {"coordinator"}),
    ("SIGSTOP site", f"eu-west, {SITE_DEADLINE_S + 6:g}s > round_timeout_s={SITE_DEADLINE_S:g}",
     freeze(["worker eu-west/0", "worker eu-west/1"], SITE_DEADLINE_S + 6, "site eu-west"),
     (f"training.round_timeout_s={SITE_DEADLINE_S:g}", "recovery.min_sites=1"), {"eu-west"}),
    ("SIGSTOP etcd 5s", "etcd", freeze(["etcd"], 5.0, "etcd"), (), set()),
    ("SIGKILL leader, ring", "worker eu-west/0, training.merge=ring", kill("worker eu-west/0"),
     ("training.merge=ring",), {"worker eu-west/0"}),
]


# ---- part 1: checkpoint cost ----
def checkpoint_cost() -> dict:
    common = (f"training.rounds={CKPT_ROUNDS}", *CKPT_MODEL)
    on = run("ckpt-on", (*common, "checkpoint.every_rounds=1"))
    off = run("ckpt-off", (*common, "checkpoint.every_rounds=0"))
    res: dict = {"overrides": list(common), "with": _brief(on), "without": _brief(off)}
    numel = next((e["numel"] for e in on["events"] + off["events"] if e["event"] == "model_initialised"), None)
    res["model_params"] = numel
    if on["ok"]:
        s = on["summary"]
        compute = sum(v["compute_seconds"] for v in s["sites"].values())
        res["stall_seconds"] = s["checkpoint_stall_seconds"]
        res["compute_seconds"] = round(compute, 3)
        res["stall_percent"] = round(100 * s["checkpoint_stall_seconds"] / compute, 4) if compute else None
        saved = [e for e in on["events"] if e["event"] == "checkpoint_saved"]
        res["coordinator_saves"] = len(saved)
        res["coordinator_part_bytes"] = max((e["bytes"] for e in saved), default=None)
        res["coordinator_write_seconds_mean"] = \
            round(sum(e["seconds"] for e in saved) / len(saved), 4) if saved else None
        res["coordinator_write_seconds_max"] = max((e["seconds"] for e in saved), default=None)
        root = Path(on["run_dir"]) / "checkpoints"
        rounds = sorted(d for d in root.glob("round-*") if d.is_dir()) if root.exists() else []
        if rounds:
            parts = {p.name: sum(f.stat().st_size for f in p.iterdir() if f.is_file())
                     for p in sorted(rounds[-1].iterdir()) if p.is_dir() and not p.name.startswith(".tmp-")}
            res["bytes_per_round_parts"] = parts
            res["bytes_per_round"] = sum(parts.values())
            res["newest_round_on_disk"] = rounds[-1].name
    if on["ok"] and off["ok"]:
        w1, w0 = on["summary"]["wall_seconds"], off["summary"]["wall_seconds"]
        res["overhead_percent"] = round(100 * (w1 - w0) / w0, 2)
    return res


def _brief(r: dict) -> dict:
    s = r["summary"] or {}
    return {"ok": r["ok"], "reason": r["reason"], "run_dir": r["run_dir"], "wall_seconds": s.get("wall_seconds"),
            "rounds_completed": s.get("rounds_completed"), "final_eval_loss": s.get("final_eval_loss"),
            "checkpoint_stall_seconds": s.get("checkpoint_stall_seconds"),
            "compute_seconds": {k: v["compute_seconds"] for k, v in s.get("sites", {}).items()}}


# ---- part 2: recovery ----
def analyse(r: dict, base_loss: float | None, expected: set[str]) -> dict:
    s = r["summary"] or {}
    row = {"ok": r["ok"], "reason": r["reason"], "run_dir": r["run_dir"], "fault": r["fault"],
           "fault_t": r["fault_t"], "rounds_planned": FAULT_ROUNDS, "rounds_completed": s.get("rounds_completed"),
           "completed_all_rounds": bool(s and s.get("status") == "completed"
                                        and s.get("rounds_completed") == FAULT_ROUNDS),
           "failures": s.get("failures"), "recoveries": s.get("recoveries"), "rounds_lost": s.get("rounds_lost"),
           "wall_seconds": s.get("wall_seconds"), "final_eval_loss": s.get("final_eval_loss")}
    row["loss_ratio"] = round(s["final_eval_loss"] / base_loss, 4) \
        if base_loss and s.get("final_eval_loss") is not None else None
    ft = r["fault_t"]
    if ft is None:
        return row
    after = [e for e in r["events"] if e["t"] >= ft]
    det = [e for e in after if e["event"] in ("failure", "heartbeat_lost")]
    rec = [e for e in after if e["event"] == "recovery"]
    sup = [e for e in rec if e.get("proc") in ("launcher", "coordinator")]
    com = [e for e in after if e["event"] == "commit"]
    row["detected_t"] = det[0]["t"] if det else None
    row["detected_by"] = f"{det[0]['event']} of {_who(det[0])} by {det[0]['proc']}" if det else None
    first_rec = (sup or rec)[0] if rec else None
    row["recovered_t"] = first_rec["t"] if first_rec else None
    row["recovered_what"] = f"{_who(first_rec)} by {first_rec['proc']}" if first_rec else None
    row["secondary_failures"] = [f"{e['event']} of {_who(e)} by {e['proc']} at +{e['t'] - ft:.1f}s"
                                 for e in det if e.get("target") not in expected]
    if any("merge" in c for c in com):  # ring runs: how many rounds the star carried, when the ring was back
        star = [c for c in com if c.get("merge") == "star"]
        back = [c for c in com if c.get("merge") == "ring" and (not star or c["t"] > star[0]["t"])]
        rebuilt = [e["seconds"] for e in after if e["event"] == "rings_ready" and e.get("rebuilt")]
        row["ring"] = {"star_rounds": len(star), "ring_back_s": round(back[0]["t"] - ft, 3) if back else None,
                       "ring_back_round": back[0]["round"] if back else None,
                       "rebuild_seconds_max": max(rebuilt) if rebuilt else None,
                       "ring_rounds_after": len(back)}
    row["resumed_t"] = com[0]["t"] if com else None
    row["resumed_round"] = com[0]["round"] if com else None
    row["resumed_sites"] = com[0]["sites"] if com else None
    for k in ("detected", "recovered", "resumed"):
        row[f"{k}_s"] = round(row[f"{k}_t"] - ft, 3) if row[f"{k}_t"] is not None else None
    row["events_after_fault"] = [{k: e.get(k) for k in ("t", "event", "proc", "what", "target", "round", "seconds",
                                                         "rounds_lost", "sites") if k in e}
                                 for e in after if e["event"] in ("failure", "heartbeat_lost", "recovery",
                                                                  "round_failed", "coordinator_started", "fenced",
                                                                  "merge_refused", "merge_discarded", "site_joined")]
    return row


def _crash_lines(run_dir: str) -> str:
    """The last exception line of each worker log that has one (why a worker died), if any."""
    found = []
    for log in sorted((Path(run_dir) / "logs").glob("worker-*.log")):
        errs = [m.group(1) for m in map(_EXC_RE.match, log.read_text(errors="replace").splitlines()) if m]
        if errs:
            found.append(f"{log.stem}: {errs[-1][:120]}")
    return " | ".join(found)


def _who(e: dict) -> str:
    what, target = e.get("what") or "", e.get("target") or ""
    return target if not what or target.startswith(what) else f"{what} {target}"


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def main() -> int:
    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    print(f"geotrain recovery benchmark ({os.cpu_count()} CPUs, load average {load0:.1f}; one run of each)\n",
          flush=True)

    # 1. checkpoint cost
    ck = checkpoint_cost()
    print(f"1. Checkpoint cost: demo, {CKPT_ROUNDS} rounds, {' '.join(CKPT_MODEL)}"
          + (f" -> {ck['model_params']:,} parameters ({ck['model_params'] * 4 / 1e6:.1f} MB fp32)"
             if ck.get("model_params") else ""))
    for label, key in (("every_rounds=1", "with"), ("every_rounds=0", "without")):
        b = ck[key]
        if not b["ok"]:
            print(f"   {label}: FAILED: {b['reason']}")
    if "stall_percent" in ck:
        print(f"   (a) stall:    {ck['stall_seconds']:.3f} s snapshotting / {ck['compute_seconds']:.1f} s of sites' "
              f"compute = {ck['stall_percent']:.3f} %  (target <= 2 %)")
    if "overhead_percent" in ck:
        print(f"   (b) overhead: wall {ck['with']['wall_seconds']:.1f} s with, {ck['without']['wall_seconds']:.1f} s "
              f"without = {ck['overhead_percent']:+.1f} %  (one run each on a shared machine: noisy)")
    if "bytes_per_round" in ck:
        parts = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in ck["bytes_per_round_parts"].items())
        print(f"   (c) bytes per checkpointed round: {ck['bytes_per_round'] / 1e6:.2f} MB ({parts} MB); "
              f"coordinator part write {ck['coordinator_write_seconds_mean']:.3f} s mean, "
              f"{ck['coordinator_write_seconds_max']:.3f} s max over {ck['coordinator_saves']} saves")
    print(flush=True)

    # 2. recovery
    base = run("fault-free", (f"training.rounds={FAULT_ROUNDS}",))
    bs = base["summary"] or {}
    base_loss = bs.get("final_eval_loss") if base["ok"] else None
    commits = [e["t"] for e in base["events"] if e["event"] == "commit"]
    round_s = (commits[-1] - commits[0]) / (len(commits) - 1) if len(commits) > 1 else None
    print(f"2. Recovery: demo, {FAULT_ROUNDS} rounds, fault injected after the round 1 commit.")
    if base["ok"]:
        print(f"   fault-free: wall {bs['wall_seconds']:.1f} s, a round every {_f(round_s)} s, "
              f"final eval loss {base_loss:.4f}")
    else:
        print(f"   fault-free run FAILED: {base['reason']}")
    rows = []
    for name, target, fault, extra, expected in SCENARIOS:
        r = run(name.replace(" ", "-"), (f"training.rounds={FAULT_ROUNDS}", *extra), fault)
        row = {"scenario": name, "target": target, "overrides": list(extra), **analyse(r, base_loss, expected)}
        rows.append(row)
        print(f"   ... {name}: {'ok' if row['ok'] else 'FAILED'} ({time.monotonic() - t_start:.0f} s so far)",
              flush=True)

    print()
    head = f"   {'fault':<21}{'detect s':>9}{'recover s':>10}{'resumed s':>10}{'lost':>5}  {'all rounds':<11}" \
           f"{'loss/base':>9}{'wall s':>8}{'2nd fail':>9}"
    print(head)
    print("   " + "-" * (len(head) - 3))
    for row in rows:
        done = f"yes {row['rounds_completed']}/{FAULT_ROUNDS}" if row["completed_all_rounds"] \
            else f"no {row['rounds_completed'] if row['rounds_completed'] is not None else '?'}/{FAULT_ROUNDS}"
        print(f"   {row['scenario']:<21}{_f(row.get('detected_s')):>9}{_f(row.get('recovered_s')):>10}"
              f"{_f(row.get('resumed_s')):>10}{_f(row['rounds_lost'], '{}'):>5}  {done:<11}"
              f"{_f(row['loss_ratio'], '{:.4f}'):>9}{_f(row['wall_seconds'], '{:.1f}'):>8}"
              f"{_f(len(row['secondary_failures']) if 'secondary_failures' in row else None, '{}'):>9}")
    print()
    for row in rows:
        bits = [f"{row['fault']}" if row["fault"] else "no fault injected"]
        if row.get("detected_by"):
            bits.append(f"detected by {row['detected_by']}")
        if row.get("recovered_what"):
            bits.append(f"recovery by {row['recovered_what']}")
        if row.get("resumed_round") is not None:
            bits.append(f"first commit after: round {row['resumed_round']} from {','.join(row['resumed_sites'])}")
        print(f"   {row['scenario']}: " + "; ".join(bits))
        if row.get("ring"):
            g = row["ring"]
            print(f"      ring: {g['star_rounds']} round(s) through the star, rings back at round {g['ring_back_round']} "
                  f"({_f(g['ring_back_s'])} s after the signal; rebuilding took at most "
                  f"{_f(g['rebuild_seconds_max'], '{:.3f}')} s), then {g['ring_rounds_after']} ring rounds")
        if row.get("secondary_failures"):
            print(f"      secondary failures (not the injected one): {'; '.join(row['secondary_failures'])}")
            crashed = _crash_lines(row["run_dir"])
            if crashed:
                print(f"      worker logs: {crashed}")
        if not row["ok"]:
            print(f"      FAILED: {row['reason']}")
    print("\n   detect/recover/resumed: seconds from the signal to the first failure|heartbeat_lost event, the first "
          "recovery event, the first commit; '-': no such event (e.g. etcd: nobody is declared dead). "
          "2nd fail: failures after the fault of anything other than its target.")

    path = save("recovery", {
        "checkpoint": ck,
        "recovery": {"rounds": FAULT_ROUNDS, "fault_free": {**_brief(base), "round_seconds": round_s},
                     "scenarios": rows},
        "benchmark_seconds": round(time.monotonic() - t_start, 1),
        "load_average_1min": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
    })
    print(f"\n   {time.monotonic() - t_start:.0f} s in all (load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end: other work on this machine inflates and scatters timings); "
          f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
