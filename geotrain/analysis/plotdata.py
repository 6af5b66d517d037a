"""What the report's plots draw, as pure functions of :class:`~geotrain.analysis.rundir.Run` objects.

Nothing here draws: geotrain.analysis.figures does. The functions return the numbers, the labels and
the reasons a plot is absent, so tests assert on them instead of on pixels.

- :func:`metric_plots`: one :class:`MetricPlot` per metric name, one :class:`Line` per site (per
  worker for scalars several ranks of a site log), never two sites joined into one line;
- :func:`series`: the curve of one run's built-in eval loss (kept for the sweep and older callers);
- :func:`timeline`: per-site compute, WAN-wait and eval intervals plus failure/fault markers,
  cropped to the training (:func:`crop_bounds`), start-up and shutdown measured, not drawn;
- :func:`byte_unit`, :func:`fmt_sig`: units that fit the numbers.

The events read (one JSON object per line of RUN_DIR/metrics.jsonl, docs/events.md):

``eval``
    ``{"site", "round", "step", "loss": value, "metric": name?}`` from a site's leader. Without
    ``metric`` it is the built-in trainer's eval: cross-entropy in nats per token (byte). With it,
    the value of the script's own evaluation called ``metric`` (``diloco.log_eval(mse, metric="mse")``):
    its plot is titled and labelled with that name and nothing else.
``metric``
    ``{"site", "rank", "round", "step", <name>: value, ...}`` (``diloco.log(step=..., **scalars)``):
    every field that is not one of geotrain.worker.metrics.RESERVED (``t``, ``event``, ``proc``,
    ``site``, ``rank``, ``round``, ``step``, ...) and holds a finite number is a scalar; each scalar
    name gets its own plot against ``step``, one line per site, or per ``site/rank`` when more than
    one rank of a site logs it.
``merge``
    ``{"site", "bytes_sent", "bytes_received", "seconds", ...}``: WAN bytes so far at each point.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from geotrain.analysis.rundir import Run, is_number, load_run
from geotrain.worker.metrics import RESERVED as _NOT_SCALARS  # fields of a `metric` event that are not scalars

# Event kinds drawn as vertical markers on the timeline: (colour, line style, legend name).

MARKER_STYLES = {
    "failure": ("tab:red", "-", "failure"),
    "recovery": ("tab:green", "--", "recovery"),
    "fault_injected": ("tab:purple", ":", "fault injected"),
    "fault_healed": ("tab:purple", "-.", "fault healed"),
}

BUILTIN_EVAL_LABEL = "eval loss (cross-entropy, nats/token)"


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

_BYTE_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))


def byte_unit(values) -> tuple[str, float]:
    """The decimal byte unit that fits ``values`` (their largest magnitude): ``(name, bytes per unit)``.

    The largest value is shown as at least 1 and below 1000 of the unit: 812 -> B, 13_600 -> kB,
    9.65e6 -> MB; no values or only zeros -> B."""
    top = max((abs(float(v)) for v in values if is_number(v)), default=0.0)
    name, factor = _BYTE_UNITS[0]
    for name_, factor_ in _BYTE_UNITS:
        if top >= factor_ * 0.9995:  # 999.6 B rounds to "1.00 kB", not "1e+03 B"
            name, factor = name_, factor_
    return name, factor


def fmt_sig(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` significant digits, never in exponent form: 0.00123, 1.5, 12.3, 812, 4096."""
    if not is_number(v):
        return "–"
    if v == 0:
        return "0"
    exp = math.floor(math.log10(abs(v)))
    decimals = max(digits - 1 - exp, 0)
    text = f"{round(v, decimals):.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---------------------------------------------------------------------------------------------
# Metric plots: one figure per metric name, one line per site
# ---------------------------------------------------------------------------------------------

@dataclass
class Line:
    """One line of a metric plot: one site (or one worker) of one run. Points sorted by step."""

    run: str               # the run's label
    who: str               # "us-east", or "us-east/1" when several ranks of a site log the scalar
    status: str
    steps: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)     # seconds since the run started
    wan_bytes: list[float] = field(default_factory=list)  # merge bytes through WAN links so far
    values: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.who


@dataclass
class MetricPlot:
    """What one figure draws: a metric against ``steps`` (and, for evals, wall time and WAN bytes)."""

    kind: str              # "eval" | "metric"
    name: str              # the metric's own name; "loss" for the built-in trainer's eval
    ylabel: str
    lines: list[Line]
    builtin: bool = False  # the built-in trainer's cross-entropy eval

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", self.name)

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(ln.run for ln in self.lines))

    def line_label(self, line: Line) -> str:
        """The legend entry: the site, prefixed by the run when several runs share the plot."""
        return f"{line.run}: {line.who}" if len(self.runs) > 1 else line.who


def same_values(lines: list[Line], attr: str = "steps") -> list[list[Line]]:
    """The lines of a plot grouped where they would be drawn on top of each other: the same run, the
    same x (``attr``: steps | wall_s | wan_bytes) and the same values at every point (every rank logs
    the same learning rate; two sites evaluate the same global model after a merge). Each group is
    drawn once and named by all its members, so no line hides another. Groups in the lines' order."""
    groups: dict[tuple, list[Line]] = {}
    for ln in lines:
        key = (ln.run, tuple(getattr(ln, attr)), tuple(ln.values))
        groups.setdefault(key, []).append(ln)
    return list(groups.values())


def _wan_so_far(run: Run):
    """A function of an eval/metric event: the merge bytes that crossed WAN links before it.

    Synchronous diloco: the merges of the rounds before the event's ``round`` (every site's, so two
    sites evaluating the same model get the same number, whichever merge was written first); other
    algorithms (rounds per site or per fragment) and events without a round: the merges written at or
    before the event's time."""
    merges = [(e["t"], e.get("round"), int(e.get("bytes_sent") or 0) + int(e.get("bytes_received") or 0))
              for e in run.of("merge") if run.crosses_wan(e.get("site"))]
    by_round = run.algorithm == "diloco" and all(is_number(r) for _, r, _ in merges)

    def at(e: dict) -> float:
        if by_round and is_number(e.get("round")):
            return float(sum(b for _, r, b in merges if r < e["round"]))
        return float(sum(b for t, _, b in merges if t <= e["t"]))
    return at


def _site_order(run: Run, names) -> list[str]:
    order = {s: i for i, s in enumerate(run.sites)}
    return sorted(names, key=lambda w: (order.get(w.split("/")[0], len(order)), w))


def eval_lines(run: Run) -> dict[str | None, list[Line]]:
    """{eval metric name (None: the built-in trainer's cross-entropy): one line per evaluating site}."""
    t0, wan = run.t0, _wan_so_far(run)
    by: dict[str | None, dict[str, Line]] = {}
    for e in run.evals():
        metric = e.get("metric") if isinstance(e.get("metric"), str) else None
        site = str(e.get("site") or str(e.get("proc") or "?").split("/")[0])
        line = by.setdefault(metric, {}).setdefault(site, Line(run=run.label, who=site, status=run.status))
        line.steps.append(float(e["step"]))
        line.wall_s.append(float(e["t"]) - t0)
        line.wan_bytes.append(wan(e))
        line.values.append(float(e["loss"]))
    return {m: [lines[w] for w in _site_order(run, lines)] for m, lines in by.items()}


