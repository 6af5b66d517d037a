"""Compute utilisation over a slow, far WAN: DDP against DiLoCo (H=10), with 2 and 3 sites.

    .venv/bin/python benchmarks/wan_utilisation.py [--steps 100] [--workers 1]

One run of each on the demo workload (topologies/demo.yaml / demo-ddp.yaml) with every WAN link
(site <-> hub coordinator) at 100 Mbit/s and 100 ms one-way latency (``links.default``: no jitter,
no loss), sites us-east, eu-west (and ap-northeast for 3 sites), ``--workers`` workers each (1 by
default, so 3 sites do not overload a 2-core machine more than 2 do). Every run does the same
number of inner steps per site (``--steps``): DiLoCo merges every H=10 steps (steps/10 rounds); DDP
averages gradients across the WAN at every step (inner_steps=10 only sets its eval cadence) and so
pays about 2 RTT + the transfer of one gradient per step.

Printed per (sites, algorithm):
  util = per site compute_seconds / (compute_seconds + wan_wait_seconds), averaged over sites;
  1-wait/wall = 1 - (mean over sites of wan_wait_seconds) / wall_seconds (wall_seconds covers the
  whole run, start-up and evals included, so this is a lower bound on time not spent waiting);
and the diloco/ddp ratio of both, per number of sites. No assertions.

Writes benchmarks/results/wan_utilisation.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
DEMO_DDP = REPO / "topologies" / "demo-ddp.yaml"
SITE_NAMES = ("us-east", "eu-west", "ap-northeast")
LINK = "links.default={bandwidth: 100mbit, latency: 100ms}"
H = 10


def utilisation(s: dict) -> dict:
    sites = s["sites"]
    per_site = {k: v["compute_seconds"] / (v["compute_seconds"] + v["wan_wait_seconds"])
                if v["compute_seconds"] + v["wan_wait_seconds"] > 0 else None for k, v in sites.items()}
    vals = [u for u in per_site.values() if u is not None]
    mean_wait = sum(v["wan_wait_seconds"] for v in sites.values()) / len(sites)
    return {
        "util": sum(vals) / len(vals) if vals else None,
        "util_per_site": per_site,
        "one_minus_wait_over_wall": 1 - mean_wait / s["wall_seconds"],
        "mean_wan_wait_seconds": mean_wait,
        "mean_compute_seconds": sum(v["compute_seconds"] for v in sites.values()) / len(sites),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="inner steps per site in every run (multiple of 10)")
    p.add_argument("--workers", type=int, default=1, help="workers per site")
    args = p.parse_args()
    if args.steps % H:
        raise SystemExit(f"--steps must be a multiple of {H}")
    rounds = args.steps // H

    results: dict[str, dict] = {}
    for n in (2, 3):
        sites = "sites=[" + ", ".join(f"{{name: {name}, workers: {args.workers}}}" for name in SITE_NAMES[:n]) + "]"
        results[str(n)] = {}
        for algo, topo in (("ddp", DEMO_DDP), ("diloco", DEMO)):
            s = launch(topo, sites, LINK, f"training.inner_steps={H}", f"training.rounds={rounds}")
            got = {v["inner_steps"] for v in s["sites"].values()}
            if got != {args.steps}:
                print(f"warning: {n} sites {algo}: inner steps per site {sorted(got)}, expected {args.steps}",
                      file=sys.stderr)
            u = utilisation(s)
            results[str(n)][algo] = {
                **u, "wall_seconds": s["wall_seconds"], "wan_bytes": s["wan_bytes"], "status": s["status"],
                "final_eval_loss": s["final_eval_loss"],
                "sites": {k: {f: v[f] for f in ("inner_steps", "compute_seconds", "wan_wait_seconds", "merges",
                                                "bytes_sent", "bytes_received")} for k, v in s["sites"].items()},
                "run_dir": s["run_dir"],
            }
            print(f"  ran {n} sites {algo}: {s['wall_seconds']:.1f} s", file=sys.stderr, flush=True)

    print(f"demo model, {args.workers} worker(s) per site, {args.steps} inner steps per site, "
          f"every link 100 Mbit/s, 100 ms one-way; diloco H={H}")
    print(f"{'sites':>5} {'algorithm':9} {'compute s':>9} {'wan wait s':>10} {'wall s':>7} {'util':>7} "
          f"{'1-wait/wall':>11}")
    for n, by_algo in results.items():
        for algo, r in by_algo.items():
            print(f"{n:>5} {algo:9} {r['mean_compute_seconds']:9.2f} {r['mean_wan_wait_seconds']:10.2f} "
                  f"{r['wall_seconds']:7.1f} {r['util']:7.3f} {r['one_minus_wait_over_wall']:11.3f}")
    print(f"{'sites':>5} {'diloco/ddp util':>16} {'diloco/ddp 1-wait/wall':>23}")
    ratios = {}
    for n, by_algo in results.items():
        d, b = by_algo["diloco"], by_algo["ddp"]
        ratios[n] = {"util": d["util"] / b["util"],
                     "one_minus_wait_over_wall": d["one_minus_wait_over_wall"] / b["one_minus_wait_over_wall"]}
        print(f"{n:>5} {ratios[n]['util']:16.2f} {ratios[n]['one_minus_wait_over_wall']:23.2f}")
    print("compute s / wan wait s: means over sites; util = mean over sites of compute / (compute + wan wait); "
          "1-wait/wall = 1 - mean wan wait / wall seconds")
    path = save("wan_utilisation", {
        "inner_steps_per_site": args.steps, "workers_per_site": args.workers, "H": H,
        "link": {"bandwidth": "100mbit", "latency": "100ms"}, "runs": results, "diloco_over_ddp": ratios,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
