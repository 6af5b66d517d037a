"""The report's figures (matplotlib, Agg backend, imported only when a figure is drawn).

Each ``*_figure`` function draws data computed by geotrain.analysis.plotdata (which also decides
what is absent: nothing here draws an empty frame) and returns the figure; :func:`save_figure`
writes it as a PNG and closes it.
"""

from __future__ import annotations

import math
from pathlib import Path

from geotrain.analysis.plotdata import (MARKER_STYLES, Line, MetricPlot, Series, Timeline, byte_unit, bytes_panel,
                                       fmt_sig, same_values)
from geotrain.analysis.rundir import Run
from geotrain.errors import GeotrainError

DPI = 120
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", "-.", ":")

X_AXES = {
    "steps": ("steps", "inner steps (per site)", "vs inner steps"),
    "time": ("wall_s", "wall time since run start (s)", "vs wall-clock time"),
    "wan": ("wan_bytes", "merge bytes through WAN links (sent + received, all sites)", "vs WAN traffic"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(i: int) -> str:
    return f"C{i % 10}"


def metric_figure(plot: MetricPlot, x: str = "steps"):
    """One metric against ``x`` (steps | time | wan): one line per site (per worker) of every run.

    Lines of the same run share nothing but the axes: a different colour, marker and line style each.
    Lines that would lie exactly on top of each other (every rank logs the same learning rate, two
    sites evaluate the same model) are drawn once, named by all of them (plotdata.same_values)."""
    plt = _pyplot()
    attr, xlabel, what = X_AXES[x]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI)
    unit, factor = ("", 1.0)
    if x == "wan":
        unit, factor = byte_unit(v for ln in plot.lines for v in ln.wan_bytes)
        xlabel = xlabel.replace("(", f"({unit}, ", 1)
    positive = [v / factor for ln in plot.lines for v in getattr(ln, attr) if v > 0]
    log_x = x == "wan" and bool(positive) and max(positive) / min(positive) > 50
    hidden_zero = False
    site_index: dict[tuple[str, str], int] = {}
    rank_index: dict[tuple[str, str], int] = {}
    for group in same_values(plot.lines, attr):
        ln = group[0]
        key = (ln.run, ln.who.split("/")[0])
        si = site_index.setdefault(key, len(site_index))
        ri = rank_index[key] = rank_index.get(key, -1) + 1
        pts = [(a / factor, b) for a, b in zip(getattr(ln, attr), ln.values)]
        if log_x:
            kept = [p for p in pts if p[0] > 0]
            hidden_zero |= len(kept) < len(pts)
            pts = kept
        if not pts:
            continue
        # A colour per site; a line style and marker per site and rank, so that lines with the same
        # values (two sites hold the same model after a merge) both stay visible.
        k = si + ri
        label = ", ".join(plot.line_label(m) for m in group) + ("  (the same values)" if len(group) > 1 else "")
        label += "  [FAILED]" if ln.status == "failed" else ""
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[k % len(_MARKERS)],
                linestyle=_STYLES[k % len(_STYLES)], markersize=5 if k == 0 else 4,
                fillstyle="full" if k % 2 == 0 else "none", linewidth=1.6, color=_colour(si), label=label)
    title = f"{plot.ylabel} {what}" if plot.kind == "eval" else f"{plot.name} {what} (logged by the script)"
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_sig(v)))
        xlabel += ", log scale"
        if hidden_zero:
            title += "\n(points before any merge, at 0 bytes, cannot be shown on the log axis)"
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3, which="both" if log_x else "major")
    who = "site/rank" if any("/" in ln.who for ln in plot.lines) else "site"
    ax.legend(loc="best", fontsize=9, title=who if len(plot.runs) == 1 else f"run: {who}", title_fontsize=9)
    fig.tight_layout()
    return fig


def loss_figure(all_series: list[Series], x: str):
    """The built-in eval loss of several runs against ``x`` (one line per run; kept for callers of
    :func:`geotrain.analysis.plotdata.series`)."""
    lines = [Line(run=s.label, who=s.label, status=s.status, steps=s.steps, wall_s=s.wall_s,
                  wan_bytes=[v * 1e6 for v in s.wan_mb], values=s.loss) for s in all_series]
    plot = MetricPlot("eval", "loss", "eval loss (cross-entropy, nats/token)", lines, builtin=True)
    plot.line_label = lambda line: line.who  # type: ignore[method-assign]
    return metric_figure(plot, x)


