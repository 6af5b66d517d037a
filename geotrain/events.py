"""Structured events of a run, one JSON object per line in ``<run_dir>/metrics.jsonl``.

Every process of a run appends to the same file. Each event is written with a single
``os.write`` on a descriptor opened with ``O_APPEND``, so lines from different processes never
interleave (Linux appends each such write atomically on a local file system). Stable keys:

- ``t``: Unix time (float seconds) the event happened;
- ``event``: its kind (``inner_step``, ``merge``, ``eval``, ``commit``, ``site_joined``, ...);
- ``proc``: who wrote it (``coordinator``, ``us-east/0``, ``launcher``).

Writing never blocks training for long: one small write per event, no fsync.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events to a JSONL file; safe to share between processes."""

    def __init__(self, path: str | Path | None, proc: str):
        self.proc = proc
        self.path = Path(path) if path else None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if self.path else None

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"t": fields.pop("t", time.time()), "event": event, "proc": self.proc, **fields}
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        return record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: str | Path) -> list[dict]:
    """All complete events of a metrics.jsonl file (a torn last line is ignored)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    except FileNotFoundError:
        pass
    return out


class EventTail:
    """Reads the events appended to a metrics.jsonl since the last call (for live consumers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = ""

    def read(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                data = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def log_tail(path: str | Path | None, lines: int = 6) -> str:
    """The last ``lines`` lines of a process's console log, for an error message: ``"; last lines
    of PATH:\\n    ..."``, or ``""`` when there is no such log or it is empty or unreadable."""
    if path is None:
        return ""
    try:
        tail = Path(path).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("; last lines of " + str(path) + ":\n    " + "\n    ".join(tail)) if tail else ""


def number(value: Any) -> float | None:
    """An event field as a float, or None where it is missing or not a number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
