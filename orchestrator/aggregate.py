"""How the coordinator combines the sites' updates of a round (``training.aggregation``).

Each rule is a small class with one method, ``__call__(updates) -> Tensor``, taking site -> flat
float32 update and giving the combined update; :data:`AGGREGATORS` is the registry the engine
builds from (:func:`aggregator`). All work coordinate-wise, over the accepted updates of the round:

- ``mean``: the arithmetic mean, summed in sorted site order (bit-identical to what the coordinator
  always did: geotrain.orchestrator.outer.mean_of). One arbitrary site moves it arbitrarily far.
- ``trimmed-mean``: per coordinate, drop the ``floor(trim_fraction * n)`` largest and as many
  smallest values, average the rest. With trim fraction β it tolerates fewer than ``β * n``
  arbitrary (byzantine) values per coordinate (Yin et al. 2018, arXiv 1803.01498).
- ``median``: per coordinate, the middle value (the mean of the two middle ones for an even n).
  It tolerates fewer than ``n / 2`` arbitrary values per coordinate.

With fewer than 3 sites the robust rules are the mean in effect: ``floor(β * 2) = 0`` for β < 0.5,
and the median of two values is their mean. docs/algorithms.md ("Aggregation") says the same.
"""

from __future__ import annotations

import math

import torch

from geotrain.orchestrator.outer import mean_of


class Mean:
    """The arithmetic mean (summed in sorted site order)."""

    name = "mean"

    def __call__(self, updates: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_of(updates)


class TrimmedMean:
    """Per coordinate: drop the ``floor(trim_fraction * n)`` largest and smallest values, average the rest."""

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.25) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def trimmed(self, n: int) -> int:
        """How many values are dropped at each end of a coordinate with ``n`` sites."""
        return math.floor(self.trim_fraction * n)

    def __call__(self, updates: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self.trimmed(len(updates))
        if k == 0:
            return mean_of(updates)
        values, _ = torch.sort(_stacked(updates), dim=0)
        kept = values[k:len(updates) - k]
        return kept.sum(dim=0) / kept.shape[0]


class Median:
    """Per coordinate: the middle value (the mean of the two middle values for an even number of sites)."""

    name = "median"

    def __call__(self, updates: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(updates)
        if n <= 2:
            return mean_of(updates)
        values, _ = torch.sort(_stacked(updates), dim=0)
        if n % 2:
            return values[n // 2].clone()
        return (values[n // 2 - 1] + values[n // 2]) / 2


def _stacked(updates: dict[str, torch.Tensor]) -> torch.Tensor:
    """(sites, numel), rows in sorted site order."""
    return torch.stack([updates[name] for name in sorted(updates)])


AGGREGATORS = {"mean": Mean, "trimmed-mean": TrimmedMean, "median": Median}
"""``training.aggregation`` -> its rule."""


def aggregator(name: str, trim_fraction: float = 0.25):
    """The rule registered under ``name``."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {name!r} ({', '.join(AGGREGATORS)})")
    if name == "trimmed-mean":
        return TrimmedMean(trim_fraction)
    return AGGREGATORS[name]()
