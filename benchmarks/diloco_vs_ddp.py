"""DiLoCo (H=10) against the DDP baseline on the demo topology, from one run of each.

    .venv/bin/python benchmarks/diloco_vs_ddp.py [--rounds 8]

Both runs use the same sites, links, model, data, seeds and number of inner steps. Printed:
WAN bytes per inner step (all bytes through the emulated links / inner steps per site), the same
for merge traffic only (leaving out the one-off model distribution at start), the ratio ddp/diloco
(expected about H), eval loss after the same number of inner steps, and wall time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402


def per_step(s: dict) -> tuple[float, float]:
    steps = max(v["inner_steps"] for v in s["sites"].values())
    merge_bytes = sum(v["bytes_sent"] + v["bytes_received"] for v in s["sites"].values())
    return s["wan_bytes"] / steps, merge_bytes / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    common = (f"training.rounds={args.rounds}", "training.inner_steps=10")
    diloco = launch(REPO / "topologies" / "demo.yaml", *common)
    ddp = launch(REPO / "topologies" / "demo-ddp.yaml", *common)
    d_all, d_merge = per_step(diloco)
    b_all, b_merge = per_step(ddp)
    rows = [
        ("WAN bytes / inner step (all)", d_all, b_all, b_all / d_all),
        ("WAN bytes / inner step (merges)", d_merge, b_merge, b_merge / d_merge),
        ("final eval loss", diloco["final_eval_loss"], ddp["final_eval_loss"], diloco["final_eval_loss"] / ddp["final_eval_loss"]),
        ("wall seconds", diloco["wall_seconds"], ddp["wall_seconds"], ddp["wall_seconds"] / diloco["wall_seconds"]),
    ]
    steps = args.rounds * 10
    print(f"demo topology, 2 sites x 2 workers, {steps} inner steps per site, H=10")
    print(f"{'metric':34} {'diloco':>14} {'ddp':>14} {'ratio':>8}")
    for name, a, b, r in rows:
        print(f"{name:34} {a:14.4g} {b:14.4g} {r:8.3f}")
    print("ratio = ddp/diloco for bytes and wall time, diloco/ddp for eval loss")
    path = save("diloco_vs_ddp", {
        "inner_steps": steps, "H": 10,
        "diloco": {k: diloco[k] for k in ("wan_bytes", "final_eval_loss", "initial_eval_loss", "wall_seconds", "run_dir")},
        "ddp": {k: ddp[k] for k in ("wan_bytes", "final_eval_loss", "initial_eval_loss", "wall_seconds", "run_dir")},
        "wan_bytes_per_step_ratio": b_all / d_all, "merge_bytes_per_step_ratio": b_merge / d_merge,
        "eval_loss_ratio": diloco["final_eval_loss"] / ddp["final_eval_loss"],
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
