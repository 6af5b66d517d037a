"""`geotrain sweep`: run a topology over a grid of overrides, one real launch per point, and compare.

    geotrain sweep TOPOLOGY --grid PATH=V1,V2,... [--grid ...] [--set PATH=VALUE ...] [--out DIR] [--dry-run]

The points are the cartesian product of the ``--grid`` entries, in the order given (the last
entry varies fastest, like :func:`itertools.product`). Every point's topology (the file, then
the ``--set`` overrides, then the point's grid values) is validated before anything runs; a bad
value is one error naming its ``--grid`` entry (exit 2, no traceback).

Points run one after another, each as a real ``geotrain launch --quiet`` subprocess with its
own run directory ``OUT/runs/<point-slug>`` (its console output goes to ``launch.log`` there).
``OUT/sweep.json`` records every point's status (pending | running | completed | failed |
interrupted), written after every change, so the sweep is resumable: running the same command
with the same ``--out`` again skips completed points and re-runs the failed, interrupted and
pending ones (a re-run point starts from an empty run directory). A different grid, topology
or ``--set`` for an existing OUT is refused.

After the points (also after a failure or Ctrl-C) it writes ``OUT/results.csv`` and
``OUT/results.md``: one row per point with its grid values, status, rounds, initial and final
eval loss, WAN bytes, wall seconds and compute utilisation (compute / (compute + WAN wait),
summed over sites); and ``OUT/report.md`` with the overlaid loss plots of every completed
point (:func:`geotrain.analysis.report.write_report`).

Progress goes to stderr, one line per point; the last line on stdout is OUT. Exit codes: 0
every point completed; 1 a point failed (the others still ran); 2 bad input; 130 interrupted
(Ctrl-C or SIGTERM stops the current point: the launch child stops its own processes, the point
is marked interrupted and the sweep stops).

For tests and other drivers, the runner that executes one point is injectable: a function
``(topology_path, overrides, run_dir) -> summary dict`` (the dict of summary.json), see
:func:`run_sweep` and :func:`launch_runner`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geotrain.errors import GeotrainError, TopologyError

STATE_FILE = "sweep.json"
STATE_FORMAT = "geotrain-sweep/1"
LOCK_FILE = ".sweep.lock"
STATUSES = ("completed", "failed", "interrupted", "running", "pending")

Runner = Callable[[Path, list[str], Path], dict]


class SweepError(GeotrainError):
    """A sweep's input is wrong (grid, topology, output directory): exit code 2."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridEntry:
    path: str                 # e.g. "links.default.bandwidth"
    values: tuple[str, ...]   # as written, e.g. ("100mbit", "1gbit"); parsed as YAML by the override
    text: str                 # the --grid argument as given, for error messages

    def override(self, value: str) -> str:
        return f"{self.path}={value}"


@dataclass(frozen=True)
class Point:
    index: int                               # 1-based, in expansion order
    values: tuple[tuple[str, str], ...]      # ((path, value), ...) in grid order
    slug: str                                # run directory name under OUT/runs/

    @property
    def overrides(self) -> list[str]:
        return [f"{p}={v}" for p, v in self.values]

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


_PATH_PART = re.compile(r"[A-Za-z_][\w-]*(\[-?\d+\])*|\[-?\d+\](\[-?\d+\])*")


