"""The state file of a sweep, ``OUT/sweep.json``: every point's status, written after every change.

It makes a sweep resumable: the same command with the same ``--out`` skips completed points and
re-runs the others. :func:`check_compatible` refuses an OUT made for another grid, topology or
``--set``; :func:`input_digest` identifies the inputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path

from geotrain.analysis.sweep_grid import GridEntry, Point, SweepError
from geotrain.errors import GeotrainError

STATE_FILE = "sweep.json"
STATE_FORMAT = "geotrain-sweep/1"
STATUSES = ("completed", "failed", "interrupted", "running", "pending")


def timestamp() -> str:
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

    from geotrain.config.safeyaml import load_yaml, read_bounded
    from geotrain.config.topology import apply_override

    # the same bounded reader as the topology loader (aliases refused, size and depth limited)
    raw = load_yaml(read_bounded(Path(topology)), str(topology))
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
        "created_at": timestamp(),
        "updated_at": timestamp(),
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
    state["updated_at"] = timestamp()
    path = out / STATE_FILE
    tmp = out / (STATE_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise GeotrainError(f"{path}: cannot write the sweep state: {exc}") from exc
