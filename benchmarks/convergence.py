"""Loss per token: DiLoCo at H=10, 50, 100 (and H=10 with int8 merges) against DDP, at equal tokens.

    .venv/bin/python benchmarks/convergence.py [--steps 200] [--workers 2]

One run of each on the demo workload (topologies/demo.yaml and its DDP twin demo-ddp.yaml: same
model, data, seeds, batch size and inner optimizer). Every run does the same number of inner steps
per site (``--steps``), hence the same number of training tokens: DiLoCo with H inner steps does
steps/H rounds (H=10 -> 20 rounds, H=50 -> 4, H=100 -> 2 for 200 steps); DDP runs with
inner_steps=10 (which for DDP only sets the eval cadence) and steps/10 rounds. The WAN is made fast
(1 Gbit/s, 5 ms one-way) so the runs are quick: this benchmark is about loss per token and bytes on
the wire, not about time (wall seconds are printed for reference only).

Printed per run: final eval loss (after the last inner step), its ratio to DDP's, WAN bytes (every
byte through the emulated links, both directions, including the one-off model distribution at
start: summary ``wan_bytes``) and its ratio to DDP's, tokens and wall seconds. No assertions.

Writes benchmarks/results/convergence.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
DEMO_DDP = REPO / "topologies" / "demo-ddp.yaml"
FAST_LINK = ("links.default.bandwidth=1gbit", "links.default.latency=5ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="inner steps per site in every run")
    p.add_argument("--workers", type=int, default=2, help="workers per site (demo.yaml has 2)")
    args = p.parse_args()
    steps = args.steps
    for h in (10, 50, 100):
        if steps % h:
            raise SystemExit(f"--steps {steps} must be a multiple of {h}")
    sites = f"sites=[{{name: us-east, workers: {args.workers}}}, {{name: eu-west, workers: {args.workers}}}]"
    common = (*FAST_LINK, sites)

    # (label, topology, H, extra overrides); ddp first so the others can be compared to it
    plan = [
        ("ddp", DEMO_DDP, 10, ()),
        ("diloco H=10", DEMO, 10, ()),
        ("diloco H=50", DEMO, 50, ()),
        ("diloco H=100", DEMO, 100, ()),
        ("diloco H=10 int8", DEMO, 10, ("training.compression.codec=int8",)),
    ]
    runs: dict[str, dict] = {}
    for label, topo, h, extra in plan:
        s = launch(topo, *common, f"training.inner_steps={h}", f"training.rounds={steps // h}", *extra)
        got = {v["inner_steps"] for v in s["sites"].values()}
        if got != {steps}:
            print(f"warning: {label}: inner steps per site {sorted(got)}, expected {steps}", file=sys.stderr)
        runs[label] = {"H": h, "rounds": steps // h, "codec": "int8" if extra else "fp32", **s}
        print(f"  ran {label}: {s['wall_seconds']:.1f} s", file=sys.stderr, flush=True)

    ddp = runs["ddp"]
    print(f"demo workload, 2 sites x {args.workers} workers, {steps} inner steps per site "
          f"({ddp['tokens']} tokens per run), link 1 Gbit/s, 5 ms one-way")
    print(f"{'run':18} {'H':>4} {'rounds':>6} {'final loss':>10} {'loss/ddp':>9} {'WAN bytes':>12} "
          f"{'bytes/ddp':>10} {'wall s':>7}")
    table = {}
    for label, r in runs.items():
        loss_ratio = r["final_eval_loss"] / ddp["final_eval_loss"]
        bytes_ratio = r["wan_bytes"] / ddp["wan_bytes"]
        h = "-" if label == "ddp" else str(r["H"])
        print(f"{label:18} {h:>4} {r['rounds']:>6} {r['final_eval_loss']:10.4f} {loss_ratio:9.3f} "
              f"{r['wan_bytes']:12,d} {bytes_ratio:10.4f} {r['wall_seconds']:7.1f}")
        table[label] = {
            "algorithm": r["algorithm"], "H": None if label == "ddp" else r["H"], "rounds": r["rounds"],
            "codec": r["codec"], "inner_steps": {k: v["inner_steps"] for k, v in r["sites"].items()},
            "tokens": r["tokens"], "initial_eval_loss": r["initial_eval_loss"],
            "final_eval_loss": r["final_eval_loss"], "eval_loss_ratio_vs_ddp": loss_ratio,
            "wan_bytes": r["wan_bytes"], "wan_bytes_ratio_vs_ddp": bytes_ratio,
            "wall_seconds": r["wall_seconds"], "eval_losses": r["eval_losses"], "status": r["status"],
            "run_dir": r["run_dir"],
        }
    print("loss/ddp = final eval loss / ddp's; bytes/ddp = WAN bytes / ddp's (includes the initial model "
          "distribution); wall seconds are for reference only")
    path = save("convergence", {
        "inner_steps_per_site": steps, "workers_per_site": args.workers,
        "link": {"bandwidth": "1gbit", "latency": "5ms"}, "runs": table,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
