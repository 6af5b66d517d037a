"""The results of a sweep: ``OUT/results.csv``, ``OUT/results.md`` and the overlaid report of its points.

One row per point: its grid values, status, rounds, initial and final eval loss, WAN bytes, wall
seconds and compute utilisation (compute / (compute + WAN wait), summed over sites), all taken
from the point's summary.json (:func:`result_of`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from geotrain.analysis.report import md_cell
from geotrain.analysis.sweep_state import STATUSES
from geotrain.errors import GeotrainError


def as_number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def result_of(summary: dict) -> dict:
    """The numbers of one point's table row, from its summary.json dict."""
    sites = summary.get("sites") if isinstance(summary.get("sites"), dict) else {}
    compute = sum(as_number(s.get("compute_seconds")) or 0.0 for s in sites.values() if isinstance(s, dict))
    wait = sum(as_number(s.get("wan_wait_seconds")) or 0.0 for s in sites.values() if isinstance(s, dict))
    wan = summary.get("wan_bytes")
    return {
        "rounds_completed": summary.get("rounds_completed"),
        "rounds_planned": summary.get("rounds_planned"),
        "initial_eval_loss": as_number(summary.get("initial_eval_loss")),
        "final_eval_loss": as_number(summary.get("final_eval_loss")),
        "wan_bytes": int(wan) if as_number(wan) is not None else None,
        "wall_seconds": as_number(summary.get("wall_seconds")),
        "compute_seconds": round(compute, 3) if sites else None,
        "wan_wait_seconds": round(wait, 3) if sites else None,
        "compute_utilisation": round(compute / (compute + wait), 4) if compute + wait > 0 else None,
    }


CSV_FIELDS = ("status", "rounds_completed", "rounds_planned", "initial_eval_loss", "final_eval_loss", "wan_bytes",
              "wall_seconds", "compute_utilisation", "compute_seconds", "wan_wait_seconds", "run_dir", "reason")


def first_line(text: Any, limit: int = 300) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


def render_csv(state: dict) -> str:
    paths = [g["path"] for g in state["grid"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", *paths, *CSV_FIELDS])
    for p in state["points"]:
        r = p.get("result") or {}
        row = [p["index"], *[p["values"].get(path, "") for path in paths]]
        for f in CSV_FIELDS:
            if f == "status":
                v = p["status"]
            elif f == "run_dir":
                v = p["run_dir"]
            elif f == "reason":
                v = first_line(p.get("reason"))
            else:
                v = r.get(f)
            row.append("" if v is None else v)
        w.writerow(row)
    return buf.getvalue()


def _fmt(v: Any, spec: str) -> str:
    return "–" if as_number(v) is None else format(v, spec)


def render_markdown(state: dict, report: Path | None = None) -> str:
    from geotrain.analysis.report import IMAGES

    paths = [g["path"] for g in state["grid"]]
    pts = state["points"]
    counts = {s: sum(1 for p in pts if p["status"] == s) for s in STATUSES}
    lines = [f"# geotrain sweep of `{md_cell(state['topology'])}`", "",
             f"- grid: {', '.join('`' + md_cell(g['path'] + '=' + ','.join(g['values'])) + '`' for g in state['grid'])}"
             f" ({len(pts)} points)"]
    if state.get("set"):
        lines.append(f"- fixed overrides: {', '.join('`' + md_cell(s) + '`' for s in state['set'])}")
    lines.append("- status: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines += [f"- updated: {state.get('updated_at')}", "",
              "| # | " + " | ".join(md_cell(p) for p in paths) + " | status | rounds | initial eval loss "
              "| final eval loss | WAN MB | wall s | compute utilisation |",
              "|---:|" + "---|" * len(paths) + "---|---:|---:|---:|---:|---:|---:|"]
    for p in pts:
        r = p.get("result") or {}
        status = p["status"] if p["status"] in ("completed", "pending") else f"**{p['status'].upper()}**"
        done, planned = r.get("rounds_completed"), r.get("rounds_planned")
        rounds = "–" if done is None else f"{done}/{planned if planned is not None else '?'}"
        wan = "–" if r.get("wan_bytes") is None else f"{r['wan_bytes'] / 1e6:,.2f}"
        util = "–" if as_number(r.get("compute_utilisation")) is None else f"{100 * r['compute_utilisation']:.1f} %"
        lines.append(f"| {p['index']} | " + " | ".join(f"`{md_cell(p['values'].get(path, ''))}`" for path in paths)
                     + f" | {status} | {rounds} | {_fmt(r.get('initial_eval_loss'), '.4f')} "
                     f"| {_fmt(r.get('final_eval_loss'), '.4f')} | {wan} | {_fmt(r.get('wall_seconds'), '.1f')} "
                     f"| {util} |")
    lines += ["", "WAN MB: bytes through the emulated WAN links, both directions (10^6 bytes). "
              "Wall s: the run's own wall time. Compute utilisation: compute / (compute + WAN wait), "
              "summed over sites (site leaders' timings).", ""]
    problems = [p for p in pts if p["status"] in ("failed", "interrupted") and p.get("reason")]
    if problems:
        lines += ["## Failed and interrupted points", ""]
        lines += [f"- {p['index']} (`{md_cell(' '.join(p['overrides']))}`): {md_cell(first_line(p['reason']))} "
                  f"— run directory `{md_cell(p['run_dir'])}`" for p in problems]
        lines.append("")
    lines += ["## Run directories", ""]
    lines += [f"- {p['index']}: `{md_cell(p['run_dir'])}`" for p in pts]
    lines.append("")
    if report is not None:
        lines += ["## Eval loss of the completed points", "",
                  f"Every completed point overlaid; per-run details, timeline and WAN links in "
                  f"[{report.name}]({report.name}).", "",
                  f"![eval loss vs inner steps]({IMAGES['steps']})", "",
                  f"![eval loss vs wall time]({IMAGES['time']})", "",
                  f"![eval loss vs WAN bytes]({IMAGES['wan']})", ""]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write it: {exc}") from exc


def write_results(out: Path, state: dict, report: Path | None = None) -> tuple[Path, Path]:
    csv_path, md_path = out / "results.csv", out / "results.md"
    _write_text(csv_path, render_csv(state))
    _write_text(md_path, render_markdown(state, report))
    return csv_path, md_path


def write_plots(out: Path, state: dict, log) -> Path | None:
    from geotrain.analysis.report import write_report

    dirs = [out / p["run_dir"] for p in state["points"] if p["status"] == "completed"]
    dirs = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    if not dirs:
        return None
    try:
        return write_report(dirs, out)
    except GeotrainError as exc:
        log(f"geotrain sweep: warning: could not write the plots: {exc}")
        return None
