"""Fit :class:`~geotrain.sim.model.SimParams` from a real run's history, and compare a simulation with it.

From ``RUN_DIR/metrics.jsonl`` (docs/events.md), each a median so that one slow outlier does not decide:

- ``step_s[site]``: the site's steady step: the outlier-trimmed mean ``compute_s`` (:func:`steady_step`; net of the
  evals inside it, :func:`net_of_evals`) of the site leader's ``inner_step`` events that ran while no warm standby was importing (``standby_started`` to its ``standby_ready``); where the run
  had too few such steps, the median of the later half of its steps. It was the mean of all steps until the
  warm standbys came: they import torch beside ~10-15 s of training after a site's first step (and again
  after a restart), which on a machine with few cores makes those steps 1.5-2x slower, a transient of fixed
  length that a mean spreads over every step of a longer run (docs/results.md, Simulator accuracy);
- ``standby_slowdown``: the median, over the steps that overlapped their own site's standby window, of
  ``compute_s`` / the site's steady step; ``standby_warm_s``: the standbys' median ``standby_started`` to
  ``standby_ready``; ``standby_after_s``: from a site's first step in a life to its standbys' start.
  None of the three where no site had steady steps to compare with (the transient is then in ``step_s``);
- ``startup_s``: from ``run_started`` to each site's first inner step, less that step;
- ``up_bytes``, ``down_bytes``: the merges' ``bytes_sent`` / ``bytes_received`` (the exact payloads);
- ``numel``: the ``model`` event's ``params``, else fp32 bytes / 4;
- ``apply_s``: the commits' ``answer_s`` (when the answer starts out; the round is made durable while it streams),
  ``apply_s`` in histories from before the two were apart; ``eval_s``: the evals' ``seconds`` (those outside the standby windows where a transient was fitted); ``restart_s``: the worker recoveries';
- ``coordinator_restart_s``: from a coordinator's kill (``fault_injected``) to its resumed ``coordinator_started``;
- ``fault_clock_s``: when the launcher's fault clock started: a fault fired ``at`` a time, less that time;
- ``shutdown_s``: from the last ``site_done`` to ``run_finished``;
- ``overhead_s[site]``: what the site's fastest merge took beyond the modelled transfers up and down and
  the outer step: with the site arriving last in that round it waited for nobody, so the rest is the
  protocol (encode, gRPC, decode, the site's broadcast).
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass
from pathlib import Path

from geotrain.config.schema import Topology
from geotrain.errors import TopologyError
from geotrain.events import read_events
from geotrain.sim.model import SimParams
from geotrain.wan.shaping import Direction, LinkParams


def _median(values, default: float) -> float:
    values = [v for v in values if isinstance(v, (int, float))]
    return float(statistics.median(values)) if values else default


def transfer_s(topo: Topology, site: str, nbytes: int) -> float:
    """Serialization plus latency of ``nbytes`` on the site's link to the coordinator (the emulator's model)."""
    spec = topo.link(site, topo.coordinator.at)
    if spec is None:
        return 0.0
    lp = LinkParams(spec.bandwidth_mbps, spec.latency_ms, spec.jitter_ms, spec.loss)
    d = Direction("x", lp, spec.streams)
    return nbytes / d.rate_bytes_per_s(lp, spec.streams) + lp.latency_ms / 1000.0


OUTLIER = 5.0
"""A step over this many times the median is not the site's compute: a SIGSTOP's frozen seconds, a first
step's one-off costs, a restart's."""


def steady_step(times: list[float]) -> float:
    """The mean step of ``times`` without outliers (:data:`OUTLIER`): a mean, because the steady steps are not
    all alike (on the demo the first step after each merge takes ~3x the median, and that is compute every
    round pays: a median left it out and under-predicted utilisation by 11 %)."""
    m = statistics.median(times)
    kept = [t for t in times if t <= OUTLIER * m]
    return float(statistics.fmean(kept))


MIN_STEADY_STEPS = 10
"""Steps outside every standby window a site needs for its steady step to be measured rather than guessed."""


@dataclass(frozen=True)
class StandbyFit:
    steady: dict[str, float]  # site -> its median step outside every standby window (enough of them only)
    after_s: float = 0.0
    warm_s: float = 0.0
    slowdown: float = 1.0
    windows: tuple = ()  # every standby's (started, ready)

    def calm(self, timed) -> list[float]:
        """The ``seconds`` of the events ``timed`` (each ending at its ``t``) that ran outside every standby
        window, where a transient was fitted and there are at least 3 of them; else all of them."""
        timed = [e for e in timed if isinstance(e.get("seconds"), (int, float))]
        calm = [e["seconds"] for e in timed if not any(e["t"] - e["seconds"] < b and e["t"] > a for a, b in self.windows)]
        return calm if self.warm_s > 0 and len(calm) >= 3 else [e["seconds"] for e in timed]


def standby_fit(events: list[dict], sites: list[str]) -> StandbyFit:
    """The steady step of each site and its standbys' transient, from the standby events of a history."""
    ready: dict[tuple, list[float]] = {}  # (pid, name) -> its ready times (a simulated history has no pids)
    for e in events:
        if e["event"] == "standby_ready":
            ready.setdefault((e.get("pid"), e.get("name")), []).append(e["t"])
    end = max((e["t"] for e in events), default=0.0)
    windows: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e["event"] == "standby_started":
            windows.setdefault(e.get("site"), []).append((e["t"], min((r for r in ready.get((e.get("pid"), e.get("name")), ()) if r >= e["t"]), default=end)))
    every = [w for ws in windows.values() for w in ws]
    if not every:
        return StandbyFit({})

    def overlaps(e: dict, ws) -> bool:
        t, took = e["t"], e.get("compute_s") or 0.0
        return any(t - took < b and t > a for a, b in ws)

    steady, ratios, after = {}, [], []
    for site in sites:
        mine = [e for e in events if e["event"] == "inner_step" and e.get("site") == site
                and isinstance(e.get("compute_s"), (int, float))]
        calm = [e["compute_s"] for e in mine if not overlaps(e, every)]
        if len(calm) >= MIN_STEADY_STEPS:
            steady[site] = steady_step(calm)
            ratios += [e["compute_s"] / steady[site] for e in mine if overlaps(e, windows.get(site, ()))]
        lives = [e["t"] for e in events if e["event"] == "site_ready" and e.get("site") == site]
        for a, _ in windows.get(site, ()):
            life = max((t for t in lives if t <= a), default=None)
            firsts = [e["t"] for e in mine if life is not None and life <= e["t"] <= a]
            if firsts:
                after.append(a - min(firsts))
    if not steady or not ratios:
        return StandbyFit(steady)
    return StandbyFit(steady, after_s=_median(after, 0.0), warm_s=_median([b - a for a, b in every], 0.0),
                      slowdown=max(1.0, _median(ratios, 1.0)), windows=tuple(every))


