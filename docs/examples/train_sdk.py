"""A user's own training loop, made multi-datacenter with the geotrain SDK.

Run it as every worker of a topology (site, rank and coordinator come from the environment):

    geotrain launch topologies/demo.yaml --script python docs/examples/train_sdk.py

The model and data here are the user's own: a small MLP that predicts the next byte from the
previous 8, on this machine's Python standard library sources. geotrain only sees the model's
parameters and the optimizer; it averages gradients inside the site, and every H inner steps
merges the sites across the WAN (DiLoCo).
"""

import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import geotrain

CONTEXT = 8


def load_text(limit: int = 500_000) -> torch.Tensor:
    root = os.path.dirname(os.__file__)
    data = bytearray()
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data += f.read()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


class NextByte(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.mlp = nn.Sequential(nn.Linear(16 * CONTEXT, 128), nn.GELU(), nn.Linear(128, 256))

    def forward(self, x):
        return self.mlp(self.emb(x).flatten(1))


def batch(data: torch.Tensor, rng: random.Random, size: int = 32):
    idx = torch.tensor([rng.randrange(len(data) - CONTEXT - 1) for _ in range(size)])
    x = torch.stack([data[i:i + CONTEXT] for i in idx])
    return x, data[idx + CONTEXT]


def main() -> None:
    torch.set_num_threads(1)
    ctx = geotrain.init()                                   # site, rank, coordinator from the environment
    torch.manual_seed(0)                                    # the same initial model in every site
    model = NextByte()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = load_text()
    split = int(len(data) * 0.9)
    train, held_out = data[:split], data[split:]
    rng = random.Random(f"{ctx.site}/{ctx.rank}")           # each worker its own batches
    steps = ctx.rounds * ctx.inner_steps
    with geotrain.DiLoCo(model, opt, context=ctx) as diloco:
        for _ in range(steps):
            x, y = batch(train, rng)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if diloco.step(loss=loss.item()) and ctx.is_leader:
                with torch.no_grad():
                    x, y = batch(held_out, random.Random(0), 256)
                    print(f"{ctx.site} round {diloco.round}: held-out loss {F.cross_entropy(model(x), y).item():.4f}", flush=True)


if __name__ == "__main__":
    main()
