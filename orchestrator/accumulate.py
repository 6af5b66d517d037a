"""The round's mean as a running sum, folded as updates are accepted, bit for bit the mean of old.

The mean of a round has always been ``(u[s1] + u[s2] + ... + u[sk]) / k`` summed in float32 in
sorted site order (geotrain.orchestrator.outer.mean_of): deterministic whatever the order in which
the updates arrived. Float addition is not associative, so a sum in arrival order would change the
bits (and make them depend on timing). :class:`RoundSum` keeps the sorted order and still holds as
few updates as it can:

- an accepted update is *folded* into the sum (``sum += u``, in place) as soon as every site that
  sorts before it and could still send this round (expected, not yet arrived: ``pending``) has
  been folded; until then it is *held*;
- the first folded update's own buffer becomes the sum (no copy; a copy when the caller keeps
  it); a folded update's buffer is free at once;
- :meth:`mean` folds what is held, in sorted order, and divides in place.

So the sum is always that of a sorted prefix of the sites that will have arrived, and the result
is exactly ``mean_of`` of the arrived updates. With two sites nothing is ever held past the second
arrival; in general the held updates are those that arrived after a site sorting before them that
has not (the worst case, the first site last: all others). The sites that may send are only ever
fewer during a round (a refused update's site leaves it; a joiner waits for the next round), so a
site sorting before a folded one can never arrive later; :meth:`add` refuses it if it did.

Only for ``training.aggregation: mean``: trimmed mean and median need every update of the round
(geotrain.orchestrator.aggregate), and the engine keeps them for those.
"""

from __future__ import annotations

import torch


class RoundSum:
    """The running sum of one round's accepted updates (see the module docstring)."""

    def __init__(self, retire=None) -> None:
        """``retire(tensor)``: called with every owned buffer folded into the sum (free from then on)."""
        self.retire = retire
        self.total: torch.Tensor | None = None
        self.folded: list[str] = []
        """Sites in the sum, in the (sorted) order they were added."""
        self.held: dict[str, tuple[torch.Tensor, bool]] = {}
        """Site -> (its update, whether its buffer is the update's own)."""

    def __len__(self) -> int:
        return len(self.folded) + len(self.held)

    def sites(self) -> frozenset[str]:
        return frozenset(self.folded) | frozenset(self.held)

    def add(self, site: str, values: torch.Tensor, pending: frozenset[str], owned: bool = False) -> None:
        """Take ``site``'s accepted update; ``pending``: the sites that may still send this round
        (after this one). ``owned``: nobody else holds ``values`` (it was received into it); the sum
        may then be kept in it (the caller must not use it again), else the sum starts from a copy."""
        if site in self.held or site in self.folded:
            raise ValueError(f"RoundSum: {site!r} is already in the round")
        if self.folded and site < self.folded[-1]:
            raise ValueError(f"RoundSum: {site!r} arrived after {self.folded[-1]!r} was folded, but sorts before it")
        self.held[site] = (values, owned)
        self._fold(pending)

    def forget_pending(self, pending: frozenset[str]) -> None:
        """The sites that may still send are fewer (one failed the round): fold what that allows."""
        self._fold(pending)

    def mean(self) -> torch.Tensor:
        """The mean of every update taken (none pending any more): ``outer.mean_of``, bit for bit."""
        self._fold(frozenset())
        if self.total is None:
            raise ValueError("RoundSum: no update to average")
        return self.total.div_(len(self.folded))

    def _fold(self, pending: frozenset[str]) -> None:
        first_pending = min(pending) if pending else None
        for site in sorted(self.held):
            if first_pending is not None and first_pending < site:
                return
            values, owned = self.held.pop(site)
            if self.total is None:
                self.total = values if owned else values.clone()
            else:
                self.total += values
                if owned and self.retire is not None:
                    self.retire(values)
            self.folded.append(site)
