"""What each WAN codec costs and buys: wire bytes, error and speed (geotrain.wire.compress).

    .venv/bin/python benchmarks/compression.py [--numel 10000000] [--repeats 3]   (10-35 s on 2 CPU threads)

Two vectors of float32:

* ``normal``: ``numel`` elements of N(0, 1);
* ``pseudo-grad``: a DiLoCo pseudo-gradient of a GPT-like model (about the same size), the
  difference ``theta_start - theta_end`` of a GPT-2-style random init and that init after a
  simulated round of AdamW steps. The simulated update is heterogeneous the way real ones are:
  a scale per tensor, a log-normal scale per output row, heavy-tailed elements, LayerNorm gains
  and biases that move differently, and embedding rows of tokens unseen in the round that only
  feel weight decay (orders of magnitude smaller). That heterogeneity is what per-block scales are for.

For each codec (block 256 for int8/int4): wire bytes / fp32 bytes, relative L2 error
``||decode(encode(x)) - x|| / ||x||``, max abs error / max |x|, and encode and decode throughput in
MB/s of fp32 data (4 * numel bytes / best-of-N wall time, on this machine's CPU threads).
Then, for int8 and int4 on the pseudo-gradient, the relative error of the *cumulative* sum sent over
10 rounds of the same update, with and without error feedback.

Writes benchmarks/results/compression.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

from geotrain.wire.compress import CODECS, ErrorFeedback, decode, encode, wire_bytes  # noqa: E402

BLOCK = 256
EF_ROUNDS = 10


def gpt_like_pseudo_gradient(seed: int = 0, vocab: int = 8192, ctx: int = 1024, d: int = 384, layers: int = 4,
                             lr: float = 4e-4, steps: int = 50, wd: float = 0.1) -> tuple[torch.Tensor, dict]:
    """theta_start - theta_end for a GPT-2-style model (~10.6M parameters with the defaults)."""
    g = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        shapes += [(f"h{i}.ln1.w", (d,)), (f"h{i}.ln1.b", (d,)), (f"h{i}.attn.qkv.w", (3 * d, d)),
                   (f"h{i}.attn.qkv.b", (3 * d,)), (f"h{i}.attn.proj.w", (d, d)), (f"h{i}.attn.proj.b", (d,)),
                   (f"h{i}.ln2.w", (d,)), (f"h{i}.ln2.b", (d,)), (f"h{i}.mlp.fc.w", (4 * d, d)),
                   (f"h{i}.mlp.fc.b", (4 * d,)), (f"h{i}.mlp.proj.w", (d, 4 * d)), (f"h{i}.mlp.proj.b", (d,))]
    shapes += [("ln_f.w", (d,)), ("ln_f.b", (d,))]
    start, delta = [], []
    for name, shape in shapes:
        n = math.prod(shape)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), LN gain 1, biases 0
        if name.endswith(".b"):
            w0 = torch.zeros(n)
        elif ".ln" in name or name.startswith("ln_f"):
            w0 = torch.ones(n)
        else:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.w") else 0.02
            w0 = torch.randn(n, generator=g) * std
        # Adam moves every touched element by about lr per step, partly coherently over the round.
        tensor_scale = math.exp(torch.empty(1).uniform_(math.log(0.3), math.log(3.0), generator=g).item())
        rows = shape[0]
        row_scale = torch.exp(0.5 * torch.randn(rows, generator=g)).repeat_interleave(n // rows)
        heavy = torch.randn(n, generator=g) * torch.exp(0.5 * torch.randn(n, generator=g))
        step = lr * math.sqrt(steps) * tensor_scale * row_scale * heavy
        if name == "wte":
            # Zipf token frequencies: tokens not seen in this round's ~100k tokens get no gradient
            freq = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float32)
            seen = torch.rand(vocab, generator=g) < 1 - torch.exp(-100_000 * freq / freq.sum())
            step = step * seen.float().repeat_interleave(d)
        decay = lr * wd * steps * w0  # AdamW's decoupled weight decay, everywhere
        start.append(w0)
        delta.append(step + decay)  # theta_end = theta_start - delta
    theta_start = torch.cat(start)
    theta_end = theta_start - torch.cat(delta)
    info = {"parameters": theta_start.numel(), "vocab": vocab, "d_model": d, "layers": layers,
            "simulated_round": f"{steps} AdamW steps, lr {lr}, weight decay {wd}"}
    return theta_start - theta_end, info


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (page faults, allocator)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def measure(x: torch.Tensor, repeats: int) -> dict:
    mb = 4 * x.numel() / 1e6
    xd = x.double()
    norm, amax = float(xd.norm()), float(xd.abs().max())
    rows = {}
    for codec in CODECS:
        t_enc, e = best_time(lambda: encode(x, codec, BLOCK), repeats)
        t_dec, y = best_time(lambda: decode(e), repeats)
        assert len(e.payload) == wire_bytes(x.numel(), codec, BLOCK)
        diff = y.double() - xd
        rows[codec] = {
            "wire_bytes": len(e.payload),
            "ratio_vs_fp32": len(e.payload) / (4 * x.numel()),
            "rel_l2_error": float(diff.norm()) / norm,
            "max_abs_error_over_max_abs": float(diff.abs().max()) / amax,
            "encode_mb_s": mb / t_enc,
            "decode_mb_s": mb / t_dec,
        }
    return rows


def ef_drift(x: torch.Tensor, codec: str) -> dict:
    """Send the same update EF_ROUNDS times; relative L2 error of the cumulative sum sent."""
    truth = x.double() * EF_ROUNDS
    out = {}
    for label, use_ef in (("without_ef", False), ("with_ef", True)):
        ef = ErrorFeedback(x.numel())
        sent = torch.zeros(x.numel(), dtype=torch.float64)
        for _ in range(EF_ROUNDS):
            sent += decode(ef.encode(x, codec, BLOCK) if use_ef else encode(x, codec, BLOCK)).double()
        out[label] = float((sent - truth).norm() / truth.norm())
    return out


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"  {'codec':6} {'ratio':>7} {'rel L2 err':>11} {'max err/max':>12} {'enc MB/s':>9} {'dec MB/s':>9}")
    for codec, r in rows.items():
        print(f"  {codec:6} {r['ratio_vs_fp32']:7.4f} {r['rel_l2_error']:11.3e} {r['max_abs_error_over_max_abs']:12.3e}"
              f" {r['encode_mb_s']:9.0f} {r['decode_mb_s']:9.0f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=10_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    normal = torch.randn(args.numel)
    pg, pg_info = gpt_like_pseudo_gradient()
    results = {"block": BLOCK, "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "vectors": {}}
    for name, x, desc in (("normal", normal, f"N(0,1), {normal.numel():,} elements"),
                          ("pseudo-grad", pg, f"GPT-like pseudo-gradient, {pg.numel():,} elements")):
        rows = measure(x, args.repeats)
        results["vectors"][name] = {"description": desc, "numel": x.numel(), "codecs": rows}
        print_table(desc, rows)
    results["vectors"]["pseudo-grad"]["model"] = pg_info
    drift = {codec: ef_drift(pg, codec) for codec in ("int8", "int4")}
    results["error_feedback"] = {"rounds": EF_ROUNDS, "vector": "pseudo-grad",
                                 "metric": "||sum sent - sum true|| / ||sum true||", "codecs": drift}
    print(f"\nCumulative error after {EF_ROUNDS} rounds of the same pseudo-gradient (rel L2):")
    for codec, r in drift.items():
        print(f"  {codec}: without EF {r['without_ef']:.3e}   with EF {r['with_ef']:.3e}")
    results["wall_seconds"] = time.perf_counter() - t0
    path = save("compression", results)
    print(f"\nwrote {path} ({results['wall_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
