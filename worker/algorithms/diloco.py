"""Synchronous DiLoCo (Douillard et al., arXiv 2311.08105, Algorithm 1).

Every H inner steps each site sends its pseudo-gradient θ_global − θ_site; the coordinator (or the
leaders' rings) averages them over the sites, applies the outer optimizer (SGD with Nesterov
momentum) and every site continues from the new global parameters. Round r is committed as global
version r + 1. A site that comes back from a failure may find rounds committed without it: it
takes the newest version and its step counter jumps to that round.
"""

from __future__ import annotations

from geotrain.worker.algorithms.base import Algorithm


class SyncDiLoCo(Algorithm):
    name = "diloco"
    uses_rings = True
    checkpoints = True

    def due(self) -> bool:
        return self.local_step % self.H == 0

    def sync(self) -> bool:
        version, _ = self.exchange_whole(base_version=self.round)
        if version != self.round + 1:  # caught up: the rounds in between were committed without us
            self.local_step = version * self.H
        self.round = version
        return True
