"""The coordinator engine: the global model, the rounds, and the commit pipeline.

No gRPC here. The servicer (:mod:`geotrain.orchestrator.server`) decodes a call, hands the
engine values (an :class:`~geotrain.orchestrator.results.Update`, the time ``now``) and gets
values back: a :class:`~geotrain.orchestrator.results.CommitResult`, or a
:class:`~geotrain.orchestrator.results.Refused` naming the typed outcome. The decisions are the
pure functions of :mod:`geotrain.orchestrator.rounds`; the outer steps are
:mod:`geotrain.orchestrator.outer`. One lock and one condition variable guard the state; a
synchronous Merge blocks (in its own server thread) until its round is committed or fails.

A synchronous merge runs through visible stages::

    validate     rounds.validate_update: length, dtype, every value finite, the norm bound; a refused
                 update never counts (merge_refused), its site fails the round and may rejoin. The
                 values were checked as they arrived (orchestrator.ingest: finite, the norm's sum,
                 piece by piece in the receiving thread); a stream cut at a non-finite value is
                 refused the same way (:meth:`CoordinatorEngine.refuse_values`)
    admit        merge_mode (ring or star), rounds.admit, record the arrival; with the mean, the
                 update is folded into the round's running sum (orchestrator.accumulate, sorted
                 site order: the bits of the mean of old) instead of being kept
    ready        rounds.round_ready: wait | commit | commit_partial | commit_quorum | timeout (the attempt fails)
    aggregate    star: training.aggregation over the updates (mean: the running sum divided, fp32,
                 sorted sites; trimmed-mean; median: orchestrator.aggregate); ring: rounds.ring_commit
    outer step   Nesterov on the mean (orchestrator.outer_inplace: the same bits without temporaries);
                 with a codec the change is encoded (error feedback) and
                 exactly its decoding applied here, so that the coordinator and the sites agree
    result       one CommitResult per round, in the lane's RoundLog, and its answer's stream (its
                 CRC32s), which the waiters start sending at once, all but its last message
    durable      in a thread of its own, while the answer streams (_make_durable): persist (the state
                 store), publish (the run state in etcd, fenced by epoch: False means a newer
                 coordinator exists), the commit event with the model's digest (finite, norm;
                 model_nonfinite if it is not), the checkpoint. Only then does any site get the answer's
                 last message (a site uses nothing of a stream before it: its CRC32 is of the whole), a
                 GetModel or Join an answer, or the next round its commit: a restart never loses a round a
                 site has, and a fenced coordinator's round reaches nobody

Algorithms (docs/algorithms.md): ``diloco``/``ddp`` use one lane of rounds, ``streaming-diloco``
one lane per fragment (its own rounds, membership and slice of the outer momentum);
``async-diloco`` has no rounds: every update is applied as it arrives (rounds.admit_async refuses
a retried one; delayed Nesterov, weighted by rounds.async_weight) and answered at once.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace

import torch

from geotrain.config.topology import OuterOptimizerConfig
from geotrain.events import EventLog
from geotrain.orchestrator.aggregate import aggregator
from geotrain.orchestrator.ingest import Squares, l2_norm
from geotrain.orchestrator.lanes import Lane
from geotrain.orchestrator.outer import DelayedNesterov
from geotrain.orchestrator.outer_inplace import InPlaceOuterOptimizer
from geotrain.orchestrator.persist import CoordinatorState, StateStore
from geotrain.orchestrator.fingerprint import decode_spec, first_difference
from geotrain.orchestrator.results import CommitResult, JoinAnswer, ModelAnswer, Refused, StatusAnswer, Update
from geotrain.orchestrator.rounds import (Decision, RoundState, admit, admit_async, async_weight, join, leaving,
                                          lose, merge_mode, next_round, record_arrival, refuse_update, ring_commit, ring_reform,
                                          round_ready, validate_update)
from geotrain.storage.checkpoint import COORDINATOR_PART
from geotrain.wire import transport
from geotrain.wire.buffers import BufferPool
from geotrain.wire.compress import UpdateEncoder, decode
from geotrain.wire.fragments import fragment_slices
from geotrain.wire.outcomes import Outcome

FENCED_MESSAGE = "this coordinator was fenced off by a newer one"

_REFUSED = {"stale": Outcome.STALE, "future": Outcome.FUTURE, "duplicate": Outcome.DUPLICATE,
            "unknown_site": Outcome.NOT_MEMBER}
"""rounds.admit's refusals, as outcomes."""

MAX_STREAM_BYTES = transport.MAX_STREAM_BYTES
"""What a stream may declare before the coordinator has a model (then: the model's size)."""


@dataclass
class EngineConfig:
    """The coordinator engine's settings (geotrain.config.derive.coordinator_config makes them from a topology)."""

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
    density: float = 0.02
    """topk: the fraction of each chunk a site sends (the change sent back may hold every site's: ``density * sites``)."""
    bits: int = 2
    error_feedback_decay: float = 1.0
    quorum: int | None = None
    """training.quorum.min_sites: a round may commit once this many sites reported and ``quorum_grace_s`` passed."""
    quorum_grace_s: float = 0.0
    fragments: int = 1  # streaming-diloco: P
    staleness_weight: str = "inverse"  # async-diloco
    delayed_nesterov: bool = True  # async-diloco
    rings: bool = False  # training.merge is ring or hierarchical: leaders rebuild their rings when told to
    aggregation: str = "mean"  # training.aggregation: mean | trimmed-mean | median
    trim_fraction: float = 0.25  # trimmed-mean: dropped at each end of every coordinate
    max_update_norm_ratio: float | None = 10.0  # security: the norm bound (None: none)
    norm_history: int = 8  # security: accepted updates' norms the bound's median is taken over
    inner_schedule: dict | None = None  # geotrain.schedule.lr_factor's arguments (total_steps explicit): norm_scale
    inner_steps: int = 1  # H, for norm_scale
    rounds: int | None = None  # training.rounds (synchronous lanes: a site joining after the last one is done)


