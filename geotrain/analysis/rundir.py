"""One run directory, read for the report (geotrain.analysis.report): a :class:`Run`.

Reads only what a run leaves in its directory: ``metrics.jsonl`` (docs/events.md),
``summary.json`` (geotrain/run/summary.py), ``topology.json`` and ``links/*.json``. Every number
comes from ``summary.json`` when the run wrote it, else from the events; what could not be read
is kept as a note for the report. A path that is not a run directory raises
:class:`~geotrain.errors.GeotrainError` naming the path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.errors import GeotrainError
from geotrain.events import read_events


@dataclass
class Run:
    """Everything the report needs from one run directory."""

    path: Path
    events: list[dict]
    summary: dict | None
    topology: dict | None
    link_files: dict[str, dict]
    label: str = ""
    notes: list[str] = field(default_factory=list)
    topology_file: str | None = None  # which file the topology came from (topology.json, topology.<site>.json)
    # A run merged from the run dirs of separate hosts (geotrain.analysis.hosts): the dirs, and the
    # status and reason judged from the merged history (no launcher wrote run_finished or summary.json).
    parts: list[Path] = field(default_factory=list)
    judged: tuple[str, str | None] | None = None
    _topo_cache: tuple | None = field(default=None, repr=False, compare=False)

    # -- basic facts, from summary.json when there is one, else from the events --
    @property
    def t0(self) -> float:
        for e in self.events:
            if e.get("event") == "run_started" and isinstance(e.get("t"), (int, float)):
                return float(e["t"])
        ts = [e["t"] for e in self.events if isinstance(e.get("t"), (int, float))]
        return float(min(ts)) if ts else 0.0

    @property
    def t_end(self) -> float:
        ts = [e["t"] for e in self.events if isinstance(e.get("t"), (int, float))]
        return float(max(ts)) if ts else self.t0

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind and isinstance(e.get("t"), (int, float))]

    @property
    def algorithm(self) -> str:
        if self.summary and self.summary.get("algorithm"):
            return str(self.summary["algorithm"])
        tr = (self.topology or {}).get("training") or {}
        if tr.get("algorithm"):
            return str(tr["algorithm"])
        for e in self.of("run_started"):
            if e.get("algorithm"):
                return str(e["algorithm"])
        return "unknown"

    @property
    def status(self) -> str:
        if self.judged is not None:
            return self.judged[0]
        if self.summary and self.summary.get("status"):
            return str(self.summary["status"])
        finished = self.of("run_finished")
        if finished and finished[-1].get("status"):
            return str(finished[-1]["status"])
        return "incomplete"

    @property
    def reason(self) -> str | None:
        if self.judged is not None:
            return self.judged[1]
        if self.summary and self.summary.get("reason"):
            return str(self.summary["reason"])
        finished = self.of("run_finished")
        if finished and finished[-1].get("reason"):
            return str(finished[-1]["reason"])
        if self.status == "incomplete":
            return "no summary.json and no run_finished event (still running, or killed)"
        return None

    @property
    def sites(self) -> list[str]:
        """Site names in topology order (else the order they appear in the events)."""
        names = [s.get("name") for s in (self.topology or {}).get("sites") or [] if s.get("name")]
        if names:
            return names
        if self.summary and self.summary.get("sites"):
            return list(self.summary["sites"])
        for e in self.of("run_started"):
            if e.get("sites"):
                return [str(s) for s in e["sites"]]
        seen: list[str] = []
        for e in self.events:
            s = e.get("site")
            if e.get("event") in ("inner_step", "merge", "site_ready") and s and s not in seen:
                seen.append(s)
        return seen

    def workers(self, site: str) -> int | None:
        for s in (self.topology or {}).get("sites") or []:
            if s.get("name") == site:
                return s.get("workers")
        if self.summary and site in (self.summary.get("sites") or {}):
            return self.summary["sites"][site].get("workers")
        joined = [e for e in self.of("site_joined") if e.get("site") == site]
        return joined[-1].get("workers") if joined else None

    @property
    def inner_steps_per_round(self) -> int | None:
        return ((self.topology or {}).get("training") or {}).get("inner_steps")

    @property
    def rounds_planned(self) -> int | None:
        if self.summary and self.summary.get("rounds_planned") is not None:
            return self.summary["rounds_planned"]
        return ((self.topology or {}).get("training") or {}).get("rounds")

    @property
    def rounds_completed(self) -> int:
        """summary.json's count, else the coordinator's commits counted the way the run's algorithm merges
        (geotrain.run.summary.rounds_completed: ddp per inner step, streaming per fragment, async-diloco per
        site), else distinct committed rounds when the topology in the dir cannot be read."""
        if self.summary and self.summary.get("rounds_completed") is not None:
            return int(self.summary["rounds_completed"])
        commits = [e for e in self.of("commit") if e.get("round") is not None]
        topo = self._topology_model()
        if topo is not None:
            from geotrain.run.summary import rounds_completed

            return rounds_completed(commits, topo)
        rounds = {e.get("round") for e in commits}
        if self.algorithm == "ddp" and self.inner_steps_per_round:
            return len(rounds) // self.inner_steps_per_round
        return len(rounds)

    def _topology_model(self):
        """The dir's topology validated (geotrain.config), or None when there is none or it does not
        validate (a run dir of an older geotrain)."""
        if not self.topology:
            return None
        if self._topo_cache is None:
            from geotrain.config.topology import parse_topology

            try:
                self._topo_cache = (parse_topology(self.topology, source=self.topology_file or "topology.json"),)
            except (GeotrainError, ValueError, TypeError):
                self._topo_cache = (None,)
        return self._topo_cache[0]

    @property
    def wall_seconds(self) -> float:
        if self.summary and self.summary.get("wall_seconds") is not None:
            return float(self.summary["wall_seconds"])
        return self.t_end - self.t0

    @property
    def coordinator_at(self) -> str | None:
        return ((self.topology or {}).get("coordinator") or {}).get("at")

    def crosses_wan(self, site: str | None) -> bool:
        """Whether a site's merges go through a WAN link (a site at the coordinator's place has none)."""
        at = self.coordinator_at
        return not (at is not None and site == at)

    def evals(self) -> list[dict]:
        out = [e for e in self.of("eval") if is_number(e.get("loss")) and is_number(e.get("step"))]
        return sorted(out, key=lambda e: (e["step"], e["t"]))

    @property
    def initial_loss(self) -> float | None:
        if self.summary and "initial_eval_loss" in self.summary:
            return self.summary["initial_eval_loss"]
        ev = self.evals()
        return ev[0]["loss"] if ev and ev[0]["step"] == 0 else None

    @property
    def final_loss(self) -> float | None:
        if self.summary and "final_eval_loss" in self.summary:
            return self.summary["final_eval_loss"]
        ev = self.evals()
        return ev[-1]["loss"] if ev else None

    def link_bytes(self) -> dict[str, tuple[int, int]]:
        """{link name: (bytes forward, bytes backward)} from summary.json, else links/*.json."""
        links = (self.summary or {}).get("links") or {}
        if not links:
            links = self.link_files
        out = {}
        for name, st in links.items():
            shown = name[len("link "):] if name.startswith("link ") else name
            out[shown] = (int(st.get("bytes_forward") or 0), int(st.get("bytes_backward") or 0))
        return out

    @property
    def wan_bytes(self) -> int | None:
        if self.summary and self.summary.get("wan_bytes") is not None:
            return int(self.summary["wan_bytes"])
        links = self.link_bytes()
        return sum(f + b for f, b in links.values()) if links else None

    def merge_wan_bytes(self) -> int:
        return sum(int(e.get("bytes_sent") or 0) + int(e.get("bytes_received") or 0)
                   for e in self.of("merge") if self.crosses_wan(e.get("site")))

    def site_stats(self) -> dict[str, dict]:
        """Per site: inner steps, merges, compute and WAN-wait seconds (summary.json, else events)."""
        from_summary = (self.summary or {}).get("sites") or {}
        out = {}
        for site in self.sites:
            s = from_summary.get(site)
            if s is not None:
                out[site] = {"inner_steps": s.get("inner_steps"), "merges": s.get("merges"),
                             "compute_seconds": float(s.get("compute_seconds") or 0.0),
                             "wan_wait_seconds": float(s.get("wan_wait_seconds") or 0.0)}
                continue
            steps = [e for e in self.of("inner_step") if e.get("site") == site]
            merges = [e for e in self.of("merge") if e.get("site") == site]
            out[site] = {"inner_steps": len(steps), "merges": len(merges),
                         "compute_seconds": round(sum(float(e.get("compute_s") or 0.0) for e in steps), 3),
                         "wan_wait_seconds": round(sum(float(e.get("seconds") or 0.0) for e in merges), 3)}
        return out


# The note of a dir without summary.json; a dir of separate hosts never has one (no launcher), so the
# merge (geotrain.analysis.hosts) drops it.
NO_SUMMARY = "no `summary.json` (the run did not finish writing it); numbers come from the events"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"`{path.name}` could not be read ({exc.__class__.__name__}); it was ignored")
        return None
    if not isinstance(data, dict):
        notes.append(f"`{path.name}` is not a JSON object; it was ignored")
        return None
    return data


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Raises GeotrainError when it is not one."""
    path = Path(run_dir)
    if not path.exists():
        raise GeotrainError(f"{path}: no such run directory")
    if not path.is_dir():
        raise GeotrainError(f"{path}: not a directory (give the run directory that holds metrics.jsonl)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise GeotrainError(f"{path}: not a run directory (no metrics.jsonl in it)")
    try:
        events = [e for e in read_events(metrics) if isinstance(e, dict)]
    except (OSError, UnicodeDecodeError) as exc:
        raise GeotrainError(f"{metrics}: cannot read it: {exc}") from exc
    notes: list[str] = []
    if not events:
        notes.append("`metrics.jsonl` holds no events")
    summary = _read_json(path / "summary.json", notes)
    if summary is None and not any("summary.json" in n for n in notes):
        notes.append(NO_SUMMARY)
    topology, topology_file = _read_json(path / "topology.json", notes), "topology.json"
    if topology is None:  # a site's host (geotrain site) writes topology.<site>.json
        for f in sorted(path.glob("topology.*.json")):
            topology, topology_file = _read_json(f, notes), f.name
            if topology is not None:
                break
    if topology is None:
        topology_file = None
    link_files = {}
    for f in sorted((path / "links").glob("*.json")) if (path / "links").is_dir() else []:
        st = _read_json(f, notes)
        if st is not None:
            link_files[str(st.get("name") or f.stem)] = st
    return Run(path=path, events=events, summary=summary, topology=topology, link_files=link_files,
               label=_default_label(path, events, summary, topology), notes=notes, topology_file=topology_file)


def _default_label(path: Path, events, summary, topology) -> str:
    run = Run(path=path, events=events, summary=summary, topology=topology, link_files={})
    return f"{path.resolve().name} ({run.algorithm})"


def label_runs(runs: list[Run]) -> None:
    """Legend names: the directory name and algorithm; parent folders added where names clash."""
    names = [r.path.resolve().name for r in runs]
    for r, name in zip(runs, names):
        if names.count(name) > 1:
            parts = r.path.resolve().parts
            name = "/".join(parts[-2:]) if len(parts) >= 2 else name
        r.label = f"{name} ({r.algorithm})"
    seen: dict[str, int] = {}
    for r in runs:  # the same directory given twice
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
