"""The outer optimizer of DiLoCo (arXiv 2311.08105, Algorithm 1), on one flat parameter vector.

Each round the coordinator receives every site's pseudo-gradient Δ_i = θ_global − θ_i after H
inner steps, averages them, Δ = (1/k) Σ Δ_i (summed in a fixed site order, in float32), and
applies SGD with Nesterov momentum (the paper's defaults: lr 0.7, momentum 0.9):

    b ← μ·b + Δ                  (b starts at zero)
    θ ← θ − lr·(Δ + μ·b)         (Nesterov; plain momentum uses θ ← θ − lr·b)

This is exactly torch.optim.SGD(nesterov=True, dampening=0) written out, so that the merge is
bitwise reproducible and its state is two plain tensors.
"""

from __future__ import annotations

import torch

from geotrain.topology import OuterOptimizerConfig


def mean_of(updates: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of per-site updates, summed in sorted site order (deterministic)."""
    names = sorted(updates)
    total = updates[names[0]].clone()
    for name in names[1:]:
        total += updates[name]
    return total / len(names)


class OuterOptimizer:
    """SGD with (Nesterov) momentum on a flat float32 vector."""

    def __init__(self, cfg: OuterOptimizerConfig):
        self.lr = cfg.lr
        self.momentum = cfg.momentum
        self.nesterov = cfg.nesterov
        self.buf: torch.Tensor | None = None

    def step(self, params: torch.Tensor, outer_grad: torch.Tensor) -> torch.Tensor:
        """Return the new parameters for the averaged pseudo-gradient ``outer_grad``."""
        if self.momentum == 0:
            return params - self.lr * outer_grad
        self.buf = outer_grad.clone() if self.buf is None else self.buf.mul_(self.momentum).add_(outer_grad)
        update = outer_grad + self.momentum * self.buf if self.nesterov else self.buf
        return params - self.lr * update

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "buf": self.buf}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state.get("buf")
