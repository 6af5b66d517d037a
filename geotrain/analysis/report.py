"""`geotrain report`: a Markdown report with plots for one or more finished (or failed) runs.

    geotrain report RUN_DIR [RUN_DIR ...] [--out DIR]

Reads only what a run leaves in its directory: ``metrics.jsonl`` (docs/events.md),
``summary.json`` (geotrain/run/summary.py), ``topology.json`` (or a site host's
``topology.<site>.json``) and ``links/*.json``. Writes ``report.md`` and PNGs into ``--out``
(default: the first run's directory); which PNGs is decided by
:func:`geotrain.analysis.plotdata.figure_plan`, and report.md says what is absent and why:

- per eval metric, against inner steps, wall time and WAN bytes, one line per site:
  ``report-loss-vs-{steps,time,wan-bytes}.png`` for the built-in trainer's cross-entropy,
  ``report-eval-<metric>-vs-*.png`` for a script's ``diloco.log_eval(value, metric=...)``;
- per scalar a script logs with ``diloco.log(step=..., **scalars)``: ``report-metric-<name>-vs-steps.png``,
  one line per site (per worker where several ranks of a site log it);
- ``report-timeline.png``: the first run's per-site timeline, cropped to its training, with the
  start-up and shutdown durations written on it;
- ``report-link-bytes.png``: bytes per WAN link and direction (link counters; else the sites' merge
  payloads), in the unit that fits.

Directories that are the parts of ONE run written by separate hosts (``geotrain coordinator
--run-dir``, ``geotrain site --run-dir``) are merged into one run first (geotrain.analysis.hosts);
distinct runs are compared. A run that failed is reported like any other and marked failed. A path
that is not a run directory raises :class:`~geotrain.errors.GeotrainError` naming the path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from geotrain.analysis.figures import links_figure, loss_figure, metric_figure, save_figure, timeline_figure
from geotrain.analysis.hosts import combine
from geotrain.analysis.plotdata import (BUILTIN_EVAL_FILES, MARKER_STYLES, FigureSpec, Marker, Series, SiteTimeline,
                                        Timeline, coalesce, figure_plan, series, timeline)
from geotrain.analysis.rundir import Run, is_number, label_runs, load_run
from geotrain.errors import GeotrainError
from geotrain.units import human_bytes

__all__ = ["IMAGES", "MARKER_STYLES", "FigureSpec", "Marker", "Run", "Series", "SiteTimeline", "Timeline", "coalesce",
           "combine", "figure_plan", "links_figure", "load_run", "loss_figure", "main", "md_cell", "metric_figure",
           "render_markdown", "series", "timeline", "timeline_figure", "write_report"]

# The figures of a built-in run (the sweep links to the first three).
IMAGES = {**BUILTIN_EVAL_FILES, "timeline": "report-timeline.png", "links": "report-link-bytes.png"}
_FAILURE_EVENTS = ("fault_injected", "failure", "round_failed", "recovery", "fault_healed")


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def md_cell(v: Any) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _loss(v: Any) -> str:
    return f"{v:.4f}" if is_number(v) else "–"


def _bytes(v: int | None) -> str:
    return "–" if v is None else f"{human_bytes(v)} ({v:,} B)"


def _eval_name(run: Run) -> str:
    """What the run's evals measure: "eval loss" (built-in: cross-entropy), else "eval <metric>"."""
    metric = (run.summary or {}).get("eval_metric")
    if not metric:
        named = [e.get("metric") for e in run.evals() if e.get("metric")]
        metric = named[-1] if named else None
    return f"eval {metric}" if metric else "eval loss"


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
    return text + (f": {md_cell(run.reason)}" if run.reason else "")


