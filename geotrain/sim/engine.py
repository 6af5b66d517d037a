"""A discrete-event simulation of a run: the same topology, the coordinator's own decisions, simulated time.

Nothing here re-implements a rule of the coordinator or the launcher. Rounds are admitted, recorded and
judged ready by geotrain.orchestrator.rounds (``admit``, ``record_arrival``, ``round_ready`` with its
deadline, ``min_sites``, quorum and grace, ``leaving``, ``join``, ``next_round``; async: ``admit_async``,
``async_weight``); a dead site's fate is geotrain.run.supervise.on_exit's; faults come from the
topology's schedule and from geotrain.run.fault_rate.FaultDraws; bytes cross the links on the link
emulator's own model (geotrain.wan.shaping.Direction: the shared bottleneck, latency, jitter, loss and the
Mathis bound), driven with simulated time instead of the clock.

What is modelled, per site: ``startup_s``, then inner steps of ``step_s[site]`` each (``standby_slowdown``
times that while the site's warm standbys import: from ``standby_after_s`` after its first step in each
life ends, for ``standby_warm_s``; a run of steps that crosses the window's edge ends where the two rates say); every H steps (a
whole-model merge; streaming: one fragment every H/P steps, needed back ``overlap_steps`` later; ddp: every
step, its gradient) the leader's update crosses its link up, the coordinator decides, its answer crosses
back, plus the site's ``overhead_s``. Killed sites are back after ``restart_s`` and rejoin where ``join``
says; a frozen site stops for the fault's duration; a partitioned link holds its bytes until it heals.

Ring merges (``training.merge: ring``): the leaders reduce-scatter and all-gather over the site-to-site
links (2(N-1) steps of 1/N of the payload on every ring edge, on the emulator's model), the uploader
(geotrain.wan.merge_plan.uploader) uploads the mean and the others a CRC32; the coordinator decides with
``merge_mode``, ``admit``, ``round_ready`` and ``ring_commit``; a site that dies breaks the ring and its
round goes through the star; ``ring_reform`` says when the rings are rebuilt (its backoff included).

A dead site does not hold the round up (fail-fast): a killed worker is reported at once and a frozen leader's
etcd lease lapses ``heartbeat_ttl_s`` into its freeze; the watch declares it dead one ``heartbeat_ttl_s`` later
(orchestrator.membership's grace: an etcd outage is not taken for deaths); both go through ``rounds.lose``; a
restarted site joins where ``rounds.join`` says with the simulated time (its window, ``run_done``), a
``join_next`` waiting for that version's commit before it fetches the model.

A killed coordinator (``kill`` of ``coordinator``, or fault_rate's ``kill_coordinator``): its fate is
``supervise.on_exit``; it is back after ``coordinator_restart_s`` with what it persisted (the committed
rounds; the open round's arrivals are lost), and every site whose merge was cut retries on the worker's
own rule (geotrain.worker.retry.next_action: backoff 0.2, 0.4, ... 2 s, until ``retry_deadline_s``), its
update crossing the link again. A ddp worker does not retry (a lost step cannot be redone): it dies and
its site restarts.

Not modelled: the loss (no training happens), hierarchical merges (refused), an etcd failure (refused),
a coordinator killed in a ring or streaming run (refused). The history is written as the real events
(docs/events.md), so that summary.json, ``geotrain report`` and ``geotrain check`` read it alike.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
from dataclasses import dataclass, field, replace
from typing import Callable

from geotrain.config.schema import Topology
from geotrain.errors import TopologyError
from geotrain.orchestrator import rounds
from geotrain.run.fault_rate import FaultDraws
from geotrain.run.supervise import on_exit
from geotrain.sim.model import SimParams
from geotrain.wan.merge_plan import ring_plan, uploader
from geotrain.wan.shaping import Direction, LinkParams
from geotrain.wire.outcomes import Outcome
from geotrain.worker.retry import Retry, next_action

ACK_BYTES = 64
"""A ring leader's CRC32 claim (and the coordinator's ring answer): a few bytes on the wire."""


def unsupported(topo: Topology) -> str | None:
    """Why this topology cannot be simulated, or None."""
    tr = topo.training
    if tr.merge == "hierarchical":
        return "training.merge: hierarchical merges are not simulated yet; simulate the star or a ring"
    coordinator_dies = (topo.fault_rate is not None and "kill_coordinator" in topo.fault_rate.kinds) or \
        any(f.target == "coordinator" for f in topo.faults)
    if coordinator_dies and (tr.merge != "star" or tr.algorithm == "streaming-diloco"):
        what = f"merge: {tr.merge}" if tr.merge != "star" else "streaming-diloco"
        return f"faults: a coordinator failure in a {what} run is not simulated yet (star diloco, async and ddp are)"
    for i, f in enumerate(topo.faults):
        if f.target.startswith("etcd"):
            return f"faults[{i}]: a failure of the {f.target} is not simulated yet"
        if f.target == "coordinator" and f.kind != "kill":
            return f"faults[{i}].kind: {f.kind} of the coordinator is not simulated yet (kill is)"
        if f.kind not in ("kill", "freeze", "partition"):
            return f"faults[{i}].kind: {f.kind} is not simulated yet (kill, freeze and partition are)"
        if f.at_step is not None:
            return f"faults[{i}].at_step: not simulated yet; give `at` (a time) or `at_round`"
    return None


@dataclass
class Site:
    name: str
    step_s: float
    overhead_s: float
    round: int = 0  # whole-model rounds done (async: own merges)
    step: int = 0
    alive: bool = True
    epoch: int = 0  # bumped when killed: callbacks of an older life are ignored
    frozen_until: float = 0.0
    pending: dict = field(default_factory=dict)  # streaming: fragment round -> step it is needed back
    done: bool = False
    restarts: int = 0
    version: int = 0
    busy: bool = False  # inner steps are scheduled or running
    block: tuple | None = None  # (token, start, steps, end) of the inner steps running
    frozen_in: dict = field(default_factory=dict)  # step of the block -> seconds it was frozen (counted in it)
    inflight: dict = field(default_factory=dict)  # fragment -> (token, round, sent_at) of a merge not yet answered
    base_step_s: float = 0.0  # its steady step; step_s is the running block's (slower while standbys import)
    fresh: bool = False  # (re)started: its first step starts its standbys' window
    warm: tuple = (0.0, 0.0)  # [from, until) its standbys import
    compute_s: float = 0.0
    took: list | None = None  # each step's time in the running block, where the standby window makes them differ
    eval_round: int = 0  # the evaluating site: the round its model was last evaluated at
    eval_due: float = 0.0  # the evaluating site: an eval to run before its next step (counted in that step)


class Simulator:
    def __init__(self, topo: Topology, params: SimParams, seed: int = 0, step_events: str = "each"):
        """``step_events``: ``each`` writes one ``inner_step`` event per step (as a real run does); ``round``
        one per run of steps between two merges (``steps``: how many; ``compute_s`` their sum): the same
        utilisation and goodput, a fraction of the events, for very large simulations."""
        problem = unsupported(topo)
        if problem:
            raise TopologyError(problem)
        self.topo, self.p, self.tr = topo, params, topo.training
        self.step_events = step_events
        self.events: list[dict] = []
        self.now = 0.0
        self._q: list = []
        self._seq = itertools.count()
        self._rng = random.Random(seed)
        self.hub = topo.coordinator.at
        self.sites = {s.name: Site(s.name, params.step_s[s.name], params.overhead_s.get(s.name, 0.0),
                                   base_step_s=params.step_s[s.name]) for s in topo.sites}
        self.workers = {s.name: s.world_size for s in topo.sites}
        self.standbys = topo.recovery.warm_standby and params.standby_warm_s > 0 and params.standby_slowdown != 1.0
        self.links: dict[str, tuple[Direction, Direction]] = {}
        for s in topo.sites:
            spec = topo.link(s.name, self.hub)
            if spec is not None:
                fwd, bwd = self._direction(f"{s.name}->{self.hub}", spec), self._direction(f"{self.hub}->{s.name}", spec)
                fwd.peer, bwd.peer = bwd, fwd
                self.links[s.name] = (fwd, bwd)
        self.up_bytes, self.down_bytes = params.merge_bytes(topo)
        self.ddp = self.tr.algorithm == "ddp"
        self.fragments = self.tr.streaming.fragments if self.tr.algorithm == "streaming-diloco" else 1
        names = frozenset(self.sites)
        self.lanes = [rounds.RoundState(expected=names) for _ in range(self.fragments)]
        self.version = 0
        self.site_merges = {n: 0 for n in self.sites}
        self.quorum = self.tr.quorum
        self.sent: dict[tuple[int, int, str], float] = {}  # (fragment, round, site) -> when its update left
        self.round_faults: list = []
        self._active: dict[str, float] = {}  # fault target -> until when a freeze or partition holds it
        self._joiners: list[tuple[int, Site, int]] = []  # (version it starts from, site, epoch): GetModel waits
        self.sync_lanes = self.tr.algorithm in ("diloco", "streaming-diloco")  # member_lost applies (engine)
        self.remaining = len(self.sites)
        self.failed: str | None = None
        self._deadline_set: set = set()  # (fragment, round, started_at) whose deadline wake-up is scheduled
        # the coordinator's own life
        self.coord_up, self.coord_epoch, self.coord_restarts = True, 1, 0
        # ring merges
        self.ring = self.tr.merge == "ring"
        self.ring_edges: dict[str, Direction] = {}  # site -> the edge to its successor
        self.ring_order: list[str] = []
        if self.ring:
            plan = ring_plan(topo)
            members = sorted((m for ms in plan.values() for m in ms if m.ring == "all"), key=lambda m: m.rank)
            self.ring_order = [m.site for m in members]
            for m in members:
                spec = topo.link(m.site, m.successor)
                if spec is not None:
                    self.ring_edges[m.site] = self._direction(f"{m.site}->{m.successor}", spec)
            self.uploader = uploader(topo)
        self.ring_at = 0  # rings (re)built for rounds >= ring_at while ring_ok (at_start: from round 0)
        self.ring_ok = self.ring
        self.ring_wait: dict[int, dict[str, tuple[Site, int]]] = {}  # round -> leaders at the ring
        self.ring_token = 0  # bumped when a ring breaks: an all-reduce in flight is void
        self.modes: dict[int, str] = {}  # round -> ring | star (rounds.merge_mode's record)
        self.ring_failures, self.ring_abandoned_at = 0, -1

    @staticmethod
    def _direction(label: str, spec) -> Direction:
        return Direction(label, LinkParams(spec.bandwidth_mbps, spec.latency_ms, spec.jitter_ms, spec.loss), spec.streams)

    # ---- the event loop ----
    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn, args))

    def emit(self, kind: str, proc: str, **fields) -> None:
        self.events.append({"t": round(self.now, 6), "event": kind, "proc": proc, **fields})

    def run(self) -> list[dict]:
        self.emit("run_started", "launcher", run=self.topo.name, topology_sha256=self.topo.digest(),
                  sites=self.topo.site_names, algorithm=self.tr.algorithm, simulated=True)
        self.emit("coordinator_started", "coordinator", sites=self.topo.site_names, epoch=1, round=0, resumed=False,
                  run=self.topo.name, topology_sha256=self.topo.digest(), simulated=True)
        init = self.p.init_bytes if self.p.init_bytes is not None else 4 * self.p.numel
        for i, s in enumerate(self.sites.values()):  # the first site provides the initial model, all fetch it
            self.at(self.p.startup_s, self._join, s, s.epoch, init, i == 0)
        self._schedule_faults()
        q = self._q
        collecting = gc.isenabled()
        gc.disable()  # millions of event dicts and no cycles: the cyclic collector's passes would grow with them
        try:
            while q and self.remaining and self.failed is None:
                t, _, fn, args = heapq.heappop(q)
                if t > self.now:
                    self.now = t
                fn(*args)
        finally:
            if collecting:
                gc.enable()
        self.now += self.p.shutdown_s
        done = not self.remaining
        self.emit("run_finished", "launcher", status="completed" if done else "failed",
                  reason=None if done else self.failed, simulated=True)
        self.events.sort(key=lambda e: e["t"])  # inner steps are written when their run of steps ends
        return self.events

    # ---- a site ----
    def _join(self, s: Site, epoch: int, init: int, provides: bool) -> None:
        if provides:
            self._transfer(s.name, 0, init, self._transfer, s.name, 1, init, self._ready, s, epoch)
        else:
            self._transfer(s.name, 1, init, self._ready, s, epoch)

    def _ready(self, s: Site, epoch: int) -> None:
        if epoch != s.epoch:
            return
        self.emit("site_ready", f"{s.name}/0", site=s.name, version=s.version, round=s.round, epoch=1)
        s.fresh = True
        self.at(self.now, self._compute, s, s.epoch)

    def _steps_ahead(self, s: Site) -> int:
        """How many inner steps run before the site next talks to the coordinator."""
        if self.ddp or self.fragments > 1:
            return 1
        H = self.tr.inner_steps
        return H - s.step % H

    def _compute(self, s: Site, epoch: int) -> None:
        """Take the inner steps up to the next merge (later if frozen)."""
        if epoch != s.epoch or s.done:
            return
        s.busy = True
        if self.now < s.frozen_until:
            self.at(s.frozen_until, self._compute, s, epoch)
            return
        if s.fresh:  # (re)started: the launcher starts the site's standbys once it has trained a step
            s.fresh = False
            if self.standbys:
                a = self.now + s.base_step_s + self.p.standby_after_s
                s.warm = (a, a + self.p.standby_warm_s)
                self.at(a, self._standbys, s, "standby_started", epoch)
                self.at(s.warm[1], self._standbys, s, "standby_ready", epoch)
        k = self._steps_ahead(s)
        tok = next(self._seq)
        due, s.eval_due = s.eval_due, 0.0  # an eval before the first step is in that step's time
        end = self._advance(s, self.now, k * s.base_step_s + due)
        s.step_s = (end - self.now) / k  # what a kill or a freeze in the block goes by
        s.took = None
        if due > 0 or end - self.now > k * s.base_step_s + 1e-12:  # steps that differ: each its own time
            t, s.took = self.now, []
            for i in range(k):
                t2 = self._advance(s, t, s.base_step_s + (due if i == 0 else 0.0))
                s.took.append(t2 - t)
                t = t2
        s.block = (tok, self.now, k, end)
        s.frozen_in = {}
        self.at(end, self._stepped, s, epoch, tok)

    def _advance(self, s: Site, t: float, work: float) -> float:
        """When ``work`` seconds of steady steps started at ``t`` end: ``standby_slowdown`` times slower inside the
        site's standby window."""
        if not self.standbys or s.warm[1] <= t:
            return t + work
        a, b = s.warm
        for edge, rate in ((a, 1.0), (b, 1.0 / self.p.standby_slowdown), (float("inf"), 1.0)):
            if t >= edge:
                continue
            can = (edge - t) * rate
            if can >= work:
                return t + work / rate
            work -= can
            t = edge
        return t

    def _emit_steps(self, s: Site, first: int, k: int, end: float) -> None:
        """Inner steps ``first+1 .. first+k``, the last ending at ``end``."""
        if k <= 0:
            return
        proc, now, frozen = f"{s.name}/0", self.now, s.frozen_in
        took = s.took
        ran = sum(took[:k]) if took is not None else k * s.step_s
        s.compute_s += ran + sum(frozen.values())
        if self.step_events == "round":
            self.now = end
            self.emit("inner_step", proc, site=s.name, step=first + k, round=s.round,
                      compute_s=round(ran + sum(frozen.values()), 9), wan_s=0.0, steps=k)
        else:
            t = end - ran - sum(frozen.values())
            for i in range(k):
                d = (took[i] if took is not None else s.step_s) + frozen.get(i, 0.0)  # a real step's compute_s is its wall time: a SIGSTOP counts
                t += d
                self.now = t
                self.emit("inner_step", proc, site=s.name, step=first + i + 1, round=s.round, compute_s=d, wan_s=0.0)
        self.now = now

    def _stepped(self, s: Site, epoch: int, tok: int) -> None:
        if epoch != s.epoch or s.block is None or s.block[0] != tok:
            return
        _, _, k, _ = s.block
        s.block = None
        s.busy = False
        self._emit_steps(s, s.step, k, self.now)
        s.step += k
        H = self.tr.inner_steps
        if self.fragments > 1:
            self._stream_step(s, epoch)
        elif self.ddp:
            self._send_up(s, epoch, s.step - 1, fragment=0)  # round = the step: its gradient
        elif s.step % H == 0:
            self._merge(s, epoch, s.round)
        else:
            self._compute(s, epoch)

    def _standbys(self, s: Site, kind: str, epoch: int) -> None:
        if epoch == s.epoch and not s.done:
            for i in range(self.workers[s.name]):
                self.emit(kind, "launcher" if kind == "standby_started" else "standby", name=f"worker {s.name}/{i}",
                          site=s.name, simulated=True)

    def _stream_step(self, s: Site, epoch: int) -> None:
        """Streaming DiLoCo: every H/P steps one fragment goes out; the site waits only when the answer of
        a fragment is not back ``overlap_steps`` steps after it left."""
        H, P = self.tr.inner_steps, self.fragments
        every = max(1, H // P)
        if s.step % every == 0:
            k = s.step // every - 1
            frag, frnd = k % P, k // P
            s.pending[(frag, frnd)] = s.step + self.tr.streaming.overlap_steps
            self._send_up(s, epoch, frnd, fragment=frag)
        self._continue_stream(s, epoch)

    def _continue_stream(self, s: Site, epoch: int) -> None:
        """Step on unless a fragment's answer is due and not back; done once every step is taken and answered."""
        s.round = s.step // self.tr.inner_steps
        self._note_round(s)
        if s.step >= self.tr.rounds * self.tr.inner_steps:
            if not s.pending:
                self._done_after_eval(s)
            return
        if not s.busy and not any(need <= s.step for need in s.pending.values()):
            self._compute(s, epoch)

    # ---- the WAN ----
    def _transfer(self, site: str, direction: int, nbytes: int, then: Callable, *args, start: float | None = None,
                  after: float = 0.0) -> None:
        """``nbytes`` over the site's link, leaving at ``start`` (default now); ``then`` ``after`` s past delivery."""
        link = self.links.get(site)
        start = self.now if start is None else start
        if link is None:  # the coordinator's own datacenter: no WAN
            self.at(start + after, then, *args)
            return
        self._send(link[direction], nbytes, then, *args, start=start, after=after)

    def _send(self, d: Direction, nbytes: int, then: Callable, *args, start: float | None = None,
              after: float = 0.0) -> None:
        start = self.now if start is None else start
        got = d.schedule(nbytes, start, self._rng)
        if got is None:  # partitioned: try again when it heals
            self.at(max(self.now, start) + 0.05, self._resend, d, nbytes, then, after, args)
            return
        d.bytes += nbytes
        self.at(got[0] + after, then, *args)

    def _resend(self, d: Direction, nbytes: int, then: Callable, after: float, args: tuple) -> None:
        self._send(d, nbytes, then, *args, after=after)

    def _merge(self, s: Site, epoch: int, rnd: int) -> None:
        """A whole-model merge: through the ring when the coordinator has the rings built, else the star."""
        if self.ring and self.ring_ok and rnd >= self.ring_at:
            self.ring_wait.setdefault(rnd, {})[s.name] = (s, epoch)
            self._ring_maybe_start(rnd)
        else:
            self._send_up(s, epoch, rnd, fragment=0)

    def _send_up(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None = None,
                 ring: bool = False) -> None:
        sent_at = self.now if sent_at is None else sent_at
        self.sent[(fragment, rnd, s.name)] = sent_at
        if not self.coord_up:  # the call fails at once: the worker's retry rule decides
            return self._cut(s, epoch, rnd, fragment, sent_at)
        tok = next(self._seq)
        s.inflight[fragment] = (tok, rnd, sent_at)
        nbytes = (self.up_bytes if s.name == self.uploader else ACK_BYTES) if ring else self.up_bytes // self.fragments
        self._transfer(s.name, 0, nbytes, self._arrive, s, epoch, rnd, fragment, sent_at, tok, ring)

    # ---- rings ----
    def _ring_maybe_start(self, rnd: int) -> None:
        waiting = self.ring_wait.get(rnd, {})
        if len(waiting) < len(self.ring_order):
            return
        self._ring_step(rnd, 0, self.ring_token)

    def _ring_step(self, rnd: int, k: int, token: int) -> None:
        """Step ``k`` of the 2(N-1) of the all-reduce: every leader sends 1/N of the payload to its successor."""
        if token != self.ring_token:  # the ring broke meanwhile
            return
        n = len(self.ring_order)
        if k >= 2 * (n - 1):
            return self._ring_done(rnd, token)
        piece = -(-self.up_bytes // n)
        end = self.now
        for name in self.ring_order:
            d = self.ring_edges.get(name)
            if d is None:
                continue
            got = d.schedule(piece, self.now, self._rng)
            if got is None:  # a ring edge cut: the ring breaks, the round goes through the star
                return self._break_ring(rnd, "link")
            d.bytes += piece
            end = max(end, got[0])
        self.at(end, self._ring_step, rnd, k + 1, token)

    def _ring_done(self, rnd: int, token: int) -> None:
        """Every leader holds the mean and applies the outer step; the uploader uploads it, the others a CRC32."""
        for name, (s, epoch) in sorted(self.ring_wait.pop(rnd, {}).items()):
            self.at(self.now + self.p.apply_s, self._send_up, s, epoch, rnd, 0, None, True)

    def _break_ring(self, rnd: int, by: str) -> None:
        """A leader died (or a ring link broke): the leaders at the ring send through the star instead."""
        if not self.ring_ok:
            return
        self.ring_ok = False
        self.ring_token += 1
        self.emit("ring_abandoned", "coordinator", round=rnd, by=by, dropped=[])
        for r, waiting in list(self.ring_wait.items()):
            for name, (s, epoch) in sorted(waiting.items()):
                if s.alive and epoch == s.epoch:
                    self._send_up(s, epoch, r, fragment=0)
        self.ring_wait.clear()

    # ---- the coordinator ----
    def _arrive(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float, tok: int, ring: bool = False) -> None:
        if epoch != s.epoch:  # the sender was killed: its stream was cut before the coordinator had it all
            return
        if s.inflight.get(fragment, (None,))[0] != tok:  # the coordinator died meanwhile: the site retries
            return
        if self.tr.algorithm == "async-diloco":
            return self._arrive_async(s, epoch, rnd, sent_at, tok)
        lane = self.lanes[fragment]
        if self.ring:
            mode = rounds.merge_mode(self.modes.get(rnd), ring, rnd, lane.round)
            if mode.action == "ring_abandoned":  # a ring update for a round the star merged: star it again
                self.emit("merge_refused", "coordinator", site=s.name, round=rnd, action=mode.action, reason=mode.reason)
                return self._send_up(s, epoch, rnd, fragment, sent_at)
            state = lane if mode.action != "abandon_ring" else replace(lane, arrived={})
        else:
            mode, state = None, lane
        decision = rounds.admit(state, s.name, rnd)
        if not decision:
            self.emit("merge_refused", "coordinator", site=s.name, round=rnd, action=decision.action,
                      reason=decision.reason, fragment=fragment)
            if decision.action == "stale":  # late for a quorum: fetch the committed version, go on
                self._answer(s, epoch, rnd, fragment, sent_at, tok, late=True)
            elif decision.action in ("unknown_site", "future"):  # dropped meanwhile: it rejoins
                self._rejoin(s, self.now, epoch, quiet=True)
            return
        if mode is not None:
            if mode.action == "abandon_ring":
                self._abandon(fragment, rnd, "star update")
                lane = self.lanes[fragment]
            self.modes.setdefault(rnd, "ring" if ring else "star")
        self.lanes[fragment] = lane = rounds.record_arrival(lane, s.name, self.now)
        self._on_arrival(fragment)

    def _on_arrival(self, fragment: int) -> None:
        """Ask round_ready when the answer may be other than wait: every expected site reported, or a quorum
        is reached (the deadline and the grace have their own wake-ups)."""
        lane = self.lanes[fragment]
        q = self.quorum
        if len(lane.arrived) >= len(lane.expected) or (q is not None and len(lane.arrived) >= q.min_sites):
            self._maybe_commit(fragment)
            lane = self.lanes[fragment]
        if lane.started_at is not None and (fragment, lane.round, lane.started_at) not in self._deadline_set:
            self._deadline_set.add((fragment, lane.round, lane.started_at))
            self.at(lane.started_at + self.tr.round_timeout_s + 1e-6, self._maybe_commit, fragment)
        if q is not None and len(lane.arrived) == q.min_sites and lane.started_at is not None:
            self.at(self.now + q.grace_s + 1e-6, self._maybe_commit, fragment)

    def _abandon(self, fragment: int, rnd: int, by: str) -> None:
        """The coordinator's _abandon_ring: the round starts over through the star; its ring updates dropped."""
        lane = self.lanes[fragment]
        if self.ring_abandoned_at != rnd:
            self.ring_failures += 1
            self.ring_abandoned_at = rnd
        dropped = sorted(lane.arrived)
        self.modes[rnd] = "star"
        self.lanes[fragment] = rounds.RoundState(round=lane.round, expected=lane.expected, joining=lane.joining)
        self.emit("ring_abandoned", "coordinator", round=rnd, by=by, dropped=dropped)
        self.ring_ok = False
        self.ring_token += 1
        for name in dropped:  # told: their ring update was dropped, they send through the star
            site = self.sites[name]
            self._send_up(site, site.epoch, rnd, fragment, self.sent.get((fragment, rnd, name)))

    def _maybe_commit(self, fragment: int) -> None:
        if not self.coord_up:
            return
        lane = self.lanes[fragment]
        q = self.quorum
        ready = rounds.round_ready(self.now, lane, self.tr.round_timeout_s, self.topo.recovery.min_sites,
                                   quorum=q.min_sites if q else None, grace_s=q.grace_s if q else 0.0)
        ring = self.ring and self.modes.get(lane.round) == "ring"
        if not ready:
            if ready.action == "timeout":
                if ring:
                    return self._abandon(fragment, lane.round, "deadline")
                self.emit("round_failed", "coordinator", round=lane.round, reason=ready.reason)
            return
        if ring:
            d = rounds.ring_commit(lane.round, ready, (1,), frozenset({1}))  # every leader claims the one mean
            if not d:
                self.emit("round_failed", "coordinator", round=lane.round, reason=d.reason)
                return self._abandon(fragment, lane.round, "coordinator")
        arrived = sorted(lane.arrived)
        dropped = rounds.leaving(lane, ready)
        self.lanes[fragment] = nxt = rounds.next_round(lane, dropped, self.now)
        self.version += 1
        extra = {"fragment": fragment} if self.fragments > 1 else {}
        if self.ring:
            extra["merge"] = "ring" if ring else "star"
        if ready.action == "commit_quorum":
            self.emit("quorum_commit", "coordinator", round=lane.round, sites=arrived,
                      late=sorted(lane.expected - set(arrived)), reason=ready.reason, **extra)
        for name in sorted(dropped):
            self.emit("failure", "coordinator", what="site", target=name, happened_t=min(lane.arrived.values()),
                      detected_t=self.now, reason=ready.reason)
        self.emit("commit", "coordinator", round=lane.round, version=self.version, sites=arrived,
                  epoch=self.coord_epoch, wait_s=round(self.now - (lane.started_at or self.now), 6),
                  apply_s=self.p.apply_s, finite=True, **extra)
        if self.ring:
            if ring:
                self.ring_failures = 0
            else:
                d = rounds.ring_reform(lane.round, sites=frozenset(self.sites), arrived=frozenset(arrived),
                                       next_expected=nxt.expected, failures=self.ring_failures,
                                       abandoned_at=self.ring_abandoned_at)
                if d.action == "ring":
                    self.ring_at, self.ring_ok = lane.round + 1, True
                    self.ring_token += 1
                    self.emit("ring_reform", "coordinator", round=lane.round + 1, reason=d.reason)
        if fragment == 0 and self._joiners:  # sites that joined at a later round fetch its version now
            ready_now = [w for w in self._joiners if w[0] <= nxt.round]
            self._joiners = [w for w in self._joiners if w[0] > nxt.round]
            for _, site, epoch in ready_now:
                self._fetch_and_start(site, epoch)
        for f in [f for f in self.round_faults if f.at_round == lane.round + 1 and fragment == 0]:
            self.at(self.now, self._fault, f)  # at_round N: as round N begins
        for name in arrived:
            site = self.sites[name]
            tok = site.inflight.get(fragment, (None,))[0]
            self._answer(site, site.epoch, lane.round, fragment, self.sent.pop((fragment, lane.round, name), None), tok,
                         False, ring, self.now + (0.0 if ring else self.p.apply_s))

    def _answer(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None, tok, late: bool = False,
                ring: bool = False, start: float | None = None) -> None:
        """The answer leaves at ``start`` (after the outer step); the site takes it ``overhead_s`` after it lands."""
        if s.inflight.get(fragment, (None,))[0] != tok:
            return
        nbytes = ACK_BYTES if ring else self.down_bytes // self.fragments
        self._transfer(s.name, 1, nbytes, self._took, s, epoch, rnd, fragment, sent_at, late, tok, start=start,
                       after=s.overhead_s)

    def _took(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None, late: bool, tok) -> None:
        if epoch != s.epoch or s.inflight.get(fragment, (None,))[0] != tok:
            return
        s.inflight.pop(fragment, None)
        seconds = self.now - (sent_at if sent_at is not None else self.now)
        up, down = self.up_bytes // self.fragments, self.down_bytes // self.fragments
        extra = {"fragment": fragment} if self.fragments > 1 else {}
        version = self.lanes[fragment].round if self.fragments == 1 else self.version
        self.emit("merge", f"{s.name}/0", site=s.name, round=version - 1, version=version, site_round=rnd,
                  bytes_sent=up, bytes_received=down, seconds=round(seconds, 6), step=s.step, **extra)
        if self.fragments > 1:
            s.pending.pop((fragment, rnd), None)
            self._continue_stream(s, epoch)
            return
        H = self.tr.inner_steps
        s.version = version
        if self.ddp:
            s.step = version  # a dropped site's step is the coordinator's
            s.round = version // H
            boundary = version % H == 0
        else:
            s.round = version
            boundary = True
        if boundary:
            self._note_round(s)
        if s.round >= self.tr.rounds:
            self._done_after_eval(s)
        else:
            self._compute(s, epoch)

    def _arrive_async(self, s: Site, epoch: int, rnd: int, sent_at: float, tok) -> None:
        decision = rounds.admit_async(s.name, rnd, sites=frozenset(self.sites), applied=self.site_merges[s.name],
                                      has_model=True)
        if not decision:
            self.emit("merge_refused", "coordinator", site=s.name, round=rnd, action=decision.action,
                      reason=decision.reason)
            if decision.action == "duplicate":  # applied before the coordinator died: fetch the model
                self.at(self.now, self._answer_async, s, epoch, sent_at, tok)
            return
        w = rounds.async_weight(self.tr.asynchronous.staleness_weight, self.version, s.version, len(self.sites))
        self.version += 1
        self.site_merges[s.name] += 1
        self.emit("commit", "coordinator", round=self.version - 1, version=self.version, sites=[s.name],
                  staleness=w.staleness, weight=round(w.weight, 6), epoch=self.coord_epoch, wait_s=0.0,
                  apply_s=self.p.apply_s, finite=True)
        self.at(self.now + self.p.apply_s, self._answer_async, s, epoch, sent_at, tok)

    def _answer_async(self, s: Site, epoch: int, sent_at: float, tok) -> None:
        if s.inflight.get(0, (None,))[0] != tok:
            return
        self._transfer(s.name, 1, self.down_bytes, self._merged_async, s, epoch, sent_at, self.version, tok)

    def _merged_async(self, s: Site, epoch: int, sent_at: float, version: int, tok) -> None:
        if epoch != s.epoch or s.inflight.get(0, (None,))[0] != tok:
            return
        s.inflight.pop(0, None)
        s.round += 1
        s.version = version
        self.emit("merge", f"{s.name}/0", site=s.name, round=version - 1, version=version, site_round=s.round,
                  bytes_sent=self.up_bytes, bytes_received=self.down_bytes,
                  seconds=round(self.now + s.overhead_s - sent_at, 6), step=s.step)
        self._note_round(s)
        if s.round >= self.tr.rounds:
            self.at(self.now + s.overhead_s, self._done_after_eval, s)
        else:
            self.at(self.now + s.overhead_s, self._compute, s, epoch)

    def _note_round(self, s: Site) -> None:
        """The evaluating site (the first) evaluates the model once per round it completes, as the built-in trainer
        does: between two inner steps, so a real run's next ``compute_s`` holds it (geotrain.sdk: the time between
        two ``step()`` calls) and the simulated one does too. No loss is simulated, so no ``eval`` event."""
        if s.round > s.eval_round and self.p.eval_s > 0 and s.name == self.topo.sites[0].name:
            s.eval_round = s.round
            s.eval_due = self.p.eval_s

    def _done_after_eval(self, s: Site) -> None:
        """The site's last round is in: its last eval (if one is due), then it is done."""
        due, s.eval_due = s.eval_due, 0.0
        if due > 0 and not s.done:  # no step follows it: in no compute_s, as in a real run
            self.at(self._advance(s, self.now, due), self._site_done, s)
        else:
            self._site_done(s)

    def _site_done(self, s: Site) -> None:
        if s.done:
            return
        s.done = True
        self.remaining -= 1
        self.emit("site_done", f"{s.name}/0", site=s.name, steps=s.step, rounds=s.round,
                  compute_s=round(s.compute_s, 6))

    # ---- faults ----
    def _schedule_faults(self) -> None:
        off = self.p.fault_clock_s  # the launcher's fault clock starts once the processes are up
        faults = [(off + f.at_ms / 1000.0, f, False) for f in self.topo.faults if f.at_ms is not None]
        self.round_faults = [f for f in self.topo.faults if f.at_round is not None]
        if self.topo.fault_rate is not None:
            horizon = self.p.startup_s + 10 * self.tr.rounds * self.tr.inner_steps * max(self.p.step_s.values())
            for t, f in FaultDraws(self.topo.fault_rate, self.topo):
                if t > horizon:
                    break
                faults.append((off + t, f, True))
        for t, f, drawn in faults:
            self.at(t, self._fault, f, drawn)

    def _fault(self, f, drawn: bool = False) -> None:
        target = f.target
        duration = (f.duration_ms or 0.0) / 1000.0
        if drawn and self._active.get(target, -1.0) > self.now:  # the launcher's FaultScheduler.fire rule
            self.emit("fault_skipped", "launcher", fault=f.kind, target=target, drawn=True,
                      reason="its target is under another fault until that one heals")
            return
        if duration > 0:
            self._active[target] = self.now + duration
        if target == "coordinator":
            return self._kill_coordinator(f)
        name = target.split(" ", 1)[1].split("/")[0] if " " in target else target
        s = self.sites.get(name)
        if s is None or s.done:
            return
        self.emit("fault_injected", "launcher", fault=f.kind, target=target, params={}, duration_s=duration,
                  drawn=True)
        if f.kind == "kill":
            self._worker_dies(s, target, "signal SIGKILL")
        elif f.kind == "freeze":
            until = self.now + duration
            pause = max(0.0, until - max(self.now, s.frozen_until))
            s.frozen_until = max(s.frozen_until, until)
            ttl = self.topo.recovery.heartbeat_ttl_s
            if duration > 2 * ttl:  # its leader's lease lapses, its key stays gone for the watch's grace: dead
                self.at(self.now + 2 * ttl, self._lease_lost, s, s.epoch)
            if s.block is not None and pause > 0:  # the steps running stop for the freeze
                _, start, k, end = s.block
                i = min(k - 1, int((self.now - start - sum(s.frozen_in.values())) / s.step_s)) if s.step_s > 0 else 0
                s.frozen_in[i] = s.frozen_in.get(i, 0.0) + pause
                tok = next(self._seq)
                s.block = (tok, start, k, end + pause)
                self.at(end + pause, self._stepped, s, s.epoch, tok)
        elif f.kind == "partition" and s.name in self.links:
            for d in self.links[s.name]:
                d.update(lambda p: LinkParams(p.bandwidth_mbps, p.latency_ms, p.jitter_ms, p.loss, up=False))
            self.at(self.now + duration, self._heal, s.name)

    def _worker_dies(self, s: Site, target: str, how: str) -> None:
        act = on_exit("worker", target, -9, how, s.restarts, self.topo.recovery)
        self.emit("failure", "launcher", what="worker", target=target, happened_t=self.now, detected_t=self.now,
                  reason=act.reason)
        if s.block is not None:  # the steps it finished before it died were taken (and count as compute)
            _, start, k, _ = s.block
            ran = self.now - start - sum(s.frozen_in.values())
            took = s.took if s.took is not None else [s.step_s] * k
            done, spent = 0, 0.0
            while done < k and spent + took[done] <= ran + 1e-9:
                spent += took[done]
                done += 1
            s.frozen_in = {i: v for i, v in s.frozen_in.items() if i < done}
            if done > 0:
                self._emit_steps(s, s.step, done, start + spent + sum(s.frozen_in.values()))
                s.step += done
            s.block = None
        if act.action != "restart":
            self.failed = act.reason
            return
        self._member_lost(s, act.reason, "supervisor")  # the launcher reports it at once (ReportLost)
        s.restarts += 1
        s.epoch += 1  # what it had in flight dies with it; a kill during its restart starts the restart over
        s.pending.clear()
        s.inflight.clear()
        s.alive = False
        if self.ring and self.ring_ok:
            self._break_ring(s.round, "site")
        self.at(self.now + self.p.restart_s, self._rejoin, s, self.now, s.epoch)

    def _lease_lost(self, s: Site, epoch: int) -> None:
        if epoch == s.epoch and self.now < s.frozen_until:
            self._member_lost(s, f"the etcd lease of {s.name}'s leader ended", "lease")

    def _member_lost(self, s: Site, why: str, source: str) -> None:
        """The coordinator's member_lost: every lane's round stops waiting for the site (rounds.lose) and
        commits with the survivors if it can; async and ddp have no round to go on without it."""
        if not self.sync_lanes or not self.coord_up:
            return
        decisions = []
        for f, lane in enumerate(self.lanes):
            self.lanes[f], d = rounds.lose(lane, s.name, why, self.topo.recovery.min_sites)
            decisions.append(d)
        d = next((d for d in decisions if d.action != "ignore"), decisions[0])
        self.emit("member_lost", "coordinator", site=s.name, source=source, action=d.action, reason=d.reason,
                  round=self.lanes[0].round)
        if source == "lease" and d.action == "drop_lost":
            self.emit("failure", "coordinator", what="site", target=s.name, happened_t=self.now, detected_t=self.now,
                      reason=d.reason, round=self.lanes[0].round)
        for f in range(len(self.lanes)):
            self._maybe_commit(f)

    def _heal(self, name: str) -> None:
        for d in self.links[name]:
            d.update(lambda p: LinkParams(p.bandwidth_mbps, p.latency_ms, p.jitter_ms, p.loss, up=True))
        self.emit("fault_healed", "launcher", fault="partition", target=f"link {name}")

    def _rejoin(self, s: Site, failed_at: float, epoch: int, quiet: bool = False) -> None:
        """Back after a restart: it joins where the coordinator's ``join`` says (its own round again if the round
        still waits for it, else the next)."""
        if epoch != s.epoch:  # killed again while restarting: that restart counts
            return
        if not self.coord_up:  # Join is retried until the coordinator answers
            return self.at(self.now + 0.2, self._rejoin, s, failed_at, epoch, quiet)
        s.alive = True
        lane = self.lanes[0]
        final = self.tr.rounds if self.sync_lanes else None
        state, version, decision = rounds.join(lane, s.name, self.now, final)
        self.lanes[0] = state
        H = self.tr.inner_steps
        lost = 1 if s.step % H else 0  # the steps of its unfinished round are redone
        s.busy = False
        s.block = None
        s.version = version if self.tr.algorithm != "async-diloco" else self.version
        if self.tr.algorithm == "async-diloco":
            s.step = s.round * H
        elif self.ddp:
            s.step, s.round = version, version // H
        else:
            s.round = version
            s.step = version * H
        s.eval_round, s.eval_due = s.round, 0.0  # a restarted evaluator evaluates at its join: in restart_s
        if not quiet:
            self.emit("recovery", "launcher", what="worker", target=f"worker {s.name}/0", failure_t=failed_at,
                      recovered_t=self.now, seconds=round(self.now - failed_at, 6), rounds_lost=lost)
        if self.sync_lanes and version > self.lanes[0].round:  # join_next: GetModel waits for that version
            self._joiners.append((version, s, s.epoch))
            return
        self._fetch_and_start(s, s.epoch)

    def _fetch_and_start(self, s: Site, epoch: int) -> None:
        """A (re)joined site fetches the global model (GetModel: fp32), then computes (or is done: the
        final version, rounds.join's run_done)."""
        if s.round >= self.tr.rounds:
            self.emit("site_ready", f"{s.name}/0", site=s.name, version=s.version, round=s.round, epoch=1)
            return self._site_done(s)
        init = self.p.init_bytes if self.p.init_bytes is not None else 4 * self.p.numel
        self._transfer(s.name, 1, init, self._ready, s, epoch)

    # ---- the coordinator's own failure ----
    def _kill_coordinator(self, f) -> None:
        if not self.coord_up:
            return
        self.emit("fault_injected", "launcher", fault=f.kind, target="coordinator", params={}, duration_s=0.0,
                  drawn=True)
        act = on_exit("coordinator", "coordinator", -9, "signal SIGKILL", self.coord_restarts, self.topo.recovery)
        self.emit("failure", "launcher", what="coordinator", target="coordinator", happened_t=self.now,
                  detected_t=self.now, reason=act.reason)
        if act.action != "restart":
            self.failed = act.reason
            return
        self.coord_restarts += 1
        self.coord_up = False
        failed_at = self.now
        for s in self.sites.values():  # every merge in flight is cut: its site retries (or a ddp worker dies)
            for fragment, (_, rnd, sent_at) in sorted(s.inflight.items()):
                self._cut(s, s.epoch, rnd, fragment, sent_at)
        self.at(self.now + self.p.coordinator_restart_s, self._coordinator_back, failed_at)

    def _coordinator_back(self, failed_at: float) -> None:
        """Restarted from its persisted state: the committed rounds and the membership; no arrivals."""
        self.coord_up = True
        self.coord_epoch += 1
        self.lanes = [rounds.RoundState(round=lane.round, expected=lane.expected, joining=lane.joining)
                      for lane in self.lanes]
        self.emit("coordinator_started", "coordinator", sites=self.topo.site_names, epoch=self.coord_epoch,
                  round=self.lanes[0].round, resumed=True, run=self.topo.name, topology_sha256=self.topo.digest(),
                  simulated=True)

    def _cut(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float) -> None:
        """The site's merge call failed (no coordinator). ddp: the worker raises and its site restarts;
        otherwise it retries the same update on the worker's rule."""
        if self.ddp:
            return self._worker_dies(s, f"worker {s.name}/0", "its merge failed (ddp does not retry)")
        s.inflight[fragment] = (None, rnd, sent_at)
        self.emit("failure", f"{s.name}/0", what="coordinator", target="coordinator", happened_t=self.now,
                  detected_t=self.now, reason="coordinator unavailable", site=s.name)
        deadline = self.now + self.topo.recovery.retry_deadline_s
        self._retry(s, epoch, rnd, fragment, sent_at, 0, deadline, self.now)

    def _retry(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float, attempt: int, deadline: float,
               failed_at: float) -> None:
        if epoch != s.epoch or s.inflight.get(fragment, (0,))[0] is not None:
            return
        if self.coord_up and attempt > 0:
            self.emit("recovery", f"{s.name}/0", what="coordinator", target="coordinator", failure_t=failed_at,
                      recovered_t=self.now, seconds=round(self.now - failed_at, 6), site=s.name, rounds_lost=0)
            return self._send_up(s, epoch, rnd, fragment, sent_at)
        act = next_action(Outcome.UNAVAILABLE, attempt, self.now, deadline)
        if isinstance(act, Retry):
            self.at(self.now + act.delay_s, self._retry, s, epoch, rnd, fragment, sent_at, attempt + 1, deadline,
                    failed_at)
        else:  # it gives up: the worker raises, its site restarts
            self._worker_dies(s, f"worker {s.name}/0", act.reason)

    def link_stats(self) -> dict[str, dict]:
        out = {f"link {name}<->{self.hub}": {"bytes_forward": fwd.bytes, "bytes_backward": bwd.bytes}
               for name, (fwd, bwd) in self.links.items()}
        plan = {m.site: m.successor for ms in ring_plan(self.topo).values() for m in ms} if self.ring else {}
        for name, d in self.ring_edges.items():
            out[f"link {name}<->{plan[name]}"] = {"bytes_forward": d.bytes, "bytes_backward": 0}
        return out