def net_of_evals(events: list[dict]) -> list[dict]:
    """``events`` with each timed ``eval`` taken out of the inner step whose ``compute_s`` holds it.

    The built-in trainer evaluates between two ``step()`` calls, and geotrain.sdk counts everything between two
    calls as the next step's compute: on the demo the evaluating site's first step after each merge is ~3x its
    others (0.15 s against 0.045 s, 0.11 s of it the eval). The simulator models the eval on its own
    (``eval_s``, put back into that step's time), so a step time fitted with the eval inside counted it twice:
    ~0.1 s per round, 8 % of the demo's wall time."""
    steps: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        if e["event"] == "inner_step" and isinstance(e.get("compute_s"), (int, float)):
            steps.setdefault(e.get("proc"), []).append(i)
    times = {proc: [events[i]["t"] for i in idx] for proc, idx in steps.items()}
    out = list(events)
    for e in events:
        took = e.get("seconds")
        if e["event"] != "eval" or not isinstance(took, (int, float)) or took <= 0:
            continue
        mine = steps.get(e.get("proc"), [])
        j = bisect.bisect_left(times.get(e.get("proc"), []), e["t"])
        if j == len(mine):
            continue  # the last eval: no step after it
        step = out[mine[j]]
        if step["t"] - step["compute_s"] <= e["t"] - took + EVAL_SLACK_S:  # the step began before the eval did
            out[mine[j]] = {**step, "compute_s": max(0.0, step["compute_s"] - took)}
    return out