def _split_values(text: str) -> list[str]:
    """Split on commas that are not inside [...], {...} or quotes (so YAML lists stay whole)."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return out


def parse_grid(text: str) -> GridEntry:
    """Parse one ``--grid PATH=V1,V2,...`` argument. Raises SweepError naming the argument."""
    where = f"--grid {text!r}"
    if "=" not in text:
        raise SweepError(f"{where}: expected PATH=V1,V2,..., e.g. --grid training.inner_steps=10,50,100")
    path, _, rest = text.partition("=")
    path = path.strip()
    if not path:
        raise SweepError(f"{where}: the path before '=' is empty (e.g. training.inner_steps=10,50)")
    if not all(_PATH_PART.fullmatch(part) for part in path.split(".")):
        raise SweepError(f"{where}: cannot read the path {path!r} (expected dotted keys with optional [index], "
                         f"e.g. links.default.bandwidth or sites[0].workers)")
    if not rest.strip():
        raise SweepError(f"{where}: no values after '=' (give them comma-separated, e.g. {path}=10,50)")
    values = [v.strip() for v in _split_values(rest)]
    if any(not v for v in values):
        raise SweepError(f"{where}: an empty value (check for a doubled or trailing comma)")
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise SweepError(f"{where}: the value {v!r} is given twice")
        seen.add(v)
    return GridEntry(path=path, values=tuple(values), text=text)


def parse_grids(texts: Sequence[str], sets: Sequence[str] = ()) -> list[GridEntry]:
    entries = [parse_grid(t) for t in texts]
    if not entries:
        raise SweepError("give at least one --grid PATH=V1,V2,...")
    seen: dict[str, str] = {}
    for e in entries:
        if e.path in seen:
            raise SweepError(f"--grid {e.text!r}: the path {e.path} is already swept by --grid {seen[e.path]!r}; "
                             f"give all its values in one entry")
        seen[e.path] = e.text
    for s in sets:
        path = s.partition("=")[0].strip()
        if path in seen:
            raise SweepError(f"--set {s!r}: {path} is also swept by --grid {seen[path]!r}; drop one of them")
    return entries


def _slug_value(value: str) -> str:
    v = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-.")
    return v or "x"


def _short_keys(paths: list[str]) -> list[str]:
    """The shortest unique dotted suffix of every path: inner_steps, bandwidth, pairs[0].bandwidth."""
    parts = [p.split(".") for p in paths]
    n = {i: 1 for i in range(len(paths))}
    while True:
        keys = [".".join(parts[i][-n[i]:]) for i in range(len(paths))]
        clashes = [i for i, k in enumerate(keys) if keys.count(k) > 1 and n[i] < len(parts[i])]
        if not clashes:
            return [re.sub(r"[^A-Za-z0-9._+\[\]-]+", "-", k) for k in keys]
        for i in clashes:
            n[i] += 1


def expand(grid: Sequence[GridEntry]) -> list[Point]:
    """The cartesian product of the grid, last entry fastest, each point with a unique slug."""
    keys = _short_keys([e.path for e in grid])
    points, used = [], set()
    for i, combo in enumerate(itertools.product(*[e.values for e in grid]), 1):
        slug = ",".join(f"{k}={_slug_value(v)}" for k, v in zip(keys, combo))
        if len(slug) > 100:
            slug = slug[:100].rstrip(",=")
        base, n = slug, 1
        while slug in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        points.append(Point(index=i, values=tuple((e.path, v) for e, v in zip(grid, combo)), slug=slug))
    return points


# ---------------------------------------------------------------------------------------------
# Validation (before anything runs)
# ---------------------------------------------------------------------------------------------

def _strip_set_prefix(msg: str, item: str) -> str:
    prefix = f"--set {item!r}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def validate(topology: Path, sets: Sequence[str], grid: Sequence[GridEntry], points: Sequence[Point]):
    """Load every point's topology. Returns (base topology, [point topology, ...]); raises SweepError."""
    from geotrain.config.topology import load_topology

    try:
        base = load_topology(topology, list(sets))
    except TopologyError as exc:
        raise SweepError(str(exc)) from None
    # Every grid value on its own first, so a bad value is blamed on its entry.
    for entry in grid:
        digests: dict[str, str] = {}
        for value in entry.values:
            item = entry.override(value)
            try:
                topo = load_topology(topology, [*sets, item])
            except TopologyError as exc:
                raise SweepError(f"--grid {entry.text!r} (value {value!r}): "
                                 f"{_strip_set_prefix(str(exc), item)}") from None
            d = topo.digest()
            if d in digests:
                raise SweepError(f"--grid {entry.text!r}: the values {digests[d]!r} and {value!r} give the same "
                                 f"topology; give each setting once")
            digests[d] = value
    topos = []
    seen: dict[str, Point] = {}
    for p in points:
        try:
            topo = load_topology(topology, [*sets, *p.overrides])
        except TopologyError as exc:
            msg = str(exc)
            for item in p.overrides:
                msg = _strip_set_prefix(msg, item)
            raise SweepError(f"point {p.index} of the grid ({p.label}): {msg}") from None
        d = topo.digest()
        if d in seen:
            raise SweepError(f"points {seen[d].index} ({seen[d].label}) and {p.index} ({p.label}) give the same "
                             f"topology")
        seen[d] = p
        topos.append(topo)
    return base, topos


# ---------------------------------------------------------------------------------------------
# The state file
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _grid_json(grid: Sequence[GridEntry]) -> list[dict]:
    return [{"path": e.path, "values": list(e.values)} for e in grid]


