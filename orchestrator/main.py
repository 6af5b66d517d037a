"""The coordinator as a process: ``geotrain coordinator TOPOLOGY [--run-dir DIR] [--etcd HOST:PORT]``.

It serves the Coordinator gRPC service, advertises its address in etcd under a lease
(``/geotrain/<run>/coordinator``), publishes the run state (round, version) after every commit
(``/geotrain/<run>/state``), prints ``READY <port>`` once it serves, and stops gracefully on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.orchestrator.persist import CoordinatorState, StateStore
from geotrain.config.derive import coordinator_config, stream_window_bytes
from geotrain.orchestrator.engine import CoordinatorEngine
from geotrain.orchestrator.server import create_server
from geotrain.run.site import checkpoint_dir
from geotrain.config.topology import Topology, load_any

log = logging.getLogger(__name__)


def initial_state(topo: Topology, run_dir: Path | None, resume_round: int | None) -> CoordinatorState | None:
    """Where this incarnation starts: a checkpoint (``geotrain resume``), the state persisted at the last
    commit (a restart inside a run), or nothing (a fresh run)."""
    if resume_round is not None and run_dir is not None:
        from geotrain.storage.checkpoint import COORDINATOR_PART, load_part

        tensors, state = load_part(checkpoint_dir(topo, run_dir), resume_round, COORDINATOR_PART)
        return CoordinatorState(round=state["round"], params=tensors["model"]["params"],
                                momentum=tensors.get("outer", {}).get("momentum"), version=state["round"])
    if run_dir is not None:
        return StateStore(run_dir / "coordinator").load()
    return None


TAIL_BYTES = 16 << 20
"""How much of the end of the history :func:`lost_commit` reads (the commit it looks for is the last durable one)."""


def lost_commit(resume: CoordinatorState | None, history: Path) -> dict | None:
    """The commit event of the round ``resume`` is the result of, when the history at ``history`` lacks it: the
    coordinator that committed it was killed after persisting the round and before writing the event
    (orchestrator.persist). None when the event is there, the state keeps none, or there is no history."""
    if resume is None or resume.commit is None:
        return None
    try:
        with open(history, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return resume.commit
    want = resume.commit
    for line in reversed(tail):
        if '"commit"' not in line:
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (e.get("event") == "commit" and e.get("version") == want.get("version")
                and e.get("fragment", 0) == want.get("fragment", 0) and e.get("epoch") == want.get("epoch")):
            return None
    return want


def coordinator_tls(topo: Topology, certs: Path | None):
    """The coordinator's certificate files: from ``--certs``, else the topology's security.certs; None when
    security.tls is false. TLS without certificates is a mistake to name, not a reason to serve plaintext."""
    from geotrain.security.pki import COORDINATOR, CertDir

    if not topo.security.tls:
        return None
    where = certs or (Path(topo.security.certs) if topo.security.certs else None)
    if where is None:
        raise GeotrainError("security.tls is on but no certificates were given: make them with `geotrain certs init "
                            "TOPOLOGY -o DIR` and pass --certs DIR (or set security.certs; security.tls: false "
                            "for plaintext on a network you trust)")
    return CertDir(where).files(COORDINATOR)


def run_done(engine: CoordinatorEngine, topo: Topology) -> bool:
    """Has the run committed every round it plans (training.rounds, counted as its algorithm merges)?"""
    tr = topo.training
    if tr.algorithm == "ddp":
        return engine.version >= tr.rounds * tr.inner_steps
    if tr.algorithm == "async-diloco":
        return all(engine.site_merges.get(s, 0) >= tr.rounds for s in topo.site_names)
    return min(lane.state.round for lane in engine.lanes) >= tr.rounds


def should_exit(done: bool, idle_s: float, linger_s: float | None) -> bool:
    """A coordinator on its own host exits once the run is done and nothing was committed for ``linger_s``
    (the sites fetch the final model meanwhile; a script that merges past training.rounds keeps it up).
    ``linger_s`` None (``--stay``, and under the launcher, which stops it): never by itself."""
    return linger_s is not None and done and idle_s >= linger_s


def serve(topo: Topology, run_dir: Path | None, etcd: str | None, bind: str, ready=print,
          resume_round: int | None = None, linger_s: float | None = None, tls=None) -> int:
    events = EventLog(run_dir / "metrics.jsonl" if run_dir else None, "coordinator")
    control = None
    registration = None
    epoch = 0
    host = bind.rsplit(":", 1)[0]
    if etcd:
        from geotrain.control.plane import ControlPlane
        from geotrain.security.pki import COORDINATOR

        # The coordinator's own certificate is its etcd user too: the only one that may write the run's keys.
        control = ControlPlane.for_part(etcd, topo.name, COORDINATOR, etcd=topo.etcd,
                                        certs_dir=Path(tls.ca).parent if tls is not None else None)
    resume = initial_state(topo, run_dir, resume_round)

    def on_commit(rnd: int, version: int) -> bool:
        """Publish the run state, fenced by our epoch: False means a newer coordinator exists."""
        if control is None:
            return True
        try:
            return control.put_state_fenced({"round": rnd + 1, "version": version, "epoch": epoch,
                                             "algorithm": topo.training.algorithm}, epoch)
        except GeotrainError as exc:  # etcd briefly away: training goes on (our lease still holds the key)
            log.warning("could not publish run state: %s", exc)
            return True

    store = StateStore(run_dir / "coordinator") if run_dir else None
    writer = None
    if run_dir is not None and topo.checkpoint.every_rounds:
        from geotrain.storage.checkpoint import COORDINATOR_PART, BackgroundWriter

        writer = BackgroundWriter(checkpoint_dir(topo, run_dir), COORDINATOR_PART, topo.digest(), keep=topo.checkpoint.keep,
                                  on_saved=lambda r, p, sec, size: events.emit("checkpoint_saved", round=r, path=str(p),
                                                                               seconds=round(sec, 6), bytes=size),
                                  on_error=lambda r, exc: events.emit("checkpoint_failed", round=r, part=COORDINATOR_PART,
                                                                      reason=str(exc)))
    cfg = coordinator_config(topo)
    engine = CoordinatorEngine(cfg, events=events, on_commit=on_commit, store=store, checkpoints=writer, resume=resume)
    server, port = create_server(engine, bind, tls=tls, window_bytes=stream_window_bytes(topo))
    exporter, metrics_url = None, None
    if topo.coordinator.prometheus_port is not None and run_dir is not None:
        try:
            from geotrain.analysis.exporters import PrometheusExporter

            exporter = PrometheusExporter(port=topo.coordinator.prometheus_port, host=host)
            metrics_url = f"http://{host}:{exporter.start()}/metrics"
            exporter.follow(run_dir / "metrics.jsonl")
        except (ImportError, OSError) as exc:  # metrics are a convenience: never a reason not to train
            log.warning("no Prometheus endpoint: %s", exc)
    if control is not None:
        registration = control.set_coordinator(f"{host}:{port}", {"pid": os.getpid(), "metrics": metrics_url},
                                               ttl_s=topo.recovery.heartbeat_ttl_s)
        epoch = int(registration.info["epoch"])
        cfg.epoch = epoch
    cancel_watch = None
    if control is not None and topo.training.algorithm not in ("ddp", "async-diloco"):
        from geotrain.orchestrator.membership import watch_members

        def on_lost(lost) -> None:
            if not run_done(engine, topo):  # at the end every site closes its registration: not a death
                engine.member_lost(lost.site, lost.pid, lost.reason, time.time(), source="lease")

        try:
            cancel_watch = watch_members(control, topo.recovery.heartbeat_ttl_s, on_lost)
        except GeotrainError as exc:  # without it a dead site is waited for until its restart or the deadline
            log.warning("not watching the members: %s", exc)
    lost = lost_commit(resume, run_dir / "metrics.jsonl") if run_dir is not None else None
    if lost is not None:  # the round is durable and its event was never written: write it before our start
        engine.replay_commit(lost)
    lanes = {"lane_rounds": [lane.state.round for lane in engine.lanes]} if len(engine.lanes) > 1 else {}
    events.emit("coordinator_started", address=f"{host}:{port}", pid=os.getpid(), sites=list(topo.site_names),
                run=topo.name, topology_sha256=topo.digest(),
                epoch=epoch, round=engine.state.round, resumed=resume is not None, metrics_url=metrics_url, **lanes)
    ready(f"READY {port}")
    sys.stdout.flush()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    seen_version, since = engine.version, time.monotonic()
    reason = None
    while not stop.wait(0.5):
        if engine.fenced:
            events.emit("coordinator_stopped", round=engine.state.round, reason="fenced", epoch=epoch)
            server.stop(grace=0)
            return 3
        if engine.failed is not None:  # its state could not be persisted: a restart takes up from the last durable one
            events.emit("coordinator_stopped", round=engine.state.round, reason="persist_failed", epoch=epoch,
                        error=engine.failed)
            print(f"geotrain coordinator: {engine.failed}", file=sys.stderr)
            server.stop(grace=0)
            return 1
        if engine.version != seen_version:
            seen_version, since = engine.version, time.monotonic()
        if should_exit(run_done(engine, topo), time.monotonic() - since, linger_s):
            reason = "done"
            break
    engine.settle(30.0)  # the last commit's event before this one
    events.emit("coordinator_stopped", round=engine.state.round, bytes_in=engine.bytes_in, bytes_out=engine.bytes_out,
                **({"reason": reason} if reason else {}))
    if cancel_watch is not None:
        cancel_watch()
    server.stop(grace=2.0).wait()
    engine.settle(30.0)  # the last commit's state persisted and published before the process goes
    if exporter is not None:
        exporter.stop()
    if writer is not None:
        writer.flush()
        writer.close()
    if registration is not None:
        registration.close()
    if control is not None:
        control.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geotrain coordinator", description=__doc__.splitlines()[0])
    p.add_argument("topology", help="topology file (YAML) or a run directory's topology.json")
    p.add_argument("--run-dir", type=Path, default=None, help="where to append metrics.jsonl")
    p.add_argument("--etcd", default=None, help="etcd endpoint host:port (default: the topology's, if any); TLS with "
                                                "the coordinator's certificate unless security.tls is false, the "
                                                "topology's etcd has no ca_file, or it is written http://")
    p.add_argument("--bind", default=None, help="host:port to serve on (default: coordinator.host, port 0)")
    p.add_argument("--resume-round", type=int, default=None, help="start from this checkpoint round (geotrain resume)")
    p.add_argument("--linger", type=float, default=30.0, metavar="SECONDS",
                   help="once every round of the run is committed, exit after this long without a new commit "
                        "(the sites fetch the final model meanwhile); default 30")
    p.add_argument("--certs", type=Path, default=None,
                   help="the run's certificate directory (geotrain certs init); default: the topology's "
                        "security.certs. Without certificates it refuses to start unless security.tls is false")
    p.add_argument("--stay", action="store_true", help="keep serving after the run is done, until SIGTERM/Ctrl-C "
                                                       "(geotrain launch runs it so and stops it itself)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s coordinator %(levelname)s %(message)s")
    from geotrain.wire.buffers import limit_malloc_arenas

    limit_malloc_arenas()  # before any server thread allocates: freed chunks are not kept per thread
    try:
        topo = load_any(args.topology)
        bind = args.bind or f"{topo.coordinator.host}:0"
        if args.run_dir is not None:
            try:
                args.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                print(f"geotrain coordinator: --run-dir {args.run_dir}: cannot create it: {exc.strerror or exc}",
                      file=sys.stderr)
                return 2
        tls = coordinator_tls(topo, args.certs)
        return serve(topo, args.run_dir, args.etcd or topo.etcd.endpoint, bind, resume_round=args.resume_round,
                     linger_s=None if args.stay else args.linger, tls=tls)
    except GeotrainError as exc:
        print(f"geotrain coordinator: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
