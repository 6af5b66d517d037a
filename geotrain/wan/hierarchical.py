"""Hierarchical merges (``merge: hierarchical``): a ring inside each region, a ring of region leaders.

Sites of one region reduce among themselves first (a ring inside the region), the region leaders
run the ring across regions, and the result goes back down the region's ring
(:meth:`~geotrain.wan.ring.RingPeer.broadcast`, pipelined). :func:`hierarchical_groups` groups
sites by region; :func:`hierarchical_all_reduce` composes the three phases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from geotrain.wan.ring_wire import OPS, check_vector

if TYPE_CHECKING:
    from geotrain.wan.ring import RingPeer


def hierarchical_groups(regions: Mapping[str, str]) -> list[list[str]]:
    """Group sites by region: ``{site: region}`` -> ``[[sites of region A], [sites of region B], ...]``.

    Regions appear in the order of their first site in ``regions`` and sites keep their order, so
    every process that reads the same topology builds the same groups. The first site of each group
    is the region's leader (it joins the ring across regions); the leaders' ring runs in group order.
    """
    if not isinstance(regions, Mapping):
        raise TypeError(f"regions must be a mapping site -> region, got {type(regions).__name__}")
    groups: dict[str, list[str]] = {}
    for site, region in regions.items():
        if not isinstance(site, str) or not site:
            raise ValueError(f"site names must be non-empty strings, got {site!r}")
        if not isinstance(region, str) or not region:
            raise ValueError(f"site {site!r}: region must be a non-empty string, got {region!r}")
        groups.setdefault(region, []).append(site)
    return list(groups.values())


def hierarchical_all_reduce(x: torch.Tensor, *, local: RingPeer | None, leaders: RingPeer | None, world: int,
                            op: str = "mean", round: int = 0, codec: str = "fp32", block: int = 256) -> torch.Tensor:
    """Two-level all-reduce: inside the region, across region leaders, back down the region.

    ``local`` is this site's ring inside its region (rank 0 = the region's leader; None when the
    region has one site); ``leaders`` the ring of region leaders (only on a leader; None when there
    is one region). ``world`` is the total number of sites (for ``mean``). Every site of every region
    ends with identical bits: the leaders' ring makes the leaders' results identical and the
    region's broadcast copies the leader's result.
    """
    check_vector(x, "hierarchical_all_reduce")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    is_leader = local is None or local.rank == 0
    if leaders is not None and not is_leader:
        raise ValueError("only a region's leader (local rank 0) takes part in the leaders' ring")
    partial = local.all_reduce(x, "sum", round, codec, block) if local is not None else x.detach().contiguous().clone()
    if is_leader:
        total = leaders.all_reduce(partial, "sum", round, codec, block) if leaders is not None else partial
        if op == "mean":
            arr = total.numpy()
            np.divide(arr, np.float32(world), out=arr)
    else:
        total = partial
    return local.broadcast(total, root=0, round=round, codec=codec, block=block) if local is not None else total
