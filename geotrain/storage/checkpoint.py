"""Checkpoints: atomic, verifiable, written in the background, one part per writer.

Layout (under ``<run_dir>/checkpoints``)::

    round-000004/
      coordinator/        global model, outer optimizer state, round      (written by the coordinator)
        manifest.json  model.safetensors  outer.safetensors  state.json
      us-east.0/          inner optimizer state, data position, RNG      (written by each worker)
        manifest.json  inner.safetensors  state.json
      ...

A *part* is written to a temporary folder next to its final place, every file and the folder
fsynced, and then renamed into place (``os.replace``), so no reader ever sees a partial part.
``manifest.json`` lists every file with its size and sha256, the round, the part name and the
topology's sha256. A round is *complete* when the coordinator's part and every worker's part are
present and verify; resume uses the newest complete round, falling back to older ones when a
newer one is corrupt. Each writer keeps its own last ``keep`` parts.

Tensors go to safetensors (no pickle: loading a checkpoint cannot run code); small state
(round, sampler position, RNG states) goes to JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from geotrain.errors import CheckpointCorrupt
from geotrain.failpoints import raise_if_disk_full

log = logging.getLogger(__name__)

ROUND_RE = re.compile(r"^round-(\d{6})$")
COORDINATOR_PART = "coordinator"


def round_dir(root: Path, rnd: int) -> Path:
    return Path(root) / f"round-{rnd:06d}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Failpoint for tests of crash safety: called between file writes with a step name.
_crash_hook: Callable[[str], None] | None = None


def write_part(root: Path, rnd: int, part: str, tensors: dict[str, dict[str, torch.Tensor]],
               state: dict, topology_sha256: str) -> Path:
    """Atomically write one part of round ``rnd``. ``tensors`` maps file stem -> {name: tensor}."""

    raise_if_disk_full(root)
    final = round_dir(root, rnd) / part
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{part}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    files = []
    for stem, named in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in named.items()}, str(path))
        files.append(path)
        if _crash_hook:
            _crash_hook(f"wrote {path.name}")
    state_path = tmp / "state.json"
    state_path.write_text(json.dumps(state, sort_keys=True))
    files.append(state_path)
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    manifest = {
        "round": rnd, "part": part, "topology_sha256": topology_sha256, "created": time.time(),
        "files": [{"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in files],
    }
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if _crash_hook:
        _crash_hook("before rename")
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same round after a restart: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def verify_checkpoint(path: Path) -> dict:
    """Verify one part (a folder with manifest.json) or a whole round folder. Returns the manifest(s).

    Raises CheckpointCorrupt naming the file and what is wrong.
    """
    path = Path(path)
    if not (path / "manifest.json").exists() and path.is_dir() and ROUND_RE.match(path.name):
        parts = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".tmp-")]
        if not parts:
            raise CheckpointCorrupt(f"{path}: no parts in this checkpoint")
        return {"round": int(path.name.split("-")[1]), "parts": {p.name: verify_checkpoint(p) for p in parts}}
    mpath = path / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: no manifest.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"{mpath}: unreadable manifest: {exc}") from None
    for key in ("round", "files", "topology_sha256"):
        if key not in manifest:
            raise CheckpointCorrupt(f"{mpath}: manifest lacks {key!r}")
    for entry in manifest["files"]:
        fpath = path / entry["path"]
        if not fpath.exists():
            raise CheckpointCorrupt(f"{fpath}: listed in the manifest but missing")
        size = fpath.stat().st_size
        if size != entry["size"]:
            raise CheckpointCorrupt(f"{fpath}: {size} bytes, the manifest says {entry['size']} (truncated?)")
        if sha256_file(fpath) != entry["sha256"]:
            raise CheckpointCorrupt(f"{fpath}: sha256 does not match the manifest (corrupt)")
    return manifest


@dataclass
class RoundInfo:
    round: int
    path: Path
    parts: list[str]
    complete: bool
    problem: str | None = None


def list_rounds(root: Path, expected_parts: list[str] | None = None, verify: bool = True) -> list[RoundInfo]:
    """Every round folder under ``root``, oldest first, with completeness and verification."""
    out = []
    root = Path(root)
    if not root.exists():
        return out
    for d in sorted(root.iterdir()):
        m = ROUND_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        parts = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))
        problem = None
        missing = sorted(set(expected_parts or [COORDINATOR_PART]) - set(parts))
        if missing:
            problem = f"missing parts: {', '.join(missing)}"
        elif verify:
            for p in parts:
                try:
                    verify_checkpoint(d / p)
                except CheckpointCorrupt as exc:
                    problem = str(exc)
                    break
        out.append(RoundInfo(int(m.group(1)), d, parts, problem is None, problem))
    return out


def latest_complete(root: Path, expected_parts: list[str]) -> RoundInfo | None:
    """The newest round whose every expected part is present and verifies (older ones as fallback)."""
    for info in reversed(list_rounds(root, expected_parts)):
        if info.complete:
            return info
        log.warning("checkpoint %s unusable: %s; falling back to an older one", info.path, info.problem)
    return None


def load_part(root: Path, rnd: int, part: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verify and load one part: ({file stem: {name: tensor}}, state)."""
    path = round_dir(root, rnd) / part
    manifest = verify_checkpoint(path)
    tensors = {}
    for entry in manifest["files"]:
        if entry["path"].endswith(".safetensors"):
            tensors[entry["path"][: -len(".safetensors")]] = load_file(str(path / entry["path"]))
    state = json.loads((path / "state.json").read_text())
    return tensors, state


