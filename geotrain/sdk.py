"""The SDK: wrap your own PyTorch training loop in DiLoCo across sites.

    import geotrain

    ctx = geotrain.init()                      # site, rank, coordinator: from the environment
    model = MyModel().to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with geotrain.DiLoCo(model, opt, context=ctx) as diloco:   # H and algorithm from the topology
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()                           # gradients were averaged inside the site first
            opt.zero_grad()
            diloco.step(loss=loss.item())        # every H steps: merge across the WAN

What happens (DiLoCo, arXiv 2311.08105):
- inside a site the workers train data-parallel: an optimizer pre-step hook all-reduces the
  gradients over the site's process group (gloo on CPU, NCCL on CUDA). Inner steps never cross
  the WAN;
- every H inner steps the site leader (rank 0) sends the pseudo-gradient θ_global − θ_site to the
  coordinator, which averages all sites' pseudo-gradients, applies the outer optimizer (SGD with
  Nesterov momentum) and returns the new global parameters; the leader broadcasts them to its site;
- with ``algorithm="ddp"`` (the baseline) the hook also averages the gradients of all sites across
  the WAN at every step, so the sites stay identical and no outer step happens.

Environment (set by ``geotrain launch``, torchrun-style; each variable is read here only):
GEOTRAIN_RUN, GEOTRAIN_RUN_DIR, GEOTRAIN_SITE, GEOTRAIN_SITE_RANK, GEOTRAIN_SITE_WORKERS,
GEOTRAIN_COORDINATOR (host:port, through the site's WAN link), GEOTRAIN_ETCD, GEOTRAIN_TOPOLOGY,
GEOTRAIN_DEVICE, MASTER_ADDR and MASTER_PORT (the site's own process group).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.transport import flatten, unflatten_into

log = logging.getLogger(__name__)

ENV_VARS = {
    "GEOTRAIN_RUN": "run name (etcd key prefix)",
    "GEOTRAIN_RUN_DIR": "run directory; events go to its metrics.jsonl",
    "GEOTRAIN_SITE": "this process's site",
    "GEOTRAIN_SITE_RANK": "rank inside the site (0 = leader)",
    "GEOTRAIN_SITE_WORKERS": "number of worker processes in the site",
    "GEOTRAIN_COORDINATOR": "host:port of the coordinator as seen from this site (its WAN link)",
    "GEOTRAIN_ETCD": "etcd endpoint host:port (membership); optional",
    "GEOTRAIN_TOPOLOGY": "path of the run's validated topology (JSON); optional",
    "GEOTRAIN_DEVICE": "cpu or cuda",
    "GEOTRAIN_ALGORITHM": "diloco or ddp (the topology's training.algorithm)",
    "GEOTRAIN_INNER_STEPS": "H, the topology's training.inner_steps",
    "GEOTRAIN_ROUNDS": "the topology's training.rounds",
}


@dataclass
class SiteContext:
    """Who this process is in the run."""

    run: str
    site: str
    rank: int
    workers: int
    coordinator: str
    run_dir: Path | None = None
    etcd: str | None = None
    topology_path: str | None = None
    device: str = "cpu"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    algorithm: str = "diloco"
    inner_steps: int = 10
    rounds: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def proc(self) -> str:
        return f"{self.site}/{self.rank}"

    @classmethod
    def from_env(cls, env=None) -> "SiteContext":
        env = os.environ if env is None else env
        missing = [k for k in ("GEOTRAIN_SITE", "GEOTRAIN_COORDINATOR") if not env.get(k)]
        if missing:
            raise GeotrainError(f"geotrain.init(): {', '.join(missing)} not set; run this script through "
                                f"`geotrain launch` (or set the variables yourself, see geotrain.sdk.ENV_VARS)")
        return cls(
            run=env.get("GEOTRAIN_RUN", "geotrain"),
            site=env["GEOTRAIN_SITE"],
            rank=int(env.get("GEOTRAIN_SITE_RANK", "0")),
            workers=int(env.get("GEOTRAIN_SITE_WORKERS", "1")),
            coordinator=env["GEOTRAIN_COORDINATOR"],
            run_dir=Path(env["GEOTRAIN_RUN_DIR"]) if env.get("GEOTRAIN_RUN_DIR") else None,
            etcd=env.get("GEOTRAIN_ETCD") or None,
            topology_path=env.get("GEOTRAIN_TOPOLOGY") or None,
            device=env.get("GEOTRAIN_DEVICE", "cpu"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            algorithm=env.get("GEOTRAIN_ALGORITHM", "diloco"),
            inner_steps=int(env.get("GEOTRAIN_INNER_STEPS", "10")),
            rounds=int(env.get("GEOTRAIN_ROUNDS", "1")),
        )


_registration = None


def init(context: SiteContext | None = None) -> SiteContext:
    """Join this process to its site: the site's process group, and etcd membership (under a lease)."""
    global _registration
    ctx = context or SiteContext.from_env()
    if ctx.workers > 1 and not dist.is_initialized():
        backend = "nccl" if ctx.device == "cuda" else "gloo"
        if ctx.device == "cuda":
            torch.cuda.set_device(ctx.rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://{ctx.master_addr}:{ctx.master_port}",
                                rank=ctx.rank, world_size=ctx.workers, timeout=datetime.timedelta(minutes=10))
    if ctx.etcd and _registration is None:
        from geotrain.controlplane import ControlPlane

        cp = ControlPlane(ctx.etcd, ctx.run)
        _registration = cp.register_member(ctx.site, ctx.rank, {"pid": os.getpid(), "device": ctx.device})
    return ctx


