"""The training algorithms, each its own class behind one interface (base.py), and their registry.

    name                class              paper
    diloco              SyncDiLoCo         DiLoCo, arXiv 2311.08105
    streaming-diloco    StreamingDiLoCo    Streaming DiLoCo, arXiv 2501.18512
    async-diloco        AsyncDiLoCo        Asynchronous Local-SGD, arXiv 2401.09135 (with or without overlap)
    ddp                 DDP                the baseline: gradients averaged across sites every step

A new algorithm is one :class:`~geotrain.worker.algorithms.base.Algorithm` subclass and one line
in :data:`ALGORITHMS`. Nothing else branches on an algorithm's name.
"""

from __future__ import annotations

from geotrain.errors import GeotrainError
from geotrain.worker.algorithms.async_ import AsyncDiLoCo
from geotrain.worker.algorithms.base import Algorithm, Site
from geotrain.worker.algorithms.ddp import DDP
from geotrain.worker.algorithms.diloco import SyncDiLoCo
from geotrain.worker.algorithms.streaming import StreamingDiLoCo

__all__ = ["ALGORITHMS", "Algorithm", "AsyncDiLoCo", "DDP", "Site", "StreamingDiLoCo", "SyncDiLoCo", "algorithm_class"]

ALGORITHMS: dict[str, type[Algorithm]] = {
    "diloco": SyncDiLoCo,
    "ddp": DDP,
    "async-diloco": AsyncDiLoCo,
    "streaming-diloco": StreamingDiLoCo,
}


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered under ``name``."""
    if name not in ALGORITHMS:
        raise GeotrainError(f"DiLoCo(algorithm={name!r}): expected one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
