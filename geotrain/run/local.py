"""``geotrain run-local SCRIPT``: a user's script as one site of one worker, in this process — no etcd,
no gRPC, no link emulator, no other process — with the same SDK calls, to debug it before a
multi-site launch.

What is the same as in a launch: the topology's recipe (algorithm, H, rounds, outer optimizer,
compression, update validation), the coordinator's own :class:`~geotrain.orchestrator.engine.CoordinatorEngine`
and the wire's own encode/decode (:mod:`geotrain.wire.transport`) for every update and answer, the
events in RUN_DIR/metrics.jsonl, summary.json, and the outcome rules (a script that never calls
``diloco.step()``, or stops early, fails). What is not: the transport is a function call instead of
gRPC (:class:`LocalCoordinator` keeps the CoordinatorClient's interface), one site averages only with
itself (a merge is the outer step on that site's pseudo-gradient), there are no faults, checkpoints
or rings. A topology with several sites or workers runs its first site (or ``--site``) with one worker.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

from geotrain._proto import coordinator_pb2 as pb
from geotrain.config.topology import Topology, load_topology, parse_topology
from geotrain.errors import GeotrainError, RunFailed, TopologyError
from geotrain.events import EventLog, read_events
from geotrain.orchestrator.results import Refused, Update
from geotrain.wire import transport
from geotrain.wire.outcomes import error_for

LOCAL = "local"
"""GEOTRAIN_COORDINATOR of a run-local worker: its coordinator is in its own process."""

DEFAULT_TOPOLOGY = {"name": "local", "sites": [{"name": "local", "workers": 1}], "training": {"rounds": 2}}


def local_topology(path: str | None, site: str | None, overrides: list[str]) -> Topology:
    """The topology a local run follows: the given one cut to one site of one worker, else a default."""
    if path is None:
        if site is not None:
            raise TopologyError("--site: name a site of a topology (--topology FILE)")
        from geotrain.config.topology import apply_override

        raw = json.loads(json.dumps(DEFAULT_TOPOLOGY))
        for item in overrides:
            raw = apply_override(raw, item, source="run-local")
        topo = parse_topology(raw, source="run-local")
    else:
        topo = load_topology(path, overrides)
    chosen = topo.sites[0] if site is None else next((s for s in topo.sites if s.name == site), None)
    if chosen is None:
        raise TopologyError(f"--site: {site!r} is not a site of {path} (sites: {', '.join(topo.site_names)})")
    recovery = topo.recovery.model_copy(update={"min_sites": 1})
    return topo.model_copy(update={"sites": (chosen.model_copy(update={"workers": 1}),), "recovery": recovery,
                                   "faults": (), "checkpoint": topo.checkpoint.model_copy(update={"every_rounds": 0})})


class LocalCoordinator:
    """The CoordinatorClient's interface over an engine in this process; every tensor goes through the
    wire's encode and decode, as it would through gRPC, and a refusal raises what the client would."""

    def __init__(self, engine, site: str):
        self.engine = engine
        self.site = site
        self.address = LOCAL
        self.bytes_sent = 0
        self.bytes_received = 0

    def _wire(self, msgs) -> transport.Payload:
        msgs = list(msgs)
        return transport.decode(iter(msgs), where=f"site {self.site}: local")

    def _refused(self, refused: Refused) -> GeotrainError:
        return error_for(refused.outcome, f"site {self.site}: {refused.message}")

    def join(self, workers: int, model_spec: str = "") -> pb.JoinResponse:
        try:
            a = self.engine.join(self.site, workers, os.getpid(), time.time(), model_spec=model_spec or None)
        except Refused as refused:
            raise self._refused(refused) from None
        return pb.JoinResponse(round=a.round, version=a.version, start_version=a.start_version, has_model=a.has_model,
                               algorithm=a.algorithm, epoch=a.epoch, fragment_rounds=list(a.fragment_rounds),
                               site_merges=a.site_merges)

    def init_model(self, flat) -> bool:
        payload = self._wire(transport.encode(flat, site=self.site, kind="params"))
        try:
            accepted, _ = self.engine.init_model(self.site, payload.tensor().clone())
        except Refused as refused:
            raise self._refused(refused) from None
        return accepted

    def get_model(self, min_version: int = 0, what: str = "params") -> transport.Payload:
        try:
            a = self.engine.model(min_version, what, 60.0, lambda: True)
        except Refused as refused:
            raise self._refused(refused) from None
        return self._wire(transport.encode(a.values, site="coordinator", round=a.version, kind=a.kind,
                                           version=a.version, ring_round=a.ring_round))

    def merge(self, flat, round: int, kind: str, version: int = 0, *, encoded=None, fragment: int = 0,
              claimed_crc32: int = 0) -> transport.Payload:
        from geotrain.orchestrator.server import _encode

        p = self._wire(transport.encode(flat, site=self.site, round=round, kind=kind, version=version,
                                        encoded=encoded, fragment=fragment, claimed_crc32=claimed_crc32))
        update = Update(site=p.site, round=p.round, kind=p.kind, version=p.version, values=p.tensor(),
                        fragment=p.fragment, claimed_crc32=p.claimed_crc32, declared_numel=p.numel)
        try:
            result = self.engine.merge(update, time.time(), lambda: True)
        except Refused as refused:
            raise self._refused(refused) from None
        if result is None:
            raise GeotrainError(f"site {self.site}: round {round} ended without an answer")
        return self._wire(_encode(result))

    def status(self):
        return self.engine.status()

    def close(self) -> None:
        pass