def _grid_text(grid_json: list[dict]) -> str:
    return " ".join(f"--grid {g['path']}={','.join(g['values'])}" for g in grid_json) or "(none)"


def input_digest(topology: Path, overrides: Sequence[str]) -> str:
    """sha256 of a point's topology as written: the file's YAML data with the overrides applied.

    Resume compares this, not :meth:`Topology.digest`: the validated model also holds every
    default, so a geotrain upgrade that adds a field would otherwise make every sweep
    unresumable. Comments and formatting of the file do not count; a changed value does.
    """
    import hashlib

    import yaml

    from geotrain.config.topology import apply_override

    raw = yaml.safe_load(Path(topology).read_text())
    for item in overrides:
        raw = apply_override(raw, item, source=str(topology))
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def new_state(topology: Path, sets: Sequence[str], grid: Sequence[GridEntry], points: Sequence[Point],
              topos: Sequence) -> dict:
    return {
        "format": STATE_FORMAT,
        "topology": str(topology),
        "set": list(sets),
        "grid": _grid_json(grid),
        "created_at": _now(),
        "updated_at": _now(),
        "points": [{"index": p.index, "slug": p.slug, "values": dict(p.values), "overrides": p.overrides,
                    "input_sha256": input_digest(topology, [*sets, *p.overrides]),
                    "topology_sha256": t.digest(), "run_dir": f"runs/{p.slug}", "status": "pending",
                    "attempts": 0, "reason": None, "elapsed_seconds": None, "started_at": None,
                    "finished_at": None, "result": None}
                   for p, t in zip(points, topos)],
    }


def load_state(out: Path) -> dict | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: cannot read the sweep state ({exc}); use another --out or remove {out}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("points"), list):
        raise SweepError(f"{path}: not a geotrain sweep state file; use another --out or remove {out}")
    return state


def check_compatible(state: dict, out: Path, topology: Path, sets: Sequence[str], grid: Sequence[GridEntry],
                     points: Sequence[Point]) -> None:
    """Refuse to continue a sweep in ``out`` that was started with another grid, topology or --set."""
    advice = f"use another --out for a different sweep (or remove {out} to start this one over)"
    if state.get("grid") != _grid_json(grid):
        raise SweepError(f"{out} holds a sweep over a different grid: it was started with "
                         f"{_grid_text(state.get('grid') or [])}, this command gives {_grid_text(_grid_json(grid))}; "
                         f"{advice}")
    old = state["points"]
    if len(old) != len(points) or any(o.get("input_sha256") != input_digest(topology, [*sets, *p.overrides])
                                      for o, p in zip(old, points)):
        was = f"{state.get('topology')}" + "".join(f" --set {s}" for s in state.get("set") or [])
        now = f"{topology}" + "".join(f" --set {s}" for s in sets)
        raise SweepError(f"{out} holds a sweep of another topology: it was started with {was}, and the points of "
                         f"{now} resolve to different topologies (the file or a --set changed); {advice}")


