"""Failure injection: a registry of named failpoints, a scheduler, and file failpoints.

Each failpoint (after etcd's ``tests/robustness/failpoint``) has a ``name``, ``available(topo,
target)`` and ``inject(env, spec)`` that returns a record of what it did and an ``undo`` to heal
it; the scheduler guarantees the undo after the fault's ``duration``. Faults come from the
topology's ``faults:`` list (triggered at a committed round, an inner step of the first site, or
a time since the run started) and, live, from ``geotrain chaos RUN_DIR ...``, which drops a
request file into ``RUN_DIR/chaos/`` that the running launcher picks up.

How each fault is made real:
- kill / freeze: SIGKILL / SIGSTOP (then SIGCONT) to the target's processes (a site: all of its
  workers). What follows is the recovery policy's business (geotrain.run.supervise).
- partition / degrade / flap: the link emulator's control file (geotrain.wan.link), per direction.
- slow: the site's workers are stopped and continued on a 100 ms duty cycle, so their compute
  takes ``factor`` times as long, without their cooperation.
- disk_full: a file failpoint that makes every checkpoint write fail with ENOSPC.
- corrupt_checkpoint: one byte of the newest complete checkpoint's model file is flipped.
Every injection and every undo goes into metrics.jsonl (``fault_injected``, ``fault_healed``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geotrain.failpoints import failpoint_path
from geotrain.config.topology import FaultSpec, Topology, fault_problem

# ---- what a failpoint can act on ----


class FaultEnv:
    """What failpoints act on; the launcher implements it."""

    run_dir: Path
    checkpoint_dir: Path

    def pids(self, target: str) -> list[int]: ...
    def link_control_file(self, site: str) -> Path: ...


Undo = Callable[[], None]


@dataclass
class Failpoint:
    name: str
    inject: Callable[[FaultEnv, FaultSpec], tuple[dict, Undo | None]]

    def available(self, topo: Topology, spec: FaultSpec) -> bool:
        return spec.kind == self.name and fault_problem(topo, spec) is None


def _signal_all(pids: list[int], sig: int) -> list[int]:
    done = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            done.append(pid)
        except ProcessLookupError:
            pass
    return done


def _kill(env: FaultEnv, spec: FaultSpec):
    pids = _signal_all(env.pids(spec.target), signal.SIGKILL)
    return {"pids": pids}, None


def _freeze(env: FaultEnv, spec: FaultSpec):
    pids = _signal_all(env.pids(spec.target), signal.SIGSTOP)
    return {"pids": pids}, lambda: _signal_all(pids, signal.SIGCONT)


def _write_control(path: Path, control: dict) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(control))
    os.replace(tmp, path)


def _directions(spec: FaultSpec) -> list[str]:
    return {"both": ["forward", "backward"], "up": ["forward"], "down": ["backward"]}[spec.direction]


def _link_site(spec: FaultSpec) -> str:
    return spec.target.split(" ", 1)[1]


def _partition(env: FaultEnv, spec: FaultSpec):
    path = env.link_control_file(_link_site(spec))
    _write_control(path, {d: {"up": False} for d in _directions(spec)})
    return {"control_file": str(path), "directions": _directions(spec)}, lambda: _write_control(path, {})


def _degrade(env: FaultEnv, spec: FaultSpec):
    path = env.link_control_file(_link_site(spec))
    changes = {k: getattr(spec, k) for k in ("bandwidth_mbps", "latency_ms", "jitter_ms", "loss") if getattr(spec, k) is not None}
    _write_control(path, {d: changes for d in _directions(spec)})
    return {"control_file": str(path), "changes": changes}, lambda: _write_control(path, {})


def _flap(env: FaultEnv, spec: FaultSpec):
    path = env.link_control_file(_link_site(spec))
    stop = threading.Event()
    half = spec.period_ms / 2000.0

    def run():
        down = True
        while not stop.is_set():
            _write_control(path, {d: {"up": False} for d in _directions(spec)} if down else {})
            down = not down
            stop.wait(half)
        _write_control(path, {})

    threading.Thread(target=run, name="flap", daemon=True).start()
    return {"control_file": str(path), "period_s": spec.period_ms / 1000}, stop.set


def _slow(env: FaultEnv, spec: FaultSpec):
    pids = env.pids(spec.target)
    stop = threading.Event()
    period = 0.1
    running = period / spec.factor

    def run():
        while not stop.is_set():
            time.sleep(running)
            _signal_all(pids, signal.SIGSTOP)
            stop.wait(period - running)
            _signal_all(pids, signal.SIGCONT)
        _signal_all(pids, signal.SIGCONT)

    threading.Thread(target=run, name="slow", daemon=True).start()
    return {"pids": pids, "factor": spec.factor}, stop.set


def _disk_full(env: FaultEnv, spec: FaultSpec):
    path = failpoint_path(env.checkpoint_dir, "disk_full")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return {"failpoint": str(path)}, lambda: path.unlink(missing_ok=True)


def _corrupt_checkpoint(env: FaultEnv, spec: FaultSpec):
    from geotrain.storage.checkpoint import COORDINATOR_PART, list_rounds

    rounds = [r for r in list_rounds(env.checkpoint_dir, [COORDINATOR_PART]) if r.complete]
    if not rounds:
        return {"corrupted": None, "reason": "no checkpoint yet"}, None
    target = rounds[-1].path / COORDINATOR_PART / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return {"corrupted": str(target), "round": rounds[-1].round}, None


REGISTRY: dict[str, Failpoint] = {fp.name: fp for fp in [
    Failpoint("kill", _kill), Failpoint("freeze", _freeze), Failpoint("partition", _partition),
    Failpoint("degrade", _degrade), Failpoint("flap", _flap), Failpoint("slow", _slow),
    Failpoint("disk_full", _disk_full), Failpoint("corrupt_checkpoint", _corrupt_checkpoint),
]}


# ---- the scheduler ----


@dataclass
class _Active:
    spec: FaultSpec
    until: float
    undo: Undo | None


class FaultScheduler:
    """Fires scheduled faults when their trigger is reached and heals them after their duration."""

    def __init__(self, env: FaultEnv, topo: Topology, events, started_at: float, registry: dict | None = None):
        """``registry``: the failpoints this launcher has (default :data:`REGISTRY`, every kind; the Slurm
        backend's is smaller): a live request for another kind, or a target its failpoint cannot act on, is
        rejected (``fault_rejected``, naming it)."""
        self.env, self.topo, self.events, self.started_at = env, topo, events, started_at
        self.registry = REGISTRY if registry is None else registry
        self.pending = list(topo.faults)
        self.active: list[_Active] = []
        self.rounds = 0
        self.step = 0
        self.chaos_dir = env.run_dir / "chaos"
        self._draws = None  # fault_rate: the seeded random faults, one at a time (geotrain.run.fault_rate)
        self._next_drawn = None
        if topo.fault_rate is not None:
            from geotrain.run.fault_rate import FaultDraws

            self._draws = iter(FaultDraws(topo.fault_rate, topo))
            self._next_drawn = next(self._draws, None)

    def observe(self, event: dict) -> None:
        if event.get("event") == "commit":
            self.rounds = max(self.rounds, event["round"] + 1)
        elif event.get("event") == "inner_step" and event.get("site") == self.topo.sites[0].name:
            self.step = max(self.step, event["step"])

    def due(self, spec: FaultSpec, now: float) -> bool:
        if spec.at_round is not None:
            return self.rounds >= spec.at_round
        if spec.at_step is not None:
            return self.step >= spec.at_step
        return now - self.started_at >= (spec.at_ms or 0.0) / 1000.0

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._read_live_requests()
        for spec in [s for s in self.pending if self.due(s, now)]:
            self.pending.remove(spec)
            self.fire(spec, now)
        while self._next_drawn is not None and now - self.started_at >= self._next_drawn[0]:
            self.fire(self._next_drawn[1], now, drawn=True)
            self._next_drawn = next(self._draws, None)
        for a in [a for a in self.active if now >= a.until]:
            self.active.remove(a)
            self._heal(a)

    def fire(self, spec: FaultSpec, now: float, drawn: bool = False) -> dict:
        if drawn and any(a.spec.target == spec.target for a in self.active):  # already frozen or cut off
            self.events.emit("fault_skipped", fault=spec.kind, target=spec.target, drawn=True,
                             reason="its target is under another fault until that one heals")
            return {}
        record, undo = self.registry[spec.kind].inject(self.env, spec)
        duration = (spec.duration_ms or 0.0) / 1000.0
        self.events.emit("fault_injected", fault=spec.kind, target=spec.target or "checkpoints",
                         params=spec.model_dump(mode="json", exclude_none=True, exclude={"kind", "target"}),
                         duration_s=duration, record=record, **({"drawn": True} if drawn else {}))
        if undo is not None:
            self.active.append(_Active(spec, now + duration, undo))
        return record

    def _heal(self, a: _Active) -> None:
        a.undo()
        self.events.emit("fault_healed", fault=a.spec.kind, target=a.spec.target or "checkpoints")

    def heal_all(self) -> None:
        for a in self.active:
            self._heal(a)
        self.active = []

    def _read_live_requests(self) -> None:
        if not self.chaos_dir.is_dir():
            return
        for path in sorted(self.chaos_dir.glob("*.json")):
            try:
                raw = json.loads(path.read_text())
                spec = FaultSpec.model_validate(raw)
            except (json.JSONDecodeError, ValueError) as exc:
                self.events.emit("fault_rejected", request=path.name, reason=str(exc).splitlines()[0])
                path.rename(path.with_suffix(".rejected"))
                continue
            problem = fault_problem(self.topo, spec)
            if not problem and (spec.kind not in self.registry or not self.registry[spec.kind].available(self.topo, spec)):
                problem = f"{spec.kind} {spec.target!r} is not available with this launcher (it can: " \
                          f"{', '.join(sorted(self.registry))})"
            if problem:
                self.events.emit("fault_rejected", request=path.name, reason=problem.lstrip(".: "))
                path.rename(path.with_suffix(".rejected"))
                continue
            path.rename(path.with_suffix(".done"))
            self.pending.append(spec)


def request_live_fault(run_dir: Path, raw: dict) -> Path:
    """`geotrain chaos`: hand a fault to the launcher running RUN_DIR (it injects it within ~0.2 s)."""
    chaos = Path(run_dir) / "chaos"
    chaos.mkdir(exist_ok=True)
    name = f"{time.time():.6f}-{uuid.uuid4().hex[:6]}"
    tmp = chaos / f".{name}.tmp"
    tmp.write_text(json.dumps(raw))
    final = chaos / f"{name}.json"
    os.replace(tmp, final)
    return final
