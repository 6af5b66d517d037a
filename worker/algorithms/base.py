"""The interface every training algorithm implements, and what they share.

An algorithm decides, after each inner step, whether this site must synchronise with the others and
how: the SDK's facade (geotrain.sdk.DiLoCo) calls, after every inner ``optimizer.step()``,

    algo.local_step += 1
    if algo.due():
        merged = algo.sync()

and, before every inner step, :meth:`Algorithm.average_gradients` (from the optimizer's pre-step
hook, after the site's own all-reduce). Everything an algorithm needs reaches it in a :class:`Site`:
the site's context, its process group (:class:`~geotrain.worker.site_group.SiteGroup`), the
parameters, H, the event log and, on the leader only, the exchange its merges go through
(geotrain.worker.exchange). Its state is the public one the facade shows: ``round``, ``version``,
``local_step``, ``global_flat`` and the WAN wait counters.

Rules every algorithm keeps (tests/worker/test_algorithm_contract.py checks them):
- every rank of a site makes the same collective calls in the same order; only the leader talks to
  the coordinator (through ``site.exchange`` / ``site.star``);
- after a merge, every site holds the same ``global_flat``;
- the leader emits one ``merge`` event per merge (docs/events.md);
- :meth:`close` finishes what is in flight and leaves no thread behind.

A new algorithm is one subclass and one line in geotrain.worker.algorithms.ALGORITHMS.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.wire.transport import fingerprint, flatten, unflatten_into
from geotrain.worker.context import SiteContext
from geotrain.worker.exchange import Exchange, StarExchange
from geotrain.worker.site_group import SiteGroup


@dataclass
class Site:
    """What an algorithm works with. ``star`` and ``exchange`` are the leader's (None on other ranks)."""

    ctx: SiteContext
    group: SiteGroup
    params: list[torch.nn.Parameter]
    H: int
    events: EventLog
    star: StarExchange | None
    exchange: Exchange | None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


class Algorithm(ABC):
    """One way for sites to train one model together. See the module docstring."""

    name: ClassVar[str]
    uses_rings: ClassVar[bool] = False
    """Its merges may go through the site leaders' rings (geotrain.worker.exchange.ring)."""
    checkpoints: ClassVar[bool] = False
    """The facade writes this worker's checkpoint part after each :meth:`sync` (at round ends)."""
    wan_gradients: ClassVar[bool] = False
    """Gradients cross the WAN at every inner step (:meth:`average_gradients` runs even for one worker)."""

    def __init__(self, site: Site):
        self.site = site
        self.ctx, self.group, self.events = site.ctx, site.group, site.events
        self.params, self.H = site.params, site.H
        self.round = 0
        self.version = 0
        self.local_step = 0
        self.global_flat = torch.zeros(0)
        self.wan_wait_s = 0.0
        self.step_wan_s = 0.0  # WAN seconds inside the current inner step (not compute)
        self.last_step_wan_s = 0.0  # seconds the last optimizer step waited on the WAN

    # ---- the interface ----
    @property
    def overlapped(self) -> bool:
        """True when merges run in the background of inner steps: the model then holds local
        parameters that differ from the global ones even right after a merge."""
        return False

    @property
    def fragments(self) -> int:
        """How many parts of the model merge on their own schedule (the coordinator's lanes)."""
        return 1

    @abstractmethod
    def due(self) -> bool:
        """Whether :meth:`sync` has work at ``local_step`` (just incremented)."""

    @abstractmethod
    def sync(self) -> bool:
        """Do this step's synchronisation. True when it ended with a merge taken into the model."""

    def average_gradients(self, flat: torch.Tensor) -> torch.Tensor:
        """The site-averaged gradient before the inner step; an algorithm may average it further."""
        return flat

    def close(self) -> None:
        """Finish what is in flight and stop background work."""

    # ---- joining ----
    def join(self) -> None:
        """Start from the global model: the leader fetches it (providing it if there is none yet) and
        broadcasts it with where the run is; :meth:`_start_at` puts this site's counters there."""
        def fetch():
            joined = self.site.star.join(flatten(self.params))
            if len(joined.fragment_rounds) != self.fragments:
                raise GeotrainError(f"site {self.ctx.site}: the coordinator runs {len(joined.fragment_rounds)} "
                                    f"fragment lanes, this {self.name} site {self.fragments}")
            return [joined.version, joined.site_merges, *joined.fragment_rounds], joined.flat

        ints, flat = self.group.leader_then_broadcast(fetch, ints=2 + self.fragments, numel=self.site.numel)
        self.version = ints[0]
        self.round = self.version
        self.global_flat = flat.clone()
        unflatten_into(self.global_flat, self.params)
        self._start_at(site_merges=ints[1], fragment_rounds=ints[2:])

    def _start_at(self, site_merges: int, fragment_rounds: list[int]) -> None:
        """After the join: synchronous rounds go on from the global version."""
        self.local_step = self.round * self.H

    # ---- what the algorithms share ----
    def pseudo_gradient(self) -> torch.Tensor:
        """θ_global − θ_site over the whole model (DiLoCo, Algorithm 1, line 8), in the flattened copy's own
        memory (one model-sized allocation per merge, not two: each is ~20 ms of page faults at 43 MB)."""
        flat = flatten(self.params)
        return torch.sub(self.global_flat, flat, out=flat)

    def exchange_whole(self, base_version: int) -> tuple[int, float]:
        """Pseudo-gradient out, new global parameters in, for the whole model, at once: the leader
        exchanges, every rank takes the result as its model and global copy. Emits the ``merge`` event.
        Returns (the global version received, seconds it took)."""
        t0 = time.perf_counter()
        traffic0 = self.site.exchange.traffic() if self.group.is_leader else (0, 0)

        def fetch():
            got = self.site.exchange.exchange(self.pseudo_gradient(), self.global_flat, round=self.round,
                                              base_version=base_version, fetch_after=base_version)
            return [got.version], got.new

        (version,), new = self.group.leader_then_broadcast(fetch, ints=1, numel=self.site.numel)
        unflatten_into(new, self.params)
        # ``new`` is this call's alone (a received payload's buffer, ``base + delta``, a ring's outer step, a
        # broadcast's buffer: each made for this merge), so it becomes the global copy without a clone
        self.global_flat = new
        seconds = time.perf_counter() - t0
        self.wan_wait_s += seconds
        self.emit_merge(version, traffic0, seconds)
        return version, seconds

    def emit_merge(self, version: int, traffic0: tuple[int, int], seconds: float, **extra) -> None:
        """The leader's ``merge`` event for a whole-model merge. ``round`` is the round whose commit
        produced the weights now held (version - 1; after a catch-up, or in async, not this site's)."""
        if not self.group.is_leader:
            return
        sent, received = self.site.exchange.traffic()
        self.events.emit("merge", site=self.ctx.site, round=version - 1, version=version, site_round=self.round,
                         bytes_sent=sent - traffic0[0], bytes_received=received - traffic0[1],
                         seconds=round(seconds, 6), step=self.local_step, crc32=fingerprint(self.global_flat),
                         codec=self.ctx.codec, **extra)