def save_state(out: Path, state: dict) -> None:
    state["updated_at"] = _now()
    path = out / STATE_FILE
    tmp = out / (STATE_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write the sweep state: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Running one point for real
# ---------------------------------------------------------------------------------------------

def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("; last lines of " + str(path) + ":\n    " + "\n    ".join(tail)) if tail else ""


def _stop_child(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Ask a launch child to stop (it stops its own processes), then wait; a second Ctrl-C kills it."""
    try:
        proc.send_signal(signal.SIGTERM)  # launch turns SIGTERM into its Ctrl-C path
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()  # its own children die with it (PR_SET_PDEATHSIG, see geotrain.run.procs)
        proc.wait()


def launch_runner(topology_path: Path, overrides: list[str], run_dir: Path) -> dict:
    """Run ``geotrain launch TOPOLOGY --run-dir RUN_DIR --quiet --set ...`` and return its summary.json.

    The child runs in its own session (a Ctrl-C at the terminal reaches only the sweep, which
    asks the child to stop exactly once) and dies if the sweep dies. Its output goes to
    ``RUN_DIR/launch.log``. Raises KeyboardInterrupt when interrupted (after the child has
    stopped), GeotrainError when the launch left no summary.
    """
    from geotrain.run import procs

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "launch.log"
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(topology_path), "--run-dir", str(run_dir), "--quiet"]
    for item in overrides:
        argv += ["--set", item]
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = procs.spawn(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        _stop_child(proc)
        raise
    if rc == 130 or rc == -signal.SIGINT or rc == -signal.SIGTERM:
        raise KeyboardInterrupt  # stopped from outside: the sweep stops too
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        how = f"exit code {rc}" if rc >= 0 else f"signal {-rc}"
        raise GeotrainError(f"geotrain launch exited with {how} and left no readable summary.json "
                            f"({exc.__class__.__name__}){_log_tail(log_path)}") from None
    if rc != 0 and summary.get("status") == "completed":
        summary = {**summary, "status": "failed", "reason": f"geotrain launch exited with code {rc}"}
    return summary


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def result_of(summary: dict) -> dict:
    """The numbers of one point's table row, from its summary.json dict."""
    sites = summary.get("sites") if isinstance(summary.get("sites"), dict) else {}
    compute = sum(_num(s.get("compute_seconds")) or 0.0 for s in sites.values() if isinstance(s, dict))
    wait = sum(_num(s.get("wan_wait_seconds")) or 0.0 for s in sites.values() if isinstance(s, dict))
    wan = summary.get("wan_bytes")
    return {
        "rounds_completed": summary.get("rounds_completed"),
        "rounds_planned": summary.get("rounds_planned"),
        "initial_eval_loss": _num(summary.get("initial_eval_loss")),
        "final_eval_loss": _num(summary.get("final_eval_loss")),
        "wan_bytes": int(wan) if _num(wan) is not None else None,
        "wall_seconds": _num(summary.get("wall_seconds")),
        "compute_seconds": round(compute, 3) if sites else None,
        "wan_wait_seconds": round(wait, 3) if sites else None,
        "compute_utilisation": round(compute / (compute + wait), 4) if compute + wait > 0 else None,
    }


CSV_FIELDS = ("status", "rounds_completed", "rounds_planned", "initial_eval_loss", "final_eval_loss", "wan_bytes",
              "wall_seconds", "compute_utilisation", "compute_seconds", "wan_wait_seconds", "run_dir", "reason")


def _first_line(text: Any, limit: int = 300) -> str:
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
                v = _first_line(p.get("reason"))
            else:
                v = r.get(f)
            row.append("" if v is None else v)
        w.writerow(row)
    return buf.getvalue()


def _md(v: Any) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _fmt(v: Any, spec: str) -> str:
    return "–" if _num(v) is None else format(v, spec)


def render_markdown(state: dict, report: Path | None = None) -> str:
    from geotrain.analysis.report import IMAGES

    paths = [g["path"] for g in state["grid"]]
    pts = state["points"]
    counts = {s: sum(1 for p in pts if p["status"] == s) for s in STATUSES}
    lines = [f"# geotrain sweep of `{_md(state['topology'])}`", "",
             f"- grid: {', '.join('`' + _md(g['path'] + '=' + ','.join(g['values'])) + '`' for g in state['grid'])}"
             f" ({len(pts)} points)"]
    if state.get("set"):
        lines.append(f"- fixed overrides: {', '.join('`' + _md(s) + '`' for s in state['set'])}")
    lines.append("- status: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines += [f"- updated: {state.get('updated_at')}", "",
              "| # | " + " | ".join(_md(p) for p in paths) + " | status | rounds | initial eval loss "
              "| final eval loss | WAN MB | wall s | compute utilisation |",
              "|---:|" + "---|" * len(paths) + "---|---:|---:|---:|---:|---:|---:|"]
    for p in pts:
        r = p.get("result") or {}
        status = p["status"] if p["status"] in ("completed", "pending") else f"**{p['status'].upper()}**"
        done, planned = r.get("rounds_completed"), r.get("rounds_planned")
        rounds = "–" if done is None else f"{done}/{planned if planned is not None else '?'}"
        wan = "–" if r.get("wan_bytes") is None else f"{r['wan_bytes'] / 1e6:,.2f}"
        util = "–" if _num(r.get("compute_utilisation")) is None else f"{100 * r['compute_utilisation']:.1f} %"
        lines.append(f"| {p['index']} | " + " | ".join(f"`{_md(p['values'].get(path, ''))}`" for path in paths)
                     + f" | {status} | {rounds} | {_fmt(r.get('initial_eval_loss'), '.4f')} "
                     f"| {_fmt(r.get('final_eval_loss'), '.4f')} | {wan} | {_fmt(r.get('wall_seconds'), '.1f')} "
                     f"| {util} |")
    lines += ["", "WAN MB: bytes through the emulated WAN links, both directions (10^6 bytes). "
              "Wall s: the run's own wall time. Compute utilisation: compute / (compute + WAN wait), "
              "summed over sites (site leaders' timings).", ""]
    problems = [p for p in pts if p["status"] in ("failed", "interrupted") and p.get("reason")]
    if problems:
        lines += ["## Failed and interrupted points", ""]
        lines += [f"- {p['index']} (`{_md(' '.join(p['overrides']))}`): {_md(_first_line(p['reason']))} "
                  f"— run directory `{_md(p['run_dir'])}`" for p in problems]
        lines.append("")
    lines += ["## Run directories", ""]
    lines += [f"- {p['index']}: `{_md(p['run_dir'])}`" for p in pts]
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


def _write_plots(out: Path, state: dict, log) -> Path | None:
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


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def default_out(name: str, root: Path = Path("runs")) -> Path:
    from geotrain.run.launch import make_run_dir

    return make_run_dir(root, f"sweep-{name}")


def _lock(out: Path):
    import fcntl

    f = open(out / LOCK_FILE, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SweepError(f"{out}: another geotrain sweep is running in this directory") from None
    return f


def _resume_command(topology: Path, grid: Sequence[GridEntry], sets: Sequence[str], out: Path) -> str:
    import shlex

    parts = ["geotrain", "sweep", str(topology)]
    for e in grid:
        parts += ["--grid", e.text]
    for s in sets:
        parts += ["--set", s]
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def run_sweep(topology: Path, grid_texts: Sequence[str], sets: Sequence[str] = (), out: Path | None = None, *,
              runner: Runner | None = None, dry_run: bool = False, report: bool = True,
              stdout=None, stderr=None) -> int:
    """Validate, run (or resume) the sweep and write its results. Returns the exit code.

    Raises SweepError (exit code 2) for bad input, before anything runs.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    runner = runner or launch_runner
    sets = list(sets)

    def log(msg: str = "", end: str = "\n") -> None:
        print(msg, end=end, file=stderr, flush=True)

    topology = Path(topology)
    grid = parse_grids(grid_texts, sets)
    points = expand(grid)
    base, topos = validate(topology, sets, grid, points)
    out = Path(out) if out is not None else default_out(base.name)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: exists and is not a directory")
    state = load_state(out) if out.is_dir() else None
    if state is not None:
        check_compatible(state, out, topology, sets, grid, points)
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise SweepError(f"--out {out}: not empty and not a sweep directory (no {STATE_FILE}); "
                         f"give a new or empty directory")

    n = len(points)
    if dry_run:
        log(f"geotrain sweep: {n} points of {topology}, all valid; would write to {out}")
        old = {p["index"]: p for p in (state or {}).get("points", [])}
        for p in points:
            status = old.get(p.index, {}).get("status", "pending")
            what = "skip (completed earlier)" if status == "completed" else (
                "run" if status == "pending" else f"run again (was {status})")
            print(f"[{p.index}/{n}] {p.label}  ->  {out / 'runs' / p.slug}  ({what})", file=stdout)
        print(out, file=stdout, flush=True)
        return 0

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"--out {out}: cannot create it: {exc}") from None
    lock = _lock(out)
    try:
        if state is None:
            state = new_state(topology, sets, grid, points, topos)
            save_state(out, state)
            log(f"geotrain sweep: {n} points of {topology}, writing to {out}")
        else:
            done = sum(1 for p in state["points"] if p["status"] == "completed")
            log(f"geotrain sweep: resuming {out}: {done} of {n} points completed earlier")
        code = _run_points(out, state, topology, sets, runner, log)
        csv_path, md_path = write_results(out, state)
        report_path = _write_plots(out, state, log) if report else None
        if report_path is not None:
            write_results(out, state, report_path)
    finally:
        lock.close()

    counts = {s: sum(1 for p in state["points"] if p["status"] == s) for s in STATUSES}
    log(f"geotrain sweep: {', '.join(f'{c} {s}' for s, c in counts.items() if c)}; results in {md_path}"
        + (f" and {report_path.name}" if report_path is not None else ""))
    if code != 0:
        log(f"geotrain sweep: to run the remaining points: {_resume_command(topology, grid, sets, out)}")
    print(out, file=stdout, flush=True)
    return code


def _run_points(out: Path, state: dict, topology: Path, sets: list[str], runner: Runner, log) -> int:
    """Run every point that is not completed; returns 0, 1 (some failed) or 130 (interrupted)."""
    pts = state["points"]
    n = len(pts)
    failed = False
    current: dict | None = None
    t_start = 0.0
    try:
        for p in pts:
            head = f"[{p['index']}/{n}] {' '.join(p['overrides'])} ..."
            run_dir = out / p["run_dir"]
            if p["status"] == "completed":
                if run_dir.is_dir():
                    loss = (p.get("result") or {}).get("final_eval_loss")
                    log(f"{head} skipped (completed earlier"
                        + (f", final loss {loss:.2f})" if _num(loss) is not None else ")"))
                    continue
                log(f"{head} its run directory {run_dir} is gone; running it again")
            if run_dir.exists():  # a failed or interrupted attempt: start over from an empty directory
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            p.update(status="running", attempts=int(p.get("attempts") or 0) + 1, started_at=_now(),
                     finished_at=None, reason=None, result=None, elapsed_seconds=None)
            current = p
            save_state(out, state)
            log(head, end=" ")
            t_start = time.monotonic()
            try:
                summary = runner(topology.resolve(), [*sets, *p["overrides"]], run_dir.resolve())
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one point's failure must not end the sweep
                reason = str(exc) if isinstance(exc, GeotrainError) else f"{exc.__class__.__name__}: {exc}"
                summary = {"status": "failed", "reason": reason}
            elapsed = time.monotonic() - t_start
            ok = isinstance(summary, dict) and summary.get("status") == "completed"
            if not isinstance(summary, dict):
                summary = {"status": "failed", "reason": f"the runner returned {type(summary).__name__}, not a dict"}
            p.update(status="completed" if ok else "failed", finished_at=_now(), elapsed_seconds=round(elapsed, 3),
                     reason=None if ok else (summary.get("reason") or "the run did not complete"),
                     result=result_of(summary))
            current = None
            save_state(out, state)
            loss = p["result"]["final_eval_loss"]
            if ok:
                log(f"done in {elapsed:.1f}s" + (f", final loss {loss:.2f}" if loss is not None else ""))
            else:
                failed = True
                log(f"FAILED after {elapsed:.1f}s: {_first_line(p['reason'], 200)} (see {run_dir})")
    except KeyboardInterrupt:
        if current is not None:
            elapsed = time.monotonic() - t_start if t_start else 0.0
            current.update(status="interrupted", finished_at=_now(), elapsed_seconds=round(elapsed, 3),
                           reason="interrupted (Ctrl-C or SIGTERM)")
            summary_path = out / current["run_dir"] / "summary.json"
            try:
                current["result"] = result_of(json.loads(summary_path.read_text()))
            except (OSError, json.JSONDecodeError):
                pass
            save_state(out, state)
            log(f"interrupted after {elapsed:.1f}s")
        log("geotrain sweep: interrupted; the remaining points did not run")
        return 130
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geotrain sweep",
        description="Run a topology over the cartesian product of --grid values, one real launch per point "
                    "(resumable), and write a comparison table (results.csv, results.md) with loss plots.")
    p.add_argument("topology", type=Path, help="the topology file (YAML)")
    p.add_argument("--grid", action="append", default=[], metavar="PATH=V1,V2,...",
                   help="a field and the values to sweep, e.g. --grid training.inner_steps=10,50,100 "
                        "--grid links.default.bandwidth=100mbit,1gbit (repeatable; the points are the product)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="a fixed override for every point, e.g. --set training.rounds=4")
    p.add_argument("--out", type=Path, default=None,
                   help="the sweep directory (default: runs/sweep-<name>-<time>); give an existing one to resume it")
    p.add_argument("--dry-run", action="store_true", help="validate every point and print the plan; run nothing")
    return p


def main(argv: list[str] | None = None, *, runner: Runner | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or an argparse usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if not args.grid:
        print("geotrain sweep: give at least one --grid PATH=V1,V2,... (e.g. --grid training.inner_steps=10,50)",
              file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    try:
        return run_sweep(args.topology, args.grid, args.overrides, args.out, runner=runner, dry_run=args.dry_run)
    except GeotrainError as exc:
        print(f"geotrain sweep: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("geotrain sweep: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
