"""Helpers for tests that run `geotrain launch` for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from geotrain.events import read_events
from geotrain.run.procs import pid_alive

REPO = Path(__file__).resolve().parents[2]


def start_launch(topology: str | Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "geotrain.cli", "launch", str(topology), "--run-dir", str(run_dir),
                             "--quiet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def started_pids(run_dir: Path) -> dict[str, int]:
    """name -> pid of every process the launcher started (from its recorded events)."""
    return {e["name"]: e["pid"] for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "process_started"}


def wait_for_event(run_dir: Path, predicate, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in read_events(run_dir / "metrics.jsonl"):
            if predicate(e):
                return e
        time.sleep(0.2)
    raise AssertionError(f"no matching event in {run_dir}/metrics.jsonl within {timeout_s}s")


def leftover(run_dir: Path, wait_s: float = 5.0) -> dict[str, int]:
    """Processes the launcher started that are still alive after up to wait_s."""
    pids = started_pids(run_dir)
    deadline = time.monotonic() + wait_s
    while True:
        alive = {n: p for n, p in pids.items() if pid_alive(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions ``text`` (the process table check)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob and pid_alive(int(proc.name)):
            out.append(int(proc.name))
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
