"""The coordinator's gRPC service: it holds the global model and commits rounds.

The servicer only moves bytes and feeds events into the pure decisions of
:mod:`geotrain.orchestrator.rounds`; the outer step is :mod:`geotrain.orchestrator.outer`.
One lock and one condition variable guard the state; a Merge call blocks (in its own server
thread) until its round is committed or times out, then streams the result back.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geotrain import transport
from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import TransferCorrupt
from geotrain.events import EventLog
from geotrain.orchestrator.outer import OuterOptimizer, mean_of
from geotrain.orchestrator.persist import CoordinatorState, StateStore
from geotrain.orchestrator.rounds import RoundState, admit, join, next_round, record_arrival, round_ready
from geotrain.topology import OuterOptimizerConfig

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]


@dataclass
class CoordinatorConfig:
    sites: tuple[str, ...]
    algorithm: str = "diloco"
    outer: OuterOptimizerConfig = OuterOptimizerConfig()
    round_timeout_s: float = 120.0
    min_sites: int | None = None  # None: every member must report (no partial commits)
    epoch: int = 0
    checkpoint_every: int = 0


class CoordinatorService(pb_grpc.CoordinatorServicer):
    """Holds the global model; commits rounds. ``store`` persists state at every commit (restart safety),
    ``checkpoints`` (a BackgroundWriter) writes the coordinator's checkpoint part every N rounds, and
    ``on_commit(round, version) -> bool`` publishes the run state (returning False means: fenced)."""

    def __init__(self, cfg: CoordinatorConfig, events: EventLog | None = None, on_commit=None,
                 store: StateStore | None = None, checkpoints=None, resume: CoordinatorState | None = None):
        self.cfg = cfg
        self.events = events or EventLog(None, "coordinator")
        self.on_commit = on_commit
        self.store = store
        self.checkpoints = checkpoints
        self.params: torch.Tensor | None = None
        self.outer = OuterOptimizer(cfg.outer)
        self.state = RoundState(expected=frozenset(cfg.sites))
        if resume is not None:
            self.params = resume.params
            self.outer.buf = resume.momentum
            self.state = RoundState(round=resume.round, expected=frozenset(cfg.sites))
        self.fenced = False
        self.dropped: dict[str, tuple[float, int]] = {}  # site -> (when dropped, round dropped at)
        self.updates: dict[str, torch.Tensor] = {}
        self.results: dict[int, tuple[int, torch.Tensor]] = {}  # round -> (version, payload)
        self.failed: dict[int, str] = {}  # round -> reason it failed
        self.bytes_in = 0
        self.bytes_out = 0
        self._cond = threading.Condition()

    # ---- RPCs ----
    def Join(self, request, context):
        with self._cond:
            if request.site not in self.cfg.sites:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"site {request.site!r} is not in the topology "
                                                                 f"({', '.join(self.cfg.sites)})")
            self.state, start_version, decision = join(self.state, request.site)
            self.events.emit("site_joined", site=request.site, workers=request.workers, pid=request.pid,
                             round=self.state.round, start_version=start_version, decision=decision.action)
            if request.site in self.dropped:
                failed_t, failed_round = self.dropped.pop(request.site)
                now = time.time()
                self.events.emit("recovery", what="site", target=request.site, failure_t=failed_t, recovered_t=now,
                                 seconds=round(now - failed_t, 3), rounds_lost=start_version - failed_round)
            return pb.JoinResponse(round=self.state.round, version=self.state.version, start_version=start_version,
                                   has_model=self.params is not None, algorithm=self.cfg.algorithm, epoch=self.cfg.epoch)

    def InitModel(self, request_iterator, context):
        payload = self._receive(request_iterator, context, "InitModel")
        with self._cond:
            if self.params is not None:
                return pb.InitModelResponse(accepted=False, version=self.state.version)
            self.params = payload.tensor().clone()
            self.events.emit("model_initialised", site=payload.site, numel=int(self.params.numel()))
            self._cond.notify_all()
            return pb.InitModelResponse(accepted=True, version=self.state.version)

    def GetModel(self, request, context):
        deadline = time.monotonic() + (context.time_remaining() or self.cfg.round_timeout_s)
        with self._cond:
            while self.params is None or self.state.version < request.min_version:
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"global version {request.min_version} not available (at {self.state.version})")
                self._cond.wait(timeout=min(left, 0.5))
            params, version = self.params, self.state.version
        yield from self._send(params, kind="params", version=version, round=version)

    def Merge(self, request_iterator, context):
        payload = self._receive(request_iterator, context, "Merge")
        site, rnd = payload.site, payload.round
        with self._cond:
            if self.fenced:
                context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator was fenced off by a newer one")
            decision = admit(self.state, site, rnd)
            if not decision:
                self.events.emit("merge_refused", site=site, round=rnd, action=decision.action, reason=decision.reason)
                code = grpc.StatusCode.FAILED_PRECONDITION if decision.action in ("stale", "future", "duplicate") \
                    else grpc.StatusCode.PERMISSION_DENIED
                context.abort(code, f"{decision.action}: {decision.reason}")
            self.updates[site] = payload.tensor()
            self.state = record_arrival(self.state, site, time.time())
            self._maybe_commit()
            while rnd not in self.results:
                if rnd in self.failed:
                    context.abort(grpc.StatusCode.ABORTED, self.failed[rnd])
                if not context.is_active():
                    return
                self._cond.wait(timeout=0.2)
                self._maybe_commit()
            version, result = self.results[rnd]
        kind = "params" if self.cfg.algorithm == "diloco" else "grad"
        yield from self._send(result, kind=kind, version=version, round=rnd)

    def Status(self, request, context):
        with self._cond:
            return pb.StatusResponse(round=self.state.round, version=self.state.version,
                                     sites=sorted(self.state.expected), pending=sorted(self.state.arrived),
                                     bytes_in=self.bytes_in, bytes_out=self.bytes_out)

    # ---- internals (called with the lock held) ----
    def _maybe_commit(self) -> None:
        decision = round_ready(time.time(), self.state, self.cfg.round_timeout_s, self.cfg.min_sites)
        if decision.action == "wait":
            return
        rnd = self.state.round
        if decision.action == "timeout":
            self.failed[rnd] = decision.reason
            self.events.emit("round_failed", round=rnd, reason=decision.reason)
            self._cond.notify_all()
            return
        t0 = time.time()
        mean = mean_of(self.updates)
        if self.cfg.algorithm == "diloco":
            if self.params is None:
                self.failed[rnd] = "no global model to apply the outer step to"
                self._cond.notify_all()
                return
            self.params = self.outer.step(self.params, mean)
            result = self.params
        else:
            result = mean
        arrived = self.state.arrived
        dropped = frozenset(self.state.expected - set(arrived))
        self.state = next_round(self.state, dropped)
        now = time.time()
        for site in sorted(dropped):
            self.dropped[site] = (now, rnd)
            self.events.emit("failure", what="site", target=site, happened_t=min(arrived.values()), detected_t=now,
                             reason=decision.reason)
        if self.store is not None:  # durable before anyone sees the result: a restart never loses it
            self.store.save(CoordinatorState(round=self.state.round, params=self.params, momentum=self.outer.buf,
                                             epoch=self.cfg.epoch, members=tuple(sorted(self.state.expected))))
        if self.on_commit is not None and self.on_commit(rnd, self.state.version) is False:
            self.fenced = True
            self.failed[rnd] = f"coordinator epoch {self.cfg.epoch} was fenced off by a newer coordinator"
            self.events.emit("fenced", round=rnd, epoch=self.cfg.epoch)
            self._cond.notify_all()
            return
        self.results[rnd] = (self.state.version, result)
        self.results.pop(rnd - 2, None)
        self.updates = {}
        self.events.emit("commit", round=rnd, version=self.state.version, sites=sorted(arrived),
                         crc32=transport.fingerprint(result), epoch=self.cfg.epoch,
                         wait_s=round(t0 - min(arrived.values()), 6), apply_s=round(time.time() - t0, 6))
        every = self.cfg.checkpoint_every
        if self.checkpoints is not None and every and self.state.version % every == 0 and self.params is not None:
            tensors = {"model": {"params": self.params}}
            if self.outer.buf is not None:
                tensors["outer"] = {"momentum": self.outer.buf}
            self.checkpoints.submit(self.state.version, tensors, {"round": self.state.version, "epoch": self.cfg.epoch,
                                                                  "members": sorted(self.state.expected)})
        self._cond.notify_all()

    def _receive(self, request_iterator, context, what: str):
        try:
            payload = transport.decode(request_iterator, where=f"{what} from {context.peer()}")
        except TransferCorrupt as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        with self._cond:
            self.bytes_in += payload.data.nbytes
        return payload

    def _send(self, tensor: torch.Tensor, *, kind: str, version: int, round: int):
        with self._cond:
            self.bytes_out += tensor.numel() * 4
        yield from transport.encode(tensor, site="coordinator", round=round, kind=kind, version=version)


def create_server(service: CoordinatorService, bind: str = "127.0.0.1:0", max_workers: int | None = None):
    """Start a gRPC server with the coordinator and the standard health service; returns (server, port)."""
    workers = max_workers or max(16, 4 * len(service.cfg.sites) + 8)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coord"),
                         options=GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"coordinator: cannot bind {bind}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("geotrain.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
    return server, port
