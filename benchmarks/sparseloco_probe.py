"""SparseLoCo against DiLoCo, in one process: the arithmetic of both, variant by variant (issue #16).

    .venv/bin/python benchmarks/sparseloco_probe.py --rounds 30

The launched benchmark (benchmarks/algorithms_2026.py) finds SparseLoCo 21 % above DiLoCo's loss where the
paper (arXiv 2508.15706) finds it level or better. A launch takes minutes per row; this probe runs the same
workload (topologies/three-continents.yaml: its model, data, inner recipe and H; each site one worker with
the batch of its two, which averages the same number of sequences per step) as M sequential "sites" in one
process, with geotrain's own codec (geotrain.wire.compress) and outer optimizer (orchestrator.outer), so
that one change at a time can be tried in seconds. Rows:

- ``diloco``: fp32 pseudo-gradients, the topology's outer step (Nesterov SGD, warmup);
- ``average``: fp32, outer lr 1, no momentum (plain averaging);
- ``sparse-shipped``: per-site error feedback, top-k per chunk + 2-bit values, outer lr 1 without momentum,
  and the way back re-encoded by the coordinator (top-k at M × density, 2 bits, its own error feedback),
  which is what geotrain's coordinator does today;
- ``sparse-exact-down``: the same, but every site applies the exact mean of the sites' decoded updates
  (SparseLoCo's all-gather: no second compression);
- ``sparse-fp32-values``: exact way back, top-k values sent unquantised;
- ``sparse-nesterov``: exact way back, the DiLoCo row's Nesterov outer step on the sparse mean.

Prints each row's final eval loss and its ratio to ``diloco``. Asserts nothing; a probe, not a result for
docs/results.md by itself (it is not the launched system: no gRPC, no coordinator process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geotrain.config.topology import load_topology  # noqa: E402
from geotrain.orchestrator.outer import OuterOptimizer  # noqa: E402
from geotrain.schedule import lr_at, schedule_args, set_lr  # noqa: E402
from geotrain.wire.compress import ErrorFeedback, UpdateEncoder, decode, encode  # noqa: E402
from geotrain.wire.transport import flatten, unflatten_into  # noqa: E402
from geotrain.worker.data import BatchSampler, DataSpec, eval_batches, evaluate, load_corpus  # noqa: E402
from geotrain.worker.main import build_inner_optimizer, gpt_config, worker_seed  # noqa: E402
from geotrain.worker.model import build_model  # noqa: E402

ROWS = ("diloco", "average", "sparse-shipped", "sparse-exact-down", "sparse-fp32-values", "sparse-nesterov")


def run(row: str, topo, rounds: int, density: float, bits: int, block: int, decay: float,
        sparse_lr: float = 1.0, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tr, m = topo.training, topo.model
    corpus = load_corpus(DataSpec.of(topo.data), m.block_size)
    cfg = gpt_config(topo)
    held_out = eval_batches(corpus.eval, tr.batch_size, m.block_size, tr.eval_batches)
    sites = [s.name for s in topo.sites]
    workers = topo.sites[0].workers
    models = [build_model(cfg, seed=topo.seed).to(device) for _ in sites]
    opts = [build_inner_optimizer(mdl, tr.inner_optimizer) for mdl in models]
    samplers = [BatchSampler(corpus.train, tr.batch_size * workers, m.block_size, seed=worker_seed(topo.seed, s, 0))
                for s in sites]
    H = tr.inner_steps
    inner = tr.inner_optimizer
    schedule = schedule_args(inner.schedule, rounds * H)
    params = [[p for p in mdl.parameters()] for mdl in models]
    global_flat = flatten(params[0]).clone()
    sparse = row.startswith("sparse")
    outer_cfg = tr.outer_optimizer
    if row in ("average",) or (sparse and row != "sparse-nesterov"):
        outer_cfg = outer_cfg.model_copy(update={"lr": sparse_lr if sparse else 1.0, "momentum": 0.0,
                                                 "schedule": outer_cfg.schedule.model_copy(update={"warmup_steps": 0})})
    outer = OuterOptimizer(outer_cfg)
    efs = [ErrorFeedback(global_flat.numel(), decay) for _ in sites]
    residuals = [torch.zeros_like(global_flat) for _ in sites]  # the fp32-values row's own error feedback
    down = UpdateEncoder("topk", block, True, density=min(1.0, density * len(sites)), bits=bits)
    value_bits = 32 if row == "sparse-fp32-values" else bits
    evals = [evaluate(models[0], held_out, device=device)]
    step = 0
    for rnd in range(rounds):
        deltas = []
        for i, mdl in enumerate(models):
            for h in range(H):
                set_lr(opts[i], lr_at(step + h, base_lr=inner.lr, **schedule))
                x, y = samplers[i].next_batch()
                _, loss = mdl(x.to(device), y.to(device))
                loss.backward()
                if inner.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params[i], inner.clip_grad_norm)
                opts[i].step()
                opts[i].zero_grad(set_to_none=True)
            deltas.append(global_flat - flatten(params[i]))
        step += H
        if sparse:
            if value_bits == 32:  # the codec's top-k choice (a decoded value is never 0), the values unquantised
                sent = []
                for i, d in enumerate(deltas):
                    comp = d + residuals[i] * decay
                    kept = decode(encode(comp, "topk", block, density, 8)) != 0
                    sent.append(torch.where(kept, comp, torch.zeros_like(comp)))
                    residuals[i] = comp - sent[-1]
            else:
                sent = [decode(efs[i].encode(d, "topk", block, density, bits)) for i, d in enumerate(deltas)]
            mean = torch.stack(sent).mean(0)
        else:
            mean = torch.stack(deltas).mean(0)
        new = outer.step(global_flat, mean, round=rnd)
        if row == "sparse-shipped":  # the coordinator's way back: the change re-encoded, applied as the sites will
            new = global_flat + decode(down.encode((new - global_flat).contiguous()))
        global_flat = new
        for i in range(len(models)):
            unflatten_into(global_flat, params[i])
        evals.append(evaluate(models[0], held_out, device=device))
    return {"row": row, "final_eval_loss": evals[-1], "evals": evals}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default=str(REPO / "topologies" / "three-continents.yaml"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a topology override, as `geotrain launch --set` takes (model.n_embd=256, say)")
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--decay", type=float, default=1.0, help="error feedback decay (the paper: 0.95)")
    p.add_argument("--sparse-lr", type=float, default=1.0,
                   help="outer lr of the sparse rows without momentum (the paper's step: 1; geotrain ships 1)")
    p.add_argument("--only", default=",".join(ROWS))
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the sites' models train (the codec and the "
                   "outer step stay on the CPU, as in geotrain)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sparseloco_probe.json"))
    args = p.parse_args()
    topo = load_topology(args.topology, args.set)
    results = []
    for row in args.only.split(","):
        t0 = time.perf_counter()
        r = run(row, topo, args.rounds, args.density, args.bits, args.block, args.decay, args.sparse_lr, args.device)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        base = results[0]["final_eval_loss"]
        print(f"{row:22s} final eval loss {r['final_eval_loss']:.4f}  / {results[0]['row']} "
              f"{r['final_eval_loss'] / base:.4f}  ({r['seconds']} s)", flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
