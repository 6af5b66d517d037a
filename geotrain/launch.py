"""``geotrain launch``: run a whole topology on this machine, for real.

Order of start: etcd (unless the topology names one) → the coordinator → one WAN link emulator
per site whose datacenter differs from the coordinator's → each site's worker processes. Every
child is started with :func:`geotrain.procs.spawn`, so it dies with the launcher, and its output
goes to ``<run_dir>/logs/<name>.log``.

The launcher watches every child. The run succeeds when every worker exits 0. If any process
dies first (a worker, the coordinator, a link, etcd), or on Ctrl-C / SIGTERM, everything is
stopped (SIGTERM, then SIGKILL), and launch fails with an error naming the process, its pid
and how it died. Recovering from failures is the job of a later layer; here a failure is clean
and explained. Finally ``summary.json`` is written from the recorded events and link counters.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from geotrain import procs
from geotrain.errors import GeotrainError, RunFailed
from geotrain.events import EventLog
from geotrain.summary import write_summary
from geotrain.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str  # e.g. "worker us-east/1", "coordinator", "link us-east<->hub", "etcd"
    role: str  # worker | coordinator | link | etcd
    proc: subprocess.Popen
    log_path: Path | None = None


@dataclass
class LaunchPlan:
    topo: Topology
    run_dir: Path
    script: list[str] | None = None  # a user's entrypoint instead of the built-in trainer
    quiet: bool = False
    children: list[Child] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run_dir(base: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{name}-{stamp}-{n}"
    return path


def _python() -> str:
    return sys.executable


def _read_ready(child: Child, timeout_s: float) -> int:
    """Wait for the child's 'READY <port>' line on stdout."""
    deadline = time.monotonic() + timeout_s
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("READY "):
                    return int(line.split()[1])
        elif chunk == b"" or child.proc.poll() is not None:
            raise RunFailed(f"{child.name} (pid {child.proc.pid}) exited with {_how(child.proc.poll())} before it was ready"
                            f"{_log_tail(child)}")
        time.sleep(0.02)
    raise RunFailed(f"{child.name} (pid {child.proc.pid}) not ready within {timeout_s:.0f}s{_log_tail(child)}")


def _how(rc: int | None) -> str:
    if rc is None:
        return "no exit yet"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def _log_tail(child: Child, lines: int = 5) -> str:
    if child.log_path is None or not child.log_path.exists():
        return ""
    tail = child.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("; last lines of " + str(child.log_path) + ":\n    " + "\n    ".join(tail)) if tail else ""


