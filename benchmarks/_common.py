"""Shared helpers for benchmark scripts: run `geotrain launch` and read what it left behind."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def launch(topology: str | Path, *overrides: str, run_dir: Path | None = None) -> dict:
    """Run one topology to completion; return its summary.json (raises on failure)."""
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="geotrain-bench-")) / "run"
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(topology), "--run-dir", str(run_dir), "--quiet"]
    for o in overrides:
        argv += ["--set", o]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"benchmark run of {topology} failed:\n{r.stderr}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["run_dir"] = str(run_dir)
    return summary


def machine() -> dict:
    import os

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path
