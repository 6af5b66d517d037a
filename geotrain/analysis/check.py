"""The history checker: proves from a run's recorded history that geotrain kept its promises.

In the spirit of Jepsen's checkers and etcd's robustness suite, it does not ask whether the run
crashed; it reads ``<run_dir>/metrics.jsonl`` (docs/events.md) and the artifacts next to it and
decides, for every promise, whether the history shows it **held**, shows it **violated** (with
the first counter-example) or does not carry enough evidence either way (**unknown**)::

    geotrain check RUN_DIR [--twin RUN_DIR] [--tolerance 0.02] [--json]

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
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from geotrain.storage.checkpoint import sha256_file
from geotrain.errors import CheckpointCorrupt, GeotrainError
from geotrain.events import read_events

HELD, VIOLATED, UNKNOWN = "held", "violated", "unknown"

INVARIANTS = (
    "rounds_committed_once_in_order",
    "version_never_backwards",
    "only_committed_versions_served",
    "sites_agree_after_merge",
    "checkpoints_verify",
    "no_committed_round_lost",
    "final_loss_matches_twin",
    "faults_survived",
    "no_stale_update_applied",
)


@dataclass(frozen=True)
class Verdict:
    """One promise and what the history says about it."""

    invariant: str  # stable id, one of INVARIANTS
    status: str     # "held" | "violated" | "unknown"
    evidence: str   # one line: what was checked, how many, the first counter-example

    def to_dict(self) -> dict:
        return asdict(self)


class HistoryUnreadable(GeotrainError):
    """A run directory (or its twin) is missing or has no metrics.jsonl."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# helpers


def _kind(events: Sequence[dict], kind: str) -> list[tuple[int, dict]]:
    """(line index, event) of every event of one kind, in file order."""
    return [(i, e) for i, e in enumerate(events) if isinstance(e, dict) and e.get("event") == kind]


def _int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _rounds_span(rounds: Iterable[int]) -> str:
    rounds = list(rounds)
    if not rounds:
        return "no rounds"
    return f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {min(rounds)}-{max(rounds)}"


def _line(i: int) -> str:
    return f"line {i + 1}"


# ---------------------------------------------------------------------------------------------
# the shape of a history: launches (run_started, possibly `geotrain resume`) and coordinator
# incarnations (coordinator_started) inside them


@dataclass(frozen=True)
class _Rebase:
    """A launch's first coordinator: the round (== version) the run (re)starts from."""

    line: int
    round: int | None  # None: not declared (an old history): carry on from what came before
    how: str           # "start" | "resume from checkpoint round R" | "relaunch at round R"
    asked: int | None  # the checkpoint round `geotrain resume` asked for (run_started.resume_round)
    declared: int | None  # the round the coordinator said it starts at (coordinator_started.round)


@dataclass(frozen=True)
class _Restart:
    """A coordinator incarnation after the first of its launch."""

    line: int
    event: dict
    round: int | None  # the round it declared it starts collecting (== committed rounds), if it says


def _shape(events: Sequence[dict]) -> tuple[dict[int, _Rebase], dict[int, _Restart]]:
    """(line -> rebase, line -> restart). A history without run_started is one launch."""
    rebases: dict[int, _Rebase] = {}
    restarts: dict[int, _Restart] = {}
    launches = 0
    resume_round: int | None = None
    coordinators_in_launch = 0
    for i, e in enumerate(events):
        kind = e.get("event")
        if kind == "run_started":
            launches += 1
            resume_round = _int(e.get("resume_round"))
            coordinators_in_launch = 0
        elif kind == "coordinator_started":
            declared = _int(e.get("round"))
            if coordinators_in_launch == 0:
                first = launches <= 1
                rnd = declared if declared is not None else resume_round if resume_round is not None else (0 if first else None)
                if resume_round is not None:
                    how = f"resume from checkpoint round {resume_round}"
                elif first and not rnd:
                    how = "start"
                else:
                    how = f"relaunch at round {rnd}" if rnd is not None else "relaunch"
                rebases[i] = _Rebase(i, rnd, how, resume_round, declared)
            else:
                restarts[i] = _Restart(i, e, declared)
            coordinators_in_launch += 1
    return rebases, restarts


def _more(problems: list[str]) -> str:
    return f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""


# ---------------------------------------------------------------------------------------------
# 1. rounds_committed_once_in_order


def _check_rounds_once_in_order(events: Sequence[dict]) -> Verdict:
    name = "rounds_committed_once_in_order"
    commits = _kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    rebases, restarts = _shape(events)
    seen: dict[int, int] = {}  # round -> line of its commit (in the current timeline)
    expected = 0
    problems: list[str] = []
    notes: list[str] = []
    for i, e in enumerate(events):
        if i in rebases:
            rb = rebases[i]
            if rb.round is not None:
                # rounds from the rebase on are redone (resume from a checkpoint): forget them
                seen = {r: line for r, line in seen.items() if r < rb.round}
                expected = rb.round
            if rb.how != "start":
                notes.append(rb.how)
            continue
        if i in restarts:
            rs = restarts[i]
            if rs.round is not None and rs.round == expected + 1 and expected not in seen:
                # the previous incarnation made round `expected` durable and died before recording its
                # commit; the new one says so by starting at the round after it
                seen[expected] = i
                notes.append(f"round {expected} committed without a commit event (restart at {_line(i)} started at round {rs.round})")
                expected = rs.round
            continue
        if e.get("event") != "commit":
            continue
        rnd = _int(e.get("round"))
        if rnd is None:
            problems.append(f"commit at {_line(i)} has no integer round ({e.get('round')!r})")
            continue
        if rnd in seen:
            epoch = f" (epoch {e['epoch']})" if "epoch" in e else ""
            problems.append(f"round {rnd} committed twice ({_line(seen[rnd])} and {_line(i)}){epoch}")
            expected = max(expected, rnd + 1)
            continue
        if rnd > expected:
            missing = f"round {expected}" if rnd == expected + 1 else f"rounds {expected}-{rnd - 1}"
            problems.append(f"gap: {missing} never committed, {_line(i)} commits round {rnd}")
        elif rnd < expected:
            problems.append(f"out of order: {_line(i)} commits round {rnd} after round {expected - 1}")
        seen[rnd] = i
        expected = max(expected, rnd + 1)
    if problems:
        return Verdict(name, VIOLATED, f"{len(commits)} commits; first: {problems[0]}{_more(problems)}")
    note = f"; {'; '.join(notes)}" if notes else ""
    return Verdict(name, HELD, f"{len(commits)} commits, {_rounds_span(sorted(seen))}, each once, in order, no gap{note}")


# ---------------------------------------------------------------------------------------------
# 2. version_never_backwards


def _check_versions(events: Sequence[dict]) -> Verdict:
    name = "version_never_backwards"
    rebases, _ = _shape(events)
    problems: list[str] = []
    n_commits = n_merges = n_ready = 0
    last_commit: tuple[int, int] | None = None      # (version, line) of the newest commit
    per_site: dict[str, tuple[int, int]] = {}       # site -> (newest merge version, line)
    committed: int | None = None                    # the newest committed version (file order)
    at_join: dict[str, int | None] = {}             # site -> the floor its next site_ready must reach
    merging_sites: set[str] = set()
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases:
            rb = rebases[i]
            if rb.round is not None:  # a resume goes back to its checkpoint on purpose
                last_commit, per_site, committed, at_join = (rb.round, i), {}, rb.round, {}
            continue
        if kind == "commit":
            v = _int(e.get("version"))
            if v is None:
                continue
            n_commits += 1
            if last_commit is not None and v <= last_commit[0]:
                problems.append(f"commit at {_line(i)} has version {v} after version {last_commit[0]} ({_line(last_commit[1])})")
            if last_commit is None or v > last_commit[0]:
                last_commit = (v, i)
            committed = v if committed is None else max(committed, v)
        elif kind == "merge":
            v, site = _int(e.get("version")), e.get("site")
            if v is None or site is None:
                continue
            n_merges += 1
            merging_sites.add(site)
            prev = per_site.get(site)
            if prev is not None and v < prev[0]:
                problems.append(f"site {site} merged version {v} at {_line(i)} after version {prev[0]} ({_line(prev[1])})")
            if prev is None or v > prev[0]:
                per_site[site] = (v, i)
        elif kind == "site_joined" and e.get("site") is not None:
            # The coordinator writes site_joined and commit under one lock and the site asks for a
            # model of at least the version it was told at join: the join is the sound anchor (a
            # commit recorded between the join and site_ready is not a counter-example).
            floors = [f for f in (committed, _int(e.get("start_version"))) if f is not None]
            at_join[e["site"]] = max(floors) if floors else None
        elif kind == "site_ready":
            v, site = _int(e.get("version")), e.get("site")
            if v is None:
                continue
            n_ready += 1
            floor = at_join.pop(site) if site in at_join else committed
            if floor is not None and v < floor:
                problems.append(f"site {site} ready at version {v} ({_line(i)}) but version {floor} was already committed")
    checked = f"{n_commits} commit versions, {n_merges} merges over {len(merging_sites)} sites, {n_ready} site_ready"
    if problems:
        return Verdict(name, VIOLATED, f"{checked}; first: {problems[0]}{_more(problems)}")
    if n_commits == 0 and n_merges == 0 and n_ready == 0:
        return Verdict(name, UNKNOWN, "no commit, merge or site_ready event carries a version")
    return Verdict(name, HELD, f"{checked}; no version went backwards")


# ---------------------------------------------------------------------------------------------
# 2b. only_committed_versions_served


def _check_only_committed_served(events: Sequence[dict]) -> Verdict:
    """A site only ever holds a version the history committed (or a coordinator declared it
    restored): the coordinator records a commit before anyone can receive its result, so a
    ``site_ready`` or ``merge`` version above every commit so far is weights no commit produced."""
    name = "only_committed_versions_served"
    rebases, restarts = _shape(events)
    ceiling = 0
    n = n_ckpt = 0
    problems: list[str] = []
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases:
            if rebases[i].round is not None:
                ceiling = rebases[i].round
            continue
        if i in restarts:
            if restarts[i].round is not None:
                ceiling = max(ceiling, restarts[i].round)
            continue
        if kind == "commit":
            v = _int(e.get("version"))
            if v is not None:
                ceiling = max(ceiling, v)
        elif kind in ("site_ready", "merge", "checkpoint_saved"):
            # a checkpoint's round is the version it saved (the number of rounds committed)
            v = _int(e.get("round" if kind == "checkpoint_saved" else "version"))
            if v is None:
                continue
            n += 1
            n_ckpt += kind == "checkpoint_saved"
            if v > ceiling:
                who = {"site_ready": f"site {e.get('site')} ready at", "merge": f"site {e.get('site')} merged",
                       "checkpoint_saved": "checkpoint saved of"}[kind]
                problems.append(f"{who} version {v} ({_line(i)}) but the newest committed version was {ceiling}")
    if problems:
        return Verdict(name, VIOLATED, f"{n} versions held by sites or checkpoints; first: {problems[0]}{_more(problems)}")
    if n == 0:
        return Verdict(name, UNKNOWN, "no site_ready, merge or checkpoint_saved event carries a version")
    return Verdict(name, HELD, f"{n} versions held ({n - n_ckpt} by sites, {n_ckpt} in checkpoints), each one committed before")


# ---------------------------------------------------------------------------------------------
# 3. sites_agree_after_merge


def _check_sites_agree(events: Sequence[dict]) -> Verdict:
    name = "sites_agree_after_merge"
    commit_crcs: dict[int, list[tuple[int, int]]] = defaultdict(list)  # round -> [(line, crc)]
    for i, e in _kind(events, "commit"):
        rnd, crc = _int(e.get("round")), _int(e.get("crc32"))
        if rnd is not None and crc is not None:
            commit_crcs[rnd].append((i, crc))
    merges: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for i, e in _kind(events, "merge"):
        rnd = _int(e.get("round"))
        if rnd is not None and _int(e.get("crc32")) is not None:
            merges[rnd].append((i, e))
    checked_rounds = compared = 0
    no_merge = [r for r in commit_crcs if r not in merges]
    no_commit = [r for r in merges if r not in commit_crcs]
    problems: list[str] = []
    for rnd in sorted(set(commit_crcs) & set(merges)):
        checked_rounds += 1
        for i, m in merges[rnd]:
            compared += 1
            # the commit this merge received: the latest commit of its round before it in the file
            before = [c for c in commit_crcs[rnd] if c[0] < i]
            line, want = before[-1] if before else commit_crcs[rnd][0]
            got = _int(m.get("crc32"))
            if got != want:
                problems.append(f"round {rnd}: site {m.get('site')} holds crc32 {got} ({_line(i)}) "
                                f"but the commit has {want} ({_line(line)})")
    gaps = []
    if no_merge:
        gaps.append(f"{len(no_merge)} committed rounds without a merge")
    if no_commit:
        gaps.append(f"{len(no_commit)} rounds with merges but no commit")
    gap_text = f"; not enough evidence for {', '.join(gaps)}" if gaps else ""
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict(name, VIOLATED, f"{compared} merges in {checked_rounds} rounds compared; first: {problems[0]}{more}")
    if checked_rounds == 0:
        if not commit_crcs and not merges:
            return Verdict(name, UNKNOWN, "no commit or merge carries a crc32")
        return Verdict(name, UNKNOWN, f"no round has both a commit and a merge with crc32{gap_text}")
    return Verdict(name, HELD, f"{compared} merges in {checked_rounds} rounds all hold the committed weights (crc32){gap_text}")


# ---------------------------------------------------------------------------------------------
# 4. checkpoints_verify


def verify_manifest(path: str | Path) -> dict:
    """Verify a checkpoint against its ``manifest.json``; return the manifest.

    ``path`` is one part (a folder with ``manifest.json`` = ``{"round", "topology_sha256",
    "files": [{"path", "size", "sha256"}]}``, paths relative to it) or a round folder holding
    parts (``round-000004/coordinator``, ``round-000004/us-east.0``, ...). Raises
    CheckpointCorrupt naming the first problem. (Used when geotrain.storage.checkpoint is not available.)
    """
    path = Path(path)
    if not (path / "manifest.json").exists() and path.is_dir():
        parts = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if parts:
            return {"parts": {p.name: verify_manifest(p) for p in parts}}
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: no manifest.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"{path}/manifest.json unreadable: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise CheckpointCorrupt(f"{path}/manifest.json: no 'files' list")
    root = path.resolve()
    for entry in files:
        try:
            rel, size, digest = entry["path"], int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointCorrupt(f"{path}/manifest.json: malformed file entry {entry!r}") from None
        target = path / rel
        if not target.resolve().is_relative_to(root):
            raise CheckpointCorrupt(f"{path}: manifest names {rel!r}, outside the checkpoint")
        if not target.is_file():
            raise CheckpointCorrupt(f"{path}: {rel} is missing")
        actual = target.stat().st_size
        if actual != size:
            raise CheckpointCorrupt(f"{path}: {rel} has {actual} bytes, manifest says {size}")
        if sha256_file(target) != digest.lower():
            raise CheckpointCorrupt(f"{path}: {rel} sha256 mismatch")
    return manifest


def _verifier():
    """geotrain.storage.checkpoint.verify_checkpoint when it exists, else verify_manifest."""
    try:
        from geotrain.storage.checkpoint import verify_checkpoint  # noqa: PLC0415 (written concurrently; lazy)
    except ImportError:
        return verify_manifest
    return verify_checkpoint


def _check_checkpoints(checkpoints: Sequence[Path]) -> Verdict:
    name = "checkpoints_verify"
    checkpoints = [Path(p) for p in checkpoints]
    if not checkpoints:
        return Verdict(name, UNKNOWN, "no checkpoints to verify")
    verify = _verifier()
    bad: list[str] = []
    for p in checkpoints:
        try:
            verify(p)
        except CheckpointCorrupt as exc:
            bad.append(str(exc) or f"{p}: corrupt")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a verifier that lets these through
            bad.append(f"{p}: {type(exc).__name__}: {exc}")
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return Verdict(name, VIOLATED, f"{len(bad)} of {len(checkpoints)} checkpoints corrupt; first: {bad[0]}{more}")
    return Verdict(name, HELD, f"{len(checkpoints)} checkpoints verified ({', '.join(p.name for p in checkpoints[:4])}"
                               f"{', ...' if len(checkpoints) > 4 else ''})")


# ---------------------------------------------------------------------------------------------
# 5. no_committed_round_lost


def _check_no_round_lost(events: Sequence[dict]) -> Verdict:
    name = "no_committed_round_lost"
    commits = _kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    rebases, restarts = _shape(events)
    problems: list[str] = []
    notes: list[str] = []
    checked = unchecked = 0
    last_round, last_version = -1, None   # newest committed round / version of the current timeline
    pending: _Restart | None = None       # a restart whose first commit is still to come
    for i, e in enumerate(events):
        if i in rebases:
            rb = rebases[i]
            if pending is not None:
                unchecked += 1
                pending = None
            if rb.asked is not None and rb.declared is not None and rb.declared != rb.asked:
                problems.append(f"resume from checkpoint round {rb.asked} but the coordinator started at round "
                                f"{rb.declared} ({_line(i)})")
            if rb.asked is None and rb.declared is not None and 0 < rb.declared <= last_round:
                # a relaunch (not `geotrain resume`) starts from the coordinator's persisted state,
                # which is saved before a commit is recorded: it can never be behind the history
                problems.append(f"relaunch at {_line(i)}: the coordinator started at round {rb.declared} but round "
                                f"{last_round} was committed; committed round lost")
            if rb.how != "start":
                notes.append(rb.how)
            if rb.round is not None:
                last_round, last_version = rb.round - 1, (rb.round if rb.round > 0 else None)
            continue
        if i in restarts:
            rs = restarts[i]
            if pending is not None:
                unchecked += 1
            pending = rs
            epoch = f" (epoch {rs.event['epoch']})" if "epoch" in rs.event else ""
            if rs.round is not None and rs.round < last_round + 1:
                problems.append(f"coordinator restart at {_line(i)}{epoch} started at round {rs.round} but round "
                                f"{last_round} was committed; committed round lost")
            continue
        if e.get("event") != "commit":
            continue
        rnd, ver = _int(e.get("round")), _int(e.get("version"))
        if pending is not None:
            checked += 1
            rs, pending = pending, None
            epoch = f" (epoch {rs.event['epoch']})" if "epoch" in rs.event else ""
            if rnd is not None and rnd < last_round + 1:
                problems.append(f"coordinator restart at {_line(rs.line)}{epoch}: first commit after it is round {rnd} "
                                f"({_line(i)}) but round {last_round} was committed before; committed round lost")
            elif ver is not None and last_version is not None and ver <= last_version:
                problems.append(f"coordinator restart at {_line(rs.line)}{epoch}: first commit after it has version {ver} "
                                f"({_line(i)}) but version {last_version} was committed before")
        if rnd is not None:
            last_round = max(last_round, rnd)
        if ver is not None:
            last_version = ver if last_version is None else max(last_version, ver)
    if pending is not None:
        unchecked += 1
    n_restarts = len(restarts)
    if problems:
        return Verdict(name, VIOLATED, f"{n_restarts} coordinator restarts, {len(commits)} commits; "
                                       f"first: {problems[0]}{_more(problems)}")
    note = f"; {'; '.join(notes)}" if notes else ""
    if n_restarts == 0:
        return Verdict(name, HELD, f"no coordinator restart; {len(commits)} commits{note}")
    if checked == 0:
        return Verdict(name, UNKNOWN, f"{n_restarts} coordinator restarts, but no commit after any of them{note}")
    extra = f" ({unchecked} with no commit after it)" if unchecked else ""
    return Verdict(name, HELD, f"{n_restarts} coordinator restarts{extra}; after each, the next commit continued from "
                               f"the last committed round and version; {len(commits)} commits{note}")


# ---------------------------------------------------------------------------------------------
# 6. final_loss_matches_twin


def final_eval_loss(events: Sequence[dict]) -> float | None:
    """The last eval's loss, ordered as summary.json orders them (by inner step, then time)."""
    evals = [e for _, e in _kind(events, "eval") if isinstance(e.get("loss"), (int, float))]
    if not evals:
        return None
    last = max(enumerate(evals), key=lambda ie: (ie[1].get("step") or 0, ie[1].get("t") or 0, ie[0]))[1]
    return float(last["loss"])


def _check_final_loss(events: Sequence[dict], twin_final_loss: float | None, tolerance: float) -> Verdict:
    name = "final_loss_matches_twin"
    mine = final_eval_loss(events)
    if mine is None:
        return Verdict(name, UNKNOWN, "no eval event in this run")
    if twin_final_loss is None:
        return Verdict(name, UNKNOWN, f"no twin to compare with (final eval loss {mine:.6g})")
    twin = float(twin_final_loss)
    if not math.isfinite(mine):
        return Verdict(name, VIOLATED, f"final eval loss is {mine} (twin {twin:.6g})")
    if not math.isfinite(twin):
        return Verdict(name, UNKNOWN, f"the twin's final eval loss is {twin}")
    rel = abs(mine - twin) / abs(twin) if twin != 0 else abs(mine - twin)
    text = f"final eval loss {mine:.6g} vs twin {twin:.6g}: relative difference {rel:.4g} (tolerance {tolerance:g})"
    return Verdict(name, HELD if rel <= tolerance else VIOLATED, text)


# ---------------------------------------------------------------------------------------------
# 7. faults_survived


def _check_faults(events: Sequence[dict], min_commits: int) -> Verdict:
    name = "faults_survived"
    faults = _kind(events, "fault_injected")
    if not faults:
        return Verdict(name, HELD, "no faults injected (vacuous)")
    commit_lines = [i for i, _ in _kind(events, "commit")]
    finished = _kind(events, "run_finished")
    status = finished[-1][1].get("status") if finished else None
    short: list[str] = []
    least = None
    for i, f in faults:
        n = sum(1 for j in commit_lines if j > i)
        least = n if least is None else min(least, n)
        if n < min_commits:
            short.append(f"{f.get('fault')} on {f.get('target')} ({_line(i)}): {n} commits after it")
    if short:
        run = f"; run {status}" if status else ""
        more = f" (+{len(short) - 1} more)" if len(short) > 1 else ""
        return Verdict(name, UNKNOWN, f"{len(short)} of {len(faults)} faults followed by fewer than {min_commits} commits"
                                      f"{run}; first: {short[0]}{more}")
    return Verdict(name, HELD, f"{len(faults)} faults injected; training went on after each "
                               f"(at least {least} commits after every one, {min_commits} needed)")


# ---------------------------------------------------------------------------------------------
# 8. no_stale_update_applied


def _check_no_stale_applied(events: Sequence[dict]) -> Verdict:
    name = "no_stale_update_applied"
    commits = _kind(events, "commit")
    if not commits:
        return Verdict(name, UNKNOWN, "no commit events")
    known: set[str] = set()
    declared = False
    problems: list[str] = []
    max_round: tuple[int, int] | None = None  # (round, line)
    contributions = 0
    rebases, _ = _shape(events)
    for i, e in enumerate(events):
        kind = e.get("event")
        if i in rebases and rebases[i].round is not None:
            max_round = None  # rounds from the rebase on are redone on purpose
        if kind in ("run_started", "coordinator_started") and isinstance(e.get("sites"), list):
            known.update(str(s) for s in e["sites"])
            declared = True
        elif kind == "site_joined" and e.get("site") is not None:
            known.add(str(e["site"]))
            declared = True
        elif kind == "commit":
            sites = e.get("sites")
            rnd = _int(e.get("round"))
            if isinstance(sites, list):
                contributions += len(sites)
                names = [str(s) for s in sites]
                dup = sorted({s for s in names if names.count(s) > 1})
                if dup:
                    problems.append(f"commit of round {rnd} ({_line(i)}) applied {', '.join(map(str, dup))} twice")
                strangers = sorted(set(names) - known) if declared else []
                if strangers:
                    problems.append(f"commit of round {rnd} ({_line(i)}) applied an update from "
                                    f"{', '.join(strangers)}, never part of the run")
            if rnd is not None:
                if max_round is not None and rnd < max_round[0]:
                    problems.append(f"commit of round {rnd} ({_line(i)}) after round {max_round[0]} "
                                    f"was committed ({_line(max_round[1])})")
                if max_round is None or rnd > max_round[0]:
                    max_round = (rnd, i)
    refused = _kind(events, "merge_refused")
    stale = sum(1 for _, e in refused if e.get("action") == "stale")
    refused_text = f"{len(refused)} updates refused ({stale} stale)"
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return Verdict(name, VIOLATED, f"{len(commits)} commits, {refused_text}; first: {problems[0]}{more}")
    return Verdict(name, HELD, f"{len(commits)} commits applied {contributions} site updates, each once, "
                               f"none for an old round; {refused_text}")


# ---------------------------------------------------------------------------------------------
# API


def check_history(events: list[dict], *, checkpoints: Sequence[Path] = (), twin_final_loss: float | None = None,
                  loss_tolerance: float = 0.02, min_merges_around_fault: int = 1) -> list[Verdict]:
    """Every invariant's verdict on a recorded history (events in file order). Pure: the only
    I/O is verifying the given checkpoint directories."""
    events = [e for e in events if isinstance(e, dict)]
    per_lane = [_check_rounds_once_in_order, _check_versions, _check_only_committed_served, _check_sites_agree]
    fragments = sorted({e.get("fragment", 0) for e in events if e.get("event") in ("commit", "merge")})
    if len(fragments) > 1:  # streaming-diloco: every fragment has rounds of its own
        lane_verdicts = [_combine_lanes([check(_lane(events, f)) for f in fragments], fragments) for check in per_lane]
        # site_ready carries the run's version (the commits of every fragment together): judged on the whole run
        ready = _check_only_committed_served([e for e in events if e.get("event") not in ("merge", "checkpoint_saved")])
        lane_verdicts[2] = _worst(lane_verdicts[2], ready)
        round_lost = _combine_lanes([_check_no_round_lost(_lane(events, f)) for f in fragments], fragments)
    else:
        lane_verdicts = [check(events) for check in per_lane]
        round_lost = _check_no_round_lost(events)
    return [
        *lane_verdicts,
        _check_checkpoints(checkpoints),
        round_lost,
        _check_final_loss(events, twin_final_loss, loss_tolerance),
        _check_faults(events, min_merges_around_fault),
        _check_no_stale_applied(events),
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


def check_run(run_dir: Path, twin: Path | None = None, loss_tolerance: float = 0.02) -> list[Verdict]:
    """Check a run directory: its metrics.jsonl, its checkpoints/*, and (optionally) a twin run's
    final eval loss. Raises HistoryUnreadable when the run directory or its history is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HistoryUnreadable(f"no run directory at {run_dir}")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise HistoryUnreadable(f"{run_dir} has no metrics.jsonl (not a run directory?)")
    twin_loss = _twin_final_loss(twin) if twin is not None else None
    verdicts = check_history(read_events(metrics), checkpoints=find_checkpoints(run_dir),
                             twin_final_loss=twin_loss, loss_tolerance=loss_tolerance)
    if twin is not None and twin_loss is None:
        verdicts = [Verdict(v.invariant, v.status, f"twin {twin} has no final eval loss")
                    if v.invariant == "final_loss_matches_twin" and v.status == UNKNOWN
                    and v.evidence.startswith("no twin") else v for v in verdicts]
    return verdicts


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
    p.add_argument("run_dir", type=Path, help="the run directory")
    p.add_argument("--twin", type=Path, default=None, help="a twin run directory whose final eval loss this run must match")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of the final loss (default 0.02)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """``geotrain check RUN_DIR [--twin RUN_DIR] [--tolerance 0.02] [--json]``: 0 when nothing is
    violated, 1 when something is, 2 when the run directory cannot be read."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.tolerance < 0 or not math.isfinite(args.tolerance):
        print(f"geotrain check: --tolerance must be a non-negative number, not {args.tolerance}", file=sys.stderr)
        return 2
    try:
        verdicts = check_run(args.run_dir, twin=args.twin, loss_tolerance=args.tolerance)
    except HistoryUnreadable as exc:
        print(f"geotrain check: {exc}", file=sys.stderr)
        return exc.exit_code
    violated = [v for v in verdicts if v.status == VIOLATED]
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "ok": not violated,
                          "verdicts": [v.to_dict() for v in verdicts]}, indent=2))
    else:
        print(format_table(verdicts))
        counts = {s: sum(1 for v in verdicts if v.status == s) for s in (HELD, VIOLATED, UNKNOWN)}
        print(f"\n{args.run_dir}: {counts[HELD]} held, {counts[VIOLATED]} violated, {counts[UNKNOWN]} unknown")
    return 1 if violated else 0


if __name__ == "__main__":
    sys.exit(main())