def timeline_figure(run: Run, tl: Timeline):
    """Per-site rows of what each site's leader was doing, on an axis cropped to the training:
    start-up and shutdown are written on the figure with their durations, not drawn to scale."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    names = list(tl.sites)
    n = max(len(names), 1)
    band = 1.0 if tl.markers else 0.0  # room above the rows for marker labels
    fig_h = 2.1 + 0.75 * n + 0.6 * band
    fig, ax = plt.subplots(figsize=(12, fig_h), dpi=DPI)
    h = 0.6
    left, right = tl.view_start, tl.view_end
    for row, name in enumerate(names):
        st = tl.sites[name]
        y = n - 1 - row  # first site on top
        bars = [
            ([(max(a, left), b) for a, b in st.starting if b > left], "0.85"),
            (st.compute, "tab:blue"),
            (st.wan, "tab:orange"),
            # an eval with no recorded duration (a script's log_eval) still shows, as a thin bar
            ([(a, max(b, a + 0.004 * (right - left))) for a, b in st.evals], "tab:green"),
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
    ax.set_xlim(left, right)
    ax.set_ylim(-0.6, n - 0.4 + band * 0.9)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("site")
    ax.set_title(f"Timeline of {run.label}: what each site's leader was doing\n"
                 f"the {fmt_sig(tl.train_end - tl.train_start)} s of training, to scale (not drawn: "
                 f"{fmt_sig(tl.startup_s)} s of start-up before it, {fmt_sig(tl.shutdown_s)} s of shutdown "
                 f"after it)", fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    # Start-up and shutdown: hatched edges with their durations, where the axis leaves them out.
    edge = 0.012 * (right - left)
    for at, text, ha in ((left, f"◀ start-up {fmt_sig(tl.startup_s)} s", "left"),
                         (right, f"shutdown {fmt_sig(tl.shutdown_s)} s ▶", "right")):
        if (tl.startup_s if ha == "left" else tl.shutdown_s) <= 0:
            continue
        ax.axvspan(at, at + edge if ha == "left" else at - edge, color="0.6", alpha=0.5, hatch="////", lw=0)
        ax.text(at + (1.5 * edge if ha == "left" else -1.5 * edge), -0.52, text, fontsize=8, color="0.25",
                ha=ha, va="bottom", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))

    # Vertical markers with labels staggered over three levels where they would collide.
    trans = blended_transform_factory(ax.transData, ax.transData)
    last_at_level = [-math.inf] * 3
    min_sep = (right - left) * 0.16
    for m in tl.markers:
        colour, style, _ = MARKER_STYLES[m.kind]
        ax.axvline(m.t, color=colour, linestyle=style, linewidth=1.4)
        level = min(range(3), key=lambda k: (last_at_level[k] > m.t - min_sep, last_at_level[k]))
        last_at_level[level] = m.t
        near_right = m.t > right - 0.3 * (right - left)  # write the label leftwards, or it is cut off
        ax.text(m.t, n - 0.45 + band * (0.68 - 0.27 * level), m.text + " " if near_right else " " + m.text,
                transform=trans, fontsize=8, color=colour, va="center", ha="right" if near_right else "left",
                clip_on=True, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))

    present = {k: any(getattr(st, k) for st in tl.sites.values()) for k in ("compute", "wan", "evals", "merges")}
    present["starting"] = any(b > left for st in tl.sites.values() for _, b in st.starting)
    handles = [h for k, h in (("starting", Patch(color="0.85", label="starting (until site_ready)")),
                              ("compute", Patch(color="tab:blue", label="compute")),
                              ("wan", Patch(color="tab:orange", label="WAN wait (merge)")),
                              ("evals", Patch(color="tab:green", label="eval")),
                              ("merges", Line2D([], [], linestyle="none", marker="v", color="black",
                                                label="merge done"))) if present[k]]
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
    """Bytes per WAN link and direction (link counters), one panel per run that has them; a run
    without link counters but with WAN-crossing merges shows its sites' merge payloads instead.
    Every panel picks the byte unit that fits its numbers."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.patches import Patch

    panels = [(run, *bytes_panel(run)) for run in runs]
    panels = [p for p in panels if p[2]]
    cols = min(len(panels), 3) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig_h = 4.0 * rows + 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 0.5, fig_h), dpi=DPI, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    colours = {"forward": "tab:blue", "backward": "tab:orange"}
    for ax, (run, source, values) in zip(axes.flat, panels):
        names = list(values)
        idx = np.arange(len(names))
        unit, factor = byte_unit(v for pair in values.values() for v in pair)
        fwd = [values[k][0] / factor for k in names]
        bwd = [values[k][1] / factor for k in names]
        top = max(fwd + bwd)
        w = 0.38
        for offset, vals, direction in ((-w / 2, fwd, "forward"), (w / 2, bwd, "backward")):
            bars = ax.bar(idx + offset, vals, w, color=colours[direction])
            ax.bar_label(bars, labels=[fmt_sig(v) for v in vals], fontsize=8, padding=2)
        ax.set_xticks(idx)
        ax.set_xticklabels(names, rotation=15 if len(names) > 3 else 0, fontsize=9,
                           ha="right" if len(names) > 3 else "center")
        ax.set_ylabel(f"bytes ({unit})")
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.grid(True, axis="y", alpha=0.3)
        total = sum(f + b for f, b in values.values())
        title = run.label + ("  [FAILED]" if run.status == "failed" else "")
        from geotrain.units import human_bytes

        title += f"\n{source}: total {human_bytes(total)}"
        ax.set_title(title, fontsize=10)
    fig.suptitle("Bytes across the WAN per link and direction"
                 + ("; each panel has its own scale" if len(panels) > 1 else ""), fontsize=12)
    fig.legend(handles=[Patch(color=colours["forward"], label="forward (site → coordinator)"),
                        Patch(color=colours["backward"], label="backward (coordinator → site)")],
               loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig_h, 1, 1))
    return fig


def save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write the plot: {exc}") from exc
    finally:
        plt.close(fig)
