"""One site's worker group: each worker's environment and settings document, and ``geotrain site``.

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

from geotrain.config.components import WorkerConfig
from geotrain.config.derive import checkpoint_dir, worker_config  # noqa: F401 - checkpoint_dir: imported from here too
from geotrain.config.topology import SiteConfig, Topology
from geotrain.errors import GeotrainError, RunFailed
from geotrain.events import EventLog
from geotrain.run import procs
from geotrain.worker.context import CONFIG_VAR, SiteContext, rendezvous_file


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_env(site: SiteConfig, rank: int, *, run: str, run_dir: Path, topology_json: Path, coordinator: str,
               etcd: str, config_path: Path, master_port: int, resume_round: int | None = None,
               rings: tuple = ()) -> dict[str, str]:
    """A worker's environment, torchrun-style: its identity (geotrain.sdk.ENV_VARS) and the path of its
    settings document (``config_path``, see :func:`write_worker_config`). The site's process group meets
    on loopback only (worker.context.init: a rendezvous file, gloo/NCCL on ``lo``); rank 0's environment,
    made before any worker of this start runs, clears a rendezvous file a killed start left."""
    if rank == 0:
        rendezvous_file(run_dir, site.name, master_port).unlink(missing_ok=True)
    ctx = SiteContext(run=run, site=site.name, rank=rank, workers=site.workers, coordinator=coordinator,
                      run_dir=run_dir, etcd=etcd, topology_path=str(topology_json), device=site.device,
                      master_addr="127.0.0.1", master_port=master_port, resume_round=resume_round, rings=rings)
    return procs.env_with(**ctx.identity_env(), **{CONFIG_VAR: str(config_path)},
                          RANK=str(rank), WORLD_SIZE=str(site.workers), LOCAL_RANK=str(rank),
                          OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")


def write_worker_config(run_dir: Path, site: str, config: WorkerConfig) -> Path:
    """``RUN_DIR/worker-config.<site>.json``: per site, as ``topology.<site>.json`` is, so that sites
    started on separate hosts (``geotrain site``) may share one run directory."""
    return config.write(run_dir / f"worker-config.{site}.json")


def run_site(topo: Topology, site_name: str, run_dir: Path, etcd: str, coordinator: str | None,
             script: list[str] | None = None, certs: Path | None = None) -> int:
    """Run one site's workers here until they finish; restart the site when a worker dies."""
    try:
        site = topo.site(site_name)
    except KeyError:
        raise GeotrainError(f"site {site_name!r} is not in the topology ({', '.join(topo.site_names)})") from None
    if script is None:  # this site's data, present on this host now (the others' may live elsewhere)
        from geotrain.worker.data import check_data_files

        check_data_files(topo, sites=[site.name])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    topo_json = run_dir / f"topology.{site.name}.json"
    topo_json.write_text(json.dumps(topo.model_dump(mode="json")))
    config = worker_config(topo, run_dir)
    if config.certs_dir is not None:  # mTLS: this host holds the CA and this site's own pair only
        from geotrain.security.pki import CertDir, site_name as cert_name

        where = certs or config.certs_dir
        CertDir(Path(where)).files(cert_name(site.name))  # a clear error now, not in every worker
        config = config.model_copy(update={"certs_dir": Path(where).resolve()})
    config_path = write_worker_config(run_dir, site.name, config)
    events = EventLog(run_dir / "metrics.jsonl", f"site {site.name}")
    if coordinator is None:
        from geotrain.control.plane import ControlPlane
        from geotrain.security.pki import site_name as cert_name

        with ControlPlane.for_part(etcd, topo.name, cert_name(site.name), certs_dir=config.certs_dir,
                                   etcd=topo.etcd) as cp:
            coordinator = cp.coordinator_address(wait_s=120)
        if coordinator is None:
            raise GeotrainError(f"site {site.name}: no coordinator registered in etcd at {etcd} within 120 s")
    entry = script or [sys.executable, "-m", "geotrain.worker.main"]
    restarts = 0
    while True:
        port = free_port()
        workers = []
        for rank in range(site.workers):
            env = worker_env(site, rank, run=topo.name, run_dir=run_dir, topology_json=topo_json,
                             coordinator=coordinator, etcd=etcd, config_path=config_path, master_port=port)
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
    p = argparse.ArgumentParser(prog="geotrain site", description=(
        "Run one site's worker group on this host. Its WAN link is whatever lies between this host and the "
        "coordinator: nothing is emulated unless --coordinator names a `geotrain link` emulator in front of "
        "the coordinator (found through etcd, the coordinator's own address is dialled directly)."))
    p.add_argument("name", help="the site's name in the topology")
    p.add_argument("topology", help="topology file (YAML) or a run directory's topology.json")
    p.add_argument("--etcd", required=False, default=None, help="etcd endpoint host:port (default: the topology's); "
                   "TLS with the site's certificate unless security.tls is false, the topology's etcd has no ca_file, "
                   "or it is written http://")
    p.add_argument("--coordinator", default=None, help="coordinator host:port, e.g. a `geotrain link` emulator's "
                                                      "listen address to emulate the WAN (default: the coordinator's "
                                                      "own address, found through etcd: no emulation)")
    p.add_argument("--certs", type=Path, default=None, help="the run's certificate directory (geotrain certs init; "
                                                           "this host needs ca.pem and site.NAME.pem/-key.pem); "
                                                           "default: the topology's security.certs")
    p.add_argument("--run-dir", type=Path, default=Path("runs/site"), help="where logs, metrics and checkpoints go")
    p.add_argument("--script", nargs=argparse.REMAINDER, default=None, help="a user entrypoint instead of the built-in trainer")
    args = p.parse_args(argv)
    from geotrain.config.topology import load_any

    try:
        topo = load_any(args.topology)
        etcd = args.etcd or topo.etcd.endpoint
        if not etcd:
            raise GeotrainError("geotrain site needs an etcd endpoint: --etcd HOST:PORT or etcd.endpoint in the topology")
        return run_site(topo, args.name, args.run_dir.resolve(), etcd, args.coordinator, args.script,
                        certs=args.certs)
    except GeotrainError as exc:
        print(f"geotrain site: {exc}", file=sys.stderr)
        return exc.exit_code
