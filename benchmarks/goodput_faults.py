"""Goodput under one random fault per minute over a run of at least ten minutes (issue #16).

    .venv/bin/python benchmarks/goodput_faults.py                      (~25 min on a 2-core machine)
    .venv/bin/python benchmarks/goodput_faults.py --rounds 40 --mtbf 20 --rows quorum    (a quick look)

Per row (``--rows``: ``quorum`` = DiLoCo with ``training.quorum: {min_sites: 2, grace_s: --grace}``, the
issue's case; ``diloco`` = synchronous DiLoCo, for contrast) on topologies/three-continents.yaml, H = ``--H``:
two runs of ``--rounds`` rounds, one clean and one with ``fault_rate: {mtbf_s: --mtbf, seed: --seed}``
(the default kinds: kills of workers and sites, freezes of sites, partitions of links; drawn, seeded,
recorded as ``fault_injected`` with ``drawn: true``).

What is printed, from the runs' summary.json and history:

- ``goodput`` (summary.json): compute time whose work reached a committed global model, over sites × wall
  time. On this machine it can never approach 1: 6 workers share 2 cores, so even the clean run's
  *utilisation* (all compute over sites × wall) is ~0.3. It is printed for both runs;
- **relative goodput** = the faulty run's goodput / the clean run's utilisation: the fraction of what the
  same machine trains per second without faults that it still turns into model progress under them (the
  framing of Decoupled DiLoCo's goodput: useful time over the ideal). Target ≥ 0.90;
- step efficiency = the faulty run's useful compute / all its compute (torchft's "step efficiency": work
  not thrown away), and wall time faulty / clean;
- fault cost = the faulty run's goodput / the clean run's goodput: what the faults alone took (the clean
  run of a quorum already throws away the updates that miss the quorum; relative goodput counts that too);
- faults drawn by kind, whether ``geotrain check`` held every invariant of the faulty run, rounds
  completed (nothing lost: all of them), final eval loss faulty / clean.

One run of each on a shared, noisy machine: no assertion. Writes benchmarks/results/goodput_faults.json.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

TOPO = REPO / "topologies" / "three-continents.yaml"


def faults_by_kind(run_dir: str) -> dict[str, int]:
    from geotrain.events import read_events

    drawn = [e for e in read_events(Path(run_dir) / "metrics.jsonl") if e["event"] == "fault_injected"]
    return dict(collections.Counter(f"{e['fault']} {e['target'].split(' ')[0]}" for e in drawn))


def check_holds(run_dir: str) -> tuple[bool, str]:
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", run_dir], capture_output=True, text=True, cwd=REPO)
    return r.returncode == 0, (r.stdout.strip().splitlines() or [""])[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="quorum,diloco")
    p.add_argument("--H", type=int, default=20)
    p.add_argument("--rounds", type=int, default=280, help="rounds of each run (default %(default)s: about 10 min each here)")
    p.add_argument("--mtbf", type=float, default=60.0, help="mean seconds between faults (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grace", type=float, default=0.5)
    args = p.parse_args()
    plans = {"quorum": (f"training.quorum={{min_sites: 2, grace_s: {args.grace}}}",), "diloco": ()}
    base = (f"training.inner_steps={args.H}", f"training.rounds={args.rounds}")
    t0 = time.perf_counter()
    out = {}
    for name in args.rows.split(","):
        clean = launch(TOPO, *base, *plans[name])
        print(f"  {name:7} clean   {clean['wall_seconds']:7.1f} s  utilisation {clean['utilisation']}", file=sys.stderr, flush=True)
        faulty = launch(TOPO, *base, *plans[name], f"fault_rate={{mtbf_s: {args.mtbf}, seed: {args.seed}}}")
        held, line = check_holds(faulty["run_dir"])
        util_c = clean["utilisation"]
        gp = faulty["goodput"]
        row = {"overrides": list(plans[name]), "clean": {k: clean.get(k) for k in (
                   "wall_seconds", "utilisation", "goodput", "final_eval_loss", "rounds_completed", "run_dir")},
               "faulty": {k: faulty.get(k) for k in (
                   "wall_seconds", "utilisation", "goodput", "final_eval_loss", "rounds_completed", "faults_drawn",
                   "failures", "recoveries", "rounds_lost", "run_dir")},
               "faults_by_kind": faults_by_kind(faulty["run_dir"]), "check_held": held, "check": line,
               "relative_goodput": gp / util_c if gp is not None and util_c else None,
               "step_efficiency": gp / faulty["utilisation"] if gp is not None and faulty["utilisation"] else None,
               "vs_clean_goodput": gp / clean["goodput"] if gp is not None and clean.get("goodput") else None,
               "wall_ratio": faulty["wall_seconds"] / clean["wall_seconds"],
               "loss_ratio": faulty["final_eval_loss"] / clean["final_eval_loss"]}
        out[name] = row
        print(f"  {name:7} faulty  {faulty['wall_seconds']:7.1f} s  goodput {gp}  faults {faulty['faults_drawn']}  "
              f"check {'held' if held else 'FAILED'}", file=sys.stderr, flush=True)
    print(f"three-continents, H={args.H}, {args.rounds} rounds; faults drawn one per {args.mtbf:g} s on average "
          f"(seed {args.seed}); one run each")
    print(f"{'row':8} {'wall clean':>10} {'wall fault':>10} {'faults':>6} {'goodput':>8} {'util clean':>10} "
          f"{'relative':>8} {'step eff':>8} {'loss f/c':>8} {'rounds':>7} check")
    for name, r in out.items():
        f, c = r["faulty"], r["clean"]
        rel = r["relative_goodput"]
        print(f"{name:8} {c['wall_seconds']:10.1f} {f['wall_seconds']:10.1f} {f['faults_drawn']:6} "
              f"{(f['goodput'] or 0):8.3f} {c['utilisation']:10.3f} {(rel or 0):8.3f} {(r['step_efficiency'] or 0):8.3f} "
              f"{r['loss_ratio']:8.4f} {f['rounds_completed']:>3}/{args.rounds:<3} {'held' if r['check_held'] else 'FAILED'}"
              f"   relative goodput target >= 0.90: {'PASS' if rel is not None and rel >= 0.9 else 'MISS'}")
        print(f"{'':8} clean goodput {c['goodput']}; faulty / clean goodput {(r['vs_clean_goodput'] or 0):.3f}; "
              f"faults: {r['faults_by_kind']}; {r['check']}")
    print(f"wrote {save('goodput_faults', {'H': args.H, 'rounds': args.rounds, 'mtbf_s': args.mtbf, 'seed': args.seed, 'rows': out, 'seconds': round(time.perf_counter() - t0, 1)})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
