"""The DDP baseline: every inner step averages the gradients of all sites across the WAN.

The sites stay identical and no outer step happens: the site's leader sends the site's mean
gradient to the coordinator, which averages over the sites and answers; the leader broadcasts the
answer to its site before the inner optimizer steps. ``round`` counts blocks of H steps (for
checkpoints and comparison with DiLoCo at equal steps).

The model lives at the sites only: the coordinator averages gradients and keeps the initial weights,
so a site that restarts mid-run has nothing to rejoin from. It stops with that reason (and the run
fails) instead of training on from the initial weights, which it did before: DDP is the baseline the
fault-tolerant algorithms are compared with, not one of them.
"""

from __future__ import annotations

import time

import torch

from geotrain.errors import GeotrainError
from geotrain.worker.algorithms.base import Algorithm


class DDP(Algorithm):
    name = "ddp"
    checkpoints = True
    wan_gradients = True

    def _start_at(self, site_merges: int, fragment_rounds: list[int]) -> None:
        if self.version > 0:
            raise GeotrainError(
                f"site {self.ctx.site}: algorithm ddp cannot rejoin a run in progress (the coordinator has averaged "
                f"{self.version} steps of gradients but holds only the initial weights; the model lives at the "
                f"sites): rerun it, or use a DiLoCo algorithm, which recovers from failures")
        super()._start_at(site_merges, fragment_rounds)

    def due(self) -> bool:
        return self.local_step % self.H == 0

    def sync(self) -> bool:
        self.round += 1
        return False

    def average_gradients(self, flat: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        traffic0 = self.site.star.traffic() if self.group.is_leader else (0, 0)
        merged = self.site.star.merge_gradients(flat.cpu(), self.local_step) if self.group.is_leader else None
        flat = self.group.broadcast(merged, flat.numel()).to(flat.device)
        seconds = time.perf_counter() - t0
        self.step_wan_s += seconds
        self.wan_wait_s += seconds
        self.last_step_wan_s = seconds
        if self.group.is_leader:
            sent, received = self.site.star.traffic()
            self.events.emit("merge", site=self.ctx.site, round=self.round, step=self.local_step + 1,
                             bytes_sent=sent - traffic0[0], bytes_received=received - traffic0[1],
                             seconds=round(seconds, 6))
        return flat
