"""File failpoints: the bottom layer that product code checks and fault injection sets.

gofail-style, but per run directory: a failpoint is active while the file
``ROOT/.failpoints/NAME`` exists. Product code (checkpoint writes) asks here; the fault
scheduler (geotrain.run.faults) creates and removes the files. Nothing here imports the rest.
"""

from __future__ import annotations

import errno
from pathlib import Path


def failpoint_path(root: Path, name: str) -> Path:
    return Path(root) / ".failpoints" / name


def failpoint_active(root: Path, name: str) -> bool:
    return failpoint_path(root, name).exists()


def raise_if_disk_full(root: Path) -> None:
    if failpoint_active(root, "disk_full"):
        raise OSError(errno.ENOSPC, "No space left on device (failpoint disk_full)", str(root))
