"""The four algorithm variants against plain DiLoCo, from one real run of each on this machine.

    .venv/bin/python benchmarks/algorithms.py          (about 5-10 minutes on a 2-core machine)

Every figure is a ratio between two runs launched here with ``geotrain launch`` (no assertions;
each figure is printed with PASS or MISS against its target):

1. async-diloco vs diloco, demo topology with one worker per site (``sites[*].workers=1``) and
   ``sites[1].slowdown=3`` (eu-west 3x slower). One worker per site because this machine has two
   cores: each site then has a core of its own, as a site has its own machines in a real run. With
   the demo's two workers per site, four worker processes share two cores, so a site's speed depends
   on how busy the other site is: the fast site runs faster in the sync run (alone on the cores
   while the slow site finishes its round) than in the async run (where the slow site never
   idles), which a multi-site deployment does not have (measured anyway, in 1b).
   Sync: R=16 rounds, H=10. Async: same H, 2R merges per site (every site counts its own merges),
   with ``dynamic_local_steps`` off and on, with ``overlap_steps=5`` (the merge runs during the
   next 5 inner steps; geotrain's extension, not the paper's protocol), and with
   ``staleness_weight=excess`` (only staleness beyond N-1 is penalised; geotrain's variant). Metric: time from ``run_started`` to the first ``eval``
   whose loss <= the sync run's final eval loss, over the sync run's time from ``run_started`` to
   its final ``eval``. Target <= 0.7. (Also printed: the same ratio measured from the step-0 eval,
   i.e. without the process start-up, 5-8 s here, that both runs pay but not equally; the slowdown
   eu-west actually had, compute seconds per inner step eu-west / us-east in the sync run; and the
   steps both sites together had done when the loss was reached, for the sync run's 2 x R x H.)
   ``slowdown`` (worker/slowdown.py): the site's rank 0 sleeps (f - 1) x its own unslowed step,
   collectives and optimizer included, and the rest of the site waits for it in the all-reduce.
   The measured factor is below f because the unslowed step of the slow site is itself measured
   on cores that it shares less (the fast site idles at every sync merge); a larger slowdown only
   favours async, so f=3 is the conservative setting.
   Only the first site's leader (us-east, the fast site) evaluates, after each of its own merges.
   An async run is therefore stopped (SIGTERM to its launcher, which stops every process) as soon
   as us-east reports ``site_done``: no eval can follow, so the rest of the run (the slow site
   finishing its own merges alone) cannot change the figure; it only cost minutes.
   1b (control, run only when the script has the time): the same three runs with the demo's two
   workers per site (four workers on two cores, see above).
2. streaming-diloco (P=4 fragments, overlap_steps=2) vs diloco, demo topology, H=20, same rounds:
   final eval loss ratio (target within 1%) and peak WAN demand, (a) the largest payload of one
   sync event and (b) peak bytes/s over a 0.25 s sliding window (see ``peak_window_rate``).
3. int8 and int4 vs fp32 diloco (the fp32 run is the diloco run of 2): merge bytes ratio
   (targets int8 <= 0.27, int4 <= 0.14) and final eval loss ratio (target within 1%).
4. compute utilisation on topologies/three-continents.yaml (rounds=4) for diloco, streaming-diloco
   (P=4, tau = H/P = 5: each fragment's exchange overlaps the steps until the next fragment is due;
   also the default tau = 1, for comparison), DiLoCo with its merge overlapped (streaming with P=1,
   tau = H/2), async-diloco, and async-diloco with overlap_steps = H/2: per site compute_seconds /
   (compute_seconds + wan_wait_seconds), i.e. 1 - WAN wait / (compute + WAN wait), averaged over
   sites. (Also kept in the JSON: 1 - WAN wait / the site's wall span from site_ready to site_done,
   which also counts eval and bookkeeping.) The async run's final eval loss is not comparable: the
   evaluating site (us-east, next to the coordinator) finishes its merges first, and its last eval
   comes before the other sites' last updates arrive.

Writes benchmarks/results/algorithms.json.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

from geotrain.events import read_events  # noqa: E402
from geotrain.wire.compress import wire_bytes  # noqa: E402
from geotrain.wire.fragments import fragment_slices  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
THREE = REPO / "topologies" / "three-continents.yaml"
R_SYNC = 16         # rounds of the sync run of experiment 1 (H=10 as in demo.yaml)
R_CONTROL = 16      # rounds of the sync run of the 1b control
ONE_WORKER = ("sites[0].workers=1", "sites[1].workers=1")  # experiment 1: each site a core of its own
H_SYNC = 10
R_STREAM = 8        # rounds of experiments 2 and 3 (demo.yaml's rounds)
H_STREAM = 20
P = 4
TAU = 2
R_THREE = 4
H_THREE = 20        # three-continents.yaml's inner_steps
# Experiment 4's runs. Streaming with tau = H/P: a fragment's exchange (0.4-0.6 s across three
# continents, including the wait for the slowest site) overlaps the 5 steps until the next
# fragment is due; with the default tau = 1 it overlaps one step (0.06 s) and the rest is waited.
THREE_RUNS = {"diloco": ("diloco",),
              "streaming-diloco": ("streaming-diloco", f"training.streaming.overlap_steps={H_THREE // P}"),
              "streaming-diloco-tau1": ("streaming-diloco", "training.streaming.overlap_steps=1"),
              # DiLoCo with its merge overlapped ("eager updates", arXiv 2502.12996): one fragment, the
              # merge of round r runs during the first H/2 inner steps of round r+1
              "diloco-overlapped": ("streaming-diloco", "training.streaming.fragments=1",
                                    f"training.streaming.overlap_steps={H_THREE // 2}"),
              "async-diloco": ("async-diloco",),
              "async-diloco-overlapped": ("async-diloco", f"training.async.overlap_steps={H_THREE // 2}")}
WINDOW_S = 0.25
CONTROL_IF_ELAPSED_UNDER_S = 540  # 1b runs only if the rest took less than this (whole script < 15 min)

TMP = Path(tempfile.mkdtemp(prefix="geotrain-algorithms-"))


def run(tag: str, topology: Path, *overrides: str) -> dict:
    t = time.perf_counter()
    s = launch(topology, *overrides, run_dir=TMP / tag)
    s["events"] = read_events(Path(s["run_dir"]) / "metrics.jsonl")
    s["bench_seconds"] = time.perf_counter() - t
    print(f"  ran {tag:24} {s['bench_seconds']:6.1f} s  final eval loss {s['final_eval_loss']:.4f}", flush=True)
    return s


def run_until_evaluator_done(tag: str, topology: Path, *overrides: str) -> dict:
    """Launch like _common.launch, but stop the run (SIGTERM to the launcher we started) once the
    evaluating site (the topology's first site) has reported site_done; read what it left."""
    from geotrain.config.topology import load_topology

    evaluator = load_topology(topology, list(overrides)).sites[0].name
    run_dir = TMP / tag
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(topology), "--run-dir", str(run_dir), "--quiet"]
    for o in overrides:
        argv += ["--set", o]
    t = time.perf_counter()
    log = open(TMP / f"{tag}.log", "w")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            text = metrics.read_text()
        except FileNotFoundError:
            continue
        if any(f'"site_done"' in line and f'"{evaluator}"' in line for line in text.splitlines()):
            proc.send_signal(signal.SIGTERM)
            stopped = True
            break
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    if not (run_dir / "summary.json").exists() or (proc.returncode != 0 and not stopped):
        raise SystemExit(f"benchmark run {tag} failed:\n{(TMP / f'{tag}.log').read_text()[-3000:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    s["run_dir"] = str(run_dir)
    s["stopped_after_evaluator_done"] = stopped
    s["events"] = read_events(metrics)
    s["bench_seconds"] = time.perf_counter() - t
    print(f"  ran {tag:24} {s['bench_seconds']:6.1f} s  final eval loss {s['final_eval_loss']:.4f}"
          f"{'  (stopped once ' + evaluator + ' was done)' if stopped else ''}", flush=True)
    return s


def of(s: dict, kind: str) -> list[dict]:
    return [e for e in s["events"] if e.get("event") == kind]


def t_start(s: dict) -> float:
    return of(s, "run_started")[0]["t"]


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------
# 1. async vs sync with a 3x slower site

def steps_by(s: dict, t: float) -> int:
    """Inner steps all sites together had done at time t (from the leaders' inner_step events)."""
    last: dict[str, int] = {}
    for e in of(s, "inner_step"):
        if e["t"] <= t:
            last[e["site"]] = max(last.get(e["site"], 0), e["step"])
    return sum(last.values())


def median_step_compute(s: dict, site: str) -> float:
    return statistics.median(e["compute_s"] for e in of(s, "inner_step") if e.get("site") == site)


def time_to_loss(s: dict, target: float) -> dict:
    t0 = t_start(s)
    evals = sorted(of(s, "eval"), key=lambda e: e["t"])
    t_train = next((e["t"] for e in evals if e["step"] == 0), evals[0]["t"])
    hit = next((e for e in evals if e["loss"] <= target), None)
    best = min(evals, key=lambda e: e["loss"])
    return {"reached": hit is not None,
            "seconds": hit["t"] - t0 if hit else None,
            "train_seconds": hit["t"] - t_train if hit else None,
            "at_step": hit["step"] if hit else None,
            "all_sites_steps": steps_by(s, hit["t"]) if hit else None,
            "loss": hit["loss"] if hit else None,
            "best_loss": best["loss"], "best_seconds": best["t"] - t0, "best_step": best["step"],
            "evals": len(evals), "last_eval_seconds": evals[-1]["t"] - t0}


def exp_async(sync: dict, variants: dict[str, dict], rounds: int) -> dict:
    target = sync["final_eval_loss"]
    evals = sorted(of(sync, "eval"), key=lambda e: e["t"])
    t_train = next((e["t"] for e in evals if e["step"] == 0), evals[0]["t"])
    sync_s = evals[-1]["t"] - t_start(sync)
    sync_train_s = evals[-1]["t"] - t_train
    ss = sync["sites"]
    per_step = {k: v["compute_seconds"] / max(1, v["inner_steps"]) for k, v in ss.items()}
    median_step = {k: median_step_compute(sync, k) for k in ss}
    out = {"sync": {"rounds": rounds, "H": H_SYNC, "final_eval_loss": target, "seconds_to_final_eval": sync_s,
                    "all_sites_steps": steps_by(sync, evals[-1]["t"]),
                    "train_seconds_to_final_eval": sync_train_s, "wall_seconds": sync["wall_seconds"],
                    "compute_seconds_per_step": per_step, "median_step_compute_seconds": median_step,
                    # the median step: the mean also holds us-east's evaluations (its leader evaluates
                    # after every merge, inside the next step's compute time) and each round's first step
                    "effective_slowdown": median_step["eu-west"] / median_step["us-east"],
                    "effective_slowdown_of_means": per_step["eu-west"] / per_step["us-east"],
                    "wan_wait_seconds": {k: v["wan_wait_seconds"] for k, v in ss.items()},
                    "run_dir": sync["run_dir"]},
           "async": {}, "async_merges_per_site": 2 * rounds, "target": 0.7}
    for name, a in variants.items():
        r = time_to_loss(a, target)
        r["ratio"] = r["seconds"] / sync_s if r["reached"] else None
        r["train_ratio"] = r["train_seconds"] / sync_train_s if r["reached"] else None
        r["best_ratio"] = r["best_seconds"] / sync_s
        r["final_eval_loss"] = a["final_eval_loss"]
        r["wall_seconds"] = a["wall_seconds"]
        r["merges"] = {site: v["merges"] for site, v in a["sites"].items()}
        r["inner_steps"] = {site: v["inner_steps"] for site, v in a["sites"].items()}
        r["commits"] = len(of(a, "commit"))
        st = [c.get("staleness", 0) for c in of(a, "commit")]
        r["mean_staleness"] = sum(st) / len(st) if st else None
        r["stopped_after_evaluator_done"] = a.get("stopped_after_evaluator_done", False)
        r["status"] = a.get("status")
        r["eval_losses"] = [[round(e["t"] - t_start(a), 3), e["step"], e["loss"]] for e in of(a, "eval")]
        r["run_dir"] = a["run_dir"]
        out["async"][name] = r
    return out


# ---------------------------------------------------------------------------------------
# 2. streaming vs diloco: loss and peak WAN demand

def event_bytes(s: dict, e: dict) -> tuple[int, int]:
    """(recorded, payload) bytes_sent + bytes_received of one merge event.

    Before 489ad02 streaming merge events under-recorded their bytes (the counters were read when
    the fragment was finished, after the background exchange had sent, often also received), e.g.
    2,049,792 B recorded of 15,433,728 B. Both figures are kept (recorded, and this payload).
    The payload each way is the fragment's wire bytes, which is exactly what non-streaming merge
    events record for the whole model (bytes_sent = wire_bytes(numel, codec)); that is used as the
    corrected figure (cross-checked against the link counters, see exp_streaming)."""
    recorded = int(e.get("bytes_sent") or 0) + int(e.get("bytes_received") or 0)
    if "fragment" not in e:
        return recorded, recorded
    numel = of(s, "model_initialised")[0]["numel"]
    sl = fragment_slices(numel, s["_fragments"])[e["fragment"]]
    payload = 2 * wire_bytes(sl.stop - sl.start, e.get("codec") or "fp32")
    return recorded, max(recorded, payload)


def peak_window_rate(intervals: list[tuple[float, float, float]], w: float) -> tuple[float, float]:
    """Max over x of (bytes delivered in [x, x+w]) / w, every interval's bytes spread uniformly over
    [a, b]. The cumulative curve is piecewise linear with kinks at the a's and b's, so the maximum of
    C(x+w) - C(x) is at an x where x or x+w is a kink. Returns (rate, x)."""
    iv = [(a, max(b, a + 1e-9), n) for a, b, n in intervals]

    def cum(x: float) -> float:
        return sum(n * min(1.0, max(0.0, (x - a) / (b - a))) for a, b, n in iv)

    cands = {c for a, b, _ in iv for c in (a, b, a - w, b - w)}
    best = max(cands, key=lambda x: cum(x + w) - cum(x))
    return (cum(best + w) - cum(best)) / w, best


def wan_demand(s: dict) -> dict:
    merges = of(s, "merge")
    rec = [event_bytes(s, e) for e in merges]
    iv_all, per_site = [], {}
    for e, (_, payload) in zip(merges, rec):
        dur = e.get("exchange_s", e.get("seconds") or 0.0)
        iv = (e["t"] - dur, e["t"], payload)
        iv_all.append(iv)
        per_site.setdefault(e["site"], []).append(iv)
    rate, at = peak_window_rate(iv_all, WINDOW_S)
    return {"merge_events": len(merges),
            "max_event_bytes_recorded": max(r for r, _ in rec),
            "max_event_bytes": max(p for _, p in rec),
            "merge_bytes_recorded": sum(r for r, _ in rec),
            "merge_bytes": sum(p for _, p in rec),
            "link_bytes": s["wan_bytes"],
            "peak_window_bytes_per_s": rate, "peak_window_at_s": at - t_start(s),
            "peak_window_bytes_per_s_per_site": {k: peak_window_rate(v, WINDOW_S)[0] for k, v in per_site.items()},
            "mean_exchange_s": sum(e.get("exchange_s", e.get("seconds") or 0.0) for e in merges) / len(merges)}


def exp_streaming(dil: dict, stream: dict) -> dict:
    d, s = wan_demand(dil), wan_demand(stream)
    # The target (<= 1/3) is about (a), the payload of one sync event: Streaming DiLoCo's "peak
    # bandwidth" reduction comes from syncing 1/P of the parameters at a time, so the bandwidth a
    # link must offer to finish one sync within a given time (here, within the tau=2 overlapped
    # steps) scales with that payload. (b), observed bytes/s over 0.25 s windows, is what the
    # emulated links actually carried; each exchange is pushed at whatever rate the 100 Mbit/s
    # link and the coordinator allow, so (b) is bounded by the link and depends on how long each
    # exchange's interval was (streaming intervals include the overlapped compute, diloco ones the
    # wait for the other site), not only on the algorithm. It is printed for information.
    return {"H": H_STREAM, "rounds": R_STREAM, "fragments": P, "overlap_steps": TAU, "window_s": WINDOW_S,
            "diloco": {**d, "final_eval_loss": dil["final_eval_loss"], "wall_seconds": dil["wall_seconds"],
                       "run_dir": dil["run_dir"]},
            "streaming": {**s, "final_eval_loss": stream["final_eval_loss"], "wall_seconds": stream["wall_seconds"],
                          "run_dir": stream["run_dir"]},
            "loss_ratio": stream["final_eval_loss"] / dil["final_eval_loss"],
            "max_event_bytes_ratio": s["max_event_bytes"] / d["max_event_bytes"],
            "max_event_bytes_ratio_recorded": s["max_event_bytes_recorded"] / d["max_event_bytes_recorded"],
            "peak_window_rate_ratio": s["peak_window_bytes_per_s"] / d["peak_window_bytes_per_s"],
            "link_bytes_ratio": stream["wan_bytes"] / dil["wan_bytes"],
            "targets": {"loss_ratio_within": 0.01, "max_event_bytes_ratio": 1 / 3}}


# ---------------------------------------------------------------------------------------
# 3. compressed merges

def merge_bytes(s: dict) -> int:
    return sum(v["bytes_sent"] + v["bytes_received"] for v in s["sites"].values())


def exp_compression(fp32: dict, runs: dict[str, dict]) -> dict:
    out = {"H": H_STREAM, "rounds": R_STREAM, "block": 256, "error_feedback": True,
           "fp32": {"merge_bytes": merge_bytes(fp32), "final_eval_loss": fp32["final_eval_loss"],
                    "run_dir": fp32["run_dir"]},
           "targets": {"int8": 0.27, "int4": 0.14, "loss_ratio_within": 0.01}}
    for codec, s in runs.items():
        out[codec] = {"merge_bytes": merge_bytes(s), "bytes_ratio": merge_bytes(s) / merge_bytes(fp32),
                      "link_bytes_ratio": s["wan_bytes"] / fp32["wan_bytes"],
                      "final_eval_loss": s["final_eval_loss"],
                      "loss_ratio": s["final_eval_loss"] / fp32["final_eval_loss"], "run_dir": s["run_dir"]}
    return out


# ---------------------------------------------------------------------------------------
# 4. compute utilisation

def utilisation(s: dict) -> dict:
    ready, done = {}, {}  # each site's first (a site restarted at the very end reports both again)
    for e in of(s, "site_ready"):
        ready.setdefault(e["site"], e["t"])
    for e in of(s, "site_done"):
        done.setdefault(e["site"], e["t"])
    per_site = {}
    for site, v in s["sites"].items():
        c, w = v["compute_seconds"], v["wan_wait_seconds"]
        span = done[site] - ready[site] if site in ready and site in done else None
        per_site[site] = {"compute_seconds": c, "wan_wait_seconds": w, "utilisation": c / (c + w) if c + w else None,
                          "span_seconds": span, "utilisation_of_span": 1 - w / span if span else None}
    for site, p in per_site.items():
        mine = [e for e in of(s, "merge") if e.get("site") == site]
        steps = [e["compute_s"] for e in of(s, "inner_step") if e.get("site") == site and e.get("compute_s") is not None]
        p["merges"] = len(mine)
        p["mean_wait_per_merge_s"] = sum(e["seconds"] for e in mine) / len(mine) if mine else None
        p["mean_exchange_s"] = (sum(e["exchange_s"] for e in mine) / len(mine)
                                if mine and all("exchange_s" in e for e in mine) else None)
        p["mean_step_compute_s"] = sum(steps) / len(steps) if steps else None
    us = [p["utilisation"] for p in per_site.values()]
    spans = [p["utilisation_of_span"] for p in per_site.values() if p["utilisation_of_span"] is not None]
    return {"mean_utilisation": sum(us) / len(us),
            "mean_utilisation_of_span": sum(spans) / len(spans) if spans else None,
            "sites": per_site, "final_eval_loss": s["final_eval_loss"], "wall_seconds": s["wall_seconds"],
            "run_dir": s["run_dir"]}


# ---------------------------------------------------------------------------------------

def print_exp1(r1: dict) -> None:
    sy = r1["sync"]
    print(f"   sync: final eval loss {sy['final_eval_loss']:.4f} at {sy['seconds_to_final_eval']:.1f} s after "
          f"run_started ({sy['train_seconds_to_final_eval']:.1f} s after the step-0 eval)")
    print(f"   eu-west's effective slowdown (median compute s/step vs us-east's): {sy['effective_slowdown']:.2f}x "
          f"(of the means, which hold us-east's evals: {sy['effective_slowdown_of_means']:.2f}x) "
          f"(the point is 3x); us-east waited {sy['wan_wait_seconds']['us-east']:.1f} s on the WAN merges")
    for name, r in r1["async"].items():
        if r["reached"]:
            print(f"   async {name:24} time to sync loss / sync time  {r['ratio']:.3f}  (target <= 0.7) "
                  f"{mark(r['ratio'] <= 0.7)}   [{r['seconds']:.1f} s, us-east step {r['at_step']}, loss {r['loss']:.4f}; "
                  f"from step-0 eval: {r['train_ratio']:.3f}; steps of both sites {r['all_sites_steps']} "
                  f"vs sync {sy['all_sites_steps']}; mean staleness {r['mean_staleness']:.2f}]")
        else:
            print(f"   async {name:24} never reached {sy['final_eval_loss']:.4f} (target <= 0.7) MISS   best loss "
                  f"{r['best_loss']:.4f} at {r['best_seconds']:.1f} s (= {r['best_ratio']:.3f} of sync time), "
                  f"step {r['best_step']}")


def main() -> int:
    t0 = time.perf_counter()
    print(f"runs in {TMP}", flush=True)

    def exp1_runs(tag: str, rounds: int, *extra: str) -> tuple[dict, dict, int]:
        slow = ("sites[1].slowdown=3", f"training.inner_steps={H_SYNC}", *extra)
        sync = run(f"{tag}-sync-slow", DEMO, *slow, f"training.rounds={rounds}")
        variants = {"dynamic_local_steps=off": ("training.async.dynamic_local_steps=false",),
                    "dynamic_local_steps=on": ("training.async.dynamic_local_steps=true",),
                    f"overlap_steps={H_SYNC // 2}": (f"training.async.overlap_steps={H_SYNC // 2}",),
                    "staleness_weight=excess": ("training.async.staleness_weight=excess",)}
        asyncs = {name: run_until_evaluator_done(
            f"{tag}-async-slow-{name.replace('=', '-')}", DEMO, *slow, "training.algorithm=async-diloco",
            f"training.rounds={2 * rounds}", *extra) for name, extra in variants.items()}
        return sync, asyncs, rounds

    sync, asyncs, _ = exp1_runs("1", R_SYNC, *ONE_WORKER)
    h = (f"training.inner_steps={H_STREAM}", f"training.rounds={R_STREAM}")
    dil = run("2-diloco-h20", DEMO, *h)
    stream = run("2-streaming-p4", DEMO, *h, "training.algorithm=streaming-diloco",
                 f"training.streaming.fragments={P}", f"training.streaming.overlap_steps={TAU}")
    dil["_fragments"], stream["_fragments"] = 1, P
    comp = {codec: run(f"3-{codec}", DEMO, *h, f"training.compression.codec={codec}") for codec in ("int8", "int4")}
    three = {label: run(f"4-three-{label}", THREE, f"training.algorithm={alg}", f"training.rounds={R_THREE}", *extra)
             for label, (alg, *extra) in THREE_RUNS.items()}

    r1 = exp_async(sync, asyncs, R_SYNC)
    r1b = None
    if time.perf_counter() - t0 < CONTROL_IF_ELAPSED_UNDER_S:
        r1b = exp_async(*exp1_runs("1b", R_CONTROL))
        r1b["topology_change"] = "none: the demo's 2 workers per site (4 worker processes on 2 cores)"
    else:
        print(f"  skipped the 1b control (the runs so far took more than {CONTROL_IF_ELAPSED_UNDER_S} s)")
    r2 = exp_streaming(dil, stream)
    r3 = exp_compression(dil, comp)
    r4 = {"rounds": R_THREE, "definition": "per site compute_seconds / (compute_seconds + wan_wait_seconds), "
                                           "mean over sites",
          **{alg: utilisation(s) for alg, s in three.items()}}

    print()
    print(f"1. async-diloco vs diloco, demo at 1 worker per site (each site its own core), eu-west slowdown 3, "
          f"H={H_SYNC}: sync {R_SYNC} rounds, async {2 * R_SYNC} merges per site")
    print_exp1(r1)
    if r1b is not None:
        print(f"1b. control: the demo's 2 workers per site (4 worker processes share the 2 cores), eu-west slowdown 3, "
              f"sync {R_CONTROL} rounds, async {2 * R_CONTROL} merges per site")
        print_exp1(r1b)
    print(f"\n2. streaming-diloco P={P}, overlap {TAU} vs diloco, demo, H={H_STREAM}, {R_STREAM} rounds")
    lr = r2["loss_ratio"]
    print(f"   final eval loss ratio streaming/diloco   {lr:.4f}  (target within 1%) {mark(abs(lr - 1) <= 0.01)}"
          f"   [{r2['streaming']['final_eval_loss']:.4f} vs {r2['diloco']['final_eval_loss']:.4f}]")
    mr = r2["max_event_bytes_ratio"]
    print(f"   (a) largest sync payload ratio           {mr:.4f}  (target <= 1/3)  {mark(mr <= 1 / 3)}"
          f"   [{r2['streaming']['max_event_bytes']:,} vs {r2['diloco']['max_event_bytes']:,} B; as recorded in "
          f"merge events: {r2['max_event_bytes_ratio_recorded']:.4f}]")
    print(f"   (b) peak bytes/s over {WINDOW_S} s ratio      {r2['peak_window_rate_ratio']:.4f}  (no target; the "
          f"target is (a))   [{r2['streaming']['peak_window_bytes_per_s'] / 1e6:.2f} vs "
          f"{r2['diloco']['peak_window_bytes_per_s'] / 1e6:.2f} MB/s]")
    print(f"   link bytes ratio (all traffic)           {r2['link_bytes_ratio']:.4f}   merge bytes as recorded: "
          f"streaming {r2['streaming']['merge_bytes_recorded']:,} B, payload {r2['streaming']['merge_bytes']:,} B, "
          f"diloco {r2['diloco']['merge_bytes']:,} B")
    print(f"\n3. compressed merges vs fp32 diloco, demo, H={H_STREAM}, {R_STREAM} rounds (fp32 = the diloco run of 2)")
    for codec in ("int8", "int4"):
        c, tgt = r3[codec], r3["targets"][codec]
        print(f"   {codec} merge bytes ratio                   {c['bytes_ratio']:.4f}  (target <= {tgt})  "
              f"{mark(c['bytes_ratio'] <= tgt)}   [{c['merge_bytes']:,} vs {r3['fp32']['merge_bytes']:,} B]")
        print(f"   {codec} final eval loss ratio               {c['loss_ratio']:.4f}  (target within 1%) "
              f"{mark(abs(c['loss_ratio'] - 1) <= 0.01)}   [{c['final_eval_loss']:.4f} vs "
              f"{r3['fp32']['final_eval_loss']:.4f}]")
    print(f"\n4. compute utilisation, three-continents, {R_THREE} rounds "
          f"(per site compute / (compute + WAN wait), mean over sites)")
    for alg in THREE_RUNS:
        u = r4[alg]
        sites = "  ".join(f"{k} {v['utilisation']:.3f}" for k, v in u["sites"].items())
        print(f"   {alg:22} {u['mean_utilisation']:.3f}   [{sites}; 1 - wait/span: {u['mean_utilisation_of_span']:.3f};"
              f" loss {u['final_eval_loss']:.4f}]")
        for k, v in u["sites"].items():
            exch = f", exchange {v['mean_exchange_s']:.2f} s" if v["mean_exchange_s"] is not None else ""
            print(f"      {k:13} {v['merges']:2d} merges, wait {v['mean_wait_per_merge_s']:.2f} s each{exch}, "
                  f"step {v['mean_step_compute_s']:.3f} s")
    total = time.perf_counter() - t0
    path = save("algorithms", {"async_vs_sync": r1, "async_vs_sync_control_2_workers": r1b, "streaming_vs_diloco": r2, "compression": r3,
                               "utilisation": r4, "bench_seconds": total})
    print(f"\nwrote {path} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
