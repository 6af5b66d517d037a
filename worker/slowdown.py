"""Emulating a slower site: ``sites[].slowdown: f`` makes the site's inner step f times as long.

Only the site's rank 0 sleeps. It sleeps after its backward pass, before the gradient all-reduce,
for (f − 1) × its own step time without the sleep: forward and backward of this step, plus what the
previous step spent from the all-reduce to the end of the optimizer step (the collective and the
update; time spent waiting on the WAN, as ddp does inside the optimizer step, is left out). The
other ranks of the site wait for rank 0 inside the all-reduce, so the whole site's step becomes
f × as long, collectives included; and because rank 0 arrives last at that all-reduce, the time it
measures there is the collective's own cost, never a wait for a peer.

Why not let every rank sleep its own measured step: a rank's step time then contains its wait for
the others' sleeps, and with f − 1 ≥ 1 the difference between two ranks' sleeps grows by a factor
of f − 1 every step (that stalled sites in the chaos suite). Why not sleep only for forward and
backward: the collectives and the optimizer step then run at full speed, and a 2-worker site asked
for "3" measured 2.5× its unslowed step.

The step time of a site with f = 1 is untouched: no clock is read.
"""

from __future__ import annotations

import time
from typing import Callable


class Slowdown:
    """Call :meth:`start` at the top of each inner step, :meth:`before_sync` after backward,
    :meth:`end` after the optimizer step (with the seconds of that step spent waiting on the WAN)."""

    def __init__(self, factor: float, rank: int, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        self.factor = float(factor)
        self.active = self.factor > 1.0 and rank == 0
        self._clock, self._sleep = clock, sleep
        self._t0 = self._t_sync = 0.0
        self._rest = 0.0  # previous step: all-reduce + optimizer step, without WAN waits
        self.slept_s = 0.0

    def start(self) -> None:
        if self.active:
            self._t0 = self._clock()

    def before_sync(self) -> None:
        if not self.active:
            return
        extra = (self._clock() - self._t0 + self._rest) * (self.factor - 1.0)
        if extra > 0:
            self._sleep(extra)
            self.slept_s += extra
        self._t_sync = self._clock()

    def end(self, wan_s: float = 0.0) -> None:
        if self.active:
            self._rest = max(0.0, self._clock() - self._t_sync - wan_s)