class DiLoCo:
    """DiLoCo (or the DDP baseline) around a model and its inner optimizer. See the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, inner_steps: int | None = None,
                 algorithm: str | None = None, context: SiteContext | None = None, events: EventLog | None = None):
        self.ctx = context or init()
        inner_steps = self.ctx.inner_steps if inner_steps is None else inner_steps
        algorithm = self.ctx.algorithm if algorithm is None else algorithm
        if algorithm not in ("diloco", "ddp"):
            raise GeotrainError(f"DiLoCo(algorithm={algorithm!r}): expected 'diloco' or 'ddp'")
        if inner_steps < 1:
            raise GeotrainError(f"DiLoCo(inner_steps={inner_steps}): must be at least 1")
        self.model = model
        self.optimizer = optimizer
        self.H = inner_steps
        self.algorithm = algorithm
        self.events = events or EventLog(self.ctx.run_dir / "metrics.jsonl" if self.ctx.run_dir else None, self.ctx.proc)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.client = None
        self.round = 0
        self.local_step = 0
        self.wan_wait_s = 0.0
        self.compute_s = 0.0
        self._step_wan_s = 0.0
        if self.ctx.is_leader:
            from geotrain.worker.client import CoordinatorClient

            self.client = CoordinatorClient(self.ctx.coordinator, self.ctx.site)
        self._join()
        self._hook = optimizer.register_step_pre_hook(self._pre_step)
        self._last = time.perf_counter()

    # ---- public ----
    def step(self, loss: float | None = None) -> bool:
        """Call after each inner ``optimizer.step()``. Returns True when this step ended with a merge."""
        now = time.perf_counter()
        compute = now - self._last - self._step_wan_s
        self.compute_s += compute
        self.local_step += 1
        merged = False
        if self.ctx.is_leader:
            self.events.emit("inner_step", site=self.ctx.site, step=self.local_step, round=self.round,
                             loss=loss, compute_s=round(compute, 6), wan_s=round(self._step_wan_s, 6))
        if self.algorithm == "diloco" and self.local_step % self.H == 0:
            self._merge()
            merged = True
        elif self.algorithm == "ddp" and self.local_step % self.H == 0:
            self.round += 1
        self._step_wan_s = 0.0
        self._last = time.perf_counter()
        return merged

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "DiLoCo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the protocol ----
    def _join(self) -> None:
        """Start from the global model: the leader fetches it (providing it if there is none yet)."""
        flat = None
        header = torch.zeros(1, dtype=torch.int64)
        if self.ctx.is_leader:
            resp = self.client.join(self.ctx.workers)
            if not resp.has_model:
                self.client.init_model(flatten(self.params))
            payload = self.client.get_model(min_version=resp.version)
            flat = payload.tensor()
            header[0] = payload.version
            self.events.emit("site_ready", site=self.ctx.site, version=payload.version, round=resp.round)
        self.round = int(self._site_broadcast(header)[0])
        self.global_flat = self._site_broadcast(flat, like=self.params).clone()
        unflatten_into(self.global_flat, self.params)

    def _merge(self) -> None:
        """Pseudo-gradient out, new global parameters in (DiLoCo, Algorithm 1, lines 8-12)."""
        t0 = time.perf_counter()
        new = None
        if self.ctx.is_leader:
            pseudo_grad = self.global_flat - flatten(self.params)
            sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
            payload = self.client.merge(pseudo_grad, round=self.round, kind="pseudo_grad", version=self.round)
            new = payload.tensor()
            crc = payload.crc32
        new = self._site_broadcast(new, like=self.params)
        unflatten_into(new, self.params)
        self.global_flat = new.clone()
        seconds = time.perf_counter() - t0
        self.wan_wait_s += seconds
        if self.ctx.is_leader:
            self.events.emit("merge", site=self.ctx.site, round=self.round, version=self.round + 1,
                             bytes_sent=self.client.bytes_sent - sent0, bytes_received=self.client.bytes_received - recv0,
                             seconds=round(seconds, 6), step=self.local_step, crc32=crc)
        self.round += 1

    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Average gradients inside the site (and, for ddp, across sites) before the inner step."""
        if self.ctx.workers == 1 and self.algorithm != "ddp":
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.ctx.workers > 1:
            dist.all_reduce(flat)
            flat /= self.ctx.workers
        if self.algorithm == "ddp":
            t0 = time.perf_counter()
            merged = None
            if self.ctx.is_leader:
                sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
                merged = self.client.merge(flat.cpu(), round=self.local_step, kind="grad").tensor()
            flat = self._site_broadcast(merged, like=self.params).to(flat.device)
            seconds = time.perf_counter() - t0
            self._step_wan_s += seconds
            self.wan_wait_s += seconds
            if self.ctx.is_leader:
                self.events.emit("merge", site=self.ctx.site, round=self.round, step=self.local_step + 1,
                                 bytes_sent=self.client.bytes_sent - sent0,
                                 bytes_received=self.client.bytes_received - recv0, seconds=round(seconds, 6))
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def _site_broadcast(self, tensor: torch.Tensor | None, like=None) -> torch.Tensor:
        """Rank 0's tensor on every rank of the site (a no-op for one-worker sites)."""
        if self.ctx.workers == 1:
            return tensor
        if tensor is None:
            numel = sum(p.numel() for p in like)
            tensor = torch.empty(numel, dtype=torch.float32)
        dev = "cuda" if self.ctx.device == "cuda" else "cpu"
        buf = tensor.to(dev)
        dist.broadcast(buf, src=0)
        return buf.cpu()
