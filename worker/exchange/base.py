"""What an exchange is: one site leader's way of turning its update into the committed global model.

    exchange(update, base, round=r, base_version=v, fragment=f, part=sl) -> Exchanged

``update`` is the site's pseudo-gradient θ_global − θ_site for ``base``'s elements (the whole model,
or Streaming DiLoCo's fragment ``f``, which is ``part`` of the flat model); the answer is the new
global parameters for the same elements and the global version they are. An exchange survives what
it can (a coordinator restart, a lost answer, a failed ring) and raises a
:class:`~geotrain.errors.GeotrainError` for what it cannot. Only the site leader holds one; the other
ranks get its answer through :class:`geotrain.worker.site_group.SiteGroup`.

Two implementations: :class:`~geotrain.worker.exchange.star.StarExchange` (Merge to the
coordinator, which averages and applies the outer step) and
:class:`~geotrain.worker.exchange.ring.RingExchange` (an all-reduce among site leaders, the outer
step mirrored at every leader, the coordinator confirming; it falls back to the star).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Exchanged:
    """One exchange's answer."""

    new: torch.Tensor
    """The new global parameters for the update's elements."""
    version: int
    """The global version they are (for a fragment: its lane's)."""
    payload_bytes: int = 0
    """Bytes of the update that was committed (0: the update was not counted, the model was fetched)."""
    wire_bytes: int = 0
    """Bytes of the answer on the wire (0 as above)."""
    resumes_at: int | None = None
    """After a rejoin: the round this fragment goes on from (the coordinator's); None otherwise."""


class Exchange(Protocol):
    def exchange(self, update: torch.Tensor, base: torch.Tensor, *, round: int, base_version: int,
                 fragment: int = 0, part: slice = slice(None), fetch_after: int = 0) -> Exchanged:
        """Send ``update`` (based on ``base``, global version ``base_version``) for ``round``; return
        the committed result. ``fetch_after``: the newest version this site knows of; when the
        coordinator says it holds this update already, the answer is fetched as a version after it."""

    def begin(self, round: int) -> None:
        """The site has joined at ``round``: get ready (build rings, say)."""

    def traffic(self) -> tuple[int, int]:
        """Bytes sent to and received from the coordinator so far."""

    def close(self) -> None:
        """Release sockets and connections."""
