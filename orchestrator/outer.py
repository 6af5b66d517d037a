"""The outer optimizer of DiLoCo (arXiv 2311.08105, Algorithm 1), on one flat parameter vector.

Each round the coordinator receives every site's pseudo-gradient Δ_i = θ_global − θ_i after H
inner steps, averages them, Δ = (1/k) Σ Δ_i (summed in a fixed site order, in float32), and
applies SGD with Nesterov momentum (the paper's defaults: lr 0.7, momentum 0.9):

    b ← μ·b + Δ                  (b starts at zero)
    θ ← θ − lr·(Δ + μ·b)         (Nesterov; plain momentum uses θ ← θ − lr·b)

This is exactly torch.optim.SGD(nesterov=True, dampening=0) written out, so that the merge is
bitwise reproducible and its state is two plain tensors.

The learning rate may follow a schedule over rounds (``outer_optimizer.schedule``, geotrain.schedule):
``lr(r) = lr × factor(r)`` for round ``r`` (a streaming fragment's own round). Being a function of the
round alone, it needs no state to resume, and the ring leaders that mirror this step compute the same one.
"""

from __future__ import annotations

import torch

from geotrain.config.topology import OuterOptimizerConfig
from geotrain.schedule import lr_factor, schedule_args


def mean_of(updates: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of per-site updates, summed in sorted site order (deterministic)."""
    names = sorted(updates)
    total = updates[names[0]].clone()
    for name in names[1:]:
        total += updates[name]
    return total / len(names)


def outer_lr(cfg: OuterOptimizerConfig, round: int | None) -> float:
    """The outer learning rate at ``round`` (the base lr when no round is given or the schedule is constant
    without warmup). A schedule's absent total_steps must have been made explicit (geotrain.config.derive)."""
    sched = cfg.schedule
    if round is None or (sched.kind == "constant" and sched.warmup_steps == 0):
        return cfg.lr
    return cfg.lr * lr_factor(max(0, round), **schedule_args(sched, sched.total_steps))


class OuterOptimizer:
    """SGD with (Nesterov) momentum on a flat float32 vector."""

    def __init__(self, cfg: OuterOptimizerConfig):
        self.cfg = cfg
        self.lr = cfg.lr
        self.momentum = cfg.momentum
        self.nesterov = cfg.nesterov
        self.buf: torch.Tensor | None = None

    def step(self, params: torch.Tensor, outer_grad: torch.Tensor, sl: slice = slice(None),
             round: int | None = None) -> torch.Tensor:
        """Return new parameters for the averaged pseudo-gradient ``outer_grad`` of ``params[sl]``.

        ``sl`` (Streaming DiLoCo) steps one fragment: only that slice of the momentum buffer moves.
        ``round`` picks the learning rate from the schedule (None: the base lr).
        """
        lr = outer_lr(self.cfg, round)
        if self.momentum == 0:
            out = params.clone()
            out[sl] = params[sl] - lr * outer_grad
            return out
        if self.buf is None:
            self.buf = torch.zeros_like(params)
            self.buf[sl] = outer_grad
        else:
            self.buf[sl].mul_(self.momentum).add_(outer_grad)
        update = outer_grad + self.momentum * self.buf[sl] if self.nesterov else self.buf[sl]
        out = params.clone()
        out[sl] = params[sl] - lr * update
        return out

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "buf": self.buf}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state.get("buf")


def staleness_weight(kind: str, staleness: int, n_sites: int) -> float:
    """The weight of an async update ``staleness`` versions behind (``training.async.staleness_weight``).

    ``inverse``: 1/(1+s). ``excess``: 1/(1+max(0, s-(N-1))): with N sites in steady state each update
    finds the N-1 others' updates applied since it started, so only staleness beyond that is penalised.
    ``none``: 1.
    """
    if kind == "inverse":
        return 1.0 / (1.0 + staleness)
    if kind == "excess":
        return 1.0 / (1.0 + max(0, staleness - (n_sites - 1)))
    if kind == "none":
        return 1.0
    raise ValueError(f"unknown staleness weight {kind!r} (inverse, excess or none)")


class DelayedNesterov:
    """The outer optimizer of asynchronous DiLoCo (Async Local-SGD, arXiv 2401.09135, "delayed Nesterov").

    Updates arrive one site at a time. Each is applied at once as a plain step ``θ ← θ − lr·Δ/N``
    (N = number of sites), and also accumulated; every N updates the momentum absorbs their mean and
    the Nesterov look-ahead is applied: ``b ← μ·b + mean(Δ)``, ``θ ← θ − lr·μ·b``. With N updates that
    arrive in lock-step this is exactly the synchronous outer step ``θ ← θ − lr·(mean(Δ) + μ·b)``.
    ``weight`` (e.g. 1/(1+staleness)) scales an update before anything else.
    """

    def __init__(self, cfg: OuterOptimizerConfig, n: int, delayed: bool = True):
        self.cfg = cfg
        self.lr, self.momentum, self.n, self.delayed = cfg.lr, cfg.momentum, max(1, n), delayed
        self.buf: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.count = 0

    def step(self, params: torch.Tensor, delta: torch.Tensor, weight: float = 1.0, version: int | None = None
             ) -> torch.Tensor:
        """``version``: the global version before this update; its round (version // N) picks the learning
        rate from the schedule (None: the base lr)."""
        g = delta * weight if weight != 1.0 else delta
        lr = outer_lr(self.cfg, None if version is None else version // self.n)
        if not self.delayed:  # plain Nesterov on every update
            self.buf = g.clone() if self.buf is None else self.buf.mul_(self.momentum).add_(g)
            return params - lr * (g + self.momentum * self.buf) / self.n
        params = params - (lr / self.n) * g
        self.acc = g.clone() if self.acc is None else self.acc.add_(g)
        self.count += 1
        if self.count >= self.n:
            mean = self.acc / self.count
            self.buf = mean.clone() if self.buf is None else self.buf.mul_(self.momentum).add_(mean)
            params = params - lr * self.momentum * self.buf
            self.acc, self.count = None, 0
        return params
