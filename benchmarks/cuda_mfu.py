"""Tokens/s and model FLOPs utilisation (MFU) of the built-in GPT's inner step on one device.

    .venv/bin/python benchmarks/cuda_mfu.py [--preset 35m] [--steps 300] [--batch 16] [--vocab 32000]
    .venv/bin/python benchmarks/cuda_mfu.py --device cpu --preset demo --steps 20   # a smoke run anywhere

The inner step the built-in trainer takes (geotrain.worker.main): the GPT of ``--preset`` (geotrain's
model presets), AdamW, gradient clipping at 1.0, bf16 autocast on CUDA with float32 weights, on batches of
random token ids (the data path is not what is measured). Steps after ``--warmup`` are timed with
``torch.cuda.synchronize()``; MFU = FLOPs per token (geotrain.worker.model.flops_per_token: 6·N + 12·L·C·T)
× tokens/s ÷ the device's peak dense bf16 FLOP/s (``--peak-tflops``, else a table of known devices).
Prints one line per figure; writes benchmarks/results/cuda_mfu.json (CUDA runs only). Without CUDA (and no ``--device cpu``)
it says so and exits 2: nothing is measured, nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402

from geotrain.config.schema import MODEL_PRESETS  # noqa: E402
from geotrain.worker.model import GPTConfig, build_model, flops_per_token  # noqa: E402

# dense bf16 peak FLOP/s by device name (vendor data sheets; sparse figures are twice these)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="35m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (allocator, kernels)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--vocab", type=int, default=32000, help="embedding rows (the paper's 35M model: 32k)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_mfu: no CUDA device here; nothing measured (run it on a GPU machine, or --device cpu for a "
              "smoke run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shape = MODEL_PRESETS[args.preset]
    cfg = GPTConfig(vocab_size=args.vocab, **shape)
    model = build_model(cfg, seed=0).to(device)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    n = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(cfg, n)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, cfg.block_size + 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_s = args.steps * args.batch * cfg.block_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    mfu = fpt * tokens_s / (peak * 1e12) if peak else None
    print(f"device {name}, preset {args.preset}: {n / 1e6:.1f} M parameters, {fpt / 1e6:.1f} MFLOP/token, "
          f"batch {args.batch}×{cfg.block_size}, bf16 {device.type == 'cuda'}")
    print(f"tokens/s {tokens_s:,.0f}  step {seconds / args.steps * 1e3:.1f} ms  loss {float(loss.detach()):.3f}")
    print(f"MFU {mfu:.1%} of {peak:g} TFLOP/s" if mfu is not None else "MFU: unknown peak (give --peak-tflops)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if device.type != "cuda":  # a smoke run: nothing to keep
        return 0
    save("cuda_mfu", {"device": name, "preset": args.preset, "params": n, "flops_per_token": fpt,
                      "batch": args.batch, "block_size": cfg.block_size, "steps": args.steps,
                      "tokens_per_second": tokens_s, "peak_tflops": peak, "mfu": mfu})
    return 0


if __name__ == "__main__":
    sys.exit(main())