def metric_lines(run: Run) -> dict[str, list[Line]]:
    """{scalar name: one line per site}, from ``metric`` events. A site where more than one rank logs
    the scalar gets one line per rank (``site/rank``): their values differ (each rank's own batch)."""
    t0, wan = run.t0, _wan_so_far(run)
    points: dict[str, dict[tuple[str, int], list[tuple[float, float, float, float]]]] = {}
    for e in run.of("metric"):
        if not is_number(e.get("step")):
            continue
        site = str(e.get("site") or str(e.get("proc") or "?").split("/")[0])
        rank = int(e["rank"]) if is_number(e.get("rank")) else 0
        for name, v in e.items():
            if name in _NOT_SCALARS or not is_number(v):
                continue
            points.setdefault(name, {}).setdefault((site, rank), []).append(
                (float(e["step"]), float(e["t"]) - t0, wan(e), float(v)))
    out: dict[str, list[Line]] = {}
    for name, per in points.items():
        ranks: dict[str, int] = {}
        for site, _ in per:
            ranks[site] = ranks.get(site, 0) + 1
        lines = {}
        for (site, rank), pts in per.items():
            who = site if ranks[site] == 1 else f"{site}/{rank}"
            pts.sort()
            lines[who] = Line(run=run.label, who=who, status=run.status, steps=[p[0] for p in pts],
                              wall_s=[p[1] for p in pts], wan_bytes=[p[2] for p in pts], values=[p[3] for p in pts])
        out[name] = [lines[w] for w in _site_order(run, lines)]
    return out


def metric_plots(runs: list[Run]) -> list[MetricPlot]:
    """Every figure the report can draw from the runs' evals and scalars, in a stable order: the
    built-in eval first, then named evals, then scalars, each by name. A name absent from every run
    has no plot (:func:`absent_plots` says why)."""
    evals: dict[str | None, list[Line]] = {}
    scalars: dict[str, list[Line]] = {}
    for run in runs:
        for m, lines in eval_lines(run).items():
            evals.setdefault(m, []).extend(lines)
        for m, lines in metric_lines(run).items():
            scalars.setdefault(m, []).extend(lines)
    plots = []
    if None in evals:
        plots.append(MetricPlot("eval", "loss", BUILTIN_EVAL_LABEL, evals.pop(None), builtin=True))
    for m in sorted(evals):  # type: ignore[arg-type]
        plots.append(MetricPlot("eval", m, f"eval {m}", evals[m]))
    for m in sorted(scalars):
        plots.append(MetricPlot("metric", m, m, scalars[m]))
    return plots


def absent_plots(runs: list[Run]) -> list[str]:
    """Why plots a reader might look for are not in the report (one sentence each)."""
    out = []
    for run in runs:
        if not run.evals():
            if run.of("inner_step") and not run.of("eval"):
                out.append(f"{run.label}: no eval plot — the run has no `eval` events (a script reports one with "
                           f"`diloco.log_eval(value, metric=...)`).")
            else:
                out.append(f"{run.label}: no eval plot — no `eval` event with a numeric `loss` and `step`.")
        if not run.of("metric") and run.of("inner_step") and any(e.get("metric") for e in run.of("eval")):
            out.append(f"{run.label}: no scalar plots — the script logged no `metric` events (`diloco.log(...)`).")
    return out


def bytes_panel(run: Run) -> tuple[str, dict[str, tuple[int, int]]]:
    """What a run's panel of the bytes figure shows: ``(source, {bar group: (forward, backward)})``,
    from the link counters, else the merge payloads of the sites whose merges cross a WAN link
    (sent = forward, received = backward); empty when it has neither."""
    links = run.link_bytes()
    if links:
        return "link emulator counters", {k: links[k] for k in _by_site(run, links)}
    per: dict[str, list[int]] = {}
    for e in run.of("merge"):
        if run.crosses_wan(e.get("site")):
            pair = per.setdefault(str(e.get("site")), [0, 0])
            pair[0] += int(e.get("bytes_sent") or 0)
            pair[1] += int(e.get("bytes_received") or 0)
    if any(a + b for a, b in per.values()):
        return ("merge payloads the sites recorded (no link counters)",
                {k: (per[k][0], per[k][1]) for k in _by_site(run, per)})
    return "", {}


