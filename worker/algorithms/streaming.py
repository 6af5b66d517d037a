"""Streaming DiLoCo (Douillard et al., arXiv 2501.18512).

The flat model is cut into P fragments (geotrain.wire.fragments). Each fragment merges once per
round, on its own schedule: round r of fragment p is due at local step r·H + (p+1)·H/P (fragment
P-1 at the end of the round), so the WAN carries 1/P of the model at a time. The exchange of a
fragment overlaps τ inner steps (``overlap_steps``); its answer is then mixed into the local
fragment, θ_p ← α·θ_p + (1 − α)·θ_global_p. The coordinator keeps one lane (round counter, outer
optimizer slice) per fragment; ``round`` is the lowest fragment round.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from geotrain.wire.fragments import fragment_slices
from geotrain.wire.transport import fingerprint, flatten, unflatten_into
from geotrain.worker.algorithms.base import Algorithm, Site


class StreamingDiLoCo(Algorithm):
    name = "streaming-diloco"

    def __init__(self, site: Site):
        super().__init__(site)
        self.P = self.ctx.fragments
        self.tau, self.alpha = self.ctx.overlap_steps, self.ctx.alpha
        self._slices = fragment_slices(site.numel, self.P)
        self._offsets = [((f + 1) * self.H // self.P) % self.H for f in range(self.P)]
        self._frag_rounds = [0] * self.P
        self._inflight: dict[int, tuple[Future | None, int, float]] = {}  # fragment -> (exchange, due step, start)
        self._pool = ThreadPoolExecutor(max_workers=self.P, thread_name_prefix="stream") if self.group.is_leader else None

    @property
    def overlapped(self) -> bool:
        return True

    @property
    def fragments(self) -> int:
        return self.P

    def _start_at(self, site_merges: int, fragment_rounds: list[int]) -> None:
        self._frag_rounds = list(fragment_rounds)
        self.round = min(self._frag_rounds)
        super()._start_at(site_merges, fragment_rounds)
        self._realign()

    def due(self) -> bool:
        return any(self.local_step >= due for _, due, _ in self._inflight.values()) or \
            any(self._starts(frag) for frag in range(self.P))

    def sync(self) -> bool:
        """Finish the fragment exchanges due now, then start the ones whose turn it is."""
        finished = False
        for frag, (future, due, t0) in list(self._inflight.items()):
            if self.local_step >= due:
                self._finish(frag, future, t0)
                finished = True
        for frag in sorted(range(self.P), key=self._due):
            if self._starts(frag):
                self._send(frag)
                if self.tau == 0:
                    future, _, _ = self._inflight[frag]
                    self._finish(frag, future, time.perf_counter())
                    finished = True
        return finished

    def close(self) -> None:
        for frag, (future, _due, t0) in list(self._inflight.items()):  # finish what is in flight
            self._finish(frag, future, t0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- the schedule ----
    def _due(self, frag: int) -> int:
        """The local step at which fragment ``frag`` sends its next round: round r of fragment p is
        due at r·H + (p+1)·H/P (fragment P-1 at the end of the round)."""
        return self._frag_rounds[frag] * self.H + (self._offsets[frag] or self.H)

    def _starts(self, frag: int) -> bool:
        """Fragment ``frag`` sends now: its turn has come, it is not in flight, the run is not over."""
        return self.local_step >= self._due(frag) and frag not in self._inflight \
            and self._frag_rounds[frag] < self.ctx.rounds

    def _realign(self) -> None:
        """Put the local step where this site's fragment rounds say it is: just after the latest
        fragment that was due. A site that (re)joins with rounds [1, 1, 1, 0] must send fragment 3
        of round 0 before fragment 0 of round 1, as the other sites do, or each waits for the other."""
        self.local_step = max(self.local_step, max(self._due(f) for f in range(self.P)) - self.H)

    # ---- one fragment's exchange ----
    def _send(self, frag: int) -> None:
        sl = self._slices[frag]
        future = None
        if self.group.is_leader:
            local = flatten(self.params)[sl]
            pseudo = self.global_flat[sl] - local
            base = self.global_flat[sl].clone()
            future = self._pool.submit(self.site.exchange.exchange, pseudo, base, round=self._frag_rounds[frag],
                                       base_version=self._frag_rounds[frag], fragment=frag, part=sl,
                                       fetch_after=self.version)
        self._inflight[frag] = (future, self.local_step + self.tau, time.perf_counter())

    def _finish(self, frag: int, future: Future | None, t0: float) -> None:
        sl = self._slices[frag]
        t_wait = time.perf_counter()
        got = future.result() if self.group.is_leader else None

        def answer():  # the leader: the round this fragment goes on with (a rejoin may say otherwise), its model
            return [self._frag_rounds[frag] + 1 if got.resumes_at is None else got.resumes_at], got.new

        (next_round,), new = self.group.leader_then_broadcast(answer, ints=1, numel=sl.stop - sl.start)
        local = flatten(self.params)
        mixed = local.clone()
        mixed[sl] = self.alpha * local[sl] + (1.0 - self.alpha) * new
        unflatten_into(mixed, self.params)
        self.global_flat[sl] = new
        waited = time.perf_counter() - t_wait  # only the part of the exchange that compute did not hide
        self.wan_wait_s += waited
        self.step_wan_s += waited
        del self._inflight[frag]
        if self.group.is_leader:
            self.events.emit("merge", site=self.ctx.site, round=self._frag_rounds[frag], fragment=frag,
                             version=self._frag_rounds[frag] + 1, seconds=round(waited, 6),
                             exchange_s=round(time.perf_counter() - t0, 6), step=self.local_step,
                             bytes_sent=got.payload_bytes, bytes_received=got.wire_bytes,
                             codec=self.ctx.codec, crc32=fingerprint(new))
        self._frag_rounds[frag] = next_round  # one more, or where a rejoin after a discarded update put us
        self._realign()
        self.round = min(self._frag_rounds)
