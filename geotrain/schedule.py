"""Learning-rate schedules as pure functions of the step (the recipe of the DiLoCo papers).

    lr(step) = base_lr * lr_factor(step, kind=..., warmup_steps=..., total_steps=..., min_lr_ratio=...)

``step`` counts from 0: the factor at ``step`` is the one the ``step``-th update uses. Three kinds:

* ``constant``: 1 after the warmup;
* ``cosine``: after the warmup, a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``
  (and ``min_lr_ratio`` after it: the floor);
* ``linear``: after the warmup, a straight line from 1 down to ``min_lr_ratio`` at ``total_steps``.

The warmup is linear from ``1 / warmup_steps`` (step 0) to 1 (step ``warmup_steps``), nanoGPT's
``(step + 1) / warmup_steps``, so no update is taken with a learning rate of exactly zero.

Being a function of the step alone, a schedule needs no state: a run resumed at step s (inner
steps) or round r (the outer optimizer) continues exactly on it. The built-in trainer applies
``training.inner_optimizer.schedule`` to its inner optimizer at every inner step and the
coordinator (and ring leaders, which mirror its outer step) ``training.outer_optimizer.schedule``
at every round. A script written on the SDK does the same with :func:`set_lr`::

    from geotrain.schedule import lr_at, set_lr
    set_lr(opt, lr_at(diloco.local_step, base_lr=3e-3, kind="cosine", warmup_steps=100,
                      total_steps=rounds * inner_steps, min_lr_ratio=0.1))
"""

from __future__ import annotations

import math
from typing import Any

KINDS = ("constant", "cosine", "linear")


def lr_factor(step: int, *, kind: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
              min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind {kind!r}: use one of {', '.join(KINDS)}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"schedule: step and warmup_steps must be >= 0, got {step}, {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"schedule: min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"schedule: a {kind} schedule needs total_steps")
    span = total_steps - warmup_steps
    if span <= 0:
        return min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def lr_at(step: int, *, base_lr: float, **schedule: Any) -> float:
    """``base_lr * lr_factor(step, **schedule)``."""
    return base_lr * lr_factor(step, **schedule)


def schedule_args(cfg: Any, default_total: int | None) -> dict[str, Any]:
    """The keyword arguments of :func:`lr_factor` for a topology's ``schedule`` section
    (``kind``, ``warmup_steps``, ``min_lr_ratio``, ``total_steps``; a null ``total_steps`` is the run's length)."""
    total = cfg.total_steps if cfg.total_steps is not None else default_total
    return {"kind": cfg.kind, "warmup_steps": cfg.warmup_steps, "total_steps": total,
            "min_lr_ratio": cfg.min_lr_ratio}


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every parameter group's learning rate of a torch optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr
