"""The DiLoCo scaling-laws protocol (arXiv 2503.09799) at the largest scale this machine finishes in ~an hour.

    .venv/bin/python benchmarks/fidelity.py                      # demo-size GPT, ~20 tokens per parameter
    .venv/bin/python benchmarks/fidelity.py --preset tiny --device cuda --tokens-per-param 20   # on a GPU
    .venv/bin/python benchmarks/fidelity.py --quick              # a smoke run of the whole protocol (minutes)

What the paper does, and what this does the same way:
- a model of N parameters trained on ~20·N tokens (Chinchilla-optimal), the same global batch for every
  row: DP trains on it as one batch, DiLoCo with M replicas gives each replica batch/M;
- the same inner recipe for every row (AdamW, linear warmup, cosine decay to 10 %, clipping at 1.0);
  DiLoCo with H = 30 and an outer SGD with Nesterov momentum 0.9, whose learning rate η is swept over
  {0.2, 0.4, 0.6, 0.8, 1.0}; each DiLoCo row is reported at its best η;
- rows: DP, DiLoCo M = 1, 2, 4; each row's final eval loss relative to DP's, beside the paper's 35M row
  (Table 4: DP 3.485, M=1 3.482, M=2 3.508, M=4 3.554).
What differs: the model (the built-in GPT at ``--preset``, byte-level text of the standard library
instead of C4 with a 32k vocabulary), hence the absolute losses; the paper's conclusions are about the
ratios. Every run is a real ``geotrain launch``: sites as processes, the coordinator over gRPC, the WAN
through the link emulator (fast links: this benchmark is about loss, not time). DP is ``algorithm: ddp``
on one site of one worker.

Prints the table and the paper's ordering checks (M=1 ≤ DP, DP ≤ M=2 ≤ M=4, M=2 within 2 % of DP) as
they came out; asserts nothing. Writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, launch, save  # noqa: E402

from geotrain.config.topology import load_topology  # noqa: E402
from geotrain.worker.main import gpt_config  # noqa: E402
from geotrain.worker.model import build_model  # noqa: E402

DEMO = REPO / "topologies" / "demo.yaml"
PAPER_35M = {"DP": 3.485, "M=1": 3.482, "M=2": 3.508, "M=4": 3.554}  # arXiv 2503.09799, Table 4
ETAS = (0.2, 0.4, 0.6, 0.8, 1.0)
FAST_LINK = ("links.default.bandwidth=10gbit", "links.default.latency=1ms", "links.default.jitter=0ms")


def sites(m: int, device: str) -> str:
    return "sites=[" + ", ".join(f"{{name: r{i}, workers: 1, device: {device}}}" for i in range(m)) + "]"


def recipe(steps: int, warmup: int, lr: float, wd: float) -> tuple[str, ...]:
    return (f"training.inner_optimizer.lr={lr}", f"training.inner_optimizer.weight_decay={wd}",
            "training.inner_optimizer.clip_grad_norm=1.0", "training.inner_optimizer.schedule.kind=cosine",
            f"training.inner_optimizer.schedule.warmup_steps={warmup}",
            "training.inner_optimizer.schedule.min_lr_ratio=0.1",
            f"training.inner_optimizer.schedule.total_steps={steps}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences (divided among M replicas)")
    p.add_argument("--H", type=int, default=30)
    p.add_argument("--ms", default="1,2,4")
    p.add_argument("--etas", default=",".join(map(str, ETAS)))
    p.add_argument("--lr", type=float, default=3e-3, help="peak inner learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--momentums", default="0.9", help="outer Nesterov momentums swept with the etas (the paper: 0.9)")
    p.add_argument("--outer-warmup", type=int, default=0, help="rounds of outer-lr warmup (the paper: none)")
    p.add_argument("--dp-from", type=Path, default=None,
                   help="take the DP row from an earlier results file of the same protocol instead of running it")
    p.add_argument("--tag", default="", help="suffix of the results file (fidelity-TAG.json)")
    p.add_argument("--quick", action="store_true", help="a few hundred steps, two etas: the protocol, not the figures")
    args = p.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    etas = [float(e) for e in args.etas.split(",")]
    momentums = [float(m) for m in args.momentums.split(",")]
    if args.quick:
        etas = etas[-2:]

    topo = load_topology(DEMO, [f"model.preset={args.preset}"])
    n = build_model(gpt_config(topo), seed=0).num_params()
    block = topo.model.block_size
    tokens_per_step = args.batch * block
    steps = int(args.tokens_per_param * n / tokens_per_step)
    if args.quick:
        steps = min(steps, 10 * args.H)
    steps = max(args.H, steps // args.H * args.H)  # whole rounds
    warmup = max(1, steps // 20)
    for m in ms:
        if args.batch % m:
            raise SystemExit(f"--batch {args.batch} must divide among M={m} replicas")
    base = (f"model.preset={args.preset}", *FAST_LINK, *recipe(steps, warmup, args.lr, args.weight_decay),
            "training.eval_batches=16")
    print(f"fidelity: {args.preset} GPT, {n:,} parameters, {steps} steps × {tokens_per_step} tokens = "
          f"{steps * tokens_per_step:,} tokens ({steps * tokens_per_step / n:.1f} per parameter), H={args.H}, "
          f"warmup {warmup}, cosine to 10 %, clip 1.0, etas {etas}, momentums {momentums}, outer warmup "
          f"{args.outer_warmup}", flush=True)

    runs: dict[str, dict] = {}

    def run(label: str, *overrides: str) -> dict:
        t0 = time.time()
        s = launch(DEMO, *base, *overrides)
        runs[label] = {"final_eval_loss": s["final_eval_loss"], "wan_bytes": s["wan_bytes"],
                       "wall_seconds": s["wall_seconds"], "eval_losses": s["eval_losses"], "run_dir": s["run_dir"],
                       "tokens": s["tokens"]}
        print(f"  {label:22} loss {s['final_eval_loss']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
        return s

    if args.dp_from is not None:
        earlier = json.loads(args.dp_from.read_text())
        same = all(earlier.get(k) == v for k, v in (("preset", args.preset), ("steps", steps), ("H", args.H),
                                                     ("lr", args.lr), ("weight_decay", args.weight_decay)))
        if not same:
            raise SystemExit(f"--dp-from {args.dp_from}: another protocol (preset, steps, H, lr or weight decay differ)")
        runs["DP"] = earlier["runs"]["DP"]
        print(f"  {'DP':22} loss {runs['DP']['final_eval_loss']:.4f}  (from {args.dp_from})", flush=True)
    else:
        run("DP", sites(1, args.device), "training.algorithm=ddp", f"training.batch_size={args.batch}",
            f"training.inner_steps={args.H}", f"training.rounds={steps // args.H}")
    best: dict[str, tuple[float, float, float]] = {}
    for m in ms:
        for mom in momentums:
            for eta in etas:
                label = f"M={m} eta={eta}" + (f" mu={mom}" if len(momentums) > 1 or mom != 0.9 else "")
                s = run(label, sites(m, args.device), "training.algorithm=diloco",
                        f"training.batch_size={args.batch // m}", f"training.inner_steps={args.H}",
                        f"training.rounds={steps // args.H}", f"training.outer_optimizer.lr={eta}",
                        f"training.outer_optimizer.momentum={mom}", "training.outer_optimizer.nesterov=true",
                        f"training.outer_optimizer.schedule.warmup_steps={args.outer_warmup}")
                if f"M={m}" not in best or s["final_eval_loss"] < best[f"M={m}"][1]:
                    best[f"M={m}"] = (eta, s["final_eval_loss"], mom)

    dp = runs["DP"]["final_eval_loss"]
    paper_dp = PAPER_35M["DP"]
    print(f"\n{'row':6} {'best eta':>8} {'mu':>4} {'loss':>8} {'/ DP':>7}   {'paper 35M':>9} {'/ DP':>7}")
    print(f"{'DP':6} {'-':>8} {'-':>4} {dp:8.4f} {1.0:7.4f}   {paper_dp:9.3f} {1.0:7.4f}")
    table = {"DP": {"loss": dp, "ratio": 1.0, "paper": paper_dp, "paper_ratio": 1.0}}
    for row, (eta, loss, mom) in best.items():
        paper = PAPER_35M.get(row)
        pr = f"{paper:9.3f} {paper / paper_dp:7.4f}" if paper else f"{'-':>9} {'-':>7}"
        print(f"{row:6} {eta:8.1f} {mom:4.1f} {loss:8.4f} {loss / dp:7.4f}   {pr}")
        table[row] = {"best_eta": eta, "momentum": mom, "loss": loss, "ratio": loss / dp, "paper": paper,
                      "paper_ratio": paper / paper_dp if paper else None}
    checks = {}
    if "M=1" in best:
        checks["M=1 <= DP"] = best["M=1"][1] <= dp
    if "M=2" in best:
        checks["DP <= M=2"] = dp <= best["M=2"][1]
        checks["M=2 within 2 % of DP"] = best["M=2"][1] / dp <= 1.02
    if "M=2" in best and "M=4" in best:
        checks["M=2 <= M=4"] = best["M=2"][1] <= best["M=4"][1]
    print("\nthe paper's ordering, as it came out here:")
    for name, ok in checks.items():
        print(f"  {name}: {'yes' if ok else 'NO'}")
    name = "fidelity-quick" if args.quick else "fidelity" + (f"-{args.tag}" if args.tag else "")
    path = save(name, {"momentums": momentums, "outer_warmup": args.outer_warmup,
        "preset": args.preset, "params": n, "steps": steps, "tokens_per_step": tokens_per_step, "H": args.H,
        "warmup": warmup, "etas": etas, "lr": args.lr, "weight_decay": args.weight_decay, "device": args.device,
        "table": table, "checks": checks, "runs": runs})
    print(f"wrote {path}")
    print(json.dumps({k: round(v["ratio"], 4) for k, v in table.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
