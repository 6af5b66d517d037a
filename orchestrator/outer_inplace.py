"""The outer step of geotrain.orchestrator.outer without its temporaries: the same bits, no scratch.

:meth:`OuterOptimizer.step` writes Nesterov's step as tensor expressions (``outer_grad +
momentum * buf``, ``params.clone()``, ``params - lr * update``): five temporaries of the model's
size per round. A model-sized tensor is a fresh mapping whose pages fault in on first touch (above
glibc's 32 MiB mmap threshold), so on this project's machines those allocations cost more than the
arithmetic (0.2 s of a 40 MB merge). :class:`InPlaceOuterOptimizer` computes every element with
the same float32 operations in the same order, in the one new parameter tensor of the round itself
(on huge pages: geotrain.wire.buffers), its slice ``t = new[sl]`` serving as the scratch:

    t = momentum * buf[sl];  t = outer_grad + t      (Nesterov; plain: t = buf[sl] * lr below)
    t = t * lr;              t = params[sl] - t       (the rest of new: params)

Each operation reads and writes the same element of ``t`` (torch allows an output that is exactly one
of the inputs), so no model-sized scratch is kept: the coordinator holds one tensor less (issue #14's
memory target counts every one).

``a + b`` and ``b + a``, ``lr * x`` and ``x * lr`` are the same IEEE operations, so the result is
bit for bit :meth:`OuterOptimizer.step`'s (tests/orchestrator/test_outer_inplace.py compares them
over rounds, slices, schedules, plain and Nesterov momentum, momentum 0). The momentum buffer,
the learning rate (``outer_lr``) and the state are the base class's. The parameters passed in are
never written: a new tensor is returned, as before (the last one may still be streamed to a site,
checkpointed or persisted); it comes from ``allocate``, the engine's pool of tensors nothing holds.
"""

from __future__ import annotations

import torch

from geotrain.orchestrator.outer import OuterOptimizer, outer_lr
from geotrain.wire import buffers


class InPlaceOuterOptimizer(OuterOptimizer):
    """:class:`OuterOptimizer` with the same step, computed without model-sized temporaries."""

    def __init__(self, cfg, allocate=None) -> None:
        """``allocate(numel)``: where the new parameters' tensor comes from (default geotrain.wire.buffers.empty;
        the engine's BufferPool reuses the parameters of two rounds ago once nothing holds them)."""
        super().__init__(cfg)
        self.allocate = allocate or buffers.empty

    def step(self, params: torch.Tensor, outer_grad: torch.Tensor, sl: slice = slice(None),
             round: int | None = None) -> torch.Tensor:
        lr = outer_lr(self.cfg, round)
        out = self.allocate(params.numel())
        if out.shape != params.shape:
            out = out.view(params.shape)
        whole = sl == slice(None)
        if not whole:
            out.copy_(params)
        target = out[sl]
        scratch = target  # every element is read and written in place: see the module docstring
        if self.momentum == 0:
            torch.mul(outer_grad, lr, out=scratch)
        else:
            if self.buf is None:
                self.buf = torch.zeros_like(params)
                self.buf[sl] = outer_grad
            else:
                self.buf[sl].mul_(self.momentum).add_(outer_grad)
            if self.nesterov:
                torch.mul(self.buf[sl], self.momentum, out=scratch)
                torch.add(outer_grad, scratch, out=scratch)
                scratch.mul_(lr)
            else:
                torch.mul(self.buf[sl], lr, out=scratch)
        torch.sub(params[sl], scratch, out=target)
        return out
