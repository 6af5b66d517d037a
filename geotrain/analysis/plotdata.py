"""What the report's plots draw, as pure functions of a :class:`~geotrain.analysis.rundir.Run`.

:func:`series`: a run's eval losses against inner steps, seconds since start and WAN MB so far;
:func:`timeline`: per-site compute, WAN-wait and eval intervals plus failure/fault markers, in
seconds since the run started, coalesced so that thousands of steps stay cheap to draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geotrain.analysis.rundir import Run, is_number, load_run

# Event kinds drawn as vertical markers on the timeline: (colour, line style, legend name).

MARKER_STYLES = {
    "failure": ("tab:red", "-", "failure"),
    "recovery": ("tab:green", "--", "recovery"),
    "fault_injected": ("tab:purple", ":", "fault injected"),
    "fault_healed": ("tab:purple", "-.", "fault healed"),
}


@dataclass
class Series:
    """The eval curve of one run, against the three x axes of the loss plots."""

    label: str
    algorithm: str
    status: str
    steps: list[float]
    wall_s: list[float]
    wan_mb: list[float]
    loss: list[float]


def series(run_dir: str | Path | Run) -> Series:
    """The eval losses of one run with their inner step, seconds since start and WAN MB so far.

    WAN MB at an eval is the sum of ``bytes_sent + bytes_received`` of every ``merge`` event (of a
    site whose merges cross a WAN link) written at or before the eval's time, in 10^6 bytes.
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    t0 = run.t0
    merges = sorted(((e["t"], int(e.get("bytes_sent") or 0) + int(e.get("bytes_received") or 0))
                     for e in run.of("merge") if run.crosses_wan(e.get("site"))))
    s = Series(label=run.label, algorithm=run.algorithm, status=run.status, steps=[], wall_s=[], wan_mb=[], loss=[])
    for e in run.evals():
        s.steps.append(float(e["step"]))
        s.wall_s.append(float(e["t"]) - t0)
        s.wan_mb.append(sum(b for t, b in merges if t <= e["t"]) / 1e6)
        s.loss.append(float(e["loss"]))
    return s


def coalesce(intervals: list[tuple[float, float]], gap: float = 0.0) -> list[tuple[float, float]]:
    """Merge (start, end) intervals that overlap or lie less than ``gap`` apart; returns (start, end)."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if end < start:
            start, end = end, start
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


@dataclass
class SiteTimeline:
    compute: list[tuple[float, float]] = field(default_factory=list)   # (start, end) seconds since start
    wan: list[tuple[float, float]] = field(default_factory=list)
    evals: list[tuple[float, float]] = field(default_factory=list)
    starting: list[tuple[float, float]] = field(default_factory=list)  # run start -> first site_ready
    merges: list[float] = field(default_factory=list)                  # merge completion times


@dataclass
class Marker:
    t: float        # seconds since the run started
    kind: str       # failure | recovery | fault_injected | fault_healed
    text: str


@dataclass
class Timeline:
    sites: dict[str, SiteTimeline]
    markers: list[Marker]
    end: float          # seconds from the run's start to its last event
    view_start: float = 0.0  # where the plot starts: a little before the first site was ready


def timeline(run_dir: str | Path | Run, *, max_intervals: int = 4000) -> Timeline:
    """Per-site intervals of a run, in seconds since it started.

    Compute: each ``inner_step`` ended at ``t`` and computed for ``compute_s``; when the step also
    waited on the WAN (``wan_s``, ddp: the gradient exchange sits between backward and the
    optimizer step) the compute is placed just before that wait. WAN wait: each ``merge`` ended
    at ``t`` and lasted ``seconds``. Evals: ended at ``t`` and lasted ``seconds``. Adjacent
    intervals closer than a pixel are merged, so thousands of steps stay cheap to draw.
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    t0 = run.t0
    end = max(run.t_end - t0, 1e-9)
    sites = {s: SiteTimeline() for s in run.sites}

    def site_of(e: dict) -> str | None:
        s = e.get("site") or str(e.get("proc") or "").split("/")[0] or None
        if s and s not in sites and e.get("event") in ("inner_step", "merge", "eval", "site_ready"):
            sites[s] = SiteTimeline()
        return s

    compute: dict[str, list[tuple[float, float]]] = {s: [] for s in sites}
    wan: dict[str, list[tuple[float, float]]] = {s: [] for s in sites}
    evals: dict[str, list[tuple[float, float]]] = {s: [] for s in sites}
    for e in run.events:
        kind, t = e.get("event"), e.get("t")
        if not is_number(t):
            continue
        t -= t0
        if kind == "inner_step":
            s = site_of(e)
            c = float(e.get("compute_s") or 0.0)
            w = float(e.get("wan_s") or 0.0)
            if s and c > 0:
                compute.setdefault(s, []).append((t - w - c, t - w))
        elif kind == "merge":
            s = site_of(e)
            if s:
                wan.setdefault(s, []).append((t - float(e.get("seconds") or 0.0), t))
                sites[s].merges.append(t)
        elif kind == "eval":
            s = site_of(e)
            if s and s in sites:
                evals.setdefault(s, []).append((t - float(e.get("seconds") or 0.0), t))
        elif kind == "site_ready":
            s = site_of(e)
            if s and not sites[s].starting:
                sites[s].starting.append((0.0, t))
    markers = _markers(run)
    firsts = [min(iv)[0] for d in (compute, wan, evals) for iv in d.values() if iv]
    firsts += [tl.starting[0][1] for tl in sites.values() if tl.starting]
    firsts += [m.t for m in markers]
    view_start = 0.0
    if firsts:
        first = max(min(firsts), 0.0)
        view_start = max(first - 0.04 * (end - first), 0.0)
        if view_start < 0.1 * end:  # not worth hiding
            view_start = 0.0
    gap = (end - view_start) / 2000  # well under one pixel at the figure's width
    for s, tl in sites.items():
        tl.compute = coalesce(compute.get(s, []), gap)
        tl.wan = coalesce(wan.get(s, []), gap)
        tl.evals = coalesce(evals.get(s, []), gap)
        # Still too many bars to draw quickly (ddp with very many steps): coarsen further; WAN
        # waits are drawn over compute, so they stay visible.
        g = gap
        while len(tl.compute) + len(tl.wan) > max_intervals and g < end:
            g *= 4
            tl.compute, tl.wan = coalesce(tl.compute, g), coalesce(tl.wan, g)
    return Timeline(sites=sites, markers=markers, end=end, view_start=view_start)


def _markers(run: Run) -> list[Marker]:
    t0 = run.t0
    out = []
    for e in run.events:
        kind = e.get("event")
        if kind not in MARKER_STYLES:
            continue
        if kind == "failure":
            t = e.get("happened_t") if is_number(e.get("happened_t")) else e.get("t")
            text = f"failure: {e.get('what') or '?'} {e.get('target') or ''}".rstrip()
        elif kind == "recovery":
            t = e.get("recovered_t") if is_number(e.get("recovered_t")) else e.get("t")
            text = f"recovered: {e.get('target') or e.get('what') or '?'}"
        elif kind == "fault_injected":
            t = e.get("t")
            text = f"fault: {e.get('fault') or '?'} {e.get('target') or ''}".rstrip()
        else:
            t = e.get("t")
            text = f"healed: {e.get('fault') or '?'} {e.get('target') or ''}".rstrip()
        if is_number(t):
            out.append(Marker(t=float(t) - t0, kind=kind, text=text))
    return sorted(out, key=lambda m: m.t)