def prune(root: Path, part: str, keep: int) -> None:
    """Delete this writer's parts of all but its newest ``keep`` rounds (and emptied round folders).

    A part is first renamed to a ``.tmp-`` name (atomic; every reader skips those), then deleted: a writer
    killed in the middle of deleting (SIGKILL during ``rmtree``) leaves a hidden folder, never a part that
    lists files it no longer has (seen in CI: ``geotrain check`` found a round-2 part with its manifest and
    state but no tensors, the worker killed while pruning it). Such leftovers of this part, and of its
    interrupted writes, are deleted by the next prune."""
    rounds = sorted(d for d in Path(root).iterdir() if ROUND_RE.match(d.name)) if Path(root).exists() else []
    with_part = [d for d in rounds if (d / part).is_dir()]
    for d in with_part[:-keep] if keep > 0 else []:
        doomed = d / f".tmp-del-{part}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(d / part, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    for d in rounds:  # leftovers of this writer's interrupted deletes and writes
        for left in d.glob(f".tmp-*{part}-*"):
            if left.name.startswith((f".tmp-del-{part}-", f".tmp-{part}-")) and not _ours_in_flight(left):
                shutil.rmtree(left, ignore_errors=True)
        try:
            d.rmdir()
        except OSError:
            pass


def _ours_in_flight(path: Path) -> bool:
    """A ``.tmp-`` folder this process is still writing (its name carries our pid): not a leftover."""
    return path.name.startswith(".tmp-") and not path.name.startswith(".tmp-del-") and f"-{os.getpid()}-" in path.name


class BackgroundWriter:
    """Writes parts on a background thread so that training never waits for the disk.

    The caller snapshots tensors (a copy, in the training thread: the only stall) and submits;
    writes happen in submission order. ``flush()`` waits for all submitted writes.
    """

    def __init__(self, root: Path, part: str, topology_sha256: str, keep: int = 2, on_saved=None, on_error=None):
        self.root, self.part, self.topology_sha256, self.keep = Path(root), part, topology_sha256, keep
        self.on_saved = on_saved  # callback(round, path, seconds, bytes)
        self.on_error = on_error  # callback(round, exception): a failed write (full disk) is reported, training goes on
        self.errors: list[BaseException] = []
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-{part}", daemon=True)
        self._thread.start()

    def submit(self, rnd: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, copy: bool = True) -> float:
        """Snapshot and queue a write. Returns the seconds the caller was stalled (the copy).
        ``copy=False``: the caller guarantees that nothing writes ``tensors`` any more (its own snapshot,
        or values never written in place): they are written as they are, without a copy."""
        t0 = time.perf_counter()
        snap = {stem: {k: v.detach().to("cpu", copy=copy) for k, v in named.items()} for stem, named in tensors.items()}
        self._q.put((rnd, snap, json.loads(json.dumps(state))))
        return time.perf_counter() - t0

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            rnd, snap, state = item
            try:
                t0 = time.perf_counter()
                path = write_part(self.root, rnd, self.part, snap, state, self.topology_sha256)
                prune(self.root, self.part, self.keep)
                size = sum(f.stat().st_size for f in path.iterdir())
                if self.on_saved:
                    self.on_saved(rnd, path, time.perf_counter() - t0, size)
            except BaseException as exc:  # a full disk must not kill training; it is reported
                log.error("checkpoint of round %d (%s) failed: %s", rnd, self.part, exc)
                self.errors.append(exc)
                if self.on_error:
                    self.on_error(rnd, exc)
            finally:
                self._q.task_done()

    def flush(self) -> None:
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)
