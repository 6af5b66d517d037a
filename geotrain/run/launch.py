"""``geotrain launch``: run a whole topology on this machine, for real.

Order of start: etcd (unless the topology names one) → the coordinator → one WAN link emulator
per site whose datacenter differs from the coordinator's → each site's worker processes. Every
child is started with :func:`geotrain.run.procs.spawn`, so it dies with the launcher, and its output
goes to ``<run_dir>/logs/<name>.log``.

The launcher watches every child and applies the topology's recovery policy
(:mod:`geotrain.run.supervise`): a dead worker restarts its whole site, which rejoins at the next
round; a dead coordinator restarts on the same port from the state it persisted at its last
commit; a frozen coordinator (its etcd lease expired while the process lives) is killed and
restarted; etcd and link emulators restart on the same ports. Every failure and recovery is
recorded in metrics.jsonl. The run succeeds when every worker exits 0 and the global model stayed
finite (no ``model_nonfinite``, no commit with ``finite: false``, no NaN or infinite eval loss in
the history: the first such event fails the run at once). When the policy says
fail, or on Ctrl-C / SIGTERM, everything is stopped (SIGTERM, then SIGKILL) and launch fails
with an error naming the process, its pid and how it died. Finally ``summary.json`` is written
from the recorded events and link counters.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from geotrain.config.components import LinkConfig
from geotrain.config.derive import checkpoint_dir, derive
from geotrain.config.topology import Topology
from geotrain.errors import GeotrainError, RunFailed, RunInterrupted
from geotrain.events import EventLog, EventTail, log_tail, read_events
from geotrain.run import procs
from geotrain.run.site import free_port, worker_env, write_worker_config
from geotrain.run.summary import history_failure, nonfinite_model, write_summary
from geotrain.security.pki import LAUNCHER

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str  # e.g. "worker us-east/1", "coordinator", "link us-east<->hub", "etcd"
    role: str  # worker | coordinator | link | etcd
    proc: subprocess.Popen
    log_path: Path | None = None
    group: str = ""  # restarts happen per group: "site:us-east", "coordinator", "link:us-east", "etcd"
    retired: bool = False  # stopped on purpose (replaced by a restart): its exit means nothing
    done: bool = False
    started_t: float = field(default_factory=time.time)


@dataclass
class LaunchPlan:
    topo: Topology
    run_dir: Path
    script: list[str] | None = None  # a user's entrypoint instead of the built-in trainer
    cwd: str | None = None  # where the script runs (its relative paths): the launching shell's folder, recorded
    quiet: bool = False
    resume_round: int | None = None  # geotrain resume: start every part from this checkpoint round
    children: list[Child] = field(default_factory=list)


def make_run_dir(base: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{name}-{stamp}-{n}"
    return path


LAUNCH_RECORD = "launch.json"
"""RUN_DIR/launch.json: what the workers ran ({"script": argv or null, "cwd": folder}); `geotrain resume` reads it."""


def write_launch_record(run_dir: Path, script: list[str] | None, cwd: str | None) -> None:
    record = {"script": list(script) if script else None, "cwd": cwd}
    tmp = run_dir / (LAUNCH_RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / LAUNCH_RECORD)


def read_launch_record(run_dir: Path) -> tuple[list[str] | None, str | None]:
    """(script, cwd) of the run in ``run_dir``; (None, None) for a run of the built-in trainer or one made
    before runs recorded it. A record that is not what this module writes is refused, naming the file."""
    path = run_dir / LAUNCH_RECORD
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text())
        script, cwd = record.get("script"), record.get("cwd")
        if script is not None and not (isinstance(script, list) and script and all(isinstance(a, str) for a in script)):
            raise ValueError("script must be a list of strings")
        if cwd is not None and not isinstance(cwd, str):
            raise ValueError("cwd must be a string")
    except (ValueError, AttributeError, OSError) as exc:
        raise RunFailed(f"{path}: not a launch record geotrain wrote ({exc})") from None
    return script, cwd


STANDBY_AFTER_S = 10.0
"""A worker's warm standby is started once its site has trained an inner step since the worker started, or
the worker has run this long (a script that logs no inner step): not while its site starts, when the standby's
imports would compete with the site's for the CPU."""


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
                            f"{log_tail(child.log_path, lines=5)}")
        time.sleep(0.02)
    raise RunFailed(f"{child.name} (pid {child.proc.pid}) not ready within {timeout_s:.0f}s{log_tail(child.log_path, lines=5)}")