def local_client(ctx):
    """The coordinator of a run-local worker (geotrain.worker.exchange.open_exchange asks for it)."""
    from geotrain.config.derive import coordinator_config
    from geotrain.orchestrator.engine import CoordinatorEngine

    if not ctx.topology_path:
        raise GeotrainError("run-local: GEOTRAIN_TOPOLOGY is not set (use `geotrain run-local SCRIPT`)")
    topo = Topology.model_validate(json.loads(Path(ctx.topology_path).read_text()))
    events = EventLog(ctx.run_dir / "metrics.jsonl" if ctx.run_dir else None, "coordinator")
    return LocalCoordinator(CoordinatorEngine(coordinator_config(topo), events=events), ctx.site)


def run_local(script: str, args: list[str], topo: Topology, run_dir: Path) -> dict:
    """Run ``script`` in this process as the one worker of ``topo``'s one site; returns summary.json's fields.
    Raises RunFailed when the script fails or did not do what the topology asks."""
    from geotrain.config.derive import derive
    from geotrain.run.site import write_worker_config
    from geotrain.run.summary import model_failure, shortfall, write_summary

    if not Path(script).is_file():
        raise RunFailed(f"run-local: no script {script}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "topology.json").write_text(json.dumps(topo.model_dump(mode="json"), indent=2))
    config = derive(topo, run_dir).worker.model_copy(update={"certs_dir": None, "checkpoint_dir": None})
    site = topo.sites[0].name
    env = {"GEOTRAIN_RUN": topo.name, "GEOTRAIN_RUN_DIR": str(run_dir), "GEOTRAIN_SITE": site,
           "GEOTRAIN_SITE_RANK": "0", "GEOTRAIN_SITE_WORKERS": "1", "GEOTRAIN_COORDINATOR": LOCAL,
           "GEOTRAIN_TOPOLOGY": str(run_dir / "topology.json"), "GEOTRAIN_DEVICE": topo.sites[0].device,
           "GEOTRAIN_WORKER_CONFIG": str(write_worker_config(run_dir, site, config))}
    events = EventLog(run_dir / "metrics.jsonl", "launcher")
    events.emit("run_started", run=topo.name, topology_sha256=topo.digest(), sites=[site],
                algorithm=topo.training.algorithm, local=True)
    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    os.environ.update(env)
    sys.argv = [script, *args]
    t0 = time.time()
    error: str | None = None
    raised: BaseException | None = None
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = f"the script exited with {exc.code}"
    except Exception as exc:  # the script's own bug: recorded, then shown with its traceback (cli)
        error, raised = f"the script raised {type(exc).__name__}: {str(exc)[:200]}", exc
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    history = read_events(run_dir / "metrics.jsonl")
    error = error or model_failure(history) or shortfall(history, topo, script=True)
    status = "failed" if error else "completed"
    events.emit("run_finished", status=status, reason=error)
    summary = write_summary(run_dir, topo, wall_seconds=time.time() - t0, link_stats={}, status=status, reason=error)
    if raised is not None:
        raise raised
    if error:
        raise RunFailed(error)
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    from geotrain.run.launch import make_run_dir

    p = argparse.ArgumentParser(prog="geotrain run-local", description=(
        "Run a training script as one site of one worker in this process (no etcd, gRPC or link emulator), "
        "with the same SDK calls and the coordinator's own merge logic: to debug a script before "
        "`geotrain launch TOPOLOGY --script ...`. Options go before the script; what follows it is its own."))
    p.add_argument("--topology", default=None, help="take the recipe from this topology (its first site, or --site, "
                                                    "with one worker); default: one site, 2 rounds")
    p.add_argument("--site", default=None, help="which site of --topology to be")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field, e.g. --set training.inner_steps=5")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<name>-local-<time>)")
    p.add_argument("script", help="the script (python file)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    args = p.parse_args(argv)
    try:
        topo = local_topology(args.topology, args.site, args.overrides)
        run_dir = (args.run_dir or make_run_dir(Path("runs"), f"{topo.name}-local")).resolve()
        summary = run_local(args.script, args.args, topo, run_dir)
    except GeotrainError as exc:
        print(f"geotrain run-local: {exc}", file=sys.stderr)
        return exc.exit_code
    from geotrain.cli import done_line

    print(f"geotrain run-local: {done_line(summary)}", file=sys.stderr)
    print(run_dir)
    return 0
