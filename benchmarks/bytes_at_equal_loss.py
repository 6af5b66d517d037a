"""The fewest WAN bytes that reach DDP's loss: H, codecs and streaming searched at equal tokens.

    .venv/bin/python benchmarks/bytes_at_equal_loss.py [--steps 300] [--tolerance 0.01]

The demo workload with its shipped recipe (topologies/demo.yaml and its DDP twin demo-ddp.yaml: same
model, data, seeds, batch, inner optimizer and schedule), 2 sites × 2 workers, every run ``--steps`` inner
steps per site (equal tokens). Searched: H ∈ {10, 30, 100, 300} (those that divide ``--steps``) × codec
∈ {fp32, int8, int4}, plus Streaming DiLoCo (4 fragments) at each H. Links are fast (1 Gbit/s, 5 ms):
the question is bytes and loss, not time.

WAN bytes are every byte through the emulated links, both directions, the one-off distribution of the
initial model included (summary ``wan_bytes``), for DDP as for the others. Printed: every run's loss and
bytes relative to DDP's, then the configuration with the fewest bytes whose final eval loss is within
``--tolerance`` of DDP's, and its reduction factor. Asserts nothing. Writes
benchmarks/results/bytes_at_equal_loss.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
DEMO_DDP = REPO / "topologies" / "demo-ddp.yaml"
FAST_LINK = ("links.default.bandwidth=1gbit", "links.default.latency=5ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="inner steps per site in every run")
    p.add_argument("--tolerance", type=float, default=0.01, help="within this fraction of DDP's final loss")
    p.add_argument("--hs", default="10,30,100,300")
    p.add_argument("--codecs", default="fp32,int8,int4")
    p.add_argument("--no-streaming", action="store_true")
    p.add_argument("--sparseloco", action="store_true",
                   help="also SparseLoCo at each H: topk 2 %% density, 2 bits, outer lr 1, no momentum (the paper's outer step)")
    p.add_argument("--ddp-from", type=Path, default=None,
                   help="take the ddp row from an earlier results file with the same --steps instead of running it")
    args = p.parse_args()
    steps = args.steps
    hs = [h for h in map(int, args.hs.split(",")) if steps % h == 0]
    plan = [] if args.ddp_from else [("ddp", DEMO_DDP, ("training.inner_steps=10", f"training.rounds={steps // 10}"))]
    for h in hs:
        for codec in args.codecs.split(","):
            plan.append((f"diloco H={h} {codec}", DEMO, (f"training.inner_steps={h}", f"training.rounds={steps // h}",
                                                          f"training.compression.codec={codec}")))
        if args.sparseloco:
            plan.append((f"sparseloco H={h}", DEMO, (
                f"training.inner_steps={h}", f"training.rounds={steps // h}", "training.compression.codec=topk",
                "training.compression.density=0.02", "training.compression.bits=2", "training.outer_optimizer.lr=1.0",
                "training.outer_optimizer.momentum=0", "training.outer_optimizer.schedule.warmup_steps=0")))
        if not args.no_streaming and h >= 8:
            plan.append((f"streaming H={h} fp32", DEMO, (
                "training.algorithm=streaming-diloco", f"training.inner_steps={h}", f"training.rounds={steps // h}",
                "training.streaming.fragments=4", f"training.streaming.overlap_steps={max(1, h // 10)}")))
    runs: dict[str, dict] = {}
    if args.ddp_from:
        earlier = json.loads(args.ddp_from.read_text())
        if earlier.get("steps") != steps:
            raise SystemExit(f"--ddp-from {args.ddp_from}: its runs have {earlier.get('steps')} steps, not {steps}")
        runs["ddp"] = earlier["runs"]["ddp"]
    for label, topo, overrides in plan:
        s = launch(topo, *FAST_LINK, *overrides)
        runs[label] = {"final_eval_loss": s["final_eval_loss"], "wan_bytes": s["wan_bytes"], "tokens": s["tokens"],
                       "overrides": list(overrides), "wall_seconds": s["wall_seconds"], "run_dir": s["run_dir"]}
        print(f"  {label:24} loss {s['final_eval_loss']:.4f}  WAN {s['wan_bytes']:>13,d} B", file=sys.stderr, flush=True)

    ddp = runs["ddp"]
    print(f"demo workload, shipped recipe, 2 sites × 2 workers, {steps} inner steps per site, 1 Gbit/s 5 ms links")
    print(f"{'run':24} {'final loss':>10} {'loss/ddp':>9} {'WAN bytes':>13} {'ddp/bytes':>10}")
    for label, r in runs.items():
        r["loss_ratio"] = r["final_eval_loss"] / ddp["final_eval_loss"]
        r["reduction"] = ddp["wan_bytes"] / r["wan_bytes"]
        print(f"{label:24} {r['final_eval_loss']:10.4f} {r['loss_ratio']:9.4f} {r['wan_bytes']:13,d} {r['reduction']:9.1f}×")
    ok = {k: r for k, r in runs.items() if k != "ddp" and r["loss_ratio"] <= 1 + args.tolerance}
    best = min(ok, key=lambda k: ok[k]["wan_bytes"]) if ok else None
    if best:
        print(f"\nfewest bytes within {args.tolerance:.0%} of DDP's loss: {best} "
              f"({' '.join(ok[best]['overrides'])}): {ok[best]['reduction']:.0f}× fewer WAN bytes, "
              f"loss {ok[best]['loss_ratio']:.4f} × DDP's")
    else:
        print(f"\nno configuration came within {args.tolerance:.0%} of DDP's loss")
    path = save("bytes_at_equal_loss", {"steps": steps, "tolerance": args.tolerance, "runs": runs, "best": best})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
