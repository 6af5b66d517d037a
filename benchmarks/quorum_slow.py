"""Quorum + grace with one site 3x slower: time to synchronous DiLoCo's final loss (issue #16).

    .venv/bin/python benchmarks/quorum_slow.py                 (about 5 minutes on a 2-core machine)
    .venv/bin/python benchmarks/quorum_slow.py --rounds 16 --grace 0.1,1

Demo topology with one worker per site (each site a core of its own on this 2-core machine; see
benchmarks/algorithms.py, experiment 1, for why) and ``sites[1].slowdown=3`` (eu-west 3x slower), H=10.

- sync: synchronous DiLoCo, ``--rounds`` rounds: its final eval loss is the target, and its time from
  ``run_started`` to that final eval the reference time.
- quorum: the same with ``training.quorum: {min_sites: 1, grace_s: G}`` for each ``--grace`` G, and
  ``--quorum-rounds`` rounds (default 3 x rounds: the fast site commits without waiting, so it needs more
  rounds for the same tokens). The run is stopped once the evaluating site (us-east, the fast one) is done.

Printed per quorum run: time to the first eval at or below the sync run's final loss, over the sync time
(target <= 0.7), with PASS or MISS; how many of the slow site's updates counted; the best loss reached.
Asserts nothing. Writes benchmarks/results/quorum_slow.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402
from algorithms import DEMO, ONE_WORKER, mark, of, run, run_until_evaluator_done, t_start, time_to_loss  # noqa: E402

def slow(h: int) -> tuple[str, ...]:
    return ("sites[1].slowdown=3", f"training.inner_steps={h}", *ONE_WORKER)


def slow_updates(s: dict) -> dict:
    """How the slow site's updates fared: in a commit, or refused (late)."""
    commits = of(s, "commit")
    return {"commits": len(commits), "with_slow_site": sum(1 for c in commits if "eu-west" in c["sites"]),
            "refused": len([e for e in of(s, "merge_refused") if e.get("site") == "eu-west"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--quorum-rounds", type=int, default=None)
    p.add_argument("--grace", default="0.1,1.0", help="comma-separated grace windows in seconds")
    p.add_argument("--inner-steps", type=int, default=10, help="H (default %(default)s)")
    args = p.parse_args()
    H = args.inner_steps
    SLOW = slow(H)
    qrounds = args.quorum_rounds or 3 * args.rounds
    t0 = time.perf_counter()
    sync = run("quorum-sync-slow", DEMO, *SLOW, f"training.rounds={args.rounds}")
    target = sync["final_eval_loss"]
    evals = sorted(of(sync, "eval"), key=lambda e: e["t"])
    sync_s = evals[-1]["t"] - t_start(sync)
    out = {"H": H, "rounds": args.rounds, "quorum_rounds": qrounds, "target": 0.7,
           "sync": {"final_eval_loss": target, "seconds_to_final_eval": sync_s, "wall_seconds": sync["wall_seconds"],
                    "updates": slow_updates(sync), "run_dir": sync["run_dir"]},
           "quorum": {}}
    for g in (float(x) for x in args.grace.split(",")):
        q = run_until_evaluator_done(f"quorum-g{g:g}", DEMO, *SLOW, f"training.rounds={qrounds}",
                                     f"training.quorum={{min_sites: 1, grace_s: {g}}}")
        r = time_to_loss(q, target)
        r.update(ratio=r["seconds"] / sync_s if r["reached"] else None, best_ratio=r["best_seconds"] / sync_s,
                 updates=slow_updates(q), final_eval_loss=q["final_eval_loss"], run_dir=q["run_dir"])
        out["quorum"][f"{g:g}"] = r
    print(f"\ndemo, 1 worker per site, eu-west slowdown 3, H={H}: sync {args.rounds} rounds, final eval loss "
          f"{target:.4f} at {sync_s:.1f} s after run_started ({sync['wall_seconds']:.1f} s wall)")
    for g, r in out["quorum"].items():
        u = r["updates"]
        counted = f"eu-west in {u['with_slow_site']} of {u['commits']} commits, {u['refused']} of its updates refused"
        if r["reached"]:
            print(f"   quorum 1 of 2, grace {g:>4} s: time to sync loss / sync time {r['ratio']:.3f} (target <= 0.7) "
                  f"{mark(r['ratio'] <= 0.7)}   [{r['seconds']:.1f} s, us-east step {r['at_step']}, loss "
                  f"{r['loss']:.4f}; {counted}]")
        else:
            print(f"   quorum 1 of 2, grace {g:>4} s: never reached {target:.4f} (target <= 0.7) MISS   best "
                  f"{r['best_loss']:.4f} at {r['best_ratio']:.3f} of sync time; {counted}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"wrote {save('quorum_slow', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
