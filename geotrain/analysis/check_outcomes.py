"""The history checker's invariants about what a run delivered (see geotrain.analysis.check).

``sites_agree_after_merge`` (every site holds the committed weights), ``checkpoints_verify``
(every checkpoint matches its manifest), ``final_loss_matches_twin`` and ``faults_survived``.
Each returns one :class:`~geotrain.analysis.history.Verdict`; only the checkpoint check reads
files (the checkpoint directories it is given).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from geotrain.analysis.history import HELD, UNKNOWN, VIOLATED, Verdict, and_more, as_int, at_line, of_kind
from geotrain.errors import CheckpointCorrupt
from geotrain.storage.checkpoint import sha256_file

# ---------------------------------------------------------------------------------------------
# 3. sites_agree_after_merge


def sites_agree_after_merge(events: Sequence[dict]) -> Verdict:
    name = "sites_agree_after_merge"
    commit_crcs: dict[int, list[tuple[int, int]]] = defaultdict(list)  # round -> [(line, crc)]
    for i, e in of_kind(events, "commit"):
        rnd, crc = as_int(e.get("round")), as_int(e.get("crc32"))
        if rnd is not None and crc is not None:
            commit_crcs[rnd].append((i, crc))
    merges: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for i, e in of_kind(events, "merge"):
        rnd = as_int(e.get("round"))
        if rnd is not None and as_int(e.get("crc32")) is not None:
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
            got = as_int(m.get("crc32"))
            if got != want:
                problems.append(f"round {rnd}: site {m.get('site')} holds crc32 {got} ({at_line(i)}) "
                                f"but the commit has {want} ({at_line(line)})")
    gaps = []
    if no_merge:
        gaps.append(f"{len(no_merge)} committed rounds without a merge")
    if no_commit:
        gaps.append(f"{len(no_commit)} rounds with merges but no commit")
    gap_text = f"; not enough evidence for {', '.join(gaps)}" if gaps else ""
    if problems:
        more = and_more(problems)
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


def checkpoints_verify(checkpoints: Sequence[Path]) -> Verdict:
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
        more = and_more(bad)
        return Verdict(name, VIOLATED, f"{len(bad)} of {len(checkpoints)} checkpoints corrupt; first: {bad[0]}{more}")
    return Verdict(name, HELD, f"{len(checkpoints)} checkpoints verified ({', '.join(p.name for p in checkpoints[:4])}"
                               f"{', ...' if len(checkpoints) > 4 else ''})")


# ---------------------------------------------------------------------------------------------
# 6. final_loss_matches_twin


def final_eval_loss(events: Sequence[dict]) -> float | None:
    """The last eval's loss, ordered as summary.json orders them (by inner step, then time)."""
    evals = [e for _, e in of_kind(events, "eval") if isinstance(e.get("loss"), (int, float))]
    if not evals:
        return None
    last = max(enumerate(evals), key=lambda ie: (ie[1].get("step") or 0, ie[1].get("t") or 0, ie[0]))[1]
    return float(last["loss"])


def final_loss_matches_twin(events: Sequence[dict], twin_final_loss: float | None, tolerance: float) -> Verdict:
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


def faults_survived(events: Sequence[dict], min_commits: int) -> Verdict:
    name = "faults_survived"
    faults = of_kind(events, "fault_injected")
    if not faults:
        return Verdict(name, HELD, "no faults injected (vacuous)")
    commit_lines = [i for i, _ in of_kind(events, "commit")]
    finished = of_kind(events, "run_finished")
    status = finished[-1][1].get("status") if finished else None
    short: list[str] = []
    least = None
    for i, f in faults:
        n = sum(1 for j in commit_lines if j > i)
        least = n if least is None else min(least, n)
        if n < min_commits:
            short.append(f"{f.get('fault')} on {f.get('target')} ({at_line(i)}): {n} commits after it")
    if short:
        run = f"; run {status}" if status else ""
        more = and_more(short)
        return Verdict(name, UNKNOWN, f"{len(short)} of {len(faults)} faults followed by fewer than {min_commits} commits"
                                      f"{run}; first: {short[0]}{more}")
    return Verdict(name, HELD, f"{len(faults)} faults injected; training went on after each "
                               f"(at least {least} commits after every one, {min_commits} needed)")
