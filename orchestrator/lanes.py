"""The rounds of one lane, and what the coordinator remembers of each.

A *lane* is the sequence of rounds over one fragment of the model (the whole model unless
streaming-diloco). It holds the round being collected (``state``, its ``updates`` and ring
``claims``, how many ``attempt``\\ s of it failed) and a :class:`RoundLog`: one
:class:`RoundRecord` per round, with everything keyed by round (how it is merged, its result,
why it failed, whose ring update was dropped, the ring plan, the encoded answer).

One pruning rule bounds the log, whatever arrives: it keeps the rounds within ``keep`` of the
round being collected (behind: answers still being streamed to slow waiters; ahead: an early
update); a record outside that window is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from geotrain.orchestrator.accumulate import RoundSum
from geotrain.orchestrator.results import CommitResult
from geotrain.orchestrator.rounds import RoundState

KEEP_ROUNDS = 2
"""Rounds kept on either side of the round being collected."""


@dataclass
class RoundRecord:
    """What the coordinator remembers about one round of a lane."""

    mode: str | None = None
    """ring | star: pinned by the round's first update (None: no update yet)."""
    result: CommitResult | None = None
    """Set once the round is committed: every waiter gets it."""
    failed: str | None = None
    """Why the round cannot commit at all (no model; fenced): its waiters are told."""
    abandoned: set[str] = field(default_factory=set)
    """Sites whose ring update was dropped when the round went to the star (each is told once)."""
    ring_next: int = 0
    """A star round of a ring run: the round at which the leaders rebuild their rings (0: none)."""
    wire: object = None
    """The answer's messages, serialized once for every waiter (geotrain.wire.transport.SharedStream)."""
    durable: bool | None = None
    """A committed round: None while its state is being persisted and published (its answer streams but
    for the last message), True once it is, False when it could not be (``failed`` says why)."""


class RoundLog:
    """Round -> RoundRecord, bounded by one rule (see the module docstring)."""

    def __init__(self, keep: int = KEEP_ROUNDS) -> None:
        self.keep = keep
        self._records: dict[int, RoundRecord] = {}

    def get(self, rnd: int) -> RoundRecord | None:
        return self._records.get(rnd)

    def at(self, rnd: int, current: int) -> RoundRecord:
        """The record of ``rnd``, created if needed; outside the window a fresh one that is not kept."""
        record = self._records.get(rnd)
        if record is None:
            record = RoundRecord()
            if self._inside(rnd, current):
                self._records[rnd] = record
        return record

    def prune(self, current: int) -> None:
        for rnd in [r for r in self._records if not self._inside(r, current)]:
            del self._records[rnd]

    def rounds(self) -> list[int]:
        return sorted(self._records)

    def _inside(self, rnd: int, current: int) -> bool:
        return current - self.keep <= rnd <= current + self.keep


@dataclass
class Lane:
    """The rounds of one fragment (the whole model unless streaming)."""

    index: int
    state: RoundState
    log: RoundLog = field(default_factory=RoundLog)
    updates: dict[str, torch.Tensor | None] = field(default_factory=dict)
    """The round being collected: site -> its update (None: a ring acknowledgement). Star rounds whose
    aggregation is the mean keep none here: their updates are folded into ``sum``."""
    sum: RoundSum = field(default_factory=RoundSum)
    """The round being collected, star and mean: the running sum of its accepted updates."""
    retire: object = None
    """Where the running sum's spent buffers go (the engine's geotrain.wire.buffers.BufferPool.retire)."""
    claims: dict[str, int] = field(default_factory=dict)
    """The round being collected, in a ring: site -> CRC32 of the mean it computed."""
    norms: list[float] = field(default_factory=list)
    """The L2 norms of the latest accepted updates (committed rounds, sorted site order), oldest first:
    the norm bound's history (bounded by ``security.norm_history``; not persisted)."""
    pending_norms: dict[str, float] = field(default_factory=dict)
    """The round being collected: site -> its update's norm (joins ``norms`` when the round commits)."""
    attempt: int = 0
    """Grows every time the round being collected fails; its waiters are told, the round reopens."""
    last_failure: str = ""

    def record(self, rnd: int) -> RoundRecord:
        return self.log.at(rnd, self.state.round)

    def remember_norms(self, norms, keep: int) -> None:
        """Accepted updates' norms join the history; only the last ``keep`` are kept."""
        self.norms.extend(norms)
        del self.norms[:-keep]

    def mode(self, rnd: int) -> str | None:
        record = self.log.get(rnd)
        return record.mode if record is not None else None

    def clear(self) -> None:
        """Forget the updates of the round being collected (it was committed, or starts over)."""
        self.updates, self.claims, self.pending_norms, self.sum = {}, {}, {}, RoundSum(self.retire)

    def reopen(self) -> None:
        """Forget the updates of the round being collected; it starts over (same round, same members, but
        for the dead whose update it had: that update is forgotten too, and they are not waited for)."""
        self.clear()
        self.state = replace(self.state, expected=self.state.expected - self.state.lost, arrived={}, started_at=None,
                             lost=frozenset())
