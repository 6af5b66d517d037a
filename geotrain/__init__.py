"""geotrain: train one model across several datacenters.

DiLoCo-style training (arXiv 2311.08105) over emulated WAN links, with a process per worker,
a real etcd, a gRPC coordinator and failure injection. The public API is small:

- :func:`init` and :class:`SiteContext`: who this process is in a run;
- :class:`DiLoCo`: wraps a model and its inner optimizer; merges every H steps;
- :func:`load_topology` and :class:`Topology`: the typed topology file;
- :class:`GeotrainError` and its subclasses: everything geotrain raises on purpose.

Everything else (the coordinator, the link emulator, the launcher) lives in submodules and is
reached through the ``geotrain`` command.
"""

from geotrain.errors import (
    CheckpointCorrupt,
    ControlPlaneError,
    CoordinatorUnavailable,
    GeotrainError,
    LinkError,
    QuorumLost,
    RunFailed,
    StaleRound,
    TopologyError,
    TransferCorrupt,
)
__version__ = "0.1.0"

# The SDK pulls in torch (a second or two): load it on first use, so that the `geotrain` command and
# the processes that never train (links, the launcher's helpers) start fast.
_LAZY = {"DiLoCo": "geotrain.sdk", "SiteContext": "geotrain.sdk", "init": "geotrain.sdk",
         "Topology": "geotrain.config.topology", "load_topology": "geotrain.config.topology"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geotrain' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "CheckpointCorrupt",
    "ControlPlaneError",
    "CoordinatorUnavailable",
    "DiLoCo",
    "GeotrainError",
    "LinkError",
    "QuorumLost",
    "RunFailed",
    "SiteContext",
    "StaleRound",
    "Topology",
    "TopologyError",
    "TransferCorrupt",
    "__version__",
    "init",
    "load_topology",
]