class CoordinatorEngine:
    """Holds the global model; commits rounds. ``store`` persists state at every commit (restart safety),
    ``checkpoints`` (a BackgroundWriter) writes the coordinator's checkpoint part every N rounds, and
    ``on_commit(round, version) -> bool`` publishes the run state (returning False means: fenced).
    ``clock`` gives the wall time of what happens inside a call (a waiting round's deadline, durations)."""

    def __init__(self, cfg: EngineConfig, events: EventLog | None = None, on_commit=None,
                 store: StateStore | None = None, checkpoints=None, resume: CoordinatorState | None = None,
                 clock=time.time):
        self.cfg = cfg
        self.events = events or EventLog(None, "coordinator")
        self.on_commit = on_commit
        self.store = store
        self.checkpoints = checkpoints
        self.clock = clock
        self.params: torch.Tensor | None = None
        self.buffers = BufferPool(keep=len(cfg.sites) + 4)
        """Model-sized tensors reused across rounds once nothing holds them: received updates, the running
        sum, the parameters (geotrain.wire.buffers: resident pages, no page faults per round)."""
        self.outer = InPlaceOuterOptimizer(cfg.outer, allocate=self.buffers.take)
        self.aggregate = aggregator(cfg.aggregation, cfg.trim_fraction)
        self.running_sum = cfg.aggregation == "mean"  # star rounds fold their updates (orchestrator.accumulate)
        self._squares = Squares()  # the norm's scratch (used under the lock)
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
        self.lanes = [Lane(i, RoundState(round=r, expected=frozenset(cfg.sites)), retire=self.buffers.retire)
                      for i, r in enumerate(lane_rounds)]
        for lane in self.lanes:
            lane.clear()
        # the change sent back, per lane. topk: the mean of M sparse updates has up to M times their
        # nonzeros, so the way back may send M times the density (what SparseLoCo's all-gather delivers)
        self.down = UpdateEncoder(cfg.codec, cfg.block, cfg.error_feedback, density=min(1.0, cfg.density * len(cfg.sites)),
                                  bits=cfg.bits, decay=cfg.error_feedback_decay)
        self.fenced = False
        self.dropped: dict[str, tuple[float, int]] = {}  # site -> (when dropped, round dropped at)
        self.bytes_in = 0
        self.bytes_out = 0
        self.ring_failures = 0  # ring rounds abandoned in a row (rebuilding backs off on them)
        self.ring_abandoned_at = -1
        self._cond = threading.Condition()
        self._job: _Durable | None = None
        """The commit being made durable (its own thread): while it is, nothing else commits."""
        self._job_squares = Squares()  # the digest's scratch, in that thread
        self.failed: str | None = None
        """Why this coordinator cannot go on: a commit's state could not be persisted (the process exits and
        is restarted from the last durable state)."""
        self.joined: set[str] = set()  # sites that joined this incarnation (GetModel is for members)
        self.site_pids: dict[str, int] = {}  # site -> the pid of its leader that joined (member_lost)
        self.model_spec = None  # the run's model fingerprint: the first site's to join (fingerprint.py)
        self.model_spec_site = ""

    @property
    def state(self) -> RoundState:
        """The round lane 0 collects (the only lane unless streaming)."""
        return self.lanes[0].state

    # ---- calls ----
    def join(self, site: str, workers: int, pid: int, now: float, model_spec: str | None = None) -> JoinAnswer:
        with self._cond:
            self._cond.wait_for(lambda: self._job is None)  # a joiner starts from a durable round
            self._refuse_if_failed()
            if site not in self.cfg.sites:
                raise Refused(Outcome.NOT_IN_TOPOLOGY, f"site {site!r} is not in the topology "
                                                       f"({', '.join(self.cfg.sites)})", site=site)
            if model_spec is not None:
                self._check_model(site, model_spec)
            self.joined.add(site)
            self.site_pids[site] = pid
            starts, decision = [], None
            for lane in self.lanes:
                final = None if self.is_async or self.cfg.algorithm == "ddp" else self.cfg.rounds
                lane.state, start, decision = join(lane.state, site, now, final)
                starts.append(start)
            start_version = self.version if self.is_async or len(self.lanes) > 1 else starts[0]
            self.events.emit("site_joined", site=site, workers=workers, pid=pid, round=self.state.round,
                             start_version=start_version, decision=decision.action)
            if site in self.dropped:
                failed_t, failed_round = self.dropped.pop(site)
                self.events.emit("recovery", what="site", target=site, failure_t=failed_t, recovered_t=now,
                                 seconds=round(now - failed_t, 3), rounds_lost=max(0, starts[0] - failed_round))
            return JoinAnswer(round=self.state.round, version=self.version, start_version=start_version,
                              has_model=self.params is not None, algorithm=self.cfg.algorithm, epoch=self.cfg.epoch,
                              fragment_rounds=tuple(starts), site_merges=self.site_merges.get(site, 0))

    def member_lost(self, site: str, pid: int | None, why: str, now: float, source: str) -> Decision:
        """``site``'s process ``pid`` was declared dead (``source``: ``lease``, its leader's etcd member key
        vanished; ``supervisor``, the process that runs it saw it exit; ``why`` says how). If ``pid`` is the
        one that joined (None: whichever did), every lane's round stops waiting for it (rounds.lose) and
        commits with the survivors if it can; a report about an older incarnation is ignored. Returns the
        decision of the lane the site was most involved in (the first that did not ignore it)."""
        with self._cond:
            joined = self.site_pids.get(site)
            if self.is_async or self.cfg.algorithm == "ddp":
                decision = Decision("ignore", f"{site!r} was declared dead ({why}); {self.cfg.algorithm} has no "
                                              f"round to go on without it")
            elif joined is None:
                decision = Decision("ignore", f"{site!r} was declared dead ({why}), but it has no member now "
                                              f"(declared dead before, or it never joined)")
            elif pid is not None and pid != joined:
                decision = Decision("ignore", f"{site!r} pid {pid} was declared dead ({why}), but the site's "
                                              f"member is pid {joined}: an older incarnation")
            else:
                decisions = []
                for lane in self.lanes:
                    lane.state, d = lose(lane.state, site, why, self.cfg.min_sites)
                    decisions.append(d)
                    if d.action == "drop_lost" and self.running_sum:
                        lane.sum.forget_pending(lane.state.expected - set(lane.state.arrived))
                decision = next((d for d in decisions if d.action != "ignore"), decisions[0])
                if decision.action in ("drop_lost", "leave_after", "forget_joiner"):
                    del self.site_pids[site]  # a second report of the same death changes nothing
            self.events.emit("member_lost", site=site, pid=pid, source=source, action=decision.action,
                             reason=decision.reason, round=self.state.round)
            if source == "lease" and decision.action == "drop_lost":
                # nobody else saw it (a frozen or unreachable site): the failure, and the recovery when it
                # rejoins, are the coordinator's to record, as for a site dropped at a deadline. A death a
                # supervisor reported is its failure and recovery (one of each, not two).
                self.dropped.setdefault(site, (now, self.state.round))
                self.events.emit("failure", what="site", target=site, happened_t=now, detected_t=now,
                                 reason=decision.reason, round=self.state.round)
            for lane in self.lanes:
                self._advance(lane, now)
            self._cond.notify_all()
            return decision

    def _check_model(self, site: str, text: str) -> None:
        """The site trains the run's model (geotrain.orchestrator.fingerprint): the first fingerprint is the run's."""
        try:
            spec = decode_spec(text)
        except ValueError as exc:
            raise Refused(Outcome.INVALID, f"site {site}: {exc}", site=site) from None
        if self.model_spec is None:
            self.model_spec, self.model_spec_site = spec, site
            return
        why = first_difference(self.model_spec, spec, site, self.model_spec_site)
        if why is not None:
            self.events.emit("model_mismatch", site=site, reason=why)
            raise Refused(Outcome.MODEL_MISMATCH, f"site {site} trains another model than the run's: {why}", site=site)

    def init_model(self, site: str, params: torch.Tensor) -> tuple[bool, int]:
        """The first site's initial model becomes the global one. Returns (accepted, version). A model
        that is empty, not float32 or not all finite is refused (INVALID_UPDATE): the next site's counts."""
        with self._cond:
            if self.params is not None:
                return False, self.version
            norm = self._norm(params) if params.dtype == torch.float32 else math.nan
            decision = validate_update(site, -1, dtype=str(params.dtype).removeprefix("torch."),
                                       expected_numel=None, declared_numel=params.numel(),
                                       received_numel=params.numel(), norm=norm, history=(), ratio=None,
                                       what=f"initial model from {site!r}")
            if not decision:
                self.events.emit("merge_refused", site=site, round=-1, action=decision.action, reason=decision.reason,
                                 what="init_model")
                raise Refused(Outcome.INVALID_UPDATE, f"{decision.action}: {decision.reason}", site=site)
            self.params = params
            self.events.emit("model_initialised", site=site, numel=int(self.params.numel()))
            self._cond.notify_all()
            return True, self.version

    def model(self, min_version: int, what: str, timeout_s: float, is_active) -> ModelAnswer:
        """The global parameters (``what`` "" or "params") or the outer momentum ("momentum": ring leaders
        rebuilding their rings mirror the outer step) once ``min_version`` is committed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.params is None or self.version < min_version or self._job is not None:
                self._refuse_if_failed(min_version)
                left = deadline - time.monotonic()
                if left <= 0 or not is_active():
                    raise Refused(Outcome.UNAVAILABLE, f"global version {min_version} not available (at {self.version})",
                                  round=min_version)
                self._cond.wait(timeout=min(left, 0.5))
            self._refuse_if_failed(min_version)  # what it holds now was never durable
            values, version = self.params, self.version
            if what == "momentum":
                buf = self.outer.buf
                values = buf.clone() if buf is not None else torch.zeros(0)
            elif what not in ("", "params"):
                raise Refused(Outcome.INVALID, f"GetModel: unknown what={what!r} (params or momentum)")
            # a leader whose Merge answer was lost fetches the model: tell it about the rings too
            record = self.lanes[0].log.get(version - 1) if len(self.lanes) == 1 else None
            ring_round = record.ring_next if record is not None else 0
        return ModelAnswer(kind=what or "params", values=values, version=version, ring_round=ring_round)

    def merge(self, update: Update, now: float, is_active, durable: bool = True) -> CommitResult | None:
        """Take ``update`` and block until its round commits (async: apply it at once). None: the
        caller went away while waiting. Raises Refused (stale, future, duplicate, not a member,
        ring abandoned, round failed, fenced, invalid fragment).

        ``durable`` False (the servicer): return once the round is committed, before it is durable; the
        caller sends the answer through :meth:`answer_once`, whose last message waits for it."""
        if self.is_async:
            return self._merge_async(update)
        with self._cond:
            lane = self._lane_of(update)
            norm = self._validate(lane, update, now)
            self._admit(lane, update, now, norm)
            attempt = lane.attempt
            self._advance(lane, now)
            result = self._await(lane, update, attempt, is_active)
            record = lane.log.get(update.round)  # kept: the next commit, which prunes, waits for this one's durability
            if result is not None and durable and record is not None and not self._await_durable(record, is_active):
                return None
            return result

    def _refuse_if_failed(self, rnd: int = -1, site: str = "") -> None:
        """A coordinator whose state could not be persisted serves nothing more (it exits; its restart resumes)."""
        if self.failed is not None:
            raise Refused(Outcome.UNAVAILABLE, f"this coordinator is stopping: {self.failed}", round=rnd, site=site)

    def settle(self, timeout_s: float | None = None) -> bool:
        """Block until no commit is being made durable (its commit event emitted, its checkpoint submitted);
        False if one still is after ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._job is None, timeout=timeout_s)

    def _await_durable(self, record, is_active=lambda: True) -> bool:
        """Block until ``record``'s round is durable (lock held); raise Refused if it could not be made so.
        False: the caller went away."""
        while record.durable is None:
            if not is_active():
                return False
            self._cond.wait(timeout=0.2)
        if not record.durable:
            raise Refused(Outcome.ROUND_FAILED, f"round_failed: {record.failed}", round=record.result.round,
                          site="")
        return True

    def _lane_of(self, update: Update) -> Lane:
        """The lane a synchronous update is for; refused when fenced or for a fragment there is not."""
        if self.fenced:
            raise Refused(Outcome.FENCED, FENCED_MESSAGE, round=update.round, site=update.site)
        self._refuse_if_failed(update.round, update.site)
        if not 0 <= update.fragment < len(self.lanes):
            raise Refused(Outcome.INVALID, f"fragment {update.fragment} of {len(self.lanes)}",
                          round=update.round, site=update.site)
        return self.lanes[update.fragment]

    def members(self) -> frozenset[str]:
        """The sites that belong to the run now: joined, expected by a round, or joining one."""
        with self._cond:
            out = set(self.joined)
            for lane in self.lanes:
                out |= lane.state.expected | lane.state.joining
            return frozenset(out)

    def max_stream_bytes(self) -> int:
        """The most bytes a stream to this coordinator may declare: the model's size once it is known
        (a compressed update is smaller than its float32 values), before that MAX_STREAM_BYTES."""
        with self._cond:
            return MAX_STREAM_BYTES if self.params is None else 4 * self.params.numel() + 4096

    def status(self) -> StatusAnswer:
        with self._cond:
            return StatusAnswer(round=self.state.round, version=self.version, sites=tuple(sorted(self.state.expected)),
                                pending=tuple(sorted(self.state.arrived)), bytes_in=self.bytes_in,
                                bytes_out=self.bytes_out)

    def received(self, nbytes: int) -> None:
        with self._cond:
            self.bytes_in += nbytes

    def sent(self, nbytes: int) -> None:
        with self._cond:
            self.bytes_out += nbytes

    def answer_once(self, result: CommitResult, build):
        """The wire messages of a synchronous round's answer: serialized once per commit (the round's
        record keeps a geotrain.wire.transport.SharedStream, made at the commit), the same bytes for every
        waiting site, each message made when the first site needs it; ``build()`` makes them when the
        record is gone (a waiter later than the log keeps). Each answer counts in ``bytes_out``."""
        with self._cond:
            record = self.lanes[result.fragment].log.get(result.round)
            shared = record.wire if record is not None else None
            self.bytes_out += result.wire_bytes
            if shared is None and record is not None:
                self._await_durable(record)
        return shared.messages() if shared is not None else build()

    def model_bytes(self) -> int | None:
        """The model's size in bytes (float32), None before there is one: a stream that declares at most
        this much is received into one buffer allocated up front (geotrain.wire.receive)."""
        with self._cond:
            return None if self.params is None else 4 * self.params.numel()

    def refuse_values(self, update: Update, now: float):
        """A Merge stream was stopped at a value that is not finite (orchestrator.ingest.ValueCheck; the
        update's ``values`` are None, ``declared_numel`` what its header declared): refuse it as an update
        that arrived whole with such a value, with the same checks before, events and consequences
        (validate_update judges it as carrying what it declared: its length first, then ``non_finite``).
        Always raises Refused."""
        site, rnd = update.site, update.round
        with self._cond:
            if self.is_async:
                lane = self.lanes[0]
                self._admit_async(update)
                decision = self._judge(lane, update, math.nan, self.cfg.max_update_norm_ratio)
                self.events.emit("merge_refused", site=site, round=rnd, action=decision.action, reason=decision.reason)
                raise Refused(Outcome.INVALID_UPDATE, f"{decision.action}: {decision.reason}", round=rnd, site=site)
            lane = self._lane_of(update)
            decision = self._judge(lane, update, math.nan, None if update.ring else self.cfg.max_update_norm_ratio)
            self._refuse_values(lane, update, decision, now)

    # ---- the synchronous pipeline (called with the lock held) ----
    def _validate(self, lane: Lane, update: Update, now: float) -> float:
        """Stage 0: the update's values may count (rounds.validate_update); returns its L2 norm.

        A refused update changes nothing but this: a ``merge_refused`` event, and when it was the
        site's contribution to the round being collected, the site leaves that round (a ``failure``,
        as a dropped site; it may rejoin) so that the round goes on with the others, and may commit now.
        """
        if update.values is None:  # a ring acknowledgement carries no values
            return 0.0
        ring = update.ring  # a ring's mean is not an update of one site: no norm bound, no history
        decision, norm = self._check_values(lane, update, ratio=None if ring else self.cfg.max_update_norm_ratio)
        if decision:
            return norm
        self._refuse_values(lane, update, decision, now)

    def _refuse_values(self, lane: Lane, update: Update, decision: Decision, now: float):
        """The refusal of an update's values (see _validate); raises Refused."""
        site, rnd = update.site, update.round
        self.events.emit("merge_refused", site=site, round=rnd, action=decision.action, reason=decision.reason,
                         fragment=lane.index)
        lane.state, dropped = refuse_update(lane.state, site, rnd, decision.action)
        if dropped.action == "drop":
            self.dropped.setdefault(site, (now, rnd))
            self.events.emit("failure", what="site", target=site, happened_t=now, detected_t=now,
                             reason=decision.reason, round=rnd, fragment=lane.index)
            self._advance(lane, now)
        raise Refused(Outcome.INVALID_UPDATE, f"{decision.action}: {decision.reason}", round=rnd, site=site)

    def _check_values(self, lane: Lane, update: Update, ratio: float | None) -> tuple[Decision, float]:
        """validate_update on the update's values; the norm is the one computed as they arrived
        (orchestrator.ingest.Received), else computed here."""
        values = update.values
        if values.dtype != torch.float32:
            norm = math.nan
        else:
            norm = getattr(update, "norm", None)
            if norm is None:
                norm = self._norm(values)
        scale = self.norm_scale(update.round, lane.index)
        if scale != 1.0 and math.isfinite(norm):  # the bound and its history compare lr-free norms
            norm = norm / scale
        return self._judge(lane, update, norm, ratio, scale), norm

    def norm_scale(self, rnd: int, fragment: int = 0) -> float:
        """How large round ``rnd``'s pseudo-gradients are expected to be relative to H steps at the peak inner
        learning rate: the inner schedule's factors summed over the steps the update covers, over H (a
        pseudo-gradient is the sum of its inner updates, each proportional to its learning rate). Streaming's
        fragment f syncs at step r·H + (f+1)·H/P (geotrain.worker.algorithms.streaming), covering the H steps
        before (fewer in round 0). Norms are divided by it before the norm bound and its history see them, so
        that the warmup's growing updates are not taken for an attack (seen: a streaming run's honest round-1
        fragments refused at 10.3x the round-0 ones), nor the decay's shrinking ones let a larger one through.
        1 without a schedule, and for ddp (its updates are raw gradients)."""
        sched, H = self.cfg.inner_schedule, self.cfg.inner_steps
        if sched is None or self.cfg.algorithm == "ddp" or (sched["kind"] == "constant" and not sched["warmup_steps"]):
            return 1.0
        from geotrain.schedule import lr_factor

        P = max(1, self.cfg.fragments)
        end = (max(0, rnd) * P + fragment + 1) * H // P
        start = max(0, end - H)
        return max(1e-6, sum(lr_factor(k, **sched) for k in range(start, end)) / H)

    def _judge(self, lane: Lane, update: Update, norm: float, ratio: float | None, scale: float = 1.0) -> Decision:
        """rounds.validate_update for ``update`` with L2 norm ``norm`` (values None: a stream stopped
        early, judged as carrying what it declared)."""
        values = update.values
        expected = None  # no model yet (ddp before InitModel): the length cannot be checked
        if self.params is not None:
            expected = len(range(self.params.numel())[self._slice(lane)])
        if values is None:
            dtype, received = "float32", update.declared_numel
        else:
            dtype, received = str(values.dtype).removeprefix("torch."), values.numel()
        declared = update.declared_numel if update.declared_numel >= 0 else received
        what = "" if scale == 1.0 else (f"update from {update.site!r} for round {update.round} (its L2 norm over the "
                                         f"round's mean inner-lr factor {scale:.3g})")
        return validate_update(update.site, update.round, dtype=dtype, expected_numel=expected,
                               declared_numel=declared, received_numel=received, norm=norm,
                               history=lane.norms, ratio=ratio, what=what)

    def _admit(self, lane: Lane, update: Update, now: float, norm: float = 0.0) -> None:
        """Stage 1: the update's round and mode may take it; it is recorded as arrived. A refused update
        leaves nothing behind: the round's record (its mode, a ring abandoned) changes only once
        rounds.admit accepted it (judged on the round as abandoning the ring would leave it)."""
        site, rnd = update.site, update.round
        mode = merge_mode(lane.mode(rnd), update.ring, rnd, lane.state.round)
        if mode.action == "ring_abandoned":
            raise Refused(Outcome.RING_ABANDONED, f"ring_abandoned: {mode.reason}", round=rnd, site=site)
        state = lane.state if mode.action != "abandon_ring" else replace(lane.state, arrived={})
        decision = admit(state, site, rnd)
        if not decision:
            self.events.emit("merge_refused", site=site, round=rnd, action=decision.action, reason=decision.reason,
                             fragment=lane.index)
            raise Refused(_REFUSED[decision.action], f"{decision.action}: {decision.reason}", round=rnd, site=site)
        if mode.action == "abandon_ring":
            self._abandon_ring(lane, rnd, site)
        else:
            lane.record(rnd).mode = mode.action
        lane.state = record_arrival(lane.state, site, now)
        if update.ring:
            lane.updates[site] = update.values
            lane.claims[site] = update.claimed_crc32
        else:
            lane.pending_norms[site] = norm
            if self.running_sum:  # the sites that may still send this round: the rest of the expected
                lane.sum.add(site, update.values, lane.state.expected - set(lane.state.arrived),
                             owned=getattr(update, "owned", False))
            else:
                lane.updates[site] = update.values

    def _await(self, lane: Lane, update: Update, attempt: int, is_active) -> CommitResult | None:
        """Block until round ``update.round`` has a result, failed, or dropped this site's ring update."""
        site, rnd = update.site, update.round
        while True:
            record = lane.log.get(rnd)
            if record is not None and record.result is not None:
                return record.result
            if lane.attempt != attempt:
                raise Refused(Outcome.ROUND_FAILED, f"round_failed: {lane.last_failure}", round=rnd, site=site)
            if record is not None and site in record.abandoned:
                record.abandoned.discard(site)
                raise Refused(Outcome.RING_ABANDONED, f"ring_abandoned: a site merged round {rnd} through the star",
                              round=rnd, site=site)
            if record is not None and record.failed is not None:
                raise Refused(Outcome.ROUND_FAILED, f"round_failed: {record.failed}", round=rnd, site=site)
            if not is_active():
                return None
            self._cond.wait(timeout=0.2)
            self._advance(lane, self.clock())

    def _advance(self, lane: Lane, now: float) -> None:
        """Stages 2-7 for the round ``lane`` collects: commit it if it is ready. Nothing commits while the
        last commit is being made durable (the next outer step writes the momentum it persists): the end
        of that calls this again for every lane."""
        if self._job is not None or self.fenced or self.failed is not None:
            return
        ready = round_ready(now, lane.state, self.cfg.round_timeout_s, self.cfg.min_sites, self.cfg.quorum,
                            self.cfg.quorum_grace_s)
        if ready.action == "wait":
            return
        rnd = lane.state.round
        ring = lane.mode(rnd) == "ring"
        if ready.action == "timeout":
            if ring:
                self._abandon_ring(lane, rnd, "deadline")
            else:
                self._fail_attempt(lane, ready)
            return
        t0 = self.clock()
        mean = self._aggregate(lane, ready, ring)
        if mean is None:
            return
        step = self._outer_step(lane, mean, ring)
        if step is None:
            return
        arrived = lane.state.arrived
        self._next_round(lane, ready)
        job = self._record_result(lane, step, ring, arrived, t0)
        self._job = job
        threading.Thread(target=self._make_durable, args=(job,), name=f"durable-{rnd}", daemon=True).start()

    def _make_durable(self, job: "_Durable") -> None:
        """Stage 8, in its own thread, without the lock (the round's waiters are streaming its answer meanwhile):
        persist the state, publish the run state (fenced), then the commit event, the checkpoint, and the answer's
        last message let go. What it writes stays as it is until it is done: the committed parameters are never
        written in place, and the momentum only by the next outer step, which waits for it (_advance)."""
        t1 = self.clock()
        failed, published = None, True
        try:
            if self.store is not None and job.state is not None:
                self.store.save(job.state)
        except Exception as exc:  # noqa: BLE001 -- disk full, I/O error: the round must not reach anyone
            failed = f"coordinator epoch {self.cfg.epoch} could not persist its state after round {job.round}: {exc}"
        t2 = self.clock()
        if failed is None:
            try:
                published = self.on_commit is None or self.on_commit(job.round, job.version) is not False
            except Exception as exc:  # noqa: BLE001
                failed = f"coordinator epoch {self.cfg.epoch} could not publish round {job.round}: {exc}"
        t3 = self.clock()
        digest = {}
        if failed is None and published:
            digest = self._digest(job.digest_of, job.round, job.fragment, job.version, self._job_squares)
        with self._cond:
            try:
                record = job.record
                if failed is not None:
                    self.failed = record.failed = failed
                    self.events.emit("failure", what="coordinator", target="coordinator", happened_t=t2,
                                     detected_t=t3, reason=failed, round=job.round)
                elif not published:
                    self.fenced = True
                    record.failed = f"coordinator epoch {self.cfg.epoch} was fenced off by a newer coordinator"
                    self.events.emit("fenced", round=job.round, epoch=self.cfg.epoch)
                else:
                    self.events.emit("commit", **job.event, **digest, apply_s=round(self.clock() - job.t0, 6),
                                     persist_s=round(t2 - t1, 6), publish_s=round(t3 - t2, 6))
                    # ddp's digest is of the mean gradient; its global model is the validated initial one, unchanged
                    self.maybe_checkpoint(model_finite=digest["finite"] or self.cfg.algorithm == "ddp")
                record.durable = failed is None and published
            finally:
                self._job = None
                for lane in self.lanes:
                    self._advance(lane, self.clock())
                self._cond.notify_all()

    def _fail_attempt(self, lane: Lane, ready: Decision) -> None:
        """Too few sites before the deadline: this attempt fails, the round reopens for a retry."""
        lane.attempt += 1
        lane.last_failure = ready.reason
        lane.reopen()
        self.events.emit("round_failed", round=lane.state.round, reason=ready.reason, fragment=lane.index,
                         attempt=lane.attempt)
        self._cond.notify_all()

    def _aggregate(self, lane: Lane, ready: Decision, ring: bool) -> torch.Tensor | None:
        """The round's mean update (None: a ring round that cannot commit went back to the star)."""
        if not ring:
            if not self.running_sum:
                return self.aggregate(lane.updates)
            if lane.sum.sites() != set(lane.state.arrived):
                raise RuntimeError(f"round {lane.state.round}: the running sum holds {sorted(lane.sum.sites())}, "
                                   f"the round's arrivals are {sorted(lane.state.arrived)}")
            return lane.sum.mean()
        rnd = lane.state.round
        means = [u for u in lane.updates.values() if u is not None]
        decision = ring_commit(rnd, ready, tuple(transport.fingerprint(m) for m in means),
                               frozenset(lane.claims.values()))
        if not decision:
            self.events.emit("round_failed", round=rnd, reason=decision.reason)
            self._abandon_ring(lane, rnd, "coordinator")
            return None
        return means[0]

    def _outer_step(self, lane: Lane, mean: torch.Tensor, ring: bool) -> CommitResult | None:
        """Apply the outer step; the result says what travels back (its version and plan come at commit)."""
        rnd = lane.state.round
        if self.cfg.algorithm == "ddp":
            return CommitResult(kind="grad", round=rnd, version=0, crc32=0, values=mean, fragment=lane.index)
        if self.params is None:
            lane.record(rnd).failed = "no global model to apply the outer step to"
            self._cond.notify_all()
            return None
        sl = self._slice(lane)
        new = self.outer.step(self.params, mean, sl, round=rnd)
        self.buffers.retire(mean)  # spent (the pool hands it out again once nothing holds it)
        old = self.params
        if ring:  # every leader computed the same outer step itself: only the fingerprint travels
            self.params = new
            self.buffers.retire(old)
            return CommitResult(kind="ring_commit", round=rnd, version=0, crc32=0, values=torch.zeros(0),
                                params_crc32=transport.fingerprint(self.params), fragment=lane.index)
        if self.cfg.codec == "fp32":
            self.params = new
            self.buffers.retire(old)
            return CommitResult(kind="params", round=rnd, version=0, crc32=0, values=self.params[sl], fragment=lane.index)
        # send the change, compressed; apply exactly what the sites will apply
        encoded = self.down.encode((new[sl] - old[sl]).contiguous(), key=lane.index)
        self.buffers.retire(new)
        self.params = self.buffers.take(old.numel()).copy_(old)
        self.params[sl] += decode(encoded)
        self.buffers.retire(old)
        return CommitResult(kind="delta", round=rnd, version=0, crc32=0, encoded=encoded, fragment=lane.index)

    def _next_round(self, lane: Lane, ready: Decision) -> None:
        """The round is committed: silent sites leave the membership, joiners come in, the version grows."""
        rnd, arrived = lane.state.round, lane.state.arrived
        dropped = leaving(lane.state, ready)
        if ready.action == "commit_quorum":
            late = sorted(lane.state.expected - set(arrived))
            self.events.emit("quorum_commit", round=rnd, sites=sorted(arrived), late=late, reason=ready.reason,
                             fragment=lane.index)
        now = self.clock()
        lane.state = next_round(lane.state, dropped, now)
        lane.log.prune(lane.state.round)
        self.version += 1
        for site in sorted(dropped):
            self.dropped[site] = (now, rnd)
            self.events.emit("failure", what="site", target=site, happened_t=min(arrived.values()), detected_t=now,
                             reason=ready.reason)

    def _record_result(self, lane: Lane, step: CommitResult, ring: bool, arrived: dict[str, float],
                       t0: float) -> "_Durable":
        """The round's one result, for every waiter, and its answer's stream, whose last message waits for the
        round to be durable; returns what making it durable needs (_make_durable)."""
        rnd = step.round
        ring_round = 0
        if self.cfg.rings and ring:
            self.ring_failures = 0
        elif self.cfg.rings:
            ring_round = self._plan_rings(lane, rnd, frozenset(arrived))
        lane.remember_norms([lane.pending_norms[s] for s in sorted(lane.pending_norms)], self.cfg.norm_history)
        lane.clear()
        version = self.version if len(self.lanes) == 1 else lane.state.round
        answer = replace(step, version=version, ring_round=ring_round)
        stream = answer_stream(answer)  # the answer every waiting site gets, serialized once below
        if answer.kind in ("params", "grad"):  # it carries the fingerprinted values themselves: one CRC32 pass
            crc = stream.crc32
        else:  # the weights every site now holds (streaming: of this fragment)
            crc = transport.fingerprint(self.params[self._slice(lane)] if len(self.lanes) > 1 else self.params)
        record = lane.record(rnd)
        record.result = replace(answer, crc32=crc)
        record.wire = transport.SharedStream(stream, gate=lambda: self._gate(record))
        extra = {"merge": "ring" if ring else "star"} if self.cfg.rings else {}
        event = dict(round=rnd, version=self.version, sites=sorted(arrived), crc32=crc, epoch=self.cfg.epoch,
                     fragment=lane.index, **extra, wait_s=round(t0 - min(arrived.values()), 6),
                     answer_s=round(self.clock() - t0, 6))
        self._cond.notify_all()
        state = self._state()
        if state is not None:  # the event goes with the state: a restart writes it if the process died before it did
            state.commit = event
        return _Durable(record=record, round=rnd, version=self.version, fragment=lane.index, state=state,
                        digest_of=step.values if self.cfg.algorithm == "ddp" else self.params, event=event, t0=t0)

    def _gate(self, record) -> None:
        """Before a waiter's last message of ``record``'s answer: block until the round is durable."""
        with self._cond:
            self._await_durable(record)

    def _plan_rings(self, lane: Lane, rnd: int, arrived: frozenset[str]) -> int:
        """Round ``rnd`` was merged through the star: do the leaders rebuild their rings for the next
        round (rounds.ring_reform)? Returns that round, or 0."""
        decision = ring_reform(rnd, sites=frozenset(self.cfg.sites), arrived=arrived, next_expected=lane.state.expected,
                               failures=self.ring_failures, abandoned_at=self.ring_abandoned_at)
        if decision.action != "ring":
            return 0
        lane.record(rnd).ring_next = rnd + 1
        self.events.emit("ring_reform", round=rnd + 1, reason=decision.reason)
        return rnd + 1

    def _abandon_ring(self, lane: Lane, rnd: int, by: str) -> None:
        """The ring of round ``rnd`` broke (a star update, the deadline, or an inconsistent ring round):
        the round is merged through the star; the sites whose ring update is dropped are told."""
        if self.ring_abandoned_at != rnd:
            self.ring_failures += 1
            self.ring_abandoned_at = rnd
        dropped = set(lane.state.arrived)
        record = lane.record(rnd)
        record.mode = "star"
        record.abandoned = dropped
        lane.reopen()
        self.events.emit("ring_abandoned", round=rnd, by=by, dropped=sorted(dropped))
        self._cond.notify_all()

    # ---- asynchronous DiLoCo ----
    def _merge_async(self, update: Update) -> CommitResult:
        """Apply one site's update at once and answer with the new global parameters."""
        site = update.site
        with self._cond:
            self._admit_async(update)
            lane = self.lanes[0]
            valid, norm = self._check_values(lane, update, self.cfg.max_update_norm_ratio)
            if not valid:
                self.events.emit("merge_refused", site=site, round=update.round, action=valid.action,
                                 reason=valid.reason)
                raise Refused(Outcome.INVALID_UPDATE, f"{valid.action}: {valid.reason}", round=update.round, site=site)
            lane.remember_norms([norm], self.cfg.norm_history)
            w = async_weight(self.cfg.staleness_weight, self.version, update.version, len(self.cfg.sites))
            t0 = self.clock()
            self.params = self.async_outer.step(self.params, update.values, w.weight, version=self.version)
            rnd = self.version
            self.version += 1
            self.site_merges[site] = self.site_merges.get(site, 0) + 1
            self.lanes[0].state = RoundState(round=self.version, expected=self.state.expected)
            crc = transport.fingerprint(self.params)
            digest = self._digest(self.params, rnd, 0, self.version)
            event = dict(round=rnd, version=self.version, sites=[site], staleness=w.staleness,
                         weight=round(w.weight, 6), crc32=crc, epoch=self.cfg.epoch, **digest, wait_s=0.0)
            if self.store is not None:  # with its event: a restart writes it if this process dies before it does
                state = self._state()
                state.commit = event
                self.store.save(state)
            self.events.emit("commit", **event, apply_s=round(self.clock() - t0, 6))
            if self.on_commit is not None and self.on_commit(rnd, self.version) is False:
                self.fenced = True
                raise Refused(Outcome.FENCED, FENCED_MESSAGE, round=rnd, site=site)
            self.maybe_checkpoint(model_finite=digest["finite"])
            self._cond.notify_all()
            return CommitResult(kind="params", round=rnd, version=self.version, crc32=crc, values=self.params,
                                staleness=w.staleness)

    def _admit_async(self, update: Update) -> None:
        """An async update may be applied (not fenced; rounds.admit_async); raises Refused."""
        site = update.site
        if self.fenced:
            raise Refused(Outcome.FENCED, FENCED_MESSAGE, round=update.round, site=site)
        decision = admit_async(site, update.round, sites=frozenset(self.cfg.sites),
                               applied=self.site_merges.get(site, 0), has_model=self.params is not None)
        if not decision:
            if decision.action == "duplicate":
                self.events.emit("merge_refused", site=site, round=update.round, action=decision.action,
                                 reason=decision.reason)
            raise Refused(_REFUSED[decision.action], f"{decision.action}: {decision.reason}", round=update.round,
                          site=site)

    # ---- shared by both pipelines (lock held) ----
    def _digest(self, values: torch.Tensor | None, rnd: int, fragment: int, version: int,
                squares: Squares | None = None) -> dict:
        """The commit event's digest of the global model (ddp: of the mean gradient): ``finite`` (every
        value is) and ``norm`` (L2, 6 significant digits; None when not finite). One pass over the values,
        in float32 (``torch.linalg.vector_norm``: a digest, on the commit's critical path); only when that
        overflows is the norm summed in float64 (ingest.l2_norm), so that a finite model is never called
        non-finite. A model that is not finite is never hidden: a ``model_nonfinite`` event says so."""
        if values is None:
            return {}
        norm = float(torch.linalg.vector_norm(values)) if values.dtype == torch.float32 else math.nan
        if not math.isfinite(norm):
            norm = l2_norm(values, squares or self._squares)
        finite = math.isfinite(norm)
        if not finite:
            self.events.emit("model_nonfinite", round=rnd, version=version, fragment=fragment,
                             reason=f"the global model after round {rnd} has a non-finite value")
        return {"finite": finite, "norm": float(f"{norm:.6g}") if finite else None}

    def replay_commit(self, event: dict) -> None:
        """Write ``event``, the commit of the round this coordinator resumed at, whose own event its predecessor
        never wrote (killed between persisting the round and writing it: orchestrator.persist), with the digest
        of the resumed parameters, which are that round's result (ddp: none; its digest is of the mean gradient, gone)."""
        digest = {} if self.cfg.algorithm == "ddp" else self._digest(
            self.params, event.get("round", 0), event.get("fragment", 0), event.get("version", 0))
        self.events.emit("commit", **{**event, **digest, "replayed": True})

    def _norm(self, values: torch.Tensor) -> float:
        return l2_norm(values, self._squares)

    def _slice(self, lane: Lane) -> slice:
        if len(self.lanes) == 1:
            return slice(None)
        return fragment_slices(self.params.numel(), len(self.lanes))[lane.index]

    def _state(self) -> CoordinatorState | None:
        """What the state store keeps of this coordinator now (None: no store)."""
        if self.store is None:
            return None
        momentum = self.async_outer.buf if self.is_async else self.outer.buf
        return CoordinatorState(round=self.state.round, params=self.params, momentum=momentum, epoch=self.cfg.epoch,
                                members=tuple(sorted(self.state.expected)),
                                lane_rounds=tuple(l.state.round for l in self.lanes) if len(self.lanes) > 1 else (),
                                version=self.version, site_merges=dict(self.site_merges) if self.is_async else None,
                                pending=self.async_outer.acc if self.is_async else None,
                                pending_count=self.async_outer.count if self.is_async else 0)

    def maybe_checkpoint(self, model_finite: bool) -> None:
        """The coordinator's checkpoint part every N rounds; ``model_finite`` is the commit digest's verdict."""
        every = self.cfg.checkpoint_every
        if self.checkpoints is None or not every or self.params is None or len(self.lanes) > 1 or self.is_async:
            return  # streaming and async runs checkpoint for restarts (the state store), not for exact resume
        if self.version % every:
            return
        if not model_finite:  # never a resume point (model_nonfinite said why)
            self.events.emit("checkpoint_failed", round=self.version, part=COORDINATOR_PART,
                             reason="the global model is non-finite: not checkpointed")
            return
        # Under the engine's lock, before the round's waiters get their answer: no model-sized allocation here.
        # The committed parameters are never written in place (every outer step makes a new tensor): written as
        # they are. The momentum is (the next outer step): its copy goes into a pooled, resident buffer, retired
        # at once (the pool hands it out again only once the writer has let go of it).
        tensors = {"model": {"params": self.params}}
        momentum = None
        if self.outer.buf is not None:
            momentum = self.buffers.take(self.outer.buf.numel()).copy_(self.outer.buf)  # both flat
            tensors["outer"] = {"momentum": momentum}
        self.checkpoints.submit(self.version, tensors, {"round": self.version, "epoch": self.cfg.epoch,
                                                        "members": sorted(self.state.expected)}, copy=False)
        self.buffers.retire(momentum)


@dataclass
class _Durable:
    """A commit being made durable (CoordinatorEngine._make_durable): its record, its state, its commit event."""

    record: object
    round: int
    version: int
    fragment: int
    state: CoordinatorState | None
    digest_of: torch.Tensor | None
    event: dict
    t0: float


def answer_stream(result: CommitResult) -> transport.Stream:
    """The stream that carries ``result`` back to a site (its payload, header and CRC32s)."""
    return transport.Stream(result.values, site="coordinator", round=result.round, kind=result.kind,
                            version=result.version, encoded=result.encoded, fragment=result.fragment,
                            staleness=result.staleness, params_crc32=result.params_crc32,
                            ring_round=result.ring_round)
