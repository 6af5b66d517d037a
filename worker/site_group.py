"""The workers of one site as a group: its collectives, and "the leader asks, everyone gets the answer".

Inside a site the workers form a torch process group (gloo on CPU, NCCL on CUDA; see
geotrain.worker.context.init). Only the leader (rank 0) talks to the coordinator; whatever it
learns (a global model, a version, a fragment's round) reaches the other ranks through
:meth:`SiteGroup.leader_then_broadcast`, the one place that pattern is written. Every rank must
make the same calls in the same order. A one-worker site is a group of one: every call is a no-op
that hands back what it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


class SiteGroup:
    """This process's site: ``workers`` ranks, this one ``rank``, tensors moved on ``device``."""

    def __init__(self, workers: int, rank: int, device: str = "cpu"):
        self.workers = workers
        self.rank = rank
        self._dev = "cuda" if device == "cuda" else "cpu"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, tensor: torch.Tensor | None, numel: int) -> torch.Tensor:
        """Rank 0's float32 vector of ``numel`` elements on every rank (the others pass None), on the CPU."""
        if self.workers == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(numel, dtype=torch.float32)
        buf = tensor.to(self._dev)
        dist.broadcast(buf, src=0)
        return buf.cpu()

    def broadcast_ints(self, values: Sequence[int] | None, n: int) -> list[int]:
        """Rank 0's ``n`` integers on every rank (the others pass None)."""
        header = torch.tensor(list(values), dtype=torch.int64) if values is not None else torch.zeros(n, dtype=torch.int64)
        if self.workers > 1:
            buf = header.to(self._dev)
            dist.broadcast(buf, src=0)
            header = buf.cpu()
        return [int(x) for x in header]

    def leader_then_broadcast(self, fn: Callable[[], tuple[Sequence[int], torch.Tensor | None]], *, ints: int,
                              numel: int) -> tuple[list[int], torch.Tensor | None]:
        """The leader runs ``fn`` (it returns ``ints`` integers and a vector of ``numel`` elements, or
        None when it has none); every rank gets both. The other ranks never call ``fn``."""
        values, tensor = fn() if self.is_leader else (None, None)
        header = self.broadcast_ints(None if values is None else [*values, int(tensor is not None)], ints + 1)
        if not header[-1]:
            return header[:-1], None
        return header[:-1], self.broadcast(tensor, numel)

    def all_reduce_mean(self, flat: torch.Tensor) -> torch.Tensor:
        """Average ``flat`` over the site's ranks, in place (sum, then divide by the number of workers)."""
        if self.workers > 1:
            dist.all_reduce(flat)
            flat /= self.workers
        return flat

    def barrier(self) -> None:
        """Every rank is here (a no-op for a one-worker site or without a process group)."""
        if self.workers > 1 and dist.is_initialized():
            dist.barrier()
