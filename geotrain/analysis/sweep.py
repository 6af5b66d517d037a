"""`geotrain sweep`: run a topology over a grid of overrides, one real launch per point, and compare.

    geotrain sweep TOPOLOGY --grid PATH=V1,V2,... [--grid ...] [--set PATH=VALUE ...] [--out DIR] [--dry-run]
    geotrain sweep TOPOLOGY --preset outer-lr [--grid ...] ...

``--preset NAME`` adds a named grid (:data:`PRESETS`): ``outer-lr`` is the DiLoCo papers' sweep of the outer
learning rate, η ∈ {0.2, 0.4, 0.6, 0.8, 1.0} (arXiv 2503.09799); ``outer`` crosses it with the outer momentum
∈ {0.0, 0.5, 0.9}, which matters when a run has few rounds (docs/results.md).

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
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from geotrain.analysis.sweep_grid import GridEntry, Point, SweepError, expand, parse_grid, parse_grids, validate
from geotrain.analysis.sweep_results import (as_number, first_line, render_csv, render_markdown, result_of, write_plots,
                                             write_results)
from geotrain.analysis.sweep_state import (STATE_FILE, STATUSES, check_compatible, load_state, new_state, save_state,
                                           timestamp)
from geotrain.errors import GeotrainError
from geotrain.events import log_tail

__all__ = ["GridEntry", "Point", "Runner", "SweepError", "default_out", "expand", "launch_runner", "main", "parse_grid",
           "parse_grids", "render_csv", "render_markdown", "result_of", "run_sweep", "validate"]

LOCK_FILE = ".sweep.lock"

Runner = Callable[[Path, list[str], Path], dict]


# ---------------------------------------------------------------------------------------------
# Running one point for real
# ---------------------------------------------------------------------------------------------

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
                            f"({exc.__class__.__name__}){log_tail(log_path)}") from None
    if rc != 0 and summary.get("status") == "completed":
        summary = {**summary, "status": "failed", "reason": f"geotrain launch exited with code {rc}"}
    return summary


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
        report_path = write_plots(out, state, log) if report else None
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
                        + (f", final loss {loss:.2f})" if as_number(loss) is not None else ")"))
                    continue
                log(f"{head} its run directory {run_dir} is gone; running it again")
            if run_dir.exists():  # a failed or interrupted attempt: start over from an empty directory
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            p.update(status="running", attempts=int(p.get("attempts") or 0) + 1, started_at=timestamp(),
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
            p.update(status="completed" if ok else "failed", finished_at=timestamp(), elapsed_seconds=round(elapsed, 3),
                     reason=None if ok else (summary.get("reason") or "the run did not complete"),
                     result=result_of(summary))
            current = None
            save_state(out, state)
            loss = p["result"]["final_eval_loss"]
            if ok:
                log(f"done in {elapsed:.1f}s" + (f", final loss {loss:.2f}" if loss is not None else ""))
            else:
                failed = True
                log(f"FAILED after {elapsed:.1f}s: {first_line(p['reason'], 200)} (see {run_dir})")
    except KeyboardInterrupt:
        if current is not None:
            elapsed = time.monotonic() - t_start if t_start else 0.0
            current.update(status="interrupted", finished_at=timestamp(), elapsed_seconds=round(elapsed, 3),
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

PRESETS: dict[str, tuple[str, ...]] = {
    "outer-lr": ("training.outer_optimizer.lr=0.2,0.4,0.6,0.8,1.0",),
    "outer": ("training.outer_optimizer.lr=0.2,0.4,0.6,0.8,1.0", "training.outer_optimizer.momentum=0.0,0.5,0.9"),
}
"""Named grids for ``--preset``."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geotrain sweep",
        description="Run a topology over the cartesian product of --grid values, one real launch per point "
                    "(resumable), and write a comparison table (results.csv, results.md) with loss plots.")
    p.add_argument("topology", type=Path, help="the topology file (YAML)")
    p.add_argument("--grid", action="append", default=[], metavar="PATH=V1,V2,...",
                   help="a field and the values to sweep, e.g. --grid training.inner_steps=10,50,100 "
                        "--grid links.default.bandwidth=100mbit,1gbit (repeatable; the points are the product)")
    p.add_argument("--preset", action="append", default=[], choices=sorted(PRESETS),
                   help="a named grid: outer-lr (the papers' outer-lr sweep 0.2..1.0), outer (that × momentum 0, 0.5, 0.9)")
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
    for name in args.preset:
        args.grid = [*PRESETS[name], *args.grid]
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