def _by_site(run: Run, names) -> list[str]:
    """Link (or site) names in the topology's site order (a link ``us-east<->hub`` sorts as its site
    ``us-east``; ring links ``ring a->b`` and other names after them, by name)."""
    order = {s: i for i, s in enumerate(run.sites)}

    def key(name: str):
        site = re.split(r"<->|->", name, maxsplit=1)[0].strip()
        return (order.get(site, len(order)), name)
    return sorted(names, key=key)


# ---------------------------------------------------------------------------------------------
# The built-in eval curve of one run (sweeps, older callers)
# ---------------------------------------------------------------------------------------------

@dataclass
class Series:
    """The eval curve of one run, against the three x axes of the loss plots (the first
    evaluating site's evals: the built-in trainer evaluates at one site)."""

    label: str
    algorithm: str
    status: str
    steps: list[float]
    wall_s: list[float]
    wan_mb: list[float]
    loss: list[float]


def series(run_dir: str | Path | Run) -> Series:
    """The eval losses of one run's first evaluating site, with inner step, seconds since start and
    WAN MB so far (``bytes_sent + bytes_received`` of every WAN-crossing ``merge`` at or before the
    eval, in 10^6 bytes)."""
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    s = Series(label=run.label, algorithm=run.algorithm, status=run.status, steps=[], wall_s=[], wan_mb=[], loss=[])
    lines = eval_lines(run)
    first = next(iter(lines.get(None) or next(iter(lines.values()), [])), None)
    if first is not None:
        s.steps, s.wall_s, s.loss = list(first.steps), list(first.wall_s), list(first.values)
        s.wan_mb = [b / 1e6 for b in first.wan_bytes]
    return s


# ---------------------------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------------------------

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
    end: float               # seconds from the run's start to its last event
    view_start: float = 0.0  # the plot's x range: the training, a little padded (crop_bounds)
    view_end: float = 0.0
    train_start: float = 0.0  # first training interval's start (inner step, merge, eval) or marker
    train_end: float = 0.0    # last one's end
    startup_s: float = 0.0    # run start -> train_start, not drawn to scale
    shutdown_s: float = 0.0   # train_end -> the run's last event

    @property
    def has_training(self) -> bool:
        return any(st.compute or st.wan or st.evals for st in self.sites.values())


def crop_bounds(spans: list[tuple[float, float]], end: float, pad: float = 0.03) -> tuple[float, float, float, float]:
    """Where the timeline's axis starts and ends: ``(view_start, view_end, train_start, train_end)``.

    ``spans`` are the (start, end) of every training interval (inner steps, merges, evals) and of the
    markers (a fault during start-up is shown). The axis covers first to last span, padded by
    ``pad`` of its length on each side but never before 0 or past ``end``; start-up (0 to the first
    span) and shutdown (the last span to ``end``) are outside it and reported as durations. No spans:
    the whole run."""
    if not spans:
        return 0.0, max(end, 1e-9), 0.0, max(end, 1e-9)
    first = max(min(a for a, _ in spans), 0.0)
    last = min(max(b for _, b in spans), end) if end > 0 else max(b for _, b in spans)
    last = max(last, first)
    width = max(last - first, 1e-3)
    return max(first - pad * width, 0.0), max(last + pad * width, first + 1e-3), first, last


