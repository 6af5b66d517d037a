"""A user's own script, written for the SDK tests: a small regression MLP (MSE) on synthetic data.

REGRESS_MODE picks how this user gets it wrong: ``normal`` (right), ``no-step`` (never calls
diloco.step()), ``early`` (stops after REGRESS_ROUNDS rounds), ``crash`` (a bug: raises at its 3rd step), ``mismatch``
(site tokyo builds its layers in another order: the same number of parameters, another model).
Batches depend only on (site, rank, step), so a resumed run sees the same data as an uninterrupted one.
"""

import os
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import geotrain

MODE = os.environ.get("REGRESS_MODE", "normal")
W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


def batch(site: str, rank: int, step: int, size: int = 32):
    g = torch.Generator().manual_seed(zlib.crc32(f"{site}/{rank}/{step}".encode()))
    x = torch.randn(size, 4, generator=g)
    return x, x @ W_TRUE.T + 0.1 * torch.randn(size, 1, generator=g)


class Reordered(nn.Module):
    """The same layers as the others' Sequential, registered last layer first (97 parameters as well)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(16, 1)
        self.a = nn.Linear(4, 16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def main() -> None:
    torch.set_num_threads(1)
    ctx = geotrain.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    if MODE == "mismatch" and ctx.site == "tokyo":
        model = Reordered()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rounds = int(os.environ.get("REGRESS_ROUNDS", ctx.rounds))
    with geotrain.DiLoCo(model, opt, context=ctx) as diloco:
        mine = 0  # steps this process took (a restarted one counts from 0 again)
        for step in range(diloco.local_step, rounds * ctx.inner_steps):
            x, y = batch(ctx.site, ctx.rank, step)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            mine += 1
            if MODE == "crash" and mine == 3:
                raise ValueError("my batch has the wrong shape")
            if MODE != "no-step" and diloco.step(loss=loss.item()):
                diloco.log(train_mse=loss.item(), lr=opt.param_groups[0]["lr"])
                with torch.no_grad():
                    x, y = batch("held-out", 0, 0, size=256)
                    diloco.log_eval(F.mse_loss(model(x), y), metric="mse")
    if ctx.is_leader:
        print(f"{ctx.site} done after {rounds} rounds", flush=True)


if __name__ == "__main__":
    main()
