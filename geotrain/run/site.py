"""One site's worker group: each worker's environment and settings document, and ``geotrain site``.

``geotrain launch`` starts every site on one machine; ``geotrain site NAME TOPOLOGY`` starts one
site's workers on the host it runs on (a Compose service, a machine of its own), finding the
coordinator through etcd unless ``--coordinator`` names it (a WAN link emulator's address, say).
A dead worker restarts the whole site (its process group cannot take a new member), within
``recovery.max_restarts``; the site then rejoins the run at the next round. A worker that fails the same
way twice (the script's bug), or that the coordinator refused for good (another model, a wrong certificate),
fails the site at once instead (geotrain.run.supervise.crash_loop, as under ``geotrain launch``).

A site of ``nodes`` > 1 runs one ``geotrain site NAME TOPOLOGY --node-rank K --master-addr HOST
--master-port P`` per node: node K starts the site ranks K*workers .. K*workers+workers-1, and the
nodes agree on every (re)start of the group through the store node 0 hosts (geotrain.run.nodes).
``--exec CMD`` hands the site's environment (:func:`site_env`) to a process launcher of the user's,
torchrun say, which sets the ranks and the rendezvous; ``--print-env`` prints it.
:func:`worker_env` is the one place a worker's environment is written (``geotrain launch`` uses it too).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from geotrain.config.components import WorkerConfig
from geotrain.config.derive import checkpoint_dir, worker_config  # noqa: F401 - checkpoint_dir: imported from here too
from geotrain.config.topology import SiteConfig, Topology
from geotrain.errors import GeotrainError, RunFailed
from geotrain.events import EventLog
from geotrain.run import procs
from geotrain.run.supervise import crash_loop
from geotrain.worker.context import CONFIG_VAR, SiteContext, is_loopback, rendezvous_file


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_PER_PROCESS = ("GEOTRAIN_SITE_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "GEOTRAIN_RENDEZVOUS", "GEOTRAIN_RINGS")
"""Identity variables that differ between the processes of one start of a site, or that the process launcher
(geotrain's, or torchrun) sets: everything else of :func:`worker_env` is :func:`site_env`."""


def _context(site: SiteConfig, rank: int, *, run: str, run_dir: Path, topology_json: Path, coordinator: str,
             etcd: str, master_addr: str = "127.0.0.1", master_port: int = 29500, resume_round: int | None = None,
             rings: tuple = (), rendezvous: str | None = None) -> SiteContext:
    node, local = divmod(rank, site.workers)
    multi = site.nodes > 1
    return SiteContext(run=run, site=site.name, rank=rank, workers=site.world_size, coordinator=coordinator,
                       run_dir=run_dir, etcd=etcd, topology_path=str(topology_json), device=site.device,
                       master_addr=master_addr, master_port=master_port, resume_round=resume_round, rings=rings,
                       local_rank=local if multi else None, local_workers=site.workers if multi else None,
                       node_rank=node, rendezvous=rendezvous)


def site_env(site: SiteConfig, *, run: str, run_dir: Path, topology_json: Path, coordinator: str, etcd: str,
             config_path: Path, resume_round: int | None = None) -> dict[str, str]:
    """What every process of ``site`` shares, as variables (not the whole environment): the site, its size
    (``GEOTRAIN_SITE_WORKERS``: nodes x workers, checked against torchrun's WORLD_SIZE), the run, the
    coordinator, etcd, the settings document. A process launcher that sets the rank and rendezvous
    variables (torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...) needs nothing else."""
    ctx = _context(site, 0, run=run, run_dir=run_dir, topology_json=topology_json, coordinator=coordinator,
                   etcd=etcd, resume_round=resume_round)
    env = {k: v for k, v in ctx.identity_env().items() if k not in _PER_PROCESS}
    return env | {CONFIG_VAR: str(config_path), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def worker_env(site: SiteConfig, rank: int, *, run: str, run_dir: Path, topology_json: Path, coordinator: str,
               etcd: str, config_path: Path, master_port: int, resume_round: int | None = None,
               rings: tuple = (), master_addr: str = "127.0.0.1", rendezvous: str | None = None) -> dict[str, str]:
    """A worker's environment, torchrun-style: :func:`site_env`, then its own identity (``rank``: its rank in
    the site, over all nodes; node ``rank // workers``) under geotrain's names and torchrun's (RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT). A one-node site's
    group meets on loopback only (worker.context.init: a rendezvous file, gloo/NCCL on ``lo``); rank 0's
    environment, made before any worker of this start runs, clears a rendezvous file a killed start left.
    A multi-node site meets at the TCP store on ``master_addr:master_port`` (``rendezvous``: the start's
    key prefix in the store node 0's agent hosts, geotrain.run.nodes; None: rank 0 hosts it)."""
    if rank == 0 and site.nodes == 1:
        rendezvous_file(run_dir, site.name, master_port).unlink(missing_ok=True)
    ctx = _context(site, rank, run=run, run_dir=run_dir, topology_json=topology_json, coordinator=coordinator,
                   etcd=etcd, master_addr=master_addr, master_port=master_port, resume_round=resume_round,
                   rings=rings, rendezvous=rendezvous)
    node, local = divmod(rank, site.workers)
    ifname = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"} if is_loopback(master_addr) else {}
    shared = site_env(site, run=run, run_dir=run_dir, topology_json=topology_json, coordinator=coordinator, etcd=etcd,
                      config_path=config_path, resume_round=resume_round)
    torchrun = {"RANK": str(rank), "WORLD_SIZE": str(site.world_size), "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(site.workers), "GROUP_RANK": str(node)}
    return procs.env_with(**(shared | ctx.identity_env() | torchrun | ifname))


def write_worker_config(run_dir: Path, site: str, config: WorkerConfig) -> Path:
    """``RUN_DIR/worker-config.<site>.json``: per site, as ``topology.<site>.json`` is, so that sites
    started on separate hosts (``geotrain site``) may share one run directory."""
    return config.write(run_dir / f"worker-config.{site}.json")


@dataclass(frozen=True)
class NodeArgs:
    """Which node of its site this ``geotrain site`` runs, and where the site's group meets (node 0)."""

    rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500


def node_problem(site: SiteConfig, node: NodeArgs) -> str | None:
    """Why ``node`` cannot be run for ``site`` (as a sentence naming the option), or None."""
    if not 0 <= node.rank < site.nodes:
        return (f"--node-rank {node.rank}: site {site.name!r} has {site.nodes} node(s) "
                f"(sites[].nodes), ranks 0..{site.nodes - 1}")
    if site.nodes > 1 and not node.master_addr:
        return (f"site {site.name!r} spans {site.nodes} nodes: give every node --node-rank K and --master-addr HOST "
                f"(node 0's address, where the site's group meets) and the same --master-port")
    if not 0 < node.master_port < 65536:
        return f"--master-port {node.master_port}: expected a TCP port (1..65535)"
    return None


def run_site(topo: Topology, site_name: str, run_dir: Path, etcd: str, coordinator: str | None,
             script: list[str] | None = None, certs: Path | None = None, node: NodeArgs = NodeArgs(),
             exec_argv: list[str] | None = None, print_env: bool = False) -> int:
    """Run one node of a site here (its ``workers`` processes; a one-node site: all of them) until they
    finish; restart the site's group when a worker dies. ``exec_argv``: run that command once per start
    instead, with the site's environment only (a process launcher such as torchrun starts the workers);
    ``print_env``: print that environment as ``export`` lines and return."""
    try:
        site = topo.site(site_name)
    except KeyError:
        raise GeotrainError(f"site {site_name!r} is not in the topology ({', '.join(topo.site_names)})") from None
    problem = None if exec_argv is not None or print_env else node_problem(site, node)
    if problem:
        raise GeotrainError(problem)
    if script is None and exec_argv is None and not print_env:  # this site's data, here now
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
    if coordinator is None:
        from geotrain.control.plane import ControlPlane
        from geotrain.security.pki import site_name as cert_name

        with ControlPlane.for_part(etcd, topo.name, cert_name(site.name), certs_dir=config.certs_dir,
                                   etcd=topo.etcd) as cp:
            coordinator = cp.coordinator_address(wait_s=120)
        if coordinator is None:
            raise GeotrainError(f"site {site.name}: no coordinator registered in etcd at {etcd} within 120 s")
    shared = dict(run=topo.name, run_dir=run_dir, topology_json=topo_json, coordinator=coordinator, etcd=etcd,
                  config_path=config_path)
    if print_env:
        import shlex

        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in site_env(site, **shared).items()))
        return 0
    events = EventLog(run_dir / "metrics.jsonl", f"site {site.name}" + (f" node {node.rank}" if site.nodes > 1 else ""))
    entry = script or [sys.executable, "-m", "geotrain.worker.main"]
    rdzv = None
    if site.nodes > 1 and exec_argv is None:
        from geotrain.run.nodes import NodeRendezvous

        rdzv = NodeRendezvous(node.master_addr, node.master_port, node.rank, site.nodes)
    restarts = 0
    previous_crash = None  # the worker_crashed event that restarted the group last (supervise.crash_loop)
    while True:
        started_t = time.time()
        workers: list[tuple[str, subprocess.Popen]] = []
        if exec_argv is not None:
            log = open(run_dir / "logs" / f"exec-{site.name}-{node.rank}.log", "ab")  # --node-rank: which node's log
            workers.append((f"{site.name} exec", procs.spawn(list(exec_argv), env=procs.env_with(**site_env(site, **shared)),
                                                             stdout=log, stderr=log)))
            log.close()
        else:
            prefix = rdzv.start() if rdzv is not None else None
            port = node.master_port if site.nodes > 1 else free_port()
            first = node.rank * site.workers
            for rank in range(first, first + site.workers):
                env = worker_env(site, rank, **shared, master_port=port, master_addr=node.master_addr or "127.0.0.1",
                                 rendezvous=prefix)
                log = open(run_dir / "logs" / f"worker-{site.name}-{rank}.log", "ab")
                workers.append((f"worker {site.name}/{rank}", procs.spawn(list(entry), env=env, stdout=log, stderr=log)))
                log.close()
        for name, w in workers:
            events.emit("process_started", name=name, role="worker", pid=w.pid)
        try:
            dead, wanted = _watch(workers, rdzv)
            signalled = any((w.poll() or 0) < 0 for _, w in workers)  # before the others are stopped below
            if dead is None and not wanted:
                if rdzv is not None:
                    rdzv.finish()
                return 0
        finally:
            procs.terminate_all([w for _, w in workers], grace_s=3.0)
        if dead is None:  # another node's worker died: its start is over, and this node joins the next one
            continue
        name, code = dead
        crash = _crash_of(run_dir / "metrics.jsonl", name, since=started_t - 1.0)
        loop = crash_loop(name, crash, previous_crash, signalled)
        if loop is not None:  # the user's bug, or a refusal for good: restarts are for faults
            raise RunFailed(f"site {site.name}: {loop.reason}")
        previous_crash = crash
        if rdzv is not None:
            rdzv.request_restart()
        restarts += 1
        now = time.time()
        events.emit("failure", what="worker", target=name, happened_t=now, detected_t=now, reason=f"exit status {code}")
        if topo.recovery.worker_failure == "fail" or restarts > topo.recovery.max_restarts:
            raise RunFailed(f"site {site.name}: {name} died with exit status {code}")


def _crash_of(metrics: Path, name: str, since: float) -> dict | None:
    """The ``worker_crashed`` event worker ``name`` ("worker SITE/RANK") left since ``since``, if any."""
    from geotrain.events import read_events

    site, _, rank = name.removeprefix("worker ").partition("/")
    try:
        events = read_events(metrics)
    except OSError:
        return None
    return next((e for e in reversed(events) if e.get("event") == "worker_crashed" and e.get("t", 0) >= since
                 and e.get("site") == site and str(e.get("rank")) == rank), None)


def _watch(workers: list, rdzv) -> tuple[tuple[str, int] | None, bool]:
    """Until this start ends: (the first worker that died and its status, or None; whether another node
    asked for a new start). Both None/False: every worker here exited 0."""
    while True:
        codes = [(name, w.poll()) for name, w in workers]
        dead = next(((n, c) for n, c in codes if c not in (None, 0)), None)
        if dead is not None:
            return dead, False
        if all(c == 0 for _, c in codes):
            return None, False
        if rdzv is not None and rdzv.restart_wanted():
            return None, True
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geotrain site", description=(
        "Run one site's worker group on this host (or one node of a multi-node site: --node-rank). Its WAN link is "
        "whatever lies between this host and the coordinator: nothing is emulated unless --coordinator names a "
        "`geotrain link` emulator in front of the coordinator (found through etcd, the coordinator's own address "
        "is dialled directly)."))
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
    p.add_argument("--node-rank", type=int, default=0, help="which node of the site this is (sites[].nodes > 1): "
                   "its workers are the site's ranks K*workers .. K*workers+workers-1 (with --exec it only names the log); "
                   "default 0")
    p.add_argument("--master-addr", default=None, help="node 0's address, where the site's process group meets "
                   "(every node gives the same; needed when the site has nodes > 1)")
    p.add_argument("--master-port", type=int, default=29500, help="the TCP port of that rendezvous on node 0 "
                   "(default 29500)")
    p.add_argument("--print-env", action="store_true", help="print the site's environment (export lines) for a "
                   "process launcher of your own, e.g. torchrun, and exit")
    p.add_argument("--exec", dest="exec_argv", nargs=argparse.REMAINDER, default=None,
                   help="run this command (e.g. `python -m torch.distributed.run ... train.py`) with the site's "
                        "environment instead of starting workers; it sets the ranks and the rendezvous")
    p.add_argument("--script", nargs=argparse.REMAINDER, default=None, help="a user entrypoint instead of the built-in trainer")
    args = p.parse_args(argv)
    from geotrain.config.topology import load_any

    try:
        topo = load_any(args.topology)
        etcd = args.etcd or topo.etcd.endpoint
        if not etcd:
            raise GeotrainError("geotrain site needs an etcd endpoint: --etcd HOST:PORT or etcd.endpoint in the topology")
        if args.exec_argv is not None and not args.exec_argv:
            raise GeotrainError("--exec needs a command, e.g. --exec python -m torch.distributed.run ... train.py")
        if args.exec_argv is None and not args.print_env:  # its workers start here: this host's GPUs must do
            from geotrain.run.devices import check_cuda_sites

            check_cuda_sites(topo, only=args.name)
        node = NodeArgs(args.node_rank, args.master_addr, args.master_port)
        return run_site(topo, args.name, args.run_dir.resolve(), etcd, args.coordinator, args.script,
                        certs=args.certs, node=node, exec_argv=args.exec_argv, print_env=args.print_env)
    except GeotrainError as exc:
        print(f"geotrain site: {exc}", file=sys.stderr)
        return exc.exit_code
