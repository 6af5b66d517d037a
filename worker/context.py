"""Who this process is in a run: its site, rank and addresses, and what the topology asks of it.

Read once, from the environment that ``geotrain launch`` (or ``geotrain site``) sets, torchrun-style.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from geotrain.errors import GeotrainError

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
    "GEOTRAIN_CHECKPOINT_DIR": "where this worker writes its checkpoint parts; unset = no worker checkpoints",
    "GEOTRAIN_CHECKPOINT_EVERY": "checkpoint every N rounds (0 = never)",
    "GEOTRAIN_CHECKPOINT_KEEP": "checkpoint parts each worker keeps",
    "GEOTRAIN_TOPOLOGY_SHA256": "the topology's digest, written into checkpoint manifests",
    "GEOTRAIN_RESUME_ROUND": "resume exactly from this checkpoint round (geotrain resume)",
    "GEOTRAIN_RETRY_DEADLINE_S": "how long the leader retries an unreachable coordinator",
    "GEOTRAIN_RPC_TIMEOUT_S": "deadline of one Merge/GetModel call",
    "GEOTRAIN_CODEC": "wire codec of merges: fp32, fp16, bf16, int8, int4",
    "GEOTRAIN_CODEC_BLOCK": "elements per scale block (int8/int4)",
    "GEOTRAIN_ERROR_FEEDBACK": "1: keep quantisation error for the next update",
    "GEOTRAIN_FRAGMENTS": "streaming-diloco: P fragments",
    "GEOTRAIN_OVERLAP_STEPS": "streaming/async-diloco: τ inner steps overlapping a merge's exchange",
    "GEOTRAIN_ALPHA": "streaming-diloco: mixing weight of the local fragment",
    "GEOTRAIN_RINGS": "ring/hierarchical merges: JSON list of this leader's ring memberships",
    "GEOTRAIN_NUM_SITES": "number of sites in the run",
    "GEOTRAIN_RING_UPLOADER": "the site that uploads a ring's mean to the coordinator",
    "GEOTRAIN_OUTER": "the outer optimizer's settings (JSON), mirrored by ring leaders",
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
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    topology_sha256: str = ""
    resume_round: int | None = None
    retry_deadline_s: float = 120.0
    rpc_timeout_s: float = 300.0
    codec: str = "fp32"
    block: int = 256
    error_feedback: bool = True
    fragments: int = 1
    overlap_steps: int = 0
    alpha: float = 0.5
    rings: tuple = ()
    num_sites: int = 1
    ring_uploader: str = ""
    outer_optimizer: dict | None = None

    @property
    def part(self) -> str:
        """This worker's checkpoint part name."""
        return f"{self.site}.{self.rank}"

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
            checkpoint_dir=Path(env["GEOTRAIN_CHECKPOINT_DIR"]) if env.get("GEOTRAIN_CHECKPOINT_DIR") else None,
            checkpoint_every=int(env.get("GEOTRAIN_CHECKPOINT_EVERY", "0")),
            checkpoint_keep=int(env.get("GEOTRAIN_CHECKPOINT_KEEP", "2")),
            topology_sha256=env.get("GEOTRAIN_TOPOLOGY_SHA256", ""),
            resume_round=int(env["GEOTRAIN_RESUME_ROUND"]) if env.get("GEOTRAIN_RESUME_ROUND") else None,
            retry_deadline_s=float(env.get("GEOTRAIN_RETRY_DEADLINE_S", "120")),
            rpc_timeout_s=float(env.get("GEOTRAIN_RPC_TIMEOUT_S", "300")),
            codec=env.get("GEOTRAIN_CODEC", "fp32"),
            block=int(env.get("GEOTRAIN_CODEC_BLOCK", "256")),
            error_feedback=env.get("GEOTRAIN_ERROR_FEEDBACK", "1") == "1",
            fragments=int(env.get("GEOTRAIN_FRAGMENTS", "1")),
            overlap_steps=int(env.get("GEOTRAIN_OVERLAP_STEPS", "0")),
            alpha=float(env.get("GEOTRAIN_ALPHA", "0.5")),
            rings=tuple(json.loads(env["GEOTRAIN_RINGS"])) if env.get("GEOTRAIN_RINGS") else (),
            num_sites=int(env.get("GEOTRAIN_NUM_SITES", "1")),
            ring_uploader=env.get("GEOTRAIN_RING_UPLOADER", ""),
            outer_optimizer=json.loads(env["GEOTRAIN_OUTER"]) if env.get("GEOTRAIN_OUTER") else None,
        )


_registration = None


def _destroy_process_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the process is exiting; say so and go on
            log.warning("could not destroy the site's process group at exit: %s", exc)


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
        # Left to interpreter teardown, gloo could abort a rank whose peer had already exited ("terminate
        # called without an active exception", seen once in ~40 runs): the launcher then took a finished
        # site for a dead one and restarted it.
        atexit.register(_destroy_process_group)
    if ctx.etcd and _registration is None:
        from geotrain.control.plane import ControlPlane

        cp = ControlPlane(ctx.etcd, ctx.run)
        _registration = cp.register_member(ctx.site, ctx.rank, {"pid": os.getpid(), "device": ctx.device})
    return ctx
