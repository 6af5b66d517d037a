"""The report's figures (matplotlib, Agg backend, imported only when a figure is drawn).

Each ``*_figure`` function draws data computed by geotrain.analysis.plotdata and returns the
figure; :func:`save_figure` writes it as a PNG and closes it.
"""

from __future__ import annotations

import math
from pathlib import Path

from geotrain.analysis.plotdata import MARKER_STYLES, Series, Timeline
from geotrain.analysis.rundir import Run
from geotrain.errors import GeotrainError

DPI = 120


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


def save_figure(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write the plot: {exc}") from exc
    finally:
        plt.close(fig)
