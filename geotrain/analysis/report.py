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
import os
import sys
from pathlib import Path
from typing import Any

from geotrain.analysis.figures import links_figure, loss_figure, save_figure, timeline_figure
from geotrain.analysis.plotdata import MARKER_STYLES, Marker, Series, SiteTimeline, Timeline, coalesce, series, timeline
from geotrain.analysis.rundir import Run, is_number, label_runs, load_run
from geotrain.errors import GeotrainError

__all__ = ["IMAGES", "MARKER_STYLES", "Marker", "Run", "Series", "SiteTimeline", "Timeline", "coalesce", "links_figure",
           "load_run", "loss_figure", "main", "md_cell", "render_markdown", "series", "timeline", "timeline_figure",
           "write_report"]

IMAGES = {
    "steps": "report-loss-vs-steps.png",
    "time": "report-loss-vs-time.png",
    "wan": "report-loss-vs-wan-bytes.png",
    "timeline": "report-timeline.png",
    "links": "report-link-bytes.png",
}
_FAILURE_EVENTS = ("fault_injected", "failure", "round_failed", "recovery", "fault_healed")


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def md_cell(v: Any) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _loss(v: Any) -> str:
    return f"{v:.4f}" if is_number(v) else "–"


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
             f"| initial eval loss | {_loss(run.initial_loss)} |",
             f"| final eval loss | {_loss(run.final_loss)} |",
             f"| WAN bytes (link counters, both directions) | {_mb(run.wan_bytes)} |",
             f"| merge payload bytes through WAN links | {_mb(run.merge_wan_bytes())} |",
             f"| wall seconds | {run.wall_seconds:.1f} |"]
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


def render_markdown(runs: list[Run], images: dict[str, str]) -> str:
    lines = ["# geotrain report", ""]
    lines.append("Runs: " + ", ".join(f"`{r.path}`" for r in runs))
    lines.append("")
    if len(runs) > 1:
        lines += ["| run | status | algorithm | sites × workers | H | rounds | initial → final eval loss "
                  "| WAN MB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            wan = f"{r.wan_bytes / 1e6:,.1f}" if r.wan_bytes is not None else "–"
            lines.append(f"| {md_cell(r.label)} | {'completed' if r.status == 'completed' else '**' + r.status + '**'} "
                         f"| {md_cell(r.algorithm)} | {md_cell(_sites_by_workers(r))} | {r.inner_steps_per_round or '–'} "
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
              f"## Timeline of {md_cell(runs[0].label)}", "",
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
    label_runs(runs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeotrainError(f"{out}: cannot create the output directory: {exc}") from exc
    all_series = [series(r) for r in runs]
    for key in ("steps", "time", "wan"):
        save_figure(loss_figure(all_series, key), out / IMAGES[key])
    save_figure(timeline_figure(runs[0], timeline(runs[0])), out / IMAGES["timeline"])
    save_figure(links_figure(runs), out / IMAGES["links"])
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
