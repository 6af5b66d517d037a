"""The coordinator's gRPC service: it holds the global model and commits rounds.

The servicer only moves bytes and feeds events into the pure decisions of
:mod:`geotrain.orchestrator.rounds`; the outer steps are :mod:`geotrain.orchestrator.outer`.
One lock and one condition variable guard the state; a synchronous Merge call blocks (in its
own server thread) until its round is committed or fails, then streams the result back.

Algorithms (docs/algorithms.md):
- ``diloco`` / ``ddp``: one *lane* of rounds over the whole parameter vector;
- ``streaming-diloco``: one lane per fragment (a contiguous slice of the flat parameter vector),
  each with its own rounds, membership and slice of the outer momentum;
- ``async-diloco``: no rounds: every update is applied as it arrives (delayed Nesterov, weighted
  by staleness) and answered at once with the current global parameters.
Compression: updates may arrive encoded (geotrain.wire.compress); they are decoded and summed in fp32.
With a codec other than fp32, a synchronous merge answers with the *change* of the global
parameters, encoded with the same codec (with error feedback), and the coordinator applies
exactly the decoded change to its own copy, so that it and every site hold identical weights.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geotrain.wire import transport
from geotrain.wire.channel import GRPC_OPTIONS
from geotrain.wire.fragments import fragment_slices
from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import TransferCorrupt
from geotrain.events import EventLog
from geotrain.orchestrator.outer import DelayedNesterov, OuterOptimizer, mean_of, staleness_weight
from geotrain.orchestrator.persist import CoordinatorState, StateStore
from geotrain.orchestrator.rounds import RoundState, admit, join, next_round, record_arrival, ring_reform, round_ready
from geotrain.config.topology import OuterOptimizerConfig

log = logging.getLogger(__name__)



@dataclass
class CoordinatorConfig:
    sites: tuple[str, ...]
    algorithm: str = "diloco"
    outer: OuterOptimizerConfig = OuterOptimizerConfig()
    round_timeout_s: float = 120.0
    min_sites: int | None = None  # None: every member must report (no partial commits)
    epoch: int = 0
    checkpoint_every: int = 0
    codec: str = "fp32"
    block: int = 256
    error_feedback: bool = True
    fragments: int = 1  # streaming-diloco: P
    staleness_weight: str = "inverse"  # async-diloco
    delayed_nesterov: bool = True  # async-diloco
    rings: bool = False  # training.merge is ring or hierarchical: leaders rebuild their rings when told to


@dataclass
class Lane:
    """The rounds of one fragment (the whole model unless streaming)."""

    index: int
    state: RoundState
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    results: dict[int, tuple[int, object]] = field(default_factory=dict)  # round -> (version, result)
    failed: dict[int, str] = field(default_factory=dict)
    modes: dict[int, str] = field(default_factory=dict)  # round -> "star" | "ring"
    claims: dict[str, int] = field(default_factory=dict)  # ring round: site -> CRC32 of the mean it computed
    abandoned: dict[int, set] = field(default_factory=dict)  # round -> sites whose ring update was dropped
    attempt: int = 0  # grows every time the round being collected fails; its waiters are told, the round reopens
    last_failure: str = ""
    wire: dict[int, list] = field(default_factory=dict)  # round -> the encoded answer, built once per commit
    ring_next: dict[int, int] = field(default_factory=dict)  # star round -> the round the leaders rebuild rings at


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
        self.async_outer = DelayedNesterov(cfg.outer, len(cfg.sites), cfg.delayed_nesterov)
        self.is_async = cfg.algorithm == "async-diloco"
        n_lanes = cfg.fragments if cfg.algorithm == "streaming-diloco" else 1
        lane_rounds = [0] * n_lanes
        self.version = 0
        self.site_merges: dict[str, int] = {}  # async-diloco: each site's merges applied
        if resume is not None:
            self.site_merges = dict(resume.site_merges or {})
            self.params = resume.params
            self.outer.buf = resume.momentum
            self.async_outer.buf = resume.momentum
            if resume.pending is not None and resume.pending_count:
                self.async_outer.acc, self.async_outer.count = resume.pending, resume.pending_count
            lane_rounds = list(resume.lane_rounds) if resume.lane_rounds else [resume.round] * n_lanes
            self.version = resume.round if not resume.lane_rounds else resume.version
        self.lanes = [Lane(i, RoundState(round=r, expected=frozenset(cfg.sites))) for i, r in enumerate(lane_rounds)]
        self.ef_down = None  # error feedback on the way back (compressed sync merges)
        self.fenced = False
        self.dropped: dict[str, tuple[float, int]] = {}  # site -> (when dropped, round dropped at)
        self.bytes_in = 0
        self.bytes_out = 0
        self.ring_failures = 0  # ring rounds abandoned in a row (rebuilding backs off on them)
        self.ring_abandoned_at = -1
        self._cond = threading.Condition()

    # ---- compatibility views (one lane) ----
    @property
    def state(self) -> RoundState:
        return self.lanes[0].state

    def _slice(self, lane: Lane) -> slice:
        if len(self.lanes) == 1:
            return slice(None)
        return fragment_slices(self.params.numel(), len(self.lanes))[lane.index]

    # ---- RPCs ----
    def Join(self, request, context):
        with self._cond:
            if request.site not in self.cfg.sites:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"site {request.site!r} is not in the topology "
                                                                 f"({', '.join(self.cfg.sites)})")
            starts, decision = [], None
            for lane in self.lanes:
                lane.state, start, decision = join(lane.state, request.site)
                starts.append(start)
            start_version = self.version if self.is_async or len(self.lanes) > 1 else starts[0]
            self.events.emit("site_joined", site=request.site, workers=request.workers, pid=request.pid,
                             round=self.state.round, start_version=start_version, decision=decision.action)
            if request.site in self.dropped:
                failed_t, failed_round = self.dropped.pop(request.site)
                now = time.time()
                self.events.emit("recovery", what="site", target=request.site, failure_t=failed_t, recovered_t=now,
                                 seconds=round(now - failed_t, 3), rounds_lost=max(0, starts[0] - failed_round))
            return pb.JoinResponse(round=self.state.round, version=self.version, start_version=start_version,
                                   has_model=self.params is not None, algorithm=self.cfg.algorithm, epoch=self.cfg.epoch,
                                   fragment_rounds=starts, site_merges=self.site_merges.get(request.site, 0))

    def InitModel(self, request_iterator, context):
        payload = self._receive(request_iterator, context, "InitModel")
        with self._cond:
            if self.params is not None:
                return pb.InitModelResponse(accepted=False, version=self.version)
            self.params = payload.tensor().clone()
            self.events.emit("model_initialised", site=payload.site, numel=int(self.params.numel()))
            self._cond.notify_all()
            return pb.InitModelResponse(accepted=True, version=self.version)

    def GetModel(self, request, context):
        deadline = time.monotonic() + (context.time_remaining() or self.cfg.round_timeout_s)
        with self._cond:
            while self.params is None or self.version < request.min_version:
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"global version {request.min_version} not available (at {self.version})")
                self._cond.wait(timeout=min(left, 0.5))
            params, version = self.params, self.version
            if request.what == "momentum":  # ring leaders rebuilding their rings mirror the outer step
                buf = self.outer.buf
                params = buf.clone() if buf is not None else torch.zeros(0)
            elif request.what not in ("", "params"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"GetModel: unknown what={request.what!r} "
                                                                f"(params or momentum)")
            # a leader whose Merge answer was lost fetches the model: tell it about the rings too
            ring_round = self.lanes[0].ring_next.get(version - 1, 0) if len(self.lanes) == 1 else 0
        yield from self._send(params, kind=request.what or "params", version=version, round=version,
                              ring_round=ring_round)

    def Merge(self, request_iterator, context):
        payload = self._receive(request_iterator, context, "Merge")
        if self.is_async:
            yield from self._merge_async(payload, context)
            return
        site, rnd = payload.site, payload.round
        with self._cond:
            if self.fenced:
                context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator was fenced off by a newer one")
            if not 0 <= payload.fragment < len(self.lanes):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"fragment {payload.fragment} of {len(self.lanes)}")
            lane = self.lanes[payload.fragment]
            ring = payload.kind in ("ring_mean", "ring_ack")
            mode = lane.modes.setdefault(rnd, "ring" if ring else "star")
            if ring and mode != "ring":
                context.abort(grpc.StatusCode.ABORTED, f"ring_abandoned: round {rnd} is merged through the star")
            if not ring and mode == "ring" and rnd == lane.state.round:
                self._abandon_ring(lane, rnd, site)
            decision = admit(lane.state, site, rnd)
            if not decision:
                self.events.emit("merge_refused", site=site, round=rnd, action=decision.action, reason=decision.reason,
                                 fragment=lane.index)
                code = grpc.StatusCode.FAILED_PRECONDITION if decision.action in ("stale", "future", "duplicate") \
                    else grpc.StatusCode.PERMISSION_DENIED
                context.abort(code, f"{decision.action}: {decision.reason}")
            lane.updates[site] = payload.tensor() if payload.kind != "ring_ack" else None
            if ring:
                lane.claims[site] = payload.claimed_crc32
            lane.state = record_arrival(lane.state, site, time.time())
            attempt = lane.attempt
            self._maybe_commit(lane)
            while rnd not in lane.results:
                if lane.attempt != attempt:
                    context.abort(grpc.StatusCode.ABORTED, f"round_failed: {lane.last_failure}")
                if site in lane.abandoned.get(rnd, ()):
                    lane.abandoned[rnd].discard(site)
                    context.abort(grpc.StatusCode.ABORTED, f"ring_abandoned: a site merged round {rnd} through the star")
                if rnd in lane.failed:
                    context.abort(grpc.StatusCode.ABORTED, f"round_failed: {lane.failed[rnd]}")
                if not context.is_active():
                    return
                self._cond.wait(timeout=0.2)
                self._maybe_commit(lane)
            version, result = lane.results[rnd]
        if isinstance(result, tuple) and result[0] == "ring_commit":  # every site computed the outer step itself
            yield from transport.encode(torch.zeros(0), site="coordinator", round=rnd, kind="ring_commit",
                                        version=version, params_crc32=result[1])
            return
        kind = "grad" if self.cfg.algorithm == "ddp" else ("delta" if self.cfg.codec != "fp32" else "params")
        with self._cond:  # every waiting site gets the same bytes: encode them once per commit
            messages = lane.wire.get(rnd)
            if messages is None:
                messages = lane.wire[rnd] = list(self._send(result, kind=kind, version=version, round=rnd,
                                                            fragment=lane.index, count=False,
                                                            ring_round=lane.ring_next.get(rnd, 0)))
                lane.wire.pop(rnd - 2, None)
            self.bytes_out += sum(len(m.data) for m in messages)
        yield from messages

    def Status(self, request, context):
        with self._cond:
            return pb.StatusResponse(round=self.state.round, version=self.version,
                                     sites=sorted(self.state.expected), pending=sorted(self.state.arrived),
                                     bytes_in=self.bytes_in, bytes_out=self.bytes_out)

    # ---- asynchronous DiLoCo ----
    def _merge_async(self, payload, context):
        site = payload.site
        with self._cond:
            if self.fenced:
                context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator was fenced off by a newer one")
            if site not in self.cfg.sites or self.params is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unknown_site: {site!r} cannot merge here")
            done = self.site_merges.get(site, 0)
            if payload.round < done:  # a retry (after a coordinator restart) of an update applied before
                reason = (f"update {payload.round} of {site!r} was applied before ({done} of its updates are); "
                          f"refused, never applied twice")
                self.events.emit("merge_refused", site=site, round=payload.round, action="duplicate", reason=reason)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"duplicate: {reason}")
            staleness = max(0, self.version - payload.version)
            weight = staleness_weight(self.cfg.staleness_weight, staleness, len(self.cfg.sites))
            t0 = time.time()
            self.params = self.async_outer.step(self.params, payload.tensor(), weight)
            rnd = self.version
            self.version += 1
            self.site_merges[site] = self.site_merges.get(site, 0) + 1
            self.lanes[0].state = RoundState(round=self.version, expected=self.state.expected)
            self._persist()
            self.events.emit("commit", round=rnd, version=self.version, sites=[site], staleness=staleness,
                             weight=round(weight, 6), crc32=transport.fingerprint(self.params), epoch=self.cfg.epoch,
                             wait_s=0.0, apply_s=round(time.time() - t0, 6))
            if self.on_commit is not None and self.on_commit(rnd, self.version) is False:
                self.fenced = True
                context.abort(grpc.StatusCode.UNAVAILABLE, "this coordinator was fenced off by a newer one")
            self._maybe_checkpoint()
            params, version = self.params, self.version
            self._cond.notify_all()
        yield from self._send(params, kind="params", version=version, round=rnd, staleness=staleness)

    # ---- internals (called with the lock held) ----
    def _maybe_commit(self, lane: Lane) -> None:
        decision = round_ready(time.time(), lane.state, self.cfg.round_timeout_s, self.cfg.min_sites)
        if decision.action == "wait":
            return
        rnd = lane.state.round
        if decision.action == "timeout" and lane.modes.get(rnd) == "ring":
            self._abandon_ring(lane, rnd, "deadline")
            return
        if decision.action == "timeout":  # too few sites: this attempt fails, the round reopens for a retry
            lane.attempt += 1
            lane.last_failure = decision.reason
            lane.updates, lane.claims = {}, {}
            lane.state = RoundState(round=rnd, expected=lane.state.expected, joining=lane.state.joining)
            self.events.emit("round_failed", round=rnd, reason=decision.reason, fragment=lane.index, attempt=lane.attempt)
            self._cond.notify_all()
            return
        t0 = time.time()
        if lane.modes.get(rnd) == "ring":
            means = [u for u in lane.updates.values() if u is not None]
            claims = set(lane.claims.values())
            if len(means) != 1 or decision.action != "commit" or claims != {transport.fingerprint(means[0])}:
                self.events.emit("round_failed", round=rnd, reason=f"ring round {rnd} cannot commit ({decision.action}; "
                                 f"{len(means)} means uploaded; claimed mean CRC32s {sorted(claims)}): retried through the star")
                self._abandon_ring(lane, rnd, "coordinator")
                return
            mean = means[0]
        else:
            mean = mean_of(lane.updates)
        if self.cfg.algorithm == "ddp":
            result = mean
        else:
            if self.params is None:
                lane.failed[rnd] = "no global model to apply the outer step to"
                self._cond.notify_all()
                return
            sl = self._slice(lane)
            new = self.outer.step(self.params, mean, sl)
            if lane.modes.get(rnd) == "ring":
                self.params = new
                result = ("ring_commit", transport.fingerprint(self.params))
            elif self.cfg.codec == "fp32":
                self.params = new
                result = self.params[sl]
            else:  # send the change, compressed; apply exactly what the sites will apply
                from geotrain.wire.compress import ErrorFeedback, decode, encode

                delta = (new[sl] - self.params[sl]).contiguous()
                if self.cfg.error_feedback:
                    if self.ef_down is None:
                        self.ef_down = {}
                    ef = self.ef_down.setdefault(lane.index, ErrorFeedback(delta.numel()))
                    result = ef.encode(delta, self.cfg.codec, self.cfg.block)
                else:
                    result = encode(delta, self.cfg.codec, self.cfg.block)
                self.params = self.params.clone()
                self.params[sl] += decode(result)
        arrived = lane.state.arrived
        dropped = frozenset(lane.state.expected - set(arrived))
        lane.state = next_round(lane.state, dropped)
        self.version += 1
        now = time.time()
        for site in sorted(dropped):
            self.dropped[site] = (now, rnd)
            self.events.emit("failure", what="site", target=site, happened_t=min(arrived.values()), detected_t=now,
                             reason=decision.reason)
        self._persist()  # durable before anyone sees the result: a restart never loses it
        if self.on_commit is not None and self.on_commit(rnd, self.version) is False:
            self.fenced = True
            lane.failed[rnd] = f"coordinator epoch {self.cfg.epoch} was fenced off by a newer coordinator"
            self.events.emit("fenced", round=rnd, epoch=self.cfg.epoch)
            self._cond.notify_all()
            return
        lane.results[rnd] = (self.version if len(self.lanes) == 1 else lane.state.round, result)
        lane.results.pop(rnd - 2, None)
        if self.cfg.rings and lane.modes.get(rnd) == "ring":
            self.ring_failures = 0
        elif self.cfg.rings:
            self._plan_rings(lane, rnd, frozenset(arrived))
        lane.updates, lane.claims = {}, {}
        if self.cfg.algorithm == "ddp":
            crc = transport.fingerprint(result)
        else:  # the weights every site now holds (streaming: of this fragment)
            crc = transport.fingerprint(self.params[self._slice(lane)] if len(self.lanes) > 1 else self.params)
        extra = {"merge": lane.modes.get(rnd, "star")} if self.cfg.rings else {}
        self.events.emit("commit", round=rnd, version=self.version, sites=sorted(arrived), crc32=crc,
                         epoch=self.cfg.epoch, fragment=lane.index, **extra,
                         wait_s=round(t0 - min(arrived.values()), 6), apply_s=round(time.time() - t0, 6))
        self._maybe_checkpoint()
        self._cond.notify_all()

    def _plan_rings(self, lane: Lane, rnd: int, arrived: frozenset[str]) -> None:
        """Round ``rnd`` was merged through the star: tell the leaders (in its answer) whether they
        rebuild their rings for the next round (orchestrator.rounds.ring_reform decides)."""
        decision = ring_reform(rnd, sites=frozenset(self.cfg.sites), arrived=arrived, next_expected=lane.state.expected,
                               failures=self.ring_failures, abandoned_at=self.ring_abandoned_at)
        lane.ring_next.pop(rnd - 2, None)
        if decision.action == "ring":
            lane.ring_next[rnd] = rnd + 1
            self.events.emit("ring_reform", round=rnd + 1, reason=decision.reason)

    def _abandon_ring(self, lane: Lane, rnd: int, site: str) -> None:
        """A star update for a round being merged in a ring: the ring broke; merge this round through the star."""
        if self.ring_abandoned_at != rnd:
            self.ring_failures += 1
            self.ring_abandoned_at = rnd
        dropped = set(lane.state.arrived)
        lane.modes[rnd] = "star"
        lane.abandoned[rnd] = dropped
        lane.updates, lane.claims = {}, {}
        lane.state = RoundState(round=rnd, expected=lane.state.expected, joining=lane.state.joining)
        self.events.emit("ring_abandoned", round=rnd, by=site, dropped=sorted(dropped))
        self._cond.notify_all()

    def _persist(self) -> None:
        if self.store is None:
            return
        momentum = self.async_outer.buf if self.is_async else self.outer.buf
        self.store.save(CoordinatorState(round=self.state.round, params=self.params, momentum=momentum,
                                         epoch=self.cfg.epoch, members=tuple(sorted(self.state.expected)),
                                         lane_rounds=tuple(l.state.round for l in self.lanes) if len(self.lanes) > 1 else (),
                                         version=self.version, site_merges=dict(self.site_merges) if self.is_async else None,
                                         pending=self.async_outer.acc if self.is_async else None,
                                         pending_count=self.async_outer.count if self.is_async else 0))

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint_every
        if self.checkpoints is None or not every or self.params is None or len(self.lanes) > 1 or self.is_async:
            return  # streaming and async runs checkpoint for restarts (the state store), not for exact resume
        if self.version % every:
            return
        tensors = {"model": {"params": self.params}}
        if self.outer.buf is not None:
            tensors["outer"] = {"momentum": self.outer.buf}
        self.checkpoints.submit(self.version, tensors, {"round": self.version, "epoch": self.cfg.epoch,
                                                        "members": sorted(self.state.expected)})

    def _receive(self, request_iterator, context, what: str):
        try:
            payload = transport.decode(request_iterator, where=f"{what} from {context.peer()}")
        except TransferCorrupt as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        with self._cond:
            self.bytes_in += payload.wire_bytes
        return payload

    def _send(self, result, *, kind: str, version: int, round: int, fragment: int = 0, staleness: int = 0,
              count: bool = True, ring_round: int = 0):
        from geotrain.wire.compress import Encoded

        encoded = result if isinstance(result, Encoded) else None
        if count:
            with self._cond:
                self.bytes_out += len(encoded.payload) if encoded is not None else result.numel() * 4
        yield from transport.encode(None if encoded is not None else result, site="coordinator", round=round, kind=kind,
                                    version=version, encoded=encoded, fragment=fragment, staleness=staleness,
                                    ring_round=ring_round)


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