def _run_section(run: Run, index: int) -> list[str]:
    planned = run.rounds_planned
    h = run.inner_steps_per_round
    heading = f"## {index}. {md_cell(run.label)}" + (" — FAILED" if run.status == "failed" else "")
    if run.status == "incomplete":
        heading += " — INCOMPLETE"
    tps = (run.summary or {}).get("tokens_per_second")
    lines = [heading, "", f"Run directory: `{run.path}`", "",
             "| | |", "|---|---|",
             f"| status | {_status_text(run)} |",
             f"| algorithm | {md_cell(run.algorithm)} |",
             f"| sites × workers | {md_cell(_sites_by_workers(run))} |",
             f"| H (inner steps per round) | {h if h is not None else '–'} |",
             f"| rounds completed / planned | {run.rounds_completed} / {planned if planned is not None else '?'} |",
             f"| initial {_eval_name(run)} | {_loss(run.initial_loss)} |",
             f"| final {_eval_name(run)} | {_loss(run.final_loss)} |",
             f"| WAN bytes (link counters, both directions) | {_bytes(run.wan_bytes)} |",
             f"| merge payload bytes through WAN links | {_bytes(run.merge_wan_bytes())} |",
             f"| wall seconds | {run.wall_seconds:.1f} |"]
    if run.parts:
        lines[2] = "Run directories (one run, from separate hosts): " + ", ".join(f"`{p}`" for p in run.parts)
    if is_number(tps):
        lines.append(f"| tokens per second | {tps:,.0f} |")
    lines += ["", "| site | workers | inner steps | merges | compute (s) | WAN wait (s) | compute utilisation |",
              "|---|---|---|---|---|---|---|"]
    for site, st in run.site_stats().items():
        c, w = st["compute_seconds"], st["wan_wait_seconds"]
        util = f"{100 * c / (c + w):.1f} %" if c + w > 0 else "–"
        workers = run.workers(site)
        steps = st["inner_steps"] if st["inner_steps"] is not None else "–"
        merges = st["merges"] if st["merges"] is not None else "–"
        lines.append(f"| {md_cell(site)} | {workers if workers is not None else '?'} | {steps} | {merges} "
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
        for e in sorted((e for e in run.events if e.get("event") in _FAILURE_EVENTS and is_number(e.get("t"))),
                        key=lambda e: e["t"]):
            kind = e["event"]
            at = e["t"]
            what = e.get("what") or e.get("fault") or ""
            target = e.get("target") or ""
            details = []
            if kind == "failure":
                if is_number(e.get("happened_t")):
                    at = e["happened_t"]
                    if is_number(e.get("detected_t")):
                        details.append(f"detected after {e['detected_t'] - e['happened_t']:.2f} s")
                if e.get("reason"):
                    details.append(str(e["reason"]))
            elif kind == "recovery":
                if is_number(e.get("recovered_t")):
                    at = e["recovered_t"]
                if is_number(e.get("seconds")):
                    details.append(f"took {e['seconds']:.2f} s")
                if e.get("rounds_lost") is not None:
                    details.append(f"rounds lost: {e['rounds_lost']}")
            elif kind == "fault_injected":
                if e.get("params"):
                    details.append(json.dumps(e["params"], sort_keys=True))
                if is_number(e.get("duration_s")):
                    details.append(f"for {e['duration_s']:g} s")
            elif kind == "round_failed":
                what = f"round {e.get('round', '?')}"
                if e.get("reason"):
                    details.append(str(e["reason"]))
            rows.append(f"| {md_cell(run.label)} | {at - t0:.2f} | {kind} | {md_cell(what)} | {md_cell(target)} | "
                        f"{md_cell('; '.join(details))} |")
    return rows


def render_markdown(runs: list[Run], figures: list[FigureSpec], absent: list[str] | None = None) -> str:
    """report.md: a comparison table (several runs), a section per run, the incidents, then the
    figures of ``figures`` (file names relative to report.md) and what is absent and why."""
    lines = ["# geotrain report", ""]
    lines.append("Runs: " + ", ".join(" + ".join(f"`{p}`" for p in r.parts) if r.parts else f"`{r.path}`"
                                      for r in runs))
    lines.append("")
    if len(runs) > 1:
        lines += ["| run | status | algorithm | sites × workers | H | rounds | initial → final eval "
                  "| WAN bytes | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            wan = human_bytes(r.wan_bytes) if r.wan_bytes is not None else "–"
            lines.append(f"| {md_cell(r.label)} | {'completed' if r.status == 'completed' else '**' + r.status + '**'} "
                         f"| {md_cell(r.algorithm)} | {md_cell(_sites_by_workers(r))} | {r.inner_steps_per_round or '–'} "
                         f"| {r.rounds_completed}/{r.rounds_planned if r.rounds_planned is not None else '?'} "
                         f"| {md_cell(_eval_name(r))} {_loss(r.initial_loss)} → {_loss(r.final_loss)} | {wan} "
                         f"| {r.wall_seconds:.1f} |")
        lines.append("")
    for i, run in enumerate(runs, 1):
        lines += _run_section(run, i)
    incidents = _incident_rows(runs)
    if incidents:
        lines += ["## Failures, recoveries and injected faults", "",
                  "Times are seconds since the run started (a failure at the time it happened, a recovery "
                  "at the time it completed).", "",
                  "| run | at (s) | event | what | target | details |", "|---|---|---|---|---|---|", *incidents, ""]
    evals = [f for f in figures if f.kind == "eval"]
    if evals:
        lines += ["## Evaluations", "",
                  "One line per evaluating site. The built-in trainer's eval is cross-entropy (nats/token); a "
                  "script's is what it named in `diloco.log_eval(value, metric=...)`. WAN bytes at an eval: "
                  "`bytes_sent + bytes_received` of the `merge` events of every site whose merges cross a WAN "
                  "link, written up to the eval's time (tensor payloads; the link counters above also count "
                  "protocol overhead).", ""]
        lines += [line for f in evals for line in (f"![{md_cell(f.alt)}]({f.file})", "")]
    scalars = [f for f in figures if f.kind == "metric"]
    if scalars:
        lines += ["## Scalars the script logged", "",
                  "From `diloco.log(step=..., **scalars)` (`metric` events): one plot per name, one line per "
                  "site, or per worker (`site/rank`) where several ranks of a site log it.", ""]
        lines += [line for f in scalars for line in (f"![{md_cell(f.alt)}]({f.file})", "")]
    for f in figures:
        if f.kind == "timeline":
            tl = timeline(runs[0])
            lines += [f"## Timeline of {md_cell(runs[0].label)}", "",
                      "One row per site (its leader's view), cropped to the training: "
                      f"{tl.train_end - tl.train_start:.2f} s from the first inner step, merge or eval to the last; "
                      f"start-up before it took {tl.startup_s:.2f} s and shutdown after it {tl.shutdown_s:.2f} s "
                      "(written on the plot, not drawn to scale). Compute intervals are rebuilt from `inner_step` "
                      "events (each ended at `t` and lasted `compute_s`), WAN waits from `merge` events (ended at "
                      "`t`, lasted `seconds`); intervals closer than a pixel are drawn merged.", "",
                      f"![per-site timeline]({f.file})", ""]
        elif f.kind == "bytes":
            lines += ["## WAN bytes", "",
                      "Per link and direction from the link emulator's counters; a run without counters shows "
                      "the merge payloads its sites recorded. Each panel picks the unit that fits its numbers.",
                      "", f"![bytes per link]({f.file})", ""]
    if absent:
        lines += ["## Not shown", "", "Plots left out because their data is not in the run:", ""]
        lines += [f"- {md_cell(a)}" for a in absent] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write report.md and its PNGs into ``out``; returns the path of report.md. Run dirs that are
    the parts of one run written by separate hosts are reported as that one run."""
    if not run_dirs:
        raise GeotrainError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    label_runs(runs)
    runs = combine(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeotrainError(f"{out}: cannot create the output directory: {exc}") from exc
    figures, absent = figure_plan(runs)
    for f in figures:
        if f.kind in ("eval", "metric"):
            fig = metric_figure(f.plot, f.x)
        elif f.kind == "timeline":
            fig = timeline_figure(runs[0], timeline(runs[0]))
        else:
            fig = links_figure(runs)
        save_figure(fig, out / f.file)
    report = out / "report.md"
    try:
        tmp = out / "report.md.tmp"
        tmp.write_text(render_markdown(runs, figures, absent))
        os.replace(tmp, report)
    except OSError as exc:
        raise GeotrainError(f"{report}: cannot write the report: {exc}") from exc
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geotrain report",
                                description="Write report.md with plots (evals and logged scalars per site, "
                                            "per-site timeline, WAN bytes) for one or more run directories. The "
                                            "run directories of separate hosts (geotrain coordinator/site "
                                            "--run-dir) of one run are merged into that run.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run directory (holds metrics.jsonl); several runs are overlaid in the plots")
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