def timeline(run_dir: str | Path | Run, *, max_intervals: int = 4000) -> Timeline:
    """Per-site intervals of a run, in seconds since it started, cropped to its training.

    Compute: each ``inner_step`` ended at ``t`` and computed for ``compute_s``; when the step also
    waited on the WAN (``wan_s``, ddp: the gradient exchange sits between backward and the
    optimizer step) the compute is placed just before that wait. WAN wait: each ``merge`` ended
    at ``t`` and lasted ``seconds``. Evals: ended at ``t`` and lasted ``seconds``. Adjacent
    intervals closer than a pixel (of the cropped axis) are merged, so thousands of steps stay
    cheap to draw. Start-up (until the first training interval) and shutdown (after the last)
    are measured in ``startup_s`` and ``shutdown_s``; the axis (``view_start``..``view_end``,
    :func:`crop_bounds`) covers the training.
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
    spans = [iv for d in (compute, wan, evals) for ivs in d.values() for iv in ivs]
    spans += [(m.t, m.t) for m in markers]
    view_start, view_end, first, last = crop_bounds(spans, end)
    gap = (view_end - view_start) / 2000  # well under one pixel at the figure's width
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
    return Timeline(sites=sites, markers=markers, end=end, view_start=view_start, view_end=view_end,
                    train_start=first, train_end=last, startup_s=first if spans else 0.0,
                    shutdown_s=max(end - last, 0.0) if spans else 0.0)

# Built-in eval figures keep their historical names (sweeps link to them).
BUILTIN_EVAL_FILES = {"steps": "report-loss-vs-steps.png", "time": "report-loss-vs-time.png",
                      "wan": "report-loss-vs-wan-bytes.png"}
_X_FILE = {"steps": "steps", "time": "time", "wan": "wan-bytes"}
_X_WORDS = {"steps": "inner steps", "time": "wall time", "wan": "WAN bytes"}  # for people: alt text, not file names


@dataclass
class FigureSpec:
    """One PNG the report writes: a metric plot against an x axis, the timeline, or the bytes."""

    file: str
    kind: str                      # "eval" | "metric" | "timeline" | "bytes"
    alt: str
    plot: MetricPlot | None = None
    x: str = "steps"


def figure_plan(runs: list[Run]) -> tuple[list[FigureSpec], list[str]]:
    """The figures the report draws for these runs, and a sentence for each one it leaves out.

    Per eval metric: against inner steps and wall time, and against WAN bytes when some eval came
    after bytes crossed a WAN link. Per scalar of ``metric`` events: against steps. The timeline of
    the first run when it has inner steps, merges or evals. The bytes per link (or per site) for the
    runs that have any. Nothing is drawn without data: every plot has at least one point."""
    specs: list[FigureSpec] = []
    absent = absent_plots(runs)
    used: set[str] = set()

    def name(base: str) -> str:
        out, k = base, 2
        while out in used:
            out, k = base.replace(".png", f"-{k}.png"), k + 1
        used.add(out)
        return out

    for plot in metric_plots(runs):
        if plot.kind == "eval":
            for x in ("steps", "time", "wan"):
                if x == "wan" and not any(v > 0 for ln in plot.lines for v in ln.wan_bytes):
                    absent.append(f"{plot.ylabel} vs WAN bytes: no merge crossed a WAN link before an eval "
                                  f"(all evals at 0 bytes).")
                    continue
                file = BUILTIN_EVAL_FILES[x] if plot.builtin else f"report-eval-{plot.slug}-vs-{_X_FILE[x]}.png"
                specs.append(FigureSpec(name(file), "eval", f"{plot.ylabel} vs {_X_WORDS[x]}", plot, x))
        else:
            specs.append(FigureSpec(name(f"report-metric-{plot.slug}-vs-steps.png"), "metric",
                                    f"{plot.name} vs inner steps", plot, "steps"))
    first = runs[0]
    if first.of("inner_step") or first.of("merge") or first.of("eval"):
        specs.append(FigureSpec(name("report-timeline.png"), "timeline", "per-site timeline"))
    else:
        absent.append(f"{first.label}: no timeline — no inner_step, merge or eval events.")
    with_bytes = [r for r in runs if bytes_panel(r)[1]]
    if with_bytes:
        specs.append(FigureSpec(name("report-link-bytes.png"), "bytes", "bytes per WAN link"))
    for r in runs:
        if r not in with_bytes:
            absent.append(f"{r.label}: no WAN bytes plot — no link counters and no merge crossed a WAN link.")
    return specs, absent


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
