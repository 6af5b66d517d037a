"""Can this machine run the topology's CUDA sites? Decided before anything starts.

A site with ``device: cuda`` whose workers run on this machine (``geotrain launch``'s local backend) needs
CUDA, and one GPU per worker: inside a site the workers form an NCCL group, and NCCL refuses two ranks
on one GPU. Without the check a wrong topology shows up as workers crashing, restarted, crashing again.
``geotrain site NAME`` (a site or one node of it on its own host) checks that site's workers against that host's
GPUs; Slurm and Kubernetes give each worker its GPU themselves (``--gres``, ``nvidia.com/gpu``).
"""

from __future__ import annotations

from geotrain.errors import TopologyError


def cuda_problem(sites, cuda_available: bool, gpus: int, only: str | None = None) -> str | None:
    """The first reason this machine cannot run ``sites`` as given (``sites[i].device`` / ``.workers``), or None.

    ``only`` None: every node of every site runs here (``geotrain launch``), so a site's whole group (``nodes`` ×
    ``workers``) shares this machine's GPUs. ``only`` a site's name: one node of that site runs here (``geotrain
    site NAME [--node-rank K]``), its ``workers``."""
    for i, s in enumerate(sites):
        if s.device != "cuda" or (only is not None and s.name != only):
            continue
        if not cuda_available:
            return (f"sites[{i}].device: site {s.name!r} asks for cuda, and torch sees no CUDA device on this "
                    f"machine (device: cpu runs it here)")
        here = s.workers if only is not None else s.world_size
        if here > gpus:
            return (f"sites[{i}].workers: site {s.name!r} runs {here} CUDA workers on this machine, which has "
                    f"{gpus} GPU{'s' if gpus != 1 else ''} (NCCL takes one GPU per worker)")
    return None


def check_cuda_sites(topo, only: str | None = None) -> None:
    """Raise TopologyError when this machine cannot run every site of ``topo`` (``geotrain launch``), or one node of
    the site ``only`` (``geotrain site``); see cuda_problem."""
    if not any(s.device == "cuda" and only in (None, s.name) for s in topo.sites):
        return
    import torch

    available = torch.cuda.is_available()
    problem = cuda_problem(topo.sites, available, torch.cuda.device_count() if available else 0, only=only)
    if problem:
        raise TopologyError(problem)