def _how(rc: int | None) -> str:
    if rc is None:
        return "no exit yet"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


class Launcher:
    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.topo = plan.topo
        self.run_dir = plan.run_dir
        self.children: list[Child] = []
        self.events = EventLog(self.run_dir / "metrics.jsonl", "launcher")
        self.tail = EventTail(self.run_dir / "metrics.jsonl")
        self.etcd = None
        self.control = None
        self.certs = None  # the run's CertDir once start() made or found it (None: plaintext)
        self.configs = derive(self.topo, self.run_dir)  # what every worker and link is told
        self.worker_configs: dict[str, Path] = {}  # site -> its workers' settings document
        self.link_stats: dict[str, Path] = {}
        self.link_ports: dict[str, int] = {}
        self.ring_env: dict[str, list[dict]] = {}  # site -> its leader's ring memberships (GEOTRAIN_RINGS: identity)
        self.ring_links: dict[str, tuple] = {}  # ring link group -> how to start it again (same ports)
        self.restarts: dict[str, int] = {}
        self.pending: dict[str, dict] = {}  # group -> failure waiting for its recovery event
        self.coord_port = 0
        self.coord_seen: float | None = None
        self.last_merge_version: dict[str, int] = {}
        self.crashes: dict[str, dict] = {}  # worker name -> its latest worker_crashed event
        self.restart_crash: dict[str, dict | None] = {}  # site group -> the crash that restarted it last (crash_loop)
        self.faults = None
        self.standbys: dict[str, subprocess.Popen] = {}  # worker name -> its warm standby (not a child yet)
        self.last_step_t: dict[str, float] = {}  # site -> time of its latest inner_step event

    # ---- starting ----
    def _log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / (name.replace(" ", "-").replace("/", "-").replace("<->", "--") + ".log")

    def _spawn(self, name: str, role: str, argv: list[str], env: dict | None = None, ready: bool = False,
               group: str = "", cwd: str | None = None) -> Child:
        if role == "worker":
            standby = self._take_standby(name, argv, env, cwd)
            if standby is not None:
                child = Child(name, role, standby, self._log_path(name), group=group or role)
                self.children.append(child)
                self.events.emit("process_started", name=name, role=role, pid=standby.pid, standby=True)
                return child
        log_path = self._log_path(name)
        log_f = open(log_path, "ab")
        proc = procs.spawn(argv, env=env or procs.env_with(), cwd=cwd, stdout=subprocess.PIPE if ready else log_f,
                           stderr=log_f)
        log_f.close()
        child = Child(name, role, proc, log_path, group=group or role)
        self.children.append(child)
        self.events.emit("process_started", name=name, role=role, pid=proc.pid)
        return child

    # ---- warm standbys (geotrain.run.standby) ----
    def _take_standby(self, name: str, argv: list[str], env: dict | None, cwd: str | None):
        """The warm standby of worker ``name``, turned into that worker; None: spawn it fresh."""
        from geotrain.run.standby import activation, can_take

        proc = self.standbys.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is not None or not can_take(argv, _python()):
            procs.terminate_all([proc], grace_s=0.5)
            return None
        try:
            proc.stdin.write(activation(argv, env or procs.env_with(), cwd))
            proc.stdin.close()
        except OSError:  # it died meanwhile
            procs.terminate_all([proc], grace_s=0.5)
            return None
        return proc

    def _keep_standbys(self) -> None:
        """One standby per worker that has run for STANDBY_AFTER_S (so that standbys never compete with a
        starting site for the CPU), unless recovery.warm_standby is off."""
        if not self.topo.recovery.warm_standby:
            return
        now = time.time()
        for c in self.children:
            if c.role != "worker" or c.retired or c.done or c.name in self.standbys or c.proc.poll() is not None:
                continue
            trained = self.last_step_t.get(c.group.removeprefix("site:"), 0.0) >= c.started_t
            if not trained and now - c.started_t < STANDBY_AFTER_S:
                continue
            log_f = open(self._log_path(c.name), "ab")
            env = procs.env_with(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo",
                                 NCCL_SOCKET_IFNAME="lo")
            argv = [_python(), "-m", "geotrain.run.standby", "--name", c.name]
            if self.topo.model.compile and not self.plan.script:  # the built-in trainer will torch.compile
                argv.append("--compile")
            if self.events.path is not None:
                argv += ["--events", str(self.events.path)]
            self.standbys[c.name] = procs.spawn(argv, env=env, stdout=log_f, stderr=log_f, stdin=subprocess.PIPE)
            log_f.close()
            self.events.emit("standby_started", name=c.name, site=c.group.removeprefix("site:"),
                             pid=self.standbys[c.name].pid)

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.topo, self.run_dir)

    # ---- what failpoints act on (geotrain.run.faults.FaultEnv) ----
    def pids(self, target: str) -> list[int]:
        kind, _, name = target.partition(" ")
        live = [c for c in self.children if not c.retired and not c.done and c.proc.poll() is None]
        if kind == "worker":
            return [c.proc.pid for c in live if c.name == target]
        if kind == "site":
            return [c.proc.pid for c in live if c.group == f"site:{name}"]
        return [c.proc.pid for c in live if c.role == kind]

    def link_control_file(self, site: str) -> Path:
        return self.run_dir / "links" / f"{site}--{self.topo.coordinator.at}.control.json"

    def start(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.topo_json = self.run_dir / "topology.json"
        self.topo_json.write_text(json.dumps(self.topo.model_dump(mode="json"), indent=2))
        write_launch_record(self.run_dir, self.plan.script, self.plan.cwd)
        from geotrain.security.pki import ensure_run_certs

        # mTLS by default: a fresh CA and a certificate per part, unless the topology names its own.
        self.certs = ensure_run_certs(self.configs.worker.certs_dir, self.topo.site_names, self.topo.name,
                                      hosts=(self.topo.coordinator.host,))
        self.worker_configs = {site: write_worker_config(self.run_dir, site, self.configs.worker)
                               for site in self.topo.site_names}
        self.events.emit("run_started", run=self.topo.name, topology_sha256=self.topo.digest(),
                         sites=self.topo.site_names, algorithm=self.topo.training.algorithm,
                         resume_round=self.plan.resume_round)

        etcd_endpoint = self.topo.etcd.endpoint
        if etcd_endpoint is None:
            self.etcd = self._etcd_server()
            etcd_endpoint = self._start_etcd()
        from geotrain.control.etcd_client import netloc, parse_endpoint
        from geotrain.control.plane import ControlPlane
        from geotrain.security.pki import LAUNCHER

        # host:port for every part; each decides plaintext or TLS the same way (geotrain.control.access).
        self.etcd_endpoint = netloc(*parse_endpoint(etcd_endpoint))
        self.control = ControlPlane.for_part(self.etcd_endpoint, self.topo.name, LAUNCHER, timeout_s=1.0,
                                             certs_dir=self.certs.path if self.certs else None, etcd=self.topo.etcd)
        self._start_coordinator(resume_round=self.plan.resume_round)
        self.ring_env = self._start_rings()
        for site in self.topo.sites:
            # A resumed run's leaders build their rings when the coordinator says (after a star round).
            self._start_site(site, resume_round=self.plan.resume_round, rings_at_start=self.plan.resume_round is None)
        from geotrain.run.faults import FaultScheduler

        self.faults = FaultScheduler(self, self.topo, self.events, started_at=time.time())

    def _etcd_server(self):
        """The run's own etcd: with the run's certificates, mutual TLS on its client and peer URLs and auth on
        (each part's certificate name is its etcd user; only the coordinator's writes its keys,
        geotrain.control.auth); plaintext when security.tls is false."""
        from geotrain.control.auth import grants
        from geotrain.control.etcd_server import EtcdServer, ServerTls
        from geotrain.security.pki import ETCD, LAUNCHER

        tls = ServerTls(self.certs.files(ETCD), self.certs.files(LAUNCHER)) if self.certs is not None else None
        return EtcdServer(self.run_dir / "etcd", log_path=self.run_dir / "logs" / "etcd.log", tls=tls,
                          auth=grants(self.topo.name, self.topo.site_names) if tls else None, run=self.topo.name)

    def _start_etcd(self) -> str:
        endpoint = self.etcd.start()
        self.children.append(Child("etcd", "etcd", self.etcd.process, self.run_dir / "logs" / "etcd.log", group="etcd"))
        self.events.emit("process_started", name="etcd", role="etcd", pid=self.etcd.pid, endpoint=endpoint)
        return endpoint

    def _start_coordinator(self, resume_round: int | None = None) -> None:
        argv = [_python(), "-m", "geotrain.orchestrator.main", str(self.topo_json), "--run-dir", str(self.run_dir),
                "--etcd", self.etcd_endpoint, "--bind", f"{self.topo.coordinator.host}:{self.coord_port}", "--stay"]
        if self.certs is not None:
            argv += ["--certs", str(self.certs.path)]
        if resume_round is not None:
            argv += ["--resume-round", str(resume_round)]
        coord = self._spawn("coordinator", "coordinator", argv, ready=True)
        self.coord_port = _read_ready(coord, 60)
        self.coord_seen = time.time()

    def _coordinator_address(self, site) -> str:
        """The coordinator as seen from ``site``: through its WAN link emulator, or directly if co-located."""
        coord_addr = f"{self.topo.coordinator.host}:{self.coord_port}"
        if site.name not in self.configs.site_links:
            return coord_addr
        if site.name not in self.link_ports or not self._link_alive(site.name):
            self._start_link(site.name, coord_addr)
        return f"127.0.0.1:{self.link_ports[site.name]}"

    def _link_alive(self, site_name: str) -> bool:
        return any(c.group == f"link:{site_name}" and not c.retired and c.proc.poll() is None for c in self.children)

    def _spawn_link(self, name: str, config: LinkConfig, stats: Path, target: str, group: str,
                    listen_port: int = 0, control: bool = False) -> int:
        """One WAN link emulator process; returns the port it listens on."""
        stats.parent.mkdir(exist_ok=True)
        self.link_stats[name] = stats
        args = config.args(listen=f"127.0.0.1:{listen_port}", target=target, stats_file=str(stats),
                           control_file=str(stats.with_suffix(".control.json")) if control else None)
        argv = [_python(), "-m", "geotrain.cli", "link", *args]
        return _read_ready(self._spawn(name, "link", argv, ready=True, group=group), 30)

    def _start_link(self, site: str, coord_addr: str) -> None:
        at = self.topo.coordinator.at
        self.link_ports[site] = self._spawn_link(
            f"link {site}<->{at}", self.configs.site_links[site], self.run_dir / "links" / f"{site}--{at}.json",
            coord_addr, f"link:{site}", listen_port=self.link_ports.get(site, 0), control=True)

    def _start_rings(self) -> dict[str, list[dict]]:
        """Ring / hierarchical merges: a listening port per ring member, a link emulator per ring edge."""
        from geotrain.wan.merge_plan import ring_plan

        plan = ring_plan(self.topo)
        ports = {(m.ring, m.site): free_port() for members in plan.values() for m in members}
        out: dict[str, list[dict]] = {}
        for site, members in plan.items():
            for m in members:
                args = (f"link {m.ring}: {site}->{m.successor}", self.configs.ring_links[(m.ring, site)],
                        self.run_dir / "links" / f"ring-{m.ring.replace(':', '-')}-{site}--{m.successor}.json",
                        f"127.0.0.1:{ports[(m.ring, m.successor)]}", f"ringlink:{m.ring}:{site}")
                port = self._spawn_link(*args)
                self.ring_links[args[-1]] = (*args, port)
                out.setdefault(site, []).append(m.as_env(ports[(m.ring, site)], f"127.0.0.1:{port}"))
        return out

    def _start_site(self, site, resume_round: int | None = None, rings_at_start: bool = False) -> None:
        """Start a site's workers. ``rings_at_start``: its leader builds its rings at once (the run's
        first start); otherwise (a restarted site, a resumed run) when the coordinator says."""
        rings = tuple(dict(m, at_start=rings_at_start) for m in self.ring_env.get(site.name, []))
        address = self._coordinator_address(site)
        master_port = free_port()
        entry = self.plan.script or [_python(), "-m", "geotrain.worker.main"]
        for rank in range(site.world_size):  # every node of the site, here; a multi-node group meets over TCP on lo
            env = worker_env(site, rank, run=self.topo.name, run_dir=self.run_dir, topology_json=self.topo_json,
                             coordinator=address, etcd=self.etcd_endpoint, config_path=self.worker_configs[site.name],
                             master_port=master_port, resume_round=resume_round, rings=rings if rank == 0 else ())
            self._spawn(f"worker {site.name}/{rank}", "worker", list(entry), env=env, group=f"site:{site.name}",
                        cwd=self.plan.cwd if self.plan.script else None)

    # ---- watching and recovering ----
    def watch(self, progress=None) -> None:
        """Block until every worker exits 0, recovering from failures as the policy says; raise RunFailed otherwise."""
        from geotrain.run.supervise import on_exit

        while True:
            exited = [(c, rc) for c in list(self.children) if not (c.retired or c.done) and (rc := c.proc.poll()) is not None]
            if exited:  # a worker that stopped because the model diverged wrote why before it exited: fail, not restart
                self._observe_events()
            for child, rc in exited:
                if child.retired:  # its group was restarted for another member in this pass
                    continue
                action = self._crash_loop(child, rc) or on_exit(
                    child.role, child.name, rc, _how(rc), self.restarts.get(child.group, 0), self.topo.recovery)
                if action.action == "crash_loop":  # the user's bug: its traceback, not the log's tail
                    raise RunFailed(action.reason)
                if action.action == "done":
                    child.done = True
                elif action.action == "fail":
                    raise RunFailed(f"{child.name} (pid {child.proc.pid}) died with {_how(rc)}"
                                    f"{'' if 'restarted' not in action.reason else ' (' + action.reason.split(', and ')[1] + ')'}"
                                    f"{log_tail(child.log_path, lines=5)}")
                else:
                    self._restart(child, action.reason)
            self._check_heartbeats()
            self._observe_events()
            self._keep_standbys()
            self.faults.tick()
            if progress is not None:
                progress()
            workers = [c for c in self.children if c.role == "worker" and not c.retired]
            if workers and all(c.done for c in workers):
                return
            time.sleep(0.2)

    def _crash(self, child: Child) -> dict | None:
        """The worker_crashed event ``child`` left in this start, if any."""
        crash = self.crashes.get(child.name)
        return crash if crash is not None and crash["t"] >= child.started_t - 1.0 else None

    def _crash_loop(self, child: Child, rc: int):
        from geotrain.run.supervise import crash_loop

        if child.role != "worker" or rc == 0:
            return None
        members = [c for c in self.children if c.group == child.group and not c.retired]
        signalled = any((c.proc.poll() or 0) < 0 for c in members)
        return crash_loop(child.name, self._crash(child), self.restart_crash.get(child.group), signalled)

    def _restart(self, child: Child, reason: str) -> None:
        now = time.time()
        group = child.group
        if child.role == "worker":
            self.restart_crash[group] = self._crash(child)
        self.restarts[group] = self.restarts.get(group, 0) + 1
        what = {"worker": "worker", "coordinator": "coordinator", "etcd": "etcd", "link": "link"}[child.role]
        self.events.emit("failure", what=what, target=child.name, happened_t=now, detected_t=now, reason=reason,
                         pid=child.proc.pid)
        if child.role == "worker":  # the other sites need not wait for this one's restart
            self._report_lost(group.split(":", 1)[1], reason)
        for c in self.children:  # stop the rest of the group (a site's surviving workers)
            if c.group == group and not c.retired:
                c.retired = True
        procs.terminate_all([c.proc for c in self.children if c.group == group], grace_s=0.5)
        self.pending[group] = {"what": what, "target": child.name, "failure_t": now}
        if child.role == "worker":
            site = self.topo.site(group.split(":", 1)[1])
            self.pending[group]["last_version"] = self.last_merge_version.get(site.name, 0)
            self._start_site(site)
        elif child.role == "coordinator":
            self._start_coordinator()
        elif child.role == "etcd":
            self._start_etcd()
            self._recovered(group, time.time())
        elif child.role == "link" and group.startswith("ringlink:"):
            # The leaders merge through the star meanwhile and rebuild their rings when the coordinator says.
            *args, port = self.ring_links[group]
            self._spawn_link(*args, listen_port=port)
            self._recovered(group, time.time())
        elif child.role == "link":
            self._start_link(group.split(":", 1)[1], f"{self.topo.coordinator.host}:{self.coord_port}")
            self._recovered(group, time.time())

    def _report_lost(self, site: str, reason: str) -> None:
        """Tell the coordinator that ``site``'s group died (ReportLost), so that the round being collected
        commits with the survivors now (rounds.lose). On its own thread: the restart does not wait for it;
        an unreachable coordinator is no reason to fail (its etcd watch, or the deadline, decides then)."""
        leader = next((c for c in self.children if c.name == f"worker {site}/0" and not c.retired), None)
        if leader is None or not self.coord_port:
            return
        address = f"{self.topo.coordinator.host}:{self.coord_port}"
        files = self.certs.files(LAUNCHER) if self.certs is not None else None
        threading.Thread(target=report_lost, args=(address, files, site, leader.proc.pid, reason, self.events),
                         name=f"report-lost-{site}", daemon=True).start()

    def _recovered(self, group: str, t: float, rounds_lost: int = 0) -> None:
        f = self.pending.pop(group, None)
        if f is not None:
            self.events.emit("recovery", what=f["what"], target=f["target"], failure_t=f["failure_t"], recovered_t=t,
                             seconds=round(t - f["failure_t"], 3), rounds_lost=rounds_lost)

    def _observe_events(self) -> None:
        """Follow the history: merges and recoveries; a sign that the global model went non-finite
        (summary.nonfinite_model) fails the run at once: training on would only spend time."""
        for e in self.tail.read():
            kind = e.get("event")
            diverged = nonfinite_model(e)
            if diverged is not None:
                raise RunFailed(f"the global model went non-finite: {diverged}")
            self.faults.observe(e)
            if kind == "inner_step" and "site" in e:
                self.last_step_t[e["site"]] = max(self.last_step_t.get(e["site"], 0.0), e.get("t", 0.0))
            if kind == "merge":
                self.last_merge_version[e["site"]] = e.get("version", 0)
            elif kind == "model_mismatch":  # a site trains another model: no restart can cure that
                raise RunFailed(f"site {e.get('site')} trains another model than the run's: {e.get('reason')}")
            elif kind == "worker_crashed":
                self.crashes[f"worker {e.get('site')}/{e.get('rank')}"] = e
            elif kind == "site_ready" and f"site:{e['site']}" in self.pending:
                group = f"site:{e['site']}"
                lost = max(0, e.get("version", 0) - self.pending[group].get("last_version", 0))
                self._recovered(group, e["t"], rounds_lost=lost)
            elif kind == "coordinator_started" and "coordinator" in self.pending:
                self._recovered("coordinator", e["t"])

    def _check_heartbeats(self) -> None:
        """A coordinator whose etcd lease lapsed while its process lives is frozen: kill it (then it restarts)."""
        from geotrain.errors import ControlPlaneError
        from geotrain.run.supervise import heartbeat_lost

        coord = next((c for c in self.children if c.role == "coordinator" and not c.retired and not c.done), None)
        if coord is None or self.control is None:
            return
        now = time.time()
        if self.coord_seen is not None and now - self.coord_seen < 1.0:
            return
        try:
            info = self.control.coordinator()
        except ControlPlaneError:
            self.coord_seen = now  # etcd unreachable: no verdict, and a full grace period once it is back
            return
        if info and info.get("pid") == coord.proc.pid:
            self.coord_seen = now
            return
        verdict = heartbeat_lost(now, self.coord_seen, coord.proc.poll() is None, self.topo.recovery.heartbeat_ttl_s)
        if verdict is not None:
            self.events.emit("heartbeat_lost", target="coordinator", pid=coord.proc.pid, reason=verdict.reason)
            coord.proc.kill()  # the next poll sees it dead and restarts it

    # ---- stopping ----
    def stop(self) -> None:
        """Stop everything: workers first, then links and the coordinator (they flush stats), etcd last."""
        if self.faults is not None:
            self.faults.heal_all()  # never leave a process stopped or a link cut behind
        if self.control is not None:
            self.control.close()
        standbys, self.standbys = list(self.standbys.values()), {}
        for proc in standbys:  # an unused standby exits when its stdin closes
            try:
                proc.stdin.close()
            except OSError:
                pass
        procs.terminate_all(standbys, grace_s=1.0)
        order = {"worker": 0, "link": 1, "coordinator": 1, "etcd": 2}
        for level in (0, 1, 2):
            procs.terminate_all([c.proc for c in self.children if order[c.role] == level], grace_s=5.0)
        if self.etcd is not None:
            self.etcd.stop()


def report_lost(address: str, files, site: str, pid: int, reason: str, events: EventLog, timeout_s: float = 5.0) -> None:
    """One ReportLost call to the coordinator at ``address`` (``files``: the launcher's certificate; None:
    plaintext); what it answered goes into ``events`` (``lost_reported``)."""
    import grpc

    from geotrain._proto import coordinator_pb2 as pb
    from geotrain.security.tls import secure_channel

    channel = secure_channel(address, files) if files is not None else grpc.insecure_channel(address)
    try:
        call = channel.unary_unary("/geotrain.v1.Coordinator/ReportLost", request_serializer=pb.LostRequest.SerializeToString,
                                   response_deserializer=pb.LostResponse.FromString)
        resp = call(pb.LostRequest(site=site, pid=pid, reason=reason), timeout=timeout_s)
        events.emit("lost_reported", site=site, pid=pid, action=resp.action, reason=resp.reason)
    except grpc.RpcError as exc:
        events.emit("lost_reported", site=site, pid=pid, action="unreachable",
                    reason=f"the coordinator did not take the report: {exc.code().name}: {exc.details()}")
    finally:
        channel.close()


def launch(plan: LaunchPlan, progress_factory=None) -> dict:
    """Run the plan to completion. Returns the summary; raises RunFailed (and stops everything) on failure."""
    launcher = Launcher(plan)
    t0 = time.time()

    def start_and_watch() -> None:
        launcher.start()
        progress = progress_factory(launcher) if progress_factory else None
        try:
            launcher.watch(progress=progress.update if progress else None)
        finally:
            if progress:
                progress.close()

    error = run_guarded(start_and_watch, launcher.stop, "every process of the run was stopped")
    if error is None:  # every worker exited 0: the history still has the last word on the model
        failed = history_failure(read_events(plan.run_dir / "metrics.jsonl"), plan.topo, script=plan.script is not None)
        error = RunFailed(failed) if failed else None
    status = "failed" if error else "completed"
    launcher.events.emit("run_finished", status=status, reason=str(error) if error else None)
    summary = write_summary(plan.run_dir, plan.topo, wall_seconds=time.time() - t0, link_stats=launcher.link_stats,
                            status=status, reason=str(error) if error else None)
    try:  # TensorBoard event files next to metrics.jsonl (tensorboard --logdir RUN_DIR/tensorboard)
        from geotrain.analysis.exporters import export_tensorboard

        export_tensorboard(plan.run_dir)
    except Exception as exc:  # noqa: BLE001 - a convenience export must never fail a finished run
        log.warning("TensorBoard export failed: %s", exc)
    if error:
        raise error
    return summary


def run_guarded(body, stop, stopped: str) -> GeotrainError | None:
    """Run ``body()``, then ``stop()`` whatever happens (SIGTERM counts as Ctrl-C meanwhile); the error that
    ended it (None: none). ``stopped`` says what ``stop`` did, for the message of an interrupted run."""
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        body()
        return None
    except KeyboardInterrupt:
        return RunInterrupted(f"interrupted (Ctrl-C or SIGTERM); {stopped}")
    except GeotrainError as exc:
        return exc if isinstance(exc, RunFailed) else RunFailed(str(exc))
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt
