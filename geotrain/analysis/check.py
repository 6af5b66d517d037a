"""The history checker: proves from a run's recorded history that geotrain kept its promises.

In the spirit of Jepsen's checkers and etcd's robustness suite, it does not ask whether the run
crashed; it reads ``<run_dir>/metrics.jsonl`` (docs/events.md) and the artifacts next to it and
decides, for every promise, whether the history shows it **held**, shows it **violated** (with
the first counter-example) or does not carry enough evidence either way (**unknown**)::

    geotrain check RUN_DIR [RUN_DIR ...] [--twin RUN_DIR] [--tolerance 0.02] [--max-eval-loss-jump X] [--json]

One directory is one run: what ``geotrain launch`` wrote, with the Slurm backend's parts under it
(``RUN/control/``, ``RUN/site-*/``) read too. Several directories are either whole runs, each checked
on its own (``geotrain check runs/demo-*``), or the parts of one run that separate hosts wrote
(``geotrain coordinator/site --run-dir``), checked as one history once geotrain.analysis.hosts.same_run
says they are one run; anything else is refused (exit 2, with the reason).

Exit status: 0 when nothing is violated (``unknown`` is printed but does not fail), 1 when
something is, 2 when the run directory (or the twin) cannot be read.

Invariants (stable ids):

``rounds_committed_once_in_order``
    ``commit`` events, in file order, are for rounds 0, 1, 2, ... : none twice (even across
    coordinator incarnations), none skipped.
``version_never_backwards``
    commit versions strictly increase; each site's ``merge`` versions never decrease; a
    ``site_ready`` version is at least the last version committed before that site (re)joined.
``only_committed_versions_served``
    a site only ever holds (``site_ready``, ``merge``), and a checkpoint only ever saves
    (``checkpoint_saved``), a version the history committed before, or one a coordinator said it
    restored: never weights no commit produced.
``sites_agree_after_merge``
    every ``merge`` event's ``crc32`` equals the ``crc32`` of its round's ``commit``: every live
    site holds the same weights after a merge.
``checkpoints_verify``
    every checkpoint directory verifies (sizes and sha256 of its manifest).
``no_committed_round_lost``
    after a coordinator restart the first commit is for the round after the last one committed
    before it, with a larger version.
``final_loss_matches_twin``
    the final eval loss is within a relative tolerance of a twin run's (e.g. the same topology
    without faults).
``faults_survived``
    training went on (at least ``min_merges_around_fault`` commits) after every injected fault.
``no_stale_update_applied``
    no commit lists a site twice or a site that was never part of the run, and no commit is for a
    round older than an earlier commit's.
``global_model_finite``
    every commit's digest says the global model is finite (``commit.finite``), and no
    ``model_nonfinite`` was recorded; unknown for a history whose commits carry no ``finite``.
``eval_loss_no_unexplained_jump``
    every eval loss is finite, and it never grows by more than ``security.max_eval_loss_jump``
    (the run's topology.json, else 4; ``--max-eval-loss-jump`` overrides) between consecutive evals
    without a recorded cause in between (a fault, failure, recovery, restart, refused or discarded
    update, failed round, ...: ``geotrain.analysis.check_model.CAUSES``).

A launch (``run_started``) whose coordinator says it starts at round R (``geotrain resume`` from a
checkpoint, ``coordinator_started.round``) rebases the timeline: rounds from R on are redone on
purpose, so they may be committed again and versions start again from R. A coordinator restart
inside a launch does not: it must continue where the last one stopped.

``check_history`` is pure (it reads nothing but the checkpoint directories it is given);
``check_run`` reads a run directory; ``main`` is the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

from geotrain.analysis.check_outcomes import (checkpoints_verify, faults_survived, final_eval_loss, final_loss_matches_twin,
                                              sites_agree_after_merge, verify_manifest)
from geotrain.analysis.check_model import DEFAULT_MAX_EVAL_LOSS_JUMP, eval_loss_no_unexplained_jump, global_model_finite
from geotrain.analysis.check_rounds import (no_committed_round_lost, no_stale_update_applied, only_committed_versions_served,
                                            rounds_committed_once_in_order, version_never_backwards)
from geotrain.analysis.history import HELD, INVARIANTS, UNKNOWN, VIOLATED, Verdict
from geotrain.errors import GeotrainError
from geotrain.events import read_events

__all__ = ["HELD", "INVARIANTS", "UNKNOWN", "VIOLATED", "HistoryUnreadable", "Verdict", "check_history", "check_run",
           "final_eval_loss", "find_checkpoints", "format_table", "main", "run_max_eval_loss_jump", "verify_manifest"]


class HistoryUnreadable(GeotrainError):
    """A run directory (or its twin) is missing or has no metrics.jsonl."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# API


def check_history(events: list[dict], *, checkpoints: Sequence[Path] = (), twin_final_loss: float | None = None,
                  loss_tolerance: float = 0.02, min_merges_around_fault: int = 1,
                  max_eval_loss_jump: float = DEFAULT_MAX_EVAL_LOSS_JUMP) -> list[Verdict]:
    """Every invariant's verdict on a recorded history (events in file order). Pure: the only
    I/O is verifying the given checkpoint directories."""
    events = [e for e in events if isinstance(e, dict)]
    per_lane = [rounds_committed_once_in_order, version_never_backwards, only_committed_versions_served, sites_agree_after_merge]
    fragments = sorted({e.get("fragment", 0) for e in events if e.get("event") in ("commit", "merge")})
    if len(fragments) > 1:  # streaming-diloco: every fragment has rounds of its own
        lane_verdicts = [_combine_lanes([check(_lane(events, f)) for f in fragments], fragments) for check in per_lane]
        # site_ready carries the run's version (the commits of every fragment together): judged on the whole run
        ready = only_committed_versions_served([e for e in events if e.get("event") not in ("merge", "checkpoint_saved")])
        lane_verdicts[2] = _worst(lane_verdicts[2], ready)
        round_lost = _combine_lanes([no_committed_round_lost(_lane(events, f)) for f in fragments], fragments)
    else:
        lane_verdicts = [check(events) for check in per_lane]
        round_lost = no_committed_round_lost(events)
    return [
        *lane_verdicts,
        checkpoints_verify(checkpoints),
        round_lost,
        final_loss_matches_twin(events, twin_final_loss, loss_tolerance),
        faults_survived(events, min_merges_around_fault),
        no_stale_update_applied(events),
        global_model_finite(events),
        eval_loss_no_unexplained_jump(events, max_eval_loss_jump),
    ]


def _lane(events: Sequence[dict], fragment: int) -> list[dict]:
    """The history of one fragment: its commits and merges, and every event that is not per fragment
    except ``site_ready`` (whose version counts the commits of all fragments); a coordinator_started
    holds this fragment's round (from its ``lane_rounds``)."""
    out = []
    for e in events:
        kind = e.get("event")
        if kind == "site_ready" or (kind in ("commit", "merge", "merge_refused") and e.get("fragment", 0) != fragment):
            continue
        lanes = e.get("lane_rounds") if kind == "coordinator_started" else None
        if isinstance(lanes, list) and fragment < len(lanes):  # a restarted coordinator: where this fragment goes on
            e = {**e, "round": lanes[fragment]}
        out.append(e)
    return out


def _worst(a: Verdict, b: Verdict) -> Verdict:
    """One verdict from two checks of one invariant: violated if either is, held if both hold or one
    holds and the other had nothing to judge."""
    if VIOLATED in (a.status, b.status):
        return a if a.status == VIOLATED else b
    if a.status == HELD and b.status == HELD:
        return Verdict(a.invariant, HELD, f"{a.evidence}; site_ready versions: {b.evidence}")
    return a if a.status == HELD else b


def _combine_lanes(verdicts: list[Verdict], fragments: list[int]) -> Verdict:
    """One verdict for an invariant checked per fragment: violated if any, unknown if any, else held."""
    for status in (VIOLATED, UNKNOWN):
        bad = [(f, v) for f, v in zip(fragments, verdicts) if v.status == status]
        if bad:
            f, v = bad[0]
            return Verdict(v.invariant, status, f"fragment {f}: {v.evidence}" + (f" (+{len(bad) - 1} fragments)" if len(bad) > 1 else ""))
    return Verdict(verdicts[0].invariant, HELD, f"each of {len(fragments)} fragments: {verdicts[0].evidence}")


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run: ``<checkpoints>/*`` where ``<checkpoints>`` is the topology's
    ``checkpoint.path`` (from the run's topology.json) or ``run_dir/checkpoints``. Hidden folders
    and ``*.tmp`` ones are saves in progress, never published, and are left out."""
    root = Path(run_dir) / "checkpoints"
    try:
        configured = json.loads((Path(run_dir) / "topology.json").read_text()).get("checkpoint", {}).get("path")
        if configured:
            root = Path(configured)  # as the run resolved it (absolute, or relative to where it ran)
    except (OSError, ValueError, AttributeError):
        pass
    if not root.is_dir():
        return []
    def published(p: Path) -> bool:  # a round folder holding only a crashed writer's .tmp-* part was never published
        return not p.name.startswith("round-") or any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir())

    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not p.name.endswith((".tmp", ".partial"))
                  and published(p))


def _twin_final_loss(twin: Path) -> float | None:
    """final_eval_loss of the twin's summary.json, else of its metrics.jsonl."""
    twin = Path(twin)
    if not twin.is_dir():
        raise HistoryUnreadable(f"twin run directory {twin} does not exist")
    try:
        value = json.loads((twin / "summary.json").read_text()).get("final_eval_loss")
        if isinstance(value, (int, float)):
            return float(value)
    except (OSError, ValueError, AttributeError):
        pass
    return final_eval_loss(read_events(twin / "metrics.jsonl"))


def run_max_eval_loss_jump(run_dir: Path) -> float:
    """``security.max_eval_loss_jump`` of the run's topology.json (a separate host's site: its
    topology.SITE.json); the default when the run has no topology file or its topology predates the
    field. Raises HistoryUnreadable for a value that is not a finite number above 1."""
    run_dir = Path(run_dir)
    path = run_dir / "topology.json"
    if not path.is_file():
        path = next(iter(sorted(run_dir.glob("topology.*.json"))), path)
    try:
        topo = json.loads(path.read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_EVAL_LOSS_JUMP
    security = topo.get("security") if isinstance(topo, dict) else None
    value = security.get("max_eval_loss_jump") if isinstance(security, dict) else None
    if value is None:
        return DEFAULT_MAX_EVAL_LOSS_JUMP
    if not _valid_jump(value):
        raise HistoryUnreadable(f"{path}: security.max_eval_loss_jump must be a finite "
                                f"number above 1, not {str(value)[:80]!r}")
    return float(value)


def _valid_jump(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 1


def history_files(run_dir: Path) -> list[Path]:
    """The histories one run directory holds: its metrics.jsonl and, in the Slurm backend's layout (a
    ``slurm/jobs.json``: geotrain.run.slurm_launch), the control plane's and every site's part."""
    run_dir = Path(run_dir)
    files = [run_dir / "metrics.jsonl"]
    if (run_dir / "slurm" / "jobs.json").is_file():
        parts = [run_dir / "control" / "metrics.jsonl", *sorted(run_dir.glob("site-*/metrics.jsonl"))]
        files += [p for p in parts if p.is_file()]
    return files


def read_history(files: Sequence[Path]) -> list[dict]:
    """The events of several histories of one run in time order (each file's own order kept for equal times)."""
    if len(files) == 1:
        return read_events(files[0])
    return sorted((e for f in files for e in read_events(f)),
                  key=lambda e: e["t"] if isinstance(e.get("t"), (int, float)) else 0.0)


def _readable(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HistoryUnreadable(f"no run directory at {run_dir}")
    if not (run_dir / "metrics.jsonl").is_file():
        raise HistoryUnreadable(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    return run_dir


def check_run(run_dir: Path | Sequence[Path], twin: Path | None = None, loss_tolerance: float = 0.02,
              max_eval_loss_jump: float | None = None) -> list[Verdict]:
    """Check a run directory: its metrics.jsonl (with the Slurm backend's parts: :func:`history_files`), its
    checkpoints/*, and (optionally) a twin run's final eval loss. Several directories: the parts of one run
    written by separate hosts, checked as one history (refused when they are not one run). ``max_eval_loss_jump``
    overrides the run's ``security.max_eval_loss_jump``. Raises HistoryUnreadable when a run directory or its
    history is missing."""
    dirs = [_readable(d) for d in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    if not dirs:
        raise HistoryUnreadable("no run directory given")
    if len(dirs) > 1:
        from geotrain.analysis.hosts import host_record, same_run
        from geotrain.analysis.rundir import load_run

        decision = same_run([host_record(load_run(d)) for d in dirs])
        if not decision.same:
            raise HistoryUnreadable(f"{', '.join(map(str, dirs))} are not the parts of one run: {decision.reason}")
    twin_loss = _twin_final_loss(twin) if twin is not None else None
    jump = max_eval_loss_jump
    if jump is None:
        jumps = [run_max_eval_loss_jump(d) for d in dirs]
        jump = next((j for j in jumps if j != DEFAULT_MAX_EVAL_LOSS_JUMP), DEFAULT_MAX_EVAL_LOSS_JUMP)
    events = read_history([f for d in dirs for f in history_files(d)])
    verdicts = check_history(events, checkpoints=[c for d in dirs for c in find_checkpoints(d)],
                             twin_final_loss=twin_loss, loss_tolerance=loss_tolerance, max_eval_loss_jump=jump)
    if twin is not None and twin_loss is None:
        verdicts = [Verdict(v.invariant, v.status, f"twin {twin} has no final eval loss")
                    if v.invariant == "final_loss_matches_twin" and v.status == UNKNOWN
                    and v.evidence.startswith("no twin") else v for v in verdicts]
    return verdicts


def check_runs(run_dirs: Sequence[Path], **kw) -> list[tuple[str, list[Verdict]]]:
    """The runs that ``run_dirs`` hold, each with its verdicts (see the module docstring): whole runs (written by
    ``geotrain launch``) one by one, else the parts of one run together. Raises HistoryUnreadable."""
    dirs = [_readable(d) for d in run_dirs]
    if len(dirs) == 1:
        return [(str(dirs[0]), check_run(dirs[0], **kw))]
    from geotrain.analysis.hosts import LAUNCHER, host_record
    from geotrain.analysis.rundir import load_run

    if all(LAUNCHER in host_record(load_run(d)).parts for d in dirs):
        return [(str(d), check_run(d, **kw)) for d in dirs]
    return [(", ".join(map(str, dirs)), check_run(dirs, **kw))]


def format_table(verdicts: Iterable[Verdict]) -> str:
    """An aligned text table: invariant | status | evidence."""
    verdicts = list(verdicts)
    rows = [("invariant", "status", "evidence")] + [(v.invariant, v.status, v.evidence) for v in verdicts]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 8}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geotrain check",
                                description="Check from a run's recorded history (metrics.jsonl) that geotrain kept its promises.")
    p.add_argument("run_dir", type=Path, nargs="+", help="the run directory; several: the directories separate hosts "
                                                          "wrote for one run (geotrain coordinator/site --run-dir)")
    p.add_argument("--twin", type=Path, default=None, help="a twin run directory whose final eval loss this run must match")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of the final loss (default 0.02)")
    p.add_argument("--max-eval-loss-jump", type=float, default=None, metavar="X",
                   help="the largest factor the eval loss may grow by between evals without a recorded cause "
                        "(default: the run's security.max_eval_loss_jump, else 4)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """``geotrain check RUN_DIR [RUN_DIR ...] [--twin RUN_DIR] [--tolerance 0.02] [--max-eval-loss-jump X] [--json]``: 0 when nothing is
    violated, 1 when something is, 2 when the run directory cannot be read."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.tolerance < 0 or not math.isfinite(args.tolerance):
        print(f"geotrain check: --tolerance must be a non-negative number, not {args.tolerance}", file=sys.stderr)
        return 2
    if args.max_eval_loss_jump is not None and not _valid_jump(args.max_eval_loss_jump):
        print(f"geotrain check: --max-eval-loss-jump must be a finite number above 1, not {args.max_eval_loss_jump}",
              file=sys.stderr)
        return 2
    try:
        runs = check_runs(args.run_dir, twin=args.twin, loss_tolerance=args.tolerance,
                          max_eval_loss_jump=args.max_eval_loss_jump)
    except HistoryUnreadable as exc:
        print(f"geotrain check: {exc}", file=sys.stderr)
        return exc.exit_code
    bad = False
    docs = []
    for i, (where, verdicts) in enumerate(runs):
        violated = [v for v in verdicts if v.status == VIOLATED]
        bad = bad or bool(violated)
        if args.json:
            docs.append({"run_dir": where, "ok": not violated, "verdicts": [v.to_dict() for v in verdicts]})
            continue
        print(("\n" if i else "") + format_table(verdicts))
        counts = {s: sum(1 for v in verdicts if v.status == s) for s in (HELD, VIOLATED, UNKNOWN)}
        print(f"\n{where}: {counts[HELD]} held, {counts[VIOLATED]} violated, {counts[UNKNOWN]} unknown")
    if args.json:  # one run: its object, as always; several whole runs: a list of them
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