EVAL_SLACK_S = 0.005
"""How far (s) an eval may seem to start before the step that holds it (the events' times are rounded)."""


def calibrate(run_dir: Path, topo: Topology) -> SimParams:
    """The times and sizes of the run in ``run_dir`` (whose own topology is ``topo``)."""
    return fit(run_dir, topo)[0]


POOLED = ("startup_s", "restart_s", "apply_s", "eval_s", "shutdown_s", "coordinator_restart_s", "fault_clock_s",
          "standby_after_s", "standby_warm_s", "standby_slowdown")
"""The times :func:`pool` takes the median of, over the runs that measured them."""


def pool(fits: list[tuple[SimParams, frozenset[str]]], names: list[str]) -> SimParams:
    """One calibration from several runs (``fits``: :func:`fit`'s, one per run, ``names`` theirs): each time the
    median over the runs that measured it (a run without a restart says nothing about restarts), each site's step
    and overhead the median over the runs that had the site. One calibration run on a shared machine carries its
    moment's load (docs/results.md: steady steps 0.045-0.051 s, starts 7.9-10.7 s across four runs of one command);
    several damp it. The runs must have trained the same model (the same parameters and payload bytes)."""
    first = fits[0][0]
    for (p, _), name in zip(fits[1:], names[1:]):
        if (p.numel, p.up_bytes, p.down_bytes) != (first.numel, first.up_bytes, first.down_bytes):
            raise TopologyError(f"--calibrate {name}: another model than {names[0]}'s ({p.numel:,} parameters, "
                                f"{p.up_bytes} / {p.down_bytes} bytes a merge, against {first.numel:,}, "
                                f"{first.up_bytes} / {first.down_bytes}): calibrate with runs of one model")
    out = SimParams(numel=first.numel, step_s={}, up_bytes=first.up_bytes, down_bytes=first.down_bytes,
                    init_bytes=first.init_bytes,
                    host_workers=first.host_workers if len({p.host_workers for p, _ in fits}) == 1 else None)
    for field_name in POOLED:
        got = [getattr(p, field_name) for p, measured in fits if field_name in measured]
        setattr(out, field_name, float(statistics.median(got)) if got else getattr(first, field_name))
    for attr in ("step_s", "overhead_s"):
        sites = {s for p, measured in fits for s in getattr(p, attr) if f"{attr}:{s}" in measured}
        for site in sorted(sites):
            got = [getattr(p, attr)[site] for p, measured in fits if f"{attr}:{site}" in measured]
            getattr(out, attr)[site] = float(statistics.median(got))
    return out


