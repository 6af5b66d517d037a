"""One site's worker group: the environment of each worker, and ``geotrain site`` for its own host.

``geotrain launch`` starts every site on one machine; ``geotrain site NAME TOPOLOGY`` starts one
site's workers on the host it runs on (a Compose service, a machine of its own), finding the
coordinator through etcd unless ``--coordinator`` names it (a WAN link emulator's address, say).
A dead worker restarts the whole site (its process group cannot take a new member), within
``recovery.max_restarts``; the site then rejoins the run at the next round.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from geotrain.run import procs
from geotrain.errors import GeotrainError, RunFailed
from geotrain.events import EventLog
from geotrain.config.topology import SiteConfig, Topology


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_env(topo: Topology, site: SiteConfig, rank: int, *, run_dir: Path, topology_json: Path, coordinator: str,
               etcd: str, checkpoint_dir: Path, master_port: int, resume_round: int | None = None) -> dict[str, str]:
    """Everything a worker learns from its environment (geotrain.sdk.ENV_VARS), torchrun-style."""
    tr, ck, rec = topo.training, topo.checkpoint, topo.recovery
    env = procs.env_with(
        GEOTRAIN_RUN=topo.name, GEOTRAIN_RUN_DIR=str(run_dir), GEOTRAIN_SITE=site.name,
        GEOTRAIN_SITE_RANK=str(rank), GEOTRAIN_SITE_WORKERS=str(site.workers),
        GEOTRAIN_COORDINATOR=coordinator, GEOTRAIN_ETCD=etcd,
        GEOTRAIN_TOPOLOGY=str(topology_json), GEOTRAIN_DEVICE=site.device,
        GEOTRAIN_ALGORITHM=tr.algorithm, GEOTRAIN_INNER_STEPS=str(tr.inner_steps), GEOTRAIN_ROUNDS=str(tr.rounds),
        GEOTRAIN_CHECKPOINT_DIR=str(checkpoint_dir), GEOTRAIN_CHECKPOINT_EVERY=str(ck.every_rounds),
        GEOTRAIN_CHECKPOINT_KEEP=str(ck.keep), GEOTRAIN_TOPOLOGY_SHA256=topo.digest(),
        GEOTRAIN_RETRY_DEADLINE_S=str(rec.retry_deadline_s),
        GEOTRAIN_RPC_TIMEOUT_S=str(max(300.0, tr.round_timeout_s * 2)),
        GEOTRAIN_CODEC=tr.compression.codec, GEOTRAIN_CODEC_BLOCK=str(tr.compression.block),
        GEOTRAIN_ERROR_FEEDBACK="1" if tr.compression.error_feedback else "0",
        GEOTRAIN_FRAGMENTS=str(tr.streaming.fragments),
        GEOTRAIN_OVERLAP_STEPS=str(tr.asynchronous.overlap_steps if tr.algorithm == "async-diloco"
                                   else tr.streaming.overlap_steps),
        GEOTRAIN_ALPHA=str(tr.streaming.alpha),
        GEOTRAIN_NUM_SITES=str(len(topo.sites)), GEOTRAIN_RING_UPLOADER=topo.sites[0].name,
        GEOTRAIN_OUTER=json.dumps(tr.outer_optimizer.model_dump(mode="json")),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(site.workers),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    if resume_round is not None:
        env["GEOTRAIN_RESUME_ROUND"] = str(resume_round)
    return env


def checkpoint_dir(topo: Topology, run_dir: Path) -> Path:
    return Path(topo.checkpoint.path) if topo.checkpoint.path else run_dir / "checkpoints"


def run_site(topo: Topology, site_name: str, run_dir: Path, etcd: str, coordinator: str | None,
             script: list[str] | None = None) -> int:
    """Run one site's workers here until they finish; restart the site when a worker dies."""
    try:
        site = topo.site(site_name)
    except KeyError:
        raise GeotrainError(f"site {site_name!r} is not in the topology ({', '.join(topo.site_names)})") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    topo_json = run_dir / f"topology.{site.name}.json"
    topo_json.write_text(json.dumps(topo.model_dump(mode="json")))
    events = EventLog(run_dir / "metrics.jsonl", f"site {site.name}")
    if coordinator is None:
        from geotrain.control.plane import ControlPlane

        with ControlPlane(etcd, topo.name) as cp:
            coordinator = cp.coordinator_address(wait_s=120)
        if coordinator is None:
            raise GeotrainError(f"site {site.name}: no coordinator registered in etcd at {etcd} within 120 s")
    entry = script or [sys.executable, "-m", "geotrain.worker.main"]
    restarts = 0
    while True:
        port = free_port()
        workers = []
        for rank in range(site.workers):
            env = worker_env(topo, site, rank, run_dir=run_dir, topology_json=topo_json, coordinator=coordinator,
                             etcd=etcd, checkpoint_dir=checkpoint_dir(topo, run_dir), master_port=port)
            log = open(run_dir / "logs" / f"worker-{site.name}-{rank}.log", "ab")
            workers.append(procs.spawn(list(entry), env=env, stdout=log, stderr=log))
            log.close()
            events.emit("process_started", name=f"worker {site.name}/{rank}", role="worker", pid=workers[-1].pid)
        try:
            while True:
                codes = [w.poll() for w in workers]
                dead = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if dead:
                    break
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.2)
        finally:
            procs.terminate_all(workers, grace_s=3.0)
        rank, code = dead[0]
        restarts += 1
        now = time.time()
        events.emit("failure", what="worker", target=f"worker {site.name}/{rank}", happened_t=now, detected_t=now,
                    reason=f"exit status {code}")
        if topo.recovery.worker_failure == "fail" or restarts > topo.recovery.max_restarts:
            raise RunFailed(f"site {site.name}: worker {rank} died with exit status {code}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geotrain site", description="run one site's worker group on this host")
    p.add_argument("name", help="the site's name in the topology")
    p.add_argument("topology", help="topology file (YAML) or a run directory's topology.json")
    p.add_argument("--etcd", required=False, default=None, help="etcd endpoint host:port (default: the topology's)")
    p.add_argument("--coordinator", default=None, help="coordinator host:port (default: found through etcd)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/site"), help="where logs, metrics and checkpoints go")
    p.add_argument("--script", nargs=argparse.REMAINDER, default=None, help="a user entrypoint instead of the built-in trainer")
    args = p.parse_args(argv)
    from geotrain.config.topology import load_any

    try:
        topo = load_any(args.topology)
        etcd = args.etcd or topo.etcd.endpoint
        if not etcd:
            raise GeotrainError("geotrain site needs an etcd endpoint: --etcd HOST:PORT or etcd.endpoint in the topology")
        return run_site(topo, args.name, args.run_dir.resolve(), etcd, args.coordinator, args.script)
    except GeotrainError as exc:
        print(f"geotrain site: {exc}", file=sys.stderr)
        return exc.exit_code
