"""Streaming DiLoCo's fragments: P contiguous slices of the flat parameter vector.

Sites and the coordinator compute the same slices from (numel, P); nothing about them travels.
"""

from __future__ import annotations

import numpy as np


def fragment_slices(numel: int, fragments: int) -> list[slice]:
    """P contiguous, near-equal slices of the flat parameter vector (sites compute the same)."""
    bounds = np.linspace(0, numel, fragments + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
