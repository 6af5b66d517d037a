"""An update's values checked as they arrive, before it counts.

The coordinator validates every update (geotrain.orchestrator.rounds.validate_update: length,
dtype, every value finite, the norm bound) before it may count. The finite check and the norm are
one pass over the values; instead of a pass once the whole update is in, :class:`ValueCheck`
takes each piece of a float32 stream as it arrives (geotrain.wire.receive.Receiver's
``inspector``), in the receiving thread, outside the engine's lock:

- it sums the squares of the values a piece of :data:`PIECE` values at a time, in stream order:
  each piece's in float32 (``torch.dot``, one pass, no allocation), the pieces' sums in float64;
  exactly the sum :func:`l2_norm` computes over the whole update (the same pieces, the same order,
  so the norm is bit for bit the same whichever way it was computed). Against the float64 sum of
  squares the coordinator used before, it differs by about 1e-7 relative (float32 rounding within a
  piece): nothing a norm bound of "10 x the median" can tell;
- a piece with a value that is not finite (NaN, infinity) stops the stream at once with
  :class:`NonFiniteValues`: nothing of it was counted, and the servicer has the engine refuse the
  update as it refuses one that arrived whole (merge_refused ``non_finite``, the site fails the round).

A piece's float32 sum of squares is not finite when a value is not (NaN, infinity), and also when
finite values above ~1e19 overflow it: such a piece is summed again in float64, where any finite
input stays finite (float32's largest value squared is ~1.2e77), so that only a non-finite value is
refused. One pass is both checks.
:class:`Received` is the update the servicer hands the engine, with the norm computed this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from geotrain.errors import GeotrainError
from geotrain.orchestrator.results import Update

PIECE = 1 << 20
"""Values per piece of the norm's sum (4 MiB of float32: one chunk of geotrain.wire.transport)."""


class Squares:
    """The sum of squares of a piece of float32 values (see the module docstring)."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None

    def __call__(self, piece: torch.Tensor) -> float:
        s = float(torch.dot(piece, piece))
        return s if math.isfinite(s) else self.exact(piece)

    def exact(self, piece: torch.Tensor) -> float:
        """``float(piece.double().square().sum())``, bit for bit, through one reusable scratch buffer."""
        n = piece.numel()
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(max(n, PIECE), dtype=torch.float64)
        s = self._scratch[:n]
        s.copy_(piece)
        s.square_()
        return float(s.sum())


def l2_norm(values: torch.Tensor, squares: Squares | None = None) -> float:
    """The L2 norm of float32 values: each :data:`PIECE`'s squares summed in float32 (in float64 where
    that overflows), the pieces' sums in float64. NaN or infinity when a value is not finite."""
    squares = squares or Squares()
    total = 0.0
    for piece in values.reshape(-1).split(PIECE):
        total += squares(piece)
    return math.sqrt(total)


class NonFiniteValues(GeotrainError):
    """A piece of a stream held a value that is not finite; the stream stops there. ``index``: the
    first value of that piece."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


class ValueCheck:
    """The norm of one float32 stream's values, piece by piece as they arrive (see the module docstring)."""

    piece = PIECE

    def __init__(self, what: str = "update") -> None:
        self.what = what
        self.total = 0.0
        self.seen = 0
        self._squares = Squares()

    def __call__(self, piece: torch.Tensor) -> None:
        """The next :data:`PIECE` values of the stream (fewer: its last); raises NonFiniteValues."""
        s = self._squares(piece)
        if not math.isfinite(s):
            raise NonFiniteValues(f"{self.what}: a value among {self.seen}..{self.seen + piece.numel() - 1} is "
                                  f"not finite (NaN or infinity); refused as it arrived", self.seen)
        self.total += s
        self.seen += piece.numel()

    @property
    def norm(self) -> float:
        return math.sqrt(self.total)


@dataclass(frozen=True)
class Received(Update):
    """An update decoded from its stream, with what was computed as it arrived."""

    norm: float | None = None
    """The values' L2 norm (:class:`ValueCheck`; None: not computed, the engine computes it)."""
    owned: bool = False
    """The values' buffer belongs to this update alone (it was received into it): the engine may sum
    into it (geotrain.orchestrator.accumulate) instead of copying it."""
