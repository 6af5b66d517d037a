"""A discrete-event simulation of a run: the same topology, the coordinator's own decisions, simulated time.

Nothing here re-implements a rule of the coordinator or the launcher. Rounds are admitted, recorded and
judged ready by geotrain.orchestrator.rounds (``admit``, ``record_arrival``, ``round_ready`` with its
deadline, ``min_sites``, quorum and grace, ``leaving``, ``join``, ``next_round``; async: ``admit_async``,
``async_weight``); a dead site's fate is geotrain.run.supervise.on_exit's; faults come from the
topology's schedule and from geotrain.run.fault_rate.FaultDraws; bytes cross the links on the link
emulator's own model (geotrain.wan.shaping.Direction: the shared bottleneck, latency, jitter, loss and the
Mathis bound), driven with simulated time instead of the clock.

What is modelled, per site: ``startup_s``, then inner steps of ``step_s[site]`` each; every H steps (a
whole-model merge; streaming: one fragment every H/P steps, needed back ``overlap_steps`` later) the
leader's update crosses its link up, the coordinator decides, its answer crosses back, plus the site's
``overhead_s``. Killed sites are back after ``restart_s`` and rejoin where ``join`` says; a frozen site
stops for the fault's duration; a partitioned link holds its bytes until it heals. Not modelled: the loss
(no training happens), ring merges (refused), a coordinator's own failure (refused), DDP (refused:
a merge every step is a transport benchmark, not a run to plan). The history is written as the real
events (docs/events.md), so that summary.json, ``geotrain report`` and ``geotrain check`` read it alike.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable

from geotrain.config.schema import Topology
from geotrain.errors import TopologyError
from geotrain.orchestrator import rounds
from geotrain.run.fault_rate import FaultDraws
from geotrain.run.supervise import on_exit
from geotrain.sim.model import SimParams
from geotrain.wan.shaping import Direction, LinkParams


def unsupported(topo: Topology) -> str | None:
    """Why this topology cannot be simulated, or None."""
    tr = topo.training
    if tr.algorithm == "ddp":
        return "training.algorithm: ddp is not simulated (a merge every step); simulate diloco, streaming or async"
    if tr.merge != "star":
        return f"training.merge: {tr.merge} merges are not simulated yet; simulate the star"
    if topo.fault_rate is not None and "kill_coordinator" in topo.fault_rate.kinds:
        return "fault_rate.kinds: kill_coordinator is not simulated yet"
    for i, f in enumerate(topo.faults):
        if f.target == "coordinator" or f.target.startswith("etcd"):
            return f"faults[{i}]: a failure of the {f.target} is not simulated yet"
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
    busy: bool = False  # an inner step is scheduled or running


class Simulator:
    def __init__(self, topo: Topology, params: SimParams, seed: int = 0):
        problem = unsupported(topo)
        if problem:
            raise TopologyError(problem)
        self.topo, self.p, self.tr = topo, params, topo.training
        self.events: list[dict] = []
        self.now = 0.0
        self._q: list = []
        self._seq = itertools.count()
        self._rng = random.Random(seed)
        self.hub = topo.coordinator.at
        self.sites = {s.name: Site(s.name, params.step_s[s.name], params.overhead_s.get(s.name, 0.0))
                      for s in topo.sites}
        self.links: dict[str, tuple[Direction, Direction]] = {}
        for s in topo.sites:
            spec = topo.link(s.name, self.hub)
            if spec is not None:
                lp = LinkParams(spec.bandwidth_mbps, spec.latency_ms, spec.jitter_ms, spec.loss)
                fwd, bwd = Direction(f"{s.name}->{self.hub}", lp), Direction(f"{self.hub}->{s.name}", lp)
                fwd.peer, bwd.peer = bwd, fwd
                self.links[s.name] = (fwd, bwd)
        self.up_bytes, self.down_bytes = params.merge_bytes(topo)
        self.fragments = self.tr.streaming.fragments if self.tr.algorithm == "streaming-diloco" else 1
        names = frozenset(self.sites)
        self.lanes = [rounds.RoundState(expected=names) for _ in range(self.fragments)]
        self.version = 0
        self.site_merges = {n: 0 for n in self.sites}
        self.quorum = self.tr.quorum
        self.sent: dict[tuple[int, int, str], float] = {}  # (fragment, round, site) -> when its update left
        self.round_faults: list = []

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
        while self._q and not all(s.done for s in self.sites.values()):
            t, _, fn, args = heapq.heappop(self._q)
            self.now = max(self.now, t)
            fn(*args)
        self.now += self.p.shutdown_s
        self.emit("run_finished", "launcher", status="completed" if all(s.done for s in self.sites.values())
                  else "failed", reason=None, simulated=True)
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
        self.at(self.now, self._compute, s, s.epoch)

    def _compute(self, s: Site, epoch: int) -> None:
        """Take one inner step (later if frozen)."""
        if epoch != s.epoch or s.done:
            return
        s.busy = True
        if self.now < s.frozen_until:
            self.at(s.frozen_until, self._compute, s, epoch)
            return
        self.at(self.now + s.step_s, self._stepped, s, epoch)

    def _stepped(self, s: Site, epoch: int) -> None:
        if epoch != s.epoch:
            return
        if self.now < s.frozen_until:  # frozen mid-step: the step ends when it thaws
            self.at(s.frozen_until, self._stepped, s, epoch)
            return
        s.busy = False
        s.step += 1
        H = self.tr.inner_steps
        self.emit("inner_step", f"{s.name}/0", site=s.name, step=s.step, round=s.round, compute_s=s.step_s,
                  wan_s=0.0)
        if self.fragments > 1:
            self._stream_step(s, epoch)
        elif s.step % H == 0:
            self._send_up(s, epoch, s.round, fragment=0)
        else:
            self._compute(s, epoch)

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
        if s.step >= self.tr.rounds * self.tr.inner_steps:
            if not s.pending:
                self._site_done(s)
            return
        if not s.busy and not any(need <= s.step for need in s.pending.values()):
            self._compute(s, epoch)

    # ---- the WAN ----
    def _transfer(self, site: str, direction: int, nbytes: int, then: Callable, *args) -> None:
        link = self.links.get(site)
        if link is None:  # the coordinator's own datacenter: no WAN
            self.at(self.now, then, *args)
            return
        d = link[direction]
        got = d.schedule(nbytes, self.now, self._rng)
        if got is None:  # partitioned: try again when it heals
            self.at(self.now + 0.05, self._transfer, site, direction, nbytes, then, *args)
            return
        d.add_bytes(nbytes)
        self.at(got[0], then, *args)

    def _send_up(self, s: Site, epoch: int, rnd: int, fragment: int) -> None:
        self.sent[(fragment, rnd, s.name)] = self.now
        self._transfer(s.name, 0, self.up_bytes // self.fragments, self._arrive, s, epoch, rnd, fragment, self.now)

    # ---- the coordinator ----
    def _arrive(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float) -> None:
        if epoch != s.epoch:  # the sender was killed: its stream was cut before the coordinator had it all
            return
        if self.tr.algorithm == "async-diloco":
            return self._arrive_async(s, epoch, rnd, sent_at)
        lane = self.lanes[fragment]
        decision = rounds.admit(lane, s.name, rnd)
        if not decision:
            self.emit("merge_refused", "coordinator", site=s.name, round=rnd, action=decision.action,
                      reason=decision.reason, fragment=fragment)
            if decision.action == "stale":  # late for a quorum: fetch the committed version, go on
                self._answer(s, epoch, rnd, fragment, sent_at, late=True)
            return
        self.lanes[fragment] = rounds.record_arrival(lane, s.name, self.now)
        self._maybe_commit(fragment)
        lane = self.lanes[fragment]
        if lane.round == rnd and lane.started_at is not None:  # wake up for its deadline and grace
            self.at(lane.started_at + self.tr.round_timeout_s + 1e-6, self._maybe_commit, fragment)
            if self.quorum is not None:
                self.at(self.now + self.quorum.grace_s + 1e-6, self._maybe_commit, fragment)

    def _maybe_commit(self, fragment: int) -> None:
        lane = self.lanes[fragment]
        q = self.quorum
        ready = rounds.round_ready(self.now, lane, self.tr.round_timeout_s, self.topo.recovery.min_sites,
                                   quorum=q.min_sites if q else None, grace_s=q.grace_s if q else 0.0)
        if not ready:
            if ready.action == "timeout":
                self.emit("round_failed", "coordinator", round=lane.round, reason=ready.reason)
            return
        arrived = sorted(lane.arrived)
        dropped = rounds.leaving(lane, ready)
        self.lanes[fragment] = rounds.next_round(lane, dropped)
        self.version += 1
        extra = {"fragment": fragment} if self.fragments > 1 else {}
        if ready.action == "commit_quorum":
            self.emit("quorum_commit", "coordinator", round=lane.round, sites=arrived,
                      late=sorted(lane.expected - set(arrived)), reason=ready.reason, **extra)
        self.emit("commit", "coordinator", round=lane.round, version=self.version, sites=arrived,
                  epoch=1, wait_s=round(self.now - (lane.started_at or self.now), 6), apply_s=self.p.apply_s,
                  finite=True, **extra)
        for f in [f for f in self.round_faults if f.at_round == lane.round + 1 and fragment == 0]:
            self.at(self.now, self._fault, f)  # at_round N: as round N begins
        for name in arrived:
            site = self.sites[name]
            self.at(self.now + self.p.apply_s, self._answer, site, site.epoch, lane.round, fragment,
                    self.sent.pop((fragment, lane.round, name), None))

    def _answer(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None, late: bool = False) -> None:
        nbytes = self.down_bytes // self.fragments
        self._transfer(s.name, 1, nbytes, self._merged, s, epoch, rnd, fragment, sent_at, late)

    def _merged(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None, late: bool) -> None:
        if epoch != s.epoch:
            return
        self.at(self.now + s.overhead_s, self._took, s, epoch, rnd, fragment, sent_at, late)

    def _took(self, s: Site, epoch: int, rnd: int, fragment: int, sent_at: float | None, late: bool) -> None:
        if epoch != s.epoch:
            return
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
        s.round = version
        s.version = version
        evaluator = s.name == self.topo.sites[0].name  # its eval takes its time; no loss is simulated
        if s.round >= self.tr.rounds:
            self._site_done(s)
        else:
            self.at(self.now + (self.p.eval_s if evaluator else 0.0), self._compute, s, epoch)

    def _arrive_async(self, s: Site, epoch: int, rnd: int, sent_at: float) -> None:
        decision = rounds.admit_async(s.name, rnd, sites=frozenset(self.sites), applied=self.site_merges[s.name],
                                      has_model=True)
        if not decision:
            self.emit("merge_refused", "coordinator", site=s.name, round=rnd, action=decision.action,
                      reason=decision.reason)
            return
        w = rounds.async_weight(self.tr.asynchronous.staleness_weight, self.version, s.version, len(self.sites))
        self.version += 1
        self.site_merges[s.name] += 1
        self.emit("commit", "coordinator", round=self.version - 1, version=self.version, sites=[s.name],
                  staleness=w.staleness, weight=round(w.weight, 6), epoch=1, wait_s=0.0, apply_s=self.p.apply_s,
                  finite=True)
        self.at(self.now + self.p.apply_s, self._answer_async, s, epoch, sent_at)

    def _answer_async(self, s: Site, epoch: int, sent_at: float) -> None:
        self._transfer(s.name, 1, self.down_bytes, self._merged_async, s, epoch, sent_at, self.version)

    def _merged_async(self, s: Site, epoch: int, sent_at: float, version: int) -> None:
        if epoch != s.epoch:
            return
        s.round += 1
        s.version = version
        self.emit("merge", f"{s.name}/0", site=s.name, round=version - 1, version=version, site_round=s.round,
                  bytes_sent=self.up_bytes, bytes_received=self.down_bytes,
                  seconds=round(self.now + s.overhead_s - sent_at, 6), step=s.step)
        if s.round >= self.tr.rounds:
            self._site_done(s)
        else:
            self.at(self.now + s.overhead_s, self._compute, s, epoch)

    def _site_done(self, s: Site) -> None:
        if s.done:
            return
        s.done = True
        self.emit("site_done", f"{s.name}/0", site=s.name, steps=s.step, rounds=s.round,
                  compute_s=round(s.step * s.step_s, 6))

    # ---- faults ----
    def _schedule_faults(self) -> None:
        faults = [(f.at_ms / 1000.0, f) for f in self.topo.faults if f.at_ms is not None]
        self.round_faults = [f for f in self.topo.faults if f.at_round is not None]
        if self.topo.fault_rate is not None:
            horizon = self.p.startup_s + 10 * self.tr.rounds * self.tr.inner_steps * max(self.p.step_s.values())
            for t, f in FaultDraws(self.topo.fault_rate, self.topo):
                if t > horizon:
                    break
                faults.append((t, f))
        for t, f in faults:
            self.at(t, self._fault, f)

    def _fault(self, f) -> None:
        target = f.target
        name = target.split(" ", 1)[1].split("/")[0] if " " in target else target
        s = self.sites.get(name)
        if s is None or s.done:
            return
        duration = (f.duration_ms or 0.0) / 1000.0
        self.emit("fault_injected", "launcher", fault=f.kind, target=target, params={}, duration_s=duration,
                  drawn=True)
        if f.kind == "kill":
            act = on_exit("worker", target, -9, "signal SIGKILL", s.restarts, self.topo.recovery)
            self.emit("failure", "launcher", what="worker", target=target, happened_t=self.now, detected_t=self.now,
                      reason=act.reason)
            if act.action != "restart":
                return
            s.restarts += 1
            s.epoch += 1  # what it had in flight dies with it; a kill during its restart starts the restart over
            s.pending.clear()
            s.alive = False
            self.at(self.now + self.p.restart_s, self._rejoin, s, self.now, s.epoch)
        elif f.kind == "freeze":
            s.frozen_until = max(s.frozen_until, self.now + duration)
        elif f.kind == "partition" and s.name in self.links:
            for d in self.links[s.name]:
                d.update(lambda p: LinkParams(p.bandwidth_mbps, p.latency_ms, p.jitter_ms, p.loss, up=False))
            self.at(self.now + duration, self._heal, s.name)

    def _heal(self, name: str) -> None:
        for d in self.links[name]:
            d.update(lambda p: LinkParams(p.bandwidth_mbps, p.latency_ms, p.jitter_ms, p.loss, up=True))
        self.emit("fault_healed", "launcher", fault="partition", target=f"link {name}")

    def _rejoin(self, s: Site, failed_at: float, epoch: int) -> None:
        """Back after a restart: it joins where the coordinator's ``join`` says (its own round again if the round
        still waits for it, else the next)."""
        if epoch != s.epoch:  # killed again while restarting: that restart counts
            return
        s.alive = True
        lane = self.lanes[0]
        state, version, _ = rounds.join(lane, s.name)
        self.lanes[0] = state
        lost = 1 if s.step % self.tr.inner_steps else 0  # the steps of its unfinished round are redone
        s.busy = False
        s.version = version if self.tr.algorithm != "async-diloco" else self.version
        if self.tr.algorithm == "async-diloco":
            s.step = s.round * self.tr.inner_steps
        else:
            s.round = version
            s.step = version * self.tr.inner_steps
        self.emit("recovery", "launcher", what="worker", target=f"worker {s.name}/0", failure_t=failed_at,
                  recovered_t=self.now, seconds=round(self.now - failed_at, 6), rounds_lost=lost)
        self.emit("site_ready", f"{s.name}/0", site=s.name, version=s.version, round=s.round, epoch=1)
        self.at(self.now, self._compute, s, s.epoch)

    def link_stats(self) -> dict[str, dict]:
        return {f"link {name}<->{self.hub}": {"bytes_forward": fwd.bytes, "bytes_backward": bwd.bytes}
                for name, (fwd, bwd) in self.links.items()}
