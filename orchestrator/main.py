"""The coordinator as a process: ``geotrain coordinator TOPOLOGY [--run-dir DIR] [--etcd HOST:PORT]``.

It serves the Coordinator gRPC service, advertises its address in etcd under a lease
(``/geotrain/<run>/coordinator``), publishes the run state (round, version) after every commit
(``/geotrain/<run>/state``), prints ``READY <port>`` once it serves, and stops gracefully on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.orchestrator.server import CoordinatorConfig, CoordinatorService, create_server
from geotrain.topology import Topology, load_topology

log = logging.getLogger(__name__)


def load_any(path: str) -> Topology:
    """A topology file (YAML) or the validated JSON the launcher writes into a run directory."""
    if path.endswith(".json"):
        import json

        with open(path) as f:
            return Topology.model_validate(json.load(f))
    return load_topology(path)


def serve(topo: Topology, run_dir: Path | None, etcd: str | None, bind: str, ready=print) -> int:
    events = EventLog(run_dir / "metrics.jsonl" if run_dir else None, "coordinator")
    control = None
    if etcd:
        from geotrain.controlplane import ControlPlane

        control = ControlPlane(etcd, topo.name)

    def on_commit(rnd: int, version: int) -> None:
        if control is not None:
            try:
                control.put_state({"round": rnd + 1, "version": version, "algorithm": topo.training.algorithm})
            except GeotrainError as exc:  # etcd briefly away: training goes on, state catches up next commit
                log.warning("could not publish run state: %s", exc)

    cfg = CoordinatorConfig(sites=tuple(topo.site_names), algorithm=topo.training.algorithm,
                            outer=topo.training.outer_optimizer, round_timeout_s=topo.training.round_timeout_s)
    service = CoordinatorService(cfg, events=events, on_commit=on_commit)
    server, port = create_server(service, bind)
    host = bind.rsplit(":", 1)[0]
    registration = None
    if control is not None:
        registration = control.set_coordinator(f"{host}:{port}", {"pid": os.getpid()})
    events.emit("coordinator_started", address=f"{host}:{port}", pid=os.getpid(), sites=list(topo.site_names))
    ready(f"READY {port}")
    sys.stdout.flush()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    events.emit("coordinator_stopped", round=service.state.round, bytes_in=service.bytes_in, bytes_out=service.bytes_out)
    server.stop(grace=2.0).wait()
    if registration is not None:
        registration.close()
    if control is not None:
        control.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="geotrain coordinator", description=__doc__.splitlines()[0])
    p.add_argument("topology", help="topology file (YAML) or a run directory's topology.json")
    p.add_argument("--run-dir", type=Path, default=None, help="where to append metrics.jsonl")
    p.add_argument("--etcd", default=None, help="etcd endpoint host:port (default: the topology's, if any)")
    p.add_argument("--bind", default=None, help="host:port to serve on (default: coordinator.host, port 0)")
    args = p.parse_args(argv)
    try:
        topo = load_any(args.topology)
        bind = args.bind or f"{topo.coordinator.host}:0"
        return serve(topo, args.run_dir, args.etcd or topo.etcd.endpoint, bind)
    except GeotrainError as exc:
        print(f"geotrain coordinator: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