class Launcher:
    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.topo = plan.topo
        self.run_dir = plan.run_dir
        self.children: list[Child] = []
        self.events = EventLog(self.run_dir / "metrics.jsonl", "launcher")
        self.etcd = None
        self.link_stats: dict[str, Path] = {}

    # ---- starting ----
    def _spawn(self, name: str, role: str, argv: list[str], env: dict | None = None, ready: bool = False) -> Child:
        log_path = self.run_dir / "logs" / (name.replace(" ", "-").replace("/", "-").replace("<->", "--") + ".log")
        log_f = open(log_path, "ab")
        proc = procs.spawn(argv, env=env or procs.env_with(), stdout=subprocess.PIPE if ready else log_f, stderr=log_f)
        log_f.close()
        child = Child(name, role, proc, log_path)
        self.children.append(child)
        self.events.emit("process_started", name=name, role=role, pid=proc.pid)
        return child

    def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        topo_json = self.run_dir / "topology.json"
        topo_json.write_text(json.dumps(self.topo.model_dump(mode="json"), indent=2))
        self.events.emit("run_started", run=self.topo.name, topology_sha256=self.topo.digest(),
                         sites=self.topo.site_names, algorithm=self.topo.training.algorithm)

        etcd_endpoint = self.topo.etcd.endpoint
        if etcd_endpoint is None:
            from geotrain.controlplane import EtcdServer

            self.etcd = EtcdServer(self.run_dir / "etcd", log_path=self.run_dir / "logs" / "etcd.log")
            etcd_endpoint = self.etcd.start()
            self.children.append(Child("etcd", "etcd", self.etcd.process, self.run_dir / "logs" / "etcd.log"))
            self.events.emit("process_started", name="etcd", role="etcd", pid=self.etcd.pid, endpoint=etcd_endpoint)
        self.etcd_endpoint = etcd_endpoint.replace("http://", "")

        coord = self._spawn("coordinator", "coordinator",
                            [_python(), "-m", "geotrain.orchestrator.main", str(topo_json), "--run-dir", str(self.run_dir),
                             "--etcd", self.etcd_endpoint, "--bind", f"{self.topo.coordinator.host}:0"], ready=True)
        coord_port = _read_ready(coord, 60)
        coord_addr = f"{self.topo.coordinator.host}:{coord_port}"

        for site in self.topo.sites:
            spec = self.topo.link(site.name, self.topo.coordinator.at)
            address = coord_addr
            if spec is not None:
                name = f"link {site.name}<->{self.topo.coordinator.at}"
                stats = self.run_dir / "links" / f"{site.name}--{self.topo.coordinator.at}.json"
                stats.parent.mkdir(exist_ok=True)
                self.link_stats[name] = stats
                link = self._spawn(name, "link", [
                    _python(), "-m", "geotrain.cli", "link", "--name", f"{site.name}<->{self.topo.coordinator.at}",
                    "--listen", "127.0.0.1:0", "--target", coord_addr,
                    "--bandwidth", f"{spec.bandwidth_mbps}mbit", "--latency", f"{spec.latency_ms}ms",
                    "--jitter", f"{spec.jitter_ms}ms", "--loss", str(spec.loss),
                    "--seed", str(self.topo.seed), "--stats-file", str(stats),
                    "--control-file", str(stats.with_suffix(".control.json"))], ready=True)
                address = f"127.0.0.1:{_read_ready(link, 30)}"
            self._start_site(site, address, topo_json)

    def _start_site(self, site, coordinator_address: str, topo_json: Path) -> None:
        master_port = free_port()
        entry = self.plan.script or [_python(), "-m", "geotrain.worker.main"]
        for rank in range(site.workers):
            env = procs.env_with(
                GEOTRAIN_RUN=self.topo.name, GEOTRAIN_RUN_DIR=str(self.run_dir), GEOTRAIN_SITE=site.name,
                GEOTRAIN_SITE_RANK=str(rank), GEOTRAIN_SITE_WORKERS=str(site.workers),
                GEOTRAIN_COORDINATOR=coordinator_address, GEOTRAIN_ETCD=self.etcd_endpoint,
                GEOTRAIN_TOPOLOGY=str(topo_json), GEOTRAIN_DEVICE=site.device,
                GEOTRAIN_ALGORITHM=self.topo.training.algorithm, GEOTRAIN_INNER_STEPS=str(self.topo.training.inner_steps),
                GEOTRAIN_ROUNDS=str(self.topo.training.rounds),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(site.workers),
                LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
            )
            self._spawn(f"worker {site.name}/{rank}", "worker", list(entry), env=env)

    # ---- watching ----
    def watch(self, progress=None) -> None:
        """Block until every worker exits 0; raise RunFailed as soon as any process dies otherwise."""
        while True:
            workers_done = True
            for child in self.children:
                rc = child.proc.poll()
                if child.role == "worker":
                    if rc is None:
                        workers_done = False
                    elif rc != 0:
                        raise RunFailed(f"{child.name} (pid {child.proc.pid}) died with {_how(rc)}{_log_tail(child)}")
                elif rc is not None:
                    raise RunFailed(f"{child.name} (pid {child.proc.pid}) died with {_how(rc)}{_log_tail(child)}")
            if progress is not None:
                progress()
            if workers_done:
                return
            time.sleep(0.2)

    # ---- stopping ----
    def stop(self) -> None:
        """Stop everything: workers first, then links and the coordinator (they flush stats), etcd last."""
        order = {"worker": 0, "link": 1, "coordinator": 1, "etcd": 2}
        for level in (0, 1, 2):
            procs.terminate_all([c.proc for c in self.children if order[c.role] == level], grace_s=5.0)
        if self.etcd is not None:
            self.etcd.stop()


def launch(plan: LaunchPlan, progress_factory=None) -> dict:
    """Run the plan to completion. Returns the summary; raises RunFailed (and stops everything) on failure."""
    launcher = Launcher(plan)
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    t0 = time.time()
    error: GeotrainError | None = None
    try:
        launcher.start()
        progress = progress_factory(launcher) if progress_factory else None
        try:
            launcher.watch(progress=progress.update if progress else None)
        finally:
            if progress:
                progress.close()
    except KeyboardInterrupt:
        error = RunFailed("interrupted (Ctrl-C or SIGTERM); every process of the run was stopped")
    except GeotrainError as exc:
        error = exc if isinstance(exc, RunFailed) else RunFailed(str(exc))
    finally:
        launcher.stop()
        signal.signal(signal.SIGTERM, previous)
    status = "failed" if error else "completed"
    launcher.events.emit("run_finished", status=status, reason=str(error) if error else None)
    summary = write_summary(plan.run_dir, plan.topo, wall_seconds=time.time() - t0, link_stats=launcher.link_stats,
                            status=status, reason=str(error) if error else None)
    if error:
        raise error
    return summary


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt
