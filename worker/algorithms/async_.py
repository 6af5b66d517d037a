"""Asynchronous DiLoCo (Liu et al., Asynchronous Local-SGD, arXiv 2401.09135).

Sites merge on their own schedule: every H inner steps a site sends its pseudo-gradient, based on
the global version it last received; the coordinator applies each update as it arrives (delayed
Nesterov, weighted by its staleness) and answers at once with the current global model. Each site
counts its own merges (``round``); ``version`` is the coordinator's count of all sites' merges.

With ``overlap_steps`` τ > 0 the merge runs in the background for τ inner steps: at step kH the
update goes out, training goes on, and at step kH + τ the answer is put under the progress made
meanwhile, θ ← θ_global_new + (θ − θ_at_send); that progress goes with the next update. The run's
last merge is waited for.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from geotrain.wire.transport import flatten, unflatten_into
from geotrain.worker.algorithms.base import Algorithm, Site


@dataclass
class _InFlight:
    """A merge running in the background."""

    future: Future | None  # the leader's exchange (None on other ranks)
    due: int  # the local step at which its answer is taken
    started: float
    at_send: torch.Tensor  # the local parameters when it went out
    traffic0: tuple[int, int]


class AsyncDiLoCo(Algorithm):
    name = "async-diloco"

    def __init__(self, site: Site):
        super().__init__(site)
        self.tau = min(self.ctx.overlap_steps, self.H - 1)  # dynamic local steps can make a site's H small
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async") \
            if self.overlapped and self.group.is_leader else None
        self._pending: _InFlight | None = None

    @property
    def overlapped(self) -> bool:
        return self.tau > 0

    def _start_at(self, site_merges: int, fragment_rounds: list[int]) -> None:
        self.round = site_merges  # a site counts its own merges (the coordinator kept count)
        super()._start_at(site_merges, fragment_rounds)

    def due(self) -> bool:
        if self._pending is not None:
            return self.local_step >= self._pending.due
        return self.local_step % self.H == 0

    def sync(self) -> bool:
        if self._pending is not None:
            self._finish()
            return True
        if self.overlapped and self.round < self.ctx.rounds - 1:  # the run's last merge is waited for
            self._send()
            return False
        self.version, _ = self.exchange_whole(base_version=self.version)
        self.round += 1
        return True

    def close(self) -> None:
        if self._pending is not None:
            self._finish()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _send(self) -> None:
        """Start this round's merge in the background; training goes on for τ steps meanwhile."""
        future, traffic0 = None, (0, 0)
        if self.group.is_leader:
            pseudo_grad = self.pseudo_gradient()
            traffic0 = self.site.exchange.traffic()
            future = self._pool.submit(self.site.exchange.exchange, pseudo_grad, self.global_flat.clone(),
                                       round=self.round, base_version=self.version, fetch_after=self.version)
        self._pending = _InFlight(future, self.local_step + self.tau, time.perf_counter(),
                                  flatten(self.params).clone(), traffic0)

    def _finish(self) -> None:
        """The merge's answer is in: θ ← θ_global_new + (θ − θ_at_send). The τ steps' progress is kept,
        and goes to the coordinator with the next update (whose base is θ_global_new)."""
        pending, self._pending = self._pending, None
        t_wait = time.perf_counter()
        got = pending.future.result() if self.group.is_leader else None
        (version,), new = self.group.leader_then_broadcast(lambda: ([got.version], got.new), ints=1,
                                                           numel=self.site.numel)
        unflatten_into(new + (flatten(self.params) - pending.at_send), self.params)
        self.global_flat = new.clone()
        waited = time.perf_counter() - t_wait  # only what the τ steps did not hide
        self.wan_wait_s += waited
        self.emit_merge(version, pending.traffic0, waited, exchange_s=round(time.perf_counter() - pending.started, 6))
        self.version = version
        self.round += 1
