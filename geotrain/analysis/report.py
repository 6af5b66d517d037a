"""`geotrain report`: a Markdown report with plots for one or more finished (or failed) runs.

    geotrain report RUN_DIR [RUN_DIR ...] [--out DIR]

Reads only what a run leaves in its directory: ``metrics.jsonl`` (docs/events.md),
``summary.json`` (geotrain/run/summary.py), ``topology.json`` and ``links/*.json``. Writes
``report.md`` and these PNGs into ``--out`` (default: the first run's directory):

- ``report-loss-vs-steps.png``: eval loss against inner steps, every run overlaid;
- ``report-loss-vs-time.png``: eval loss against seconds since the run started;
- ``report-loss-vs-wan-bytes.png``: eval loss against the merge bytes that crossed WAN links so far
  (``bytes_sent + bytes_received`` of ``merge`` events, summed over sites whose merges go through a
  WAN link, up to the eval's time);
- ``report-timeline.png``: per-site timeline of the first run: compute, WAN wait, evals, merges,
  failures, recoveries and injected faults;
- ``report-link-bytes.png``: bytes per WAN link and direction, from the link counters.

A run that failed is reported like any other and marked failed. A path that is not a run
directory raises :class:`~geotrain.errors.GeotrainError` naming the path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.errors import GeotrainError
from geotrain.events import read_events

DPI = 120
IMAGES = {
    "steps": "report-loss-vs-steps.png",
    "time": "report-loss-vs-time.png",
    "wan": "report-loss-vs-wan-bytes.png",
    "timeline": "report-timeline.png",
    "links": "report-link-bytes.png",
}
# Event kinds drawn as vertical markers on the timeline: (colour, line style, legend name).
MARKER_STYLES = {
    "failure": ("tab:red", "-", "failure"),
    "recovery": ("tab:green", "--", "recovery"),
    "fault_injected": ("tab:purple", ":", "fault injected"),
    "fault_healed": ("tab:purple", "-.", "fault healed"),
}
_FAILURE_EVENTS = ("fault_injected", "failure", "round_failed", "recovery", "fault_healed")


# ---------------------------------------------------------------------------------------------
# Reading a run directory
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the report needs from one run directory."""

    path: Path
    events: list[dict]
    summary: dict | None
    topology: dict | None
    link_files: dict[str, dict]
    label: str = ""
    notes: list[str] = field(default_factory=list)

    # -- basic facts, from summary.json when there is one, else from the events --
    @property
    def t0(self) -> float:
        for e in self.events:
            if e.get("event") == "run_started" and isinstance(e.get("t"), (int, float)):
                return float(e["t"])
        ts = [e["t"] for e in self.events if isinstance(e.get("t"), (int, float))]
        return float(min(ts)) if ts else 0.0

    @property
    def t_end(self) -> float:
        ts = [e["t"] for e in self.events if isinstance(e.get("t"), (int, float))]
        return float(max(ts)) if ts else self.t0

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind and isinstance(e.get("t"), (int, float))]

    @property
    def algorithm(self) -> str:
        if self.summary and self.summary.get("algorithm"):
            return str(self.summary["algorithm"])
        tr = (self.topology or {}).get("training") or {}
        if tr.get("algorithm"):
            return str(tr["algorithm"])
        for e in self.of("run_started"):
            if e.get("algorithm"):
                return str(e["algorithm"])
        return "unknown"

    @property
    def status(self) -> str:
        if self.summary and self.summary.get("status"):
            return str(self.summary["status"])
        finished = self.of("run_finished")
        if finished and finished[-1].get("status"):
            return str(finished[-1]["status"])
        return "incomplete"

    @property
    def reason(self) -> str | None:
        if self.summary and self.summary.get("reason"):
            return str(self.summary["reason"])
        finished = self.of("run_finished")
        if finished and finished[-1].get("reason"):
            return str(finished[-1]["reason"])
        if self.status == "incomplete":
            return "no summary.json and no run_finished event (still running, or killed)"
        return None

    @property
    def sites(self) -> list[str]:
        """Site names in topology order (else the order they appear in the events)."""
        names = [s.get("name") for s in (self.topology or {}).get("sites") or [] if s.get("name")]
        if names:
            return names
        if self.summary and self.summary.get("sites"):
            return list(self.summary["sites"])
        for e in self.of("run_started"):
            if e.get("sites"):
                return [str(s) for s in e["sites"]]
        seen: list[str] = []
        for e in self.events:
            s = e.get("site")
            if e.get("event") in ("inner_step", "merge", "site_ready") and s and s not in seen:
                seen.append(s)
        return seen

    def workers(self, site: str) -> int | None:
        for s in (self.topology or {}).get("sites") or []:
            if s.get("name") == site:
                return s.get("workers")
        if self.summary and site in (self.summary.get("sites") or {}):
            return self.summary["sites"][site].get("workers")
        joined = [e for e in self.of("site_joined") if e.get("site") == site]
        return joined[-1].get("workers") if joined else None

    @property
    def inner_steps_per_round(self) -> int | None:
        return ((self.topology or {}).get("training") or {}).get("inner_steps")

    @property
    def rounds_planned(self) -> int | None:
        if self.summary and self.summary.get("rounds_planned") is not None:
            return self.summary["rounds_planned"]
        return ((self.topology or {}).get("training") or {}).get("rounds")

    @property
    def rounds_completed(self) -> int:
        if self.summary and self.summary.get("rounds_completed") is not None:
            return int(self.summary["rounds_completed"])
        commits = {e.get("round") for e in self.of("commit")}
        if self.algorithm == "ddp" and self.inner_steps_per_round:
            return len(commits) // self.inner_steps_per_round
        return len(commits)

    @property
    def wall_seconds(self) -> float:
        if self.summary and self.summary.get("wall_seconds") is not None:
            return float(self.summary["wall_seconds"])
        return self.t_end - self.t0

    @property
    def coordinator_at(self) -> str | None:
        return ((self.topology or {}).get("coordinator") or {}).get("at")

    def crosses_wan(self, site: str | None) -> bool:
        """Whether a site's merges go through a WAN link (a site at the coordinator's place has none)."""
        at = self.coordinator_at
        return not (at is not None and site == at)

    def evals(self) -> list[dict]:
        out = [e for e in self.of("eval") if _is_number(e.get("loss")) and _is_number(e.get("step"))]
        return sorted(out, key=lambda e: (e["step"], e["t"]))

    @property
    def initial_loss(self) -> float | None:
        if self.summary and "initial_eval_loss" in self.summary:
            return self.summary["initial_eval_loss"]
        ev = self.evals()
        return ev[0]["loss"] if ev and ev[0]["step"] == 0 else None

    @property
    def final_loss(self) -> float | None:
        if self.summary and "final_eval_loss" in self.summary:
            return self.summary["final_eval_loss"]
        ev = self.evals()
        return ev[-1]["loss"] if ev else None

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        """{link name: (bytes forward, bytes backward)} from summary.json, else links/*.json."""
        links = (self.summary or {}).get("links") or {}
        if not links:
            links = self.link_files
        out = {}
        for name, st in links.items():
            shown = name[len("link "):] if name.startswith("link ") else name
            out[shown] = (int(st.get("bytes_forward") or 0), int(st.get("bytes_backward") or 0))
        return out

    @property
    def wan_bytes(self) -> int | None:
        if self.summary and self.summary.get("wan_bytes") is not None:
            return int(self.summary["wan_bytes"])
        links = self.link_bytes()
        return sum(f + b for f, b in links.values()) if links else None

    def merge_wan_bytes(self) -> int:
        return sum(int(e.get("bytes_sent") or 0) + int(e.get("bytes_received") or 0)
                   for e in self.of("merge") if self.crosses_wan(e.get("site")))

    def site_stats(self) -> dict[str, dict]:
        """Per site: inner steps, merges, compute and WAN-wait seconds (summary.json, else events)."""
        from_summary = (self.summary or {}).get("sites") or {}
        out = {}
        for site in self.sites:
            s = from_summary.get(site)
            if s is not None:
                out[site] = {"inner_steps": s.get("inner_steps"), "merges": s.get("merges"),
                             "compute_seconds": float(s.get("compute_seconds") or 0.0),
                             "wan_wait_seconds": float(s.get("wan_wait_seconds") or 0.0)}
                continue
            steps = [e for e in self.of("inner_step") if e.get("site") == site]
            merges = [e for e in self.of("merge") if e.get("site") == site]
            out[site] = {"inner_steps": len(steps), "merges": len(merges),
                         "compute_seconds": round(sum(float(e.get("compute_s") or 0.0) for e in steps), 3),
                         "wan_wait_seconds": round(sum(float(e.get("seconds") or 0.0) for e in merges), 3)}
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"`{path.name}` could not be read ({exc.__class__.__name__}); it was ignored")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{path.name}` is not a JSON object; it was ignored")
        return None
    return data


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Raises GeotrainError when it is not one."""
    path = Path(run_dir)
    if not path.exists():
        raise GeotrainError(f"{path}: no such run directory")
    if not path.is_dir():
        raise GeotrainError(f"{path}: not a directory (give the run directory that holds metrics.jsonl)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise GeotrainError(f"{path}: not a run directory (no metrics.jsonl in it)")
    try:
        events = [e for e in read_events(metrics) if isinstance(e, dict)]
    except (OSError, UnicodeDecodeError) as exc:
        raise GeotrainError(f"{metrics}: cannot read it: {exc}") from exc
    notes: list[str] = []
    if not events:
        notes.append("`metrics.jsonl` holds no events")
    summary = _read_json(path / "summary.json", notes)
    if summary is None and not any("summary.json" in n for n in notes):
        notes.append("no `summary.json` (the run did not finish writing it); numbers come from the events")
    topology = _read_json(path / "topology.json", notes)
    link_files = {}
    for f in sorted((path / "links").glob("*.json")) if (path / "links").is_dir() else []:
        st = _read_json(f, notes)
        if st is not None:
            link_files[str(st.get("name") or f.stem)] = st
    return Run(path=path, events=events, summary=summary, topology=topology, link_files=link_files,
               label=_default_label(path, events, summary, topology), notes=notes)


def _default_label(path: Path, events, summary, topology) -> str:
    run = Run(path=path, events=events, summary=summary, topology=topology, link_files={})
    return f"{path.resolve().name} ({run.algorithm})"


def _labels(runs: list[Run]) -> None:
    """Legend names: the directory name and algorithm; parent folders added where names clash."""
    names = [r.path.resolve().name for r in runs]
    for r, name in zip(runs, names):
        if names.count(name) > 1:
            parts = r.path.resolve().parts
            name = "/".join(parts[-2:]) if len(parts) >= 2 else name
        r.label = f"{name} ({r.algorithm})"
    seen: dict[str, int] = {}
    for r in runs:  # the same directory given twice
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"


# ---------------------------------------------------------------------------------------------
# Series and timeline data (pure functions; the plots only draw them)
# ---------------------------------------------------------------------------------------------

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
        if not _is_number(t):
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
            t = e.get("happened_t") if _is_number(e.get("happened_t")) else e.get("t")
            text = f"failure: {e.get('what') or '?'} {e.get('target') or ''}".rstrip()
        elif kind == "recovery":
            t = e.get("recovered_t") if _is_number(e.get("recovered_t")) else e.get("t")
            text = f"recovered: {e.get('target') or e.get('what') or '?'}"
        elif kind == "fault_injected":
            t = e.get("t")
            text = f"fault: {e.get('fault') or '?'} {e.get('target') or ''}".rstrip()
        else:
            t = e.get("t")
            text = f"healed: {e.get('fault') or '?'} {e.get('target') or ''}".rstrip()
        if _is_number(t):
            out.append(Marker(t=float(t) - t0, kind=kind, text=text))
    return sorted(out, key=lambda m: m.t)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(i: int) -> str:
    return f"C{i % 10}"


_LOSS_AXES = {
    "steps": ("steps", "inner steps (per site)", "Eval loss vs inner steps"),
    "time": ("wall_s", "wall time since run start (s)", "Eval loss vs wall-clock time"),
    "wan": ("wan_mb", "merge bytes through WAN links (MB, sent + received, all sites)",
            "Eval loss vs WAN traffic"),
}


def loss_figure(all_series: list[Series], x: str):
    """A figure of eval loss against ``x`` (steps | time | wan), one line and legend entry per run."""
    plt = _pyplot()
    attr, xlabel, title = _LOSS_AXES[x]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI)
    drawn = 0
    log_x = False
    if x == "wan":
        positive = [v for s in all_series for v in s.wan_mb if v > 0]
        # Runs that differ by orders of magnitude in traffic (diloco vs ddp) need a log axis.
        log_x = bool(positive) and max(positive) / min(positive) > 50
    hidden_zero = False
    for i, s in enumerate(all_series):
        xs, ys = getattr(s, attr), s.loss
        why_empty = " (no evals)"
        if log_x:
            pts = [(a, b) for a, b in zip(xs, ys) if a > 0]
            hidden_zero |= len(pts) < len(xs)
            if xs and not pts:
                why_empty = " (no eval after a merge)"
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        label = s.label + ("  [FAILED]" if s.status == "failed" else "")
        if xs:
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, color=_colour(i), label=label)
        else:  # keep the run in the legend even without points
            ax.plot([], [], marker="o", color=_colour(i), label=label + why_empty)
        drawn += len(xs)
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        # Plain numbers (2, 5, 10, 20, 50, 100 MB) instead of powers of ten.
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6) in (2, 5) else ""))
        xlabel += ", log scale"
        if hidden_zero:
            title += "\n(evals before any merge, at 0 bytes, cannot be shown on the log axis)"
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval loss (cross-entropy, nats/token)")
    ax.grid(True, alpha=0.3, which="both" if log_x else "major")
    if drawn == 0:
        ax.text(0.5, 0.5, "no eval events in these runs", ha="center", va="center", transform=ax.transAxes,
                color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    return fig


def timeline_figure(run: Run, tl: Timeline):
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    names = list(tl.sites)
    n = max(len(names), 1)
    band = 1.0 if tl.markers else 0.0  # room above the rows for marker labels
    fig_h = 1.9 + 0.75 * n + 0.6 * band
    fig, ax = plt.subplots(figsize=(12, fig_h), dpi=DPI)
    h = 0.6
    for row, name in enumerate(names):
        st = tl.sites[name]
        y = n - 1 - row  # first site on top
        bars = [
            (st.starting, "0.85"),
            (st.compute, "tab:blue"),
            (st.wan, "tab:orange"),
            (st.evals, "tab:green"),
        ]
        for intervals, colour in bars:
            if intervals:
                ax.broken_barh([(a, b - a) for a, b in intervals], (y - h / 2, h), facecolors=colour,
                               edgecolors="none")
        if st.merges:
            ax.plot(st.merges, [y + h / 2 + 0.08] * len(st.merges), linestyle="none", marker="v",
                    markersize=4, color="black")
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(names)) if names else [""])
    # Process start-up (imports, joining) can take most of a short run: start the axis shortly
    # before the first site was ready, or at the first marker if that is earlier.
    left = tl.view_start
    ax.set_xlim(left, tl.end + (tl.end - left) * 0.01)
    ax.set_ylim(-0.6, n - 0.4 + band * 0.9)
    ax.set_xlabel("seconds since run start (s)")
    ax.set_ylabel("site")
    title = f"Timeline of {run.label}: what each site's leader was doing"
    if left > 0:
        title += f"\n(0 – {left:.1f} s, processes starting up, not shown)"
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)

    # Vertical markers with labels staggered over three levels where they would collide.
    trans = blended_transform_factory(ax.transData, ax.transData)
    last_at_level = [-math.inf] * 3
    min_sep = (tl.end - left) * 0.16
    for m in tl.markers:
        colour, style, _ = MARKER_STYLES[m.kind]
        ax.axvline(m.t, color=colour, linestyle=style, linewidth=1.4)
        level = min(range(3), key=lambda k: (last_at_level[k] > m.t - min_sep, last_at_level[k]))
        last_at_level[level] = m.t
        near_right = m.t > tl.end - 0.3 * (tl.end - left)  # write the label leftwards, or it is cut off
        ax.text(m.t, n - 0.45 + band * (0.68 - 0.27 * level), m.text + " " if near_right else " " + m.text,
                transform=trans, fontsize=8, color=colour, va="center", ha="right" if near_right else "left",
                clip_on=True,
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
    if not any(st.compute or st.wan for st in tl.sites.values()):
        ax.text(0.5, 0.5, "no inner_step or merge events in this run", ha="center", va="center",
                transform=ax.transAxes, color="grey")

    handles = [Patch(color="0.85", label="starting (until site_ready)"), Patch(color="tab:blue", label="compute"),
               Patch(color="tab:orange", label="WAN wait (merge)"), Patch(color="tab:green", label="eval"),
               Line2D([], [], linestyle="none", marker="v", color="black", label="merge done")]
    kinds = {m.kind for m in tl.markers}
    for kind, (colour, style, name) in MARKER_STYLES.items():
        if kind in kinds:
            handles.append(Line2D([], [], color=colour, linestyle=style, label=name))
    ncol = min(len(handles), 5)
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.1 + 0.22 * rows) / fig_h, 1, 1))
    return fig


def links_figure(runs: list[Run]):
    plt = _pyplot()
    import numpy as np
    from matplotlib.patches import Patch

    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig_h = 4.0 * rows + 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 0.5, fig_h), dpi=DPI, squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    colours = {"forward": "tab:blue", "backward": "tab:orange"}
    for ax, run in zip(axes.flat, runs):
        links = run.link_bytes()
        names = sorted(links)
        if not names:
            ax.text(0.5, 0.5, "no WAN links\n(no link counters in this run)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            idx = np.arange(len(names))
            fwd = [links[k][0] / 1e6 for k in names]
            bwd = [links[k][1] / 1e6 for k in names]
            top = max(fwd + bwd)
            fmt = "%.2f" if top < 10 else "%.1f" if top < 1000 else "%.0f"
            w = 0.38
            for offset, values, direction in ((-w / 2, fwd, "forward"), (w / 2, bwd, "backward")):
                bars = ax.bar(idx + offset, values, w, color=colours[direction])
                ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
            ax.set_xticks(idx)
            ax.set_xticklabels(names, rotation=15 if len(names) > 3 else 0, fontsize=9,
                               ha="right" if len(names) > 3 else "center")
            ax.set_ylabel("bytes through the link (MB)")
            ax.set_ylim(0, top * 1.15 if top > 0 else 1)
            ax.grid(True, axis="y", alpha=0.3)
        total = run.wan_bytes
        title = run.label + ("  [FAILED]" if run.status == "failed" else "")
        if total is not None:
            title += f"\nWAN total {total / 1e6:,.1f} MB"
        ax.set_title(title, fontsize=10)
    fig.suptitle("Bytes per WAN link and direction (link emulator counters"
                 + ("; each panel has its own scale)" if len(runs) > 1 else ")"), fontsize=12)
    if any(run.link_bytes() for run in runs):
        fig.legend(handles=[Patch(color=colours["forward"], label="forward (site → coordinator)"),
                            Patch(color=colours["backward"], label="backward (coordinator → site)")],
                   loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig_h, 1, 1))
    return fig


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write the plot: {exc}") from exc
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _md(v: Any) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _loss(v: Any) -> str:
    return f"{v:.4f}" if _is_number(v) else "–"


def _mb(v: int | None) -> str:
    return "–" if v is None else f"{v / 1e6:,.2f} MB ({v:,} B)"


def _sites_by_workers(run: Run) -> str:
    sites = run.sites
    workers = [run.workers(s) for s in sites]
    if not sites:
        return "–"
    if len(set(workers)) == 1 and workers[0] is not None:
        return f"{len(sites)}×{workers[0]} ({', '.join(sites)})"
    return f"{len(sites)} sites: " + ", ".join(f"{s}×{w if w is not None else '?'}" for s, w in zip(sites, workers))


def _status_text(run: Run) -> str:
    if run.status == "completed":
        return "completed"
    text = f"**{run.status.upper()}**"
    return text + (f": {_md(run.reason)}" if run.reason else "")


def _run_section(run: Run, index: int) -> list[str]:
    planned = run.rounds_planned
    h = run.inner_steps_per_round
    heading = f"## {index}. {_md(run.label)}" + (" — FAILED" if run.status == "failed" else "")
    if run.status == "incomplete":
        heading += " — INCOMPLETE"
    tps = (run.summary or {}).get("tokens_per_second")
    lines = [heading, "", f"Run directory: `{run.path}`", "",
             "| | |", "|---|---|",
             f"| status | {_status_text(run)} |",
             f"| algorithm | {_md(run.algorithm)} |",
             f"| sites × workers | {_md(_sites_by_workers(run))} |",
             f"| H (inner steps per round) | {h if h is not None else '–'} |",
             f"| rounds completed / planned | {run.rounds_completed} / {planned if planned is not None else '?'} |",
             f"| initial eval loss | {_loss(run.initial_loss)} |",
             f"| final eval loss | {_loss(run.final_loss)} |",
             f"| WAN bytes (link counters, both directions) | {_mb(run.wan_bytes)} |",
             f"| merge payload bytes through WAN links | {_mb(run.merge_wan_bytes())} |",
             f"| wall seconds | {run.wall_seconds:.1f} |"]
    if _is_number(tps):
        lines.append(f"| tokens per second | {tps:,.0f} |")
    lines += ["", "| site | workers | inner steps | merges | compute (s) | WAN wait (s) | compute utilisation |",
              "|---|---|---|---|---|---|---|"]
    for site, st in run.site_stats().items():
        c, w = st["compute_seconds"], st["wan_wait_seconds"]
        util = f"{100 * c / (c + w):.1f} %" if c + w > 0 else "–"
        workers = run.workers(site)
        steps = st["inner_steps"] if st["inner_steps"] is not None else "–"
        merges = st["merges"] if st["merges"] is not None else "–"
        lines.append(f"| {_md(site)} | {workers if workers is not None else '?'} | {steps} | {merges} "
                     f"| {c:.2f} | {w:.2f} | {util} |")
    lines.append("")
    lines.append("Compute utilisation = compute / (compute + WAN wait), from the site leader's timings.")
    if run.notes:
        lines += [""] + [f"> Note: {n}" for n in run.notes]
    lines.append("")
    return lines


def _incident_rows(runs: list[Run]) -> list[str]:
    rows = []
    for run in runs:
        t0 = run.t0
        for e in sorted((e for e in run.events if e.get("event") in _FAILURE_EVENTS and _is_number(e.get("t"))),
                        key=lambda e: e["t"]):
            kind = e["event"]
            at = e["t"]
            what = e.get("what") or e.get("fault") or ""
            target = e.get("target") or ""
            details = []
            if kind == "failure":
                if _is_number(e.get("happened_t")):
                    at = e["happened_t"]
                    if _is_number(e.get("detected_t")):
                        details.append(f"detected after {e['detected_t'] - e['happened_t']:.2f} s")
                if e.get("reason"):
                    details.append(str(e["reason"]))
            elif kind == "recovery":
                if _is_number(e.get("recovered_t")):
                    at = e["recovered_t"]
                if _is_number(e.get("seconds")):
                    details.append(f"took {e['seconds']:.2f} s")
                if e.get("rounds_lost") is not None:
                    details.append(f"rounds lost: {e['rounds_lost']}")
            elif kind == "fault_injected":
                if e.get("params"):
                    details.append(json.dumps(e["params"], sort_keys=True))
                if _is_number(e.get("duration_s")):
                    details.append(f"for {e['duration_s']:g} s")
            elif kind == "round_failed":
                what = f"round {e.get('round', '?')}"
                if e.get("reason"):
                    details.append(str(e["reason"]))
            rows.append(f"| {_md(run.label)} | {at - t0:.2f} | {kind} | {_md(what)} | {_md(target)} | "
                        f"{_md('; '.join(details))} |")
    return rows


def render_markdown(runs: list[Run], images: dict[str, str]) -> str:
    lines = ["# geotrain report", ""]
    lines.append("Runs: " + ", ".join(f"`{r.path}`" for r in runs))
    lines.append("")
    if len(runs) > 1:
        lines += ["| run | status | algorithm | sites × workers | H | rounds | initial → final eval loss "
                  "| WAN MB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            wan = f"{r.wan_bytes / 1e6:,.1f}" if r.wan_bytes is not None else "–"
            lines.append(f"| {_md(r.label)} | {'completed' if r.status == 'completed' else '**' + r.status + '**'} "
                         f"| {_md(r.algorithm)} | {_md(_sites_by_workers(r))} | {r.inner_steps_per_round or '–'} "
                         f"| {r.rounds_completed}/{r.rounds_planned if r.rounds_planned is not None else '?'} "
                         f"| {_loss(r.initial_loss)} → {_loss(r.final_loss)} | {wan} | {r.wall_seconds:.1f} |")
        lines.append("")
    for i, run in enumerate(runs, 1):
        lines += _run_section(run, i)
    incidents = _incident_rows(runs)
    if incidents:
        lines += ["## Failures, recoveries and injected faults", "",
                  "Times are seconds since the run started (a failure at the time it happened, a recovery "
                  "at the time it completed).", "",
                  "| run | at (s) | event | what | target | details |", "|---|---|---|---|---|---|", *incidents, ""]
    lines += ["## Eval loss", "",
              f"![eval loss vs inner steps]({images['steps']})", "",
              f"![eval loss vs wall time]({images['time']})", "",
              "WAN traffic at an eval: `bytes_sent + bytes_received` of the `merge` events of every site whose "
              "merges cross a WAN link, written up to the eval's time (tensor payloads; the link counters "
              "above also count protocol overhead).", "",
              f"![eval loss vs WAN bytes]({images['wan']})", "",
              f"## Timeline of {_md(runs[0].label)}", "",
              "One row per site (its leader's view). Compute intervals are rebuilt from `inner_step` events "
              "(each ended at `t` and lasted `compute_s`), WAN waits from `merge` events (ended at `t`, lasted "
              "`seconds`); intervals closer than a pixel are drawn merged.", "",
              f"![per-site timeline]({images['timeline']})", "",
              "## WAN links", "",
              f"![bytes per link]({images['links']})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write report.md and its PNGs into ``out``; returns the path of report.md."""
    if not run_dirs:
        raise GeotrainError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    _labels(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeotrainError(f"{out}: cannot create the output directory: {exc}") from exc
    all_series = [series(r) for r in runs]
    for key in ("steps", "time", "wan"):
        _save(loss_figure(all_series, key), out / IMAGES[key])
    _save(timeline_figure(runs[0], timeline(runs[0])), out / IMAGES["timeline"])
    _save(links_figure(runs), out / IMAGES["links"])
    rel = {k: Path(os.path.relpath(out / v, out)).as_posix() for k, v in IMAGES.items()}
    report = out / "report.md"
    try:
        tmp = out / "report.md.tmp"
        tmp.write_text(render_markdown(runs, rel))
        os.replace(tmp, report)
    except OSError as exc:
        raise GeotrainError(f"{report}: cannot write the report: {exc}") from exc
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geotrain report",
                                description="Write report.md with plots (eval loss, per-site timeline, WAN bytes) "
                                            "for one or more run directories.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run directory (holds metrics.jsonl); several are overlaid in the loss plots")
    p.add_argument("--out", type=Path, default=None,
                   help="where report.md and the PNGs go (default: the first run directory)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_report(args.run_dirs, args.out if args.out is not None else args.run_dirs[0])
    except GeotrainError as exc:
        print(f"geotrain report: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