def fit(run_dir: Path, topo: Topology) -> tuple[SimParams, frozenset[str]]:
    """:func:`calibrate`'s parameters, and the names of those the history measured (the others are defaults:
    ``restart_s`` of a run nothing restarted in; ``step_s:SITE`` for each site that stepped)."""
    events = net_of_evals(read_events(Path(run_dir) / "metrics.jsonl"))
    measured: set[str] = set()

    def seen(name: str, values) -> list:
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            measured.add(name)
        return values
    started = next((e["t"] for e in events if e["event"] == "run_started"), None)
    if started is None:
        started = min((e["t"] for e in events), default=0.0)
    steps = [e for e in events if e["event"] == "inner_step"]
    merges = [e for e in events if e["event"] == "merge" and "fragment" not in e]
    merges_any = [e for e in events if e["event"] == "merge"]
    step_s, first = {}, []
    sb = standby_fit(events, [s.name for s in topo.sites])
    for s in topo.sites:
        mine = [e for e in steps if e.get("site") == s.name]
        step_s[s.name] = sb.steady.get(s.name) or _median([e.get("compute_s") for e in mine[len(mine) // 2:]], 0.05)
        if mine:
            measured.add(f"step_s:{s.name}")
            first.append(mine[0]["t"] - started - step_s[s.name])
    up = int(_median([e.get("bytes_sent") for e in merges_any], 0))
    down = int(_median([e.get("bytes_received") for e in merges_any], 0))
    model = next((e for e in events if e["event"] == "model"), None)
    fragments = topo.training.streaming.fragments if topo.training.algorithm == "streaming-diloco" else 1
    numel = int(model["params"]) if model else max(1, up * fragments // 4)
    apply_s = _median(seen("apply_s", [e.get("answer_s", e.get("apply_s")) for e in events if e["event"] == "commit"]),
                      0.0)
    done = [e["t"] for e in events if e["event"] == "site_done"]
    finished = next((e["t"] for e in events if e["event"] == "run_finished"), None)
    shutdown = seen("shutdown_s", [finished - max(done)] if done and finished is not None else [])
    p = SimParams(numel=numel, shutdown_s=max(0.0, shutdown[0]) if shutdown else 1.0, step_s=step_s,
                  startup_s=_median(seen("startup_s", first), 5.0),
                  restart_s=_median(seen("restart_s", [e.get("seconds") for e in events if e["event"] == "recovery"
                                                       and e.get("what") == "worker"]), 5.0),
                  apply_s=apply_s, up_bytes=up * fragments or None, down_bytes=down * fragments or None,
                  eval_s=_median(seen("eval_s", sb.calm(e for e in events if e["event"] == "eval")), 0.0))
    p.standby_after_s, p.standby_warm_s, p.standby_slowdown = sb.after_s, sb.warm_s, sb.slowdown
    p.host_workers = sum(s.world_size for s in topo.sites)  # a local launch's: every worker on this one host
    if sb.warm_s > 0:
        measured.update(("standby_after_s", "standby_warm_s", "standby_slowdown"))
    kills = [e["t"] for e in events if e["event"] == "fault_injected" and e.get("target") == "coordinator"]
    resumed = [e["t"] for e in events if e["event"] == "coordinator_started" and e.get("resumed")]
    back = [min((r for r in resumed if r >= k), default=None) for k in kills]
    p.coordinator_restart_s = _median(seen("coordinator_restart_s", [b - k for k, b in zip(kills, back) if b is not None]),
                                      p.coordinator_restart_s)
    p.fault_clock_s = max(0.0, _median(seen("fault_clock_s", [
        e["t"] - started - e["params"]["at_ms"] / 1000.0 for e in events
        if e["event"] == "fault_injected" and isinstance(e.get("params"), dict)
        and isinstance(e["params"].get("at_ms"), (int, float))]), 0.0))
    for s in topo.sites:
        mine = [e["seconds"] for e in (merges or merges_any) if e.get("site") == s.name and "seconds" in e]
        if mine:
            wire = transfer_s(topo, s.name, up) + transfer_s(topo, s.name, down)
            p.overhead_s[s.name] = max(0.0, min(mine) - wire - apply_s)
            measured.add(f"overhead_s:{s.name}")
    return p, frozenset(measured)


FIGURES = ("wall_seconds", "utilisation", "goodput", "wan_bytes", "rounds_completed")


def compare(predicted: dict, measured: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(figure, predicted, measured, predicted / measured) for each summary figure both have."""
    rows = []
    for name in FIGURES:
        a, b = predicted.get(name), measured.get(name)
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        rows.append((name, a, b, ratio))
    return rows
