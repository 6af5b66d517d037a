"""One run from the run dirs of separate hosts: which directories given to ``geotrain report`` hold
parts of the same run, and their histories merged into one :class:`~geotrain.analysis.rundir.Run`.

With separate hosts (docs/architecture.md) no launcher writes the whole run into one directory:
``geotrain coordinator --run-dir DIR`` appends the coordinator's events (``coordinator_started``,
``commit``, ``coordinator_stopped`` ...) to DIR/metrics.jsonl, and each ``geotrain site NAME
--run-dir DIR`` its workers' events (``site_ready``, ``inner_step``, ``merge``, ``eval``, ``metric``)
and its own (proc ``site NAME``), with the topology as DIR/topology.NAME.json. A link's counters are
read from ``links/*.json`` in any of the dirs (``geotrain link --stats-file DIR/links/NAME.json``).

What identifies a part (:func:`host_record`):

- who wrote it: ``proc`` of its events — ``launcher``, ``coordinator``, ``site X`` or ``X/<rank>``;
- the run's name and topology digest: ``run_started`` (``run``, ``topology_sha256``), else
  ``coordinator_started`` (the same two fields, where the coordinator writes them), else the topology
  file in the dir (its ``name``, and sha256 of its canonical JSON — the same as
  ``Topology.digest()``, geotrain.config.schema);
- the sites it names (topology, else ``coordinator_started.sites``) and its time span.

:func:`same_run` decides, with its reason, whether some parts are one run; :func:`group_runs` splits
the directories given into runs; :func:`merge_runs` builds the merged run (rounds from the
coordinator's commits, WAN bytes from link counters or the sites' merges), judged by :func:`judge`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from geotrain.analysis.rundir import NO_SUMMARY, Run, is_number

COORDINATOR = "coordinator"
LAUNCHER = "launcher"


@dataclass(frozen=True)
class HostRecord:
    """What identifies one run directory as a part of a run."""

    path: str
    parts: tuple[str, ...]            # "launcher", "coordinator", "site us-east": who wrote its events
    run: str | None                   # the run's (topology's) name
    digest: str | None                # sha256 of the topology
    sites: tuple[str, ...]            # the sites its topology (or its coordinator) names
    span: tuple[float, float] | None  # first and last event time (Unix seconds)


@dataclass(frozen=True)
class Decision:
    same: bool
    reason: str


def topology_digest(topology: dict) -> str:
    """sha256 of a topology's canonical JSON, as ``Topology.digest()`` computes it."""
    return hashlib.sha256(json.dumps(topology, sort_keys=True).encode()).hexdigest()


def _part_of(proc: str) -> str | None:
    if proc in (LAUNCHER, COORDINATOR):
        return proc
    if proc.startswith("site "):
        return proc
    if "/" in proc:
        return "site " + proc.split("/")[0]
    return None


def host_record(run: Run) -> HostRecord:
    parts: list[str] = []
    for e in run.events:
        p = _part_of(str(e.get("proc") or ""))
        if p and p not in parts:
            parts.append(p)
    name = digest = None
    for kind in ("run_started", "coordinator_started"):
        for e in run.of(kind):
            name = name or (str(e["run"]) if e.get("run") else None)
            digest = digest or (str(e["topology_sha256"]) if e.get("topology_sha256") else None)
    if run.topology:
        name = name or (str(run.topology["name"]) if run.topology.get("name") else None)
        digest = digest or topology_digest(run.topology)
    sites = tuple(s.get("name") for s in (run.topology or {}).get("sites") or [] if s.get("name"))
    if not sites:
        for e in run.of("coordinator_started"):
            sites = tuple(str(s) for s in e.get("sites") or [])
    ts = [float(e["t"]) for e in run.events if is_number(e.get("t"))]
    return HostRecord(path=str(run.path), parts=tuple(parts), run=name, digest=digest, sites=sites,
                      span=(min(ts), max(ts)) if ts else None)


def _short(digest: str) -> str:
    return digest[:12]


def same_run(records: list[HostRecord]) -> Decision:
    """Whether these run dirs are the parts of ONE run written by separate hosts, and why.

    They are when: there are at least two; none was written by ``geotrain launch`` (a launch keeps
    its whole run in one dir); every digest and run name they carry agree; no two hold the same part
    (the coordinator, or the same site); every site they hold is one their topology or coordinator
    names; and their histories overlap in time (the same topology run twice is two runs). With no
    name or digest anywhere the last three rules alone decide, and the reason says so.
    """
    if len(records) < 2:
        return Decision(False, "one run directory")
    for r in records:
        if LAUNCHER in r.parts:
            return Decision(False, f"{r.path} was written by `geotrain launch`: a whole run in one directory")
        if not r.parts:
            return Decision(False, f"{r.path} holds no events of a coordinator or a site")
    digests = {r.digest for r in records if r.digest}
    if len(digests) > 1:
        by = ", ".join(f"{r.path}: {_short(r.digest)}" for r in records if r.digest)
        return Decision(False, f"their topologies differ (sha256 {by})")
    names = {r.run for r in records if r.run}
    if len(names) > 1:
        return Decision(False, f"their run names differ ({', '.join(sorted(names))})")
    seen: dict[str, str] = {}
    for r in records:
        for p in r.parts:
            if p in seen:
                return Decision(False, f"both {seen[p]} and {r.path} hold the history of the {p}")
            seen[p] = r.path
    # Every site held anywhere must be one that EVERY dir naming sites names (a coordinator of sites
    # a, b and a site c of another topology are not one run, though the union of names covers c).
    for namer in records:
        if not namer.sites:
            continue
        for r in records:
            for p in r.parts:
                if p.startswith("site ") and p[5:] not in namer.sites:
                    whose = "its own topology" if r is namer else f"{namer.path}"
                    return Decision(False, f"{r.path} holds {p}, which {whose} does not name "
                                           f"(it names {', '.join(namer.sites)})")
    spans = [r.span for r in records if r.span is not None]
    if len(spans) == len(records):
        lo, hi = max(a for a, _ in spans), min(b for _, b in spans)
        if lo > hi:
            return Decision(False, "their histories do not overlap in time")
    hosts = "; ".join(", ".join(r.parts) for r in records)
    if digests:
        ident = f"the same topology (sha256 {_short(next(iter(digests)))}"
        ident += f", run {next(iter(names))})" if names else ")"
    elif names:
        ident = f"the same run name ({next(iter(names))})"
    else:
        ident = "no run name or topology digest in any of them"
    return Decision(True, f"{ident}; each holds other parts ({hosts}); their histories overlap in time")


def group_runs(records: list[HostRecord]) -> list[tuple[list[int], Decision | None]]:
    """The directories given, as runs: lists of indices into ``records`` in the order given, each
    with the decision that joined it (None for a directory reported on its own). A directory joins
    the first group it forms one run with."""
    groups: list[list[int]] = []
    for i, r in enumerate(records):
        for g in groups:
            if same_run([records[j] for j in g] + [r]).same:
                g.append(i)
                break
        else:
            groups.append([i])
    return [(g, same_run([records[j] for j in g]) if len(g) > 1 else None) for g in groups]


def judge(events: list[dict], rounds_done: int, rounds_planned: int | None,
          has_coordinator: bool) -> tuple[str, str | None]:
    """Status and reason of a run from separate hosts (no launcher judged it): ``failed`` when the
    global model went non-finite or a round failed without a later commit; ``completed`` when the
    coordinator's history completes every planned round (``rounds_done``, counted the way the
    algorithm merges: :attr:`Run.rounds_completed`); else ``incomplete``, saying what is known."""
    if any(e.get("event") == "model_nonfinite" or (e.get("event") == "commit" and e.get("finite") is False)
           for e in events):
        return "failed", "the global model went non-finite (a model_nonfinite event or a commit with finite: false)"
    if not has_coordinator:
        return "incomplete", "no coordinator's run directory among those given: rounds unknown"
    timed = [e for e in events if is_number(e.get("t"))]
    failed = [e for e in timed if e.get("event") == "round_failed"]
    if failed and not any(e["t"] > failed[-1]["t"] for e in timed if e.get("event") == "commit"):
        return "failed", f"round {failed[-1].get('round', '?')} failed: {failed[-1].get('reason') or '?'}"
    if rounds_planned is not None and rounds_done >= rounds_planned:
        return "completed", None
    planned = rounds_planned if rounds_planned is not None else "?"
    return "incomplete", f"the coordinator's history completes {rounds_done} of {planned} rounds"


def merge_runs(runs: list[Run], decision: Decision) -> Run:
    """One run from the parts written by separate hosts: their events in time order, the topology
    of the first part that has one (the coordinator's first), every part's link counters."""
    records = [host_record(r) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: (COORDINATOR not in records[i].parts, i))
    runs = [runs[i] for i in order]
    records = [records[i] for i in order]
    events = sorted((e for r in runs for e in r.events), key=lambda e: e["t"] if is_number(e.get("t")) else 0.0)
    topo_run = next((r for r in runs if r.topology), None)
    links: dict[str, dict] = {}
    for r in runs:
        links.update(r.link_files)
    notes = [f"merged from the run directories of {len(runs)} separate hosts: "
             + "; ".join(f"{', '.join(rec.parts)} in `{r.path}`" for r, rec in zip(runs, records))
             + f" (same run: {decision.reason})"]
    notes += [f"`{r.path.name}`: {n}" for r in runs for n in r.notes if n != NO_SUMMARY]
    if not links:
        notes.append("no link counters (`links/*.json`) in these directories: WAN bytes are the merge payloads "
                     "the sites recorded")
    merged = Run(path=runs[0].path, events=events, summary=None, topology=topo_run.topology if topo_run else None,
                 link_files=links, notes=notes, topology_file=topo_run.topology_file if topo_run else None,
                 parts=[r.path for r in runs])
    merged.judged = judge(events, merged.rounds_completed, merged.rounds_planned,
                          any(COORDINATOR in rec.parts for rec in records))
    name = next((rec.run for rec in records if rec.run), None) or runs[0].path.resolve().name
    merged.label = f"{name} ({merged.algorithm}, {len(runs)} hosts)"
    return merged


def not_merged(records: list[HostRecord], groups: list[list[int]], i: int) -> list[str]:
    """Why the directory ``records[i]``, reported on its own, was not merged with each other group
    of ``groups`` (empty when it was written by ``geotrain launch``: a whole run needs no merging)."""
    if LAUNCHER in records[i].parts:
        return []
    out = []
    for g in groups:
        if i in g:
            continue
        why = same_run([records[j] for j in g] + [records[i]])
        if not why.same:
            out.append(f"not merged with {', '.join(f'`{records[j].path}`' for j in g)}: {why.reason}")
    return out


def combine(runs: list[Run]) -> list[Run]:
    """The runs to report: the parts of one run from separate hosts merged, every other run as given.

    A directory of separate hosts reported on its own (no launcher wrote it) gets a note saying why
    it was not merged with each other directory given, and, without a summary.json, its status judged
    from its history (:func:`judge`) rather than "still running, or killed"."""
    records = [host_record(r) for r in runs]
    grouped = group_runs(records)
    groups = [g for g, _ in grouped]
    out = []
    for group, decision in grouped:
        if decision is not None:
            out.append(merge_runs([runs[i] for i in group], decision))
            continue
        i = group[0]
        run = runs[i]
        run.notes.extend(not_merged(records, groups, i))
        if records[i].parts and LAUNCHER not in records[i].parts and run.summary is None:
            run.judged = judge(run.events, run.rounds_completed, run.rounds_planned, COORDINATOR in records[i].parts)
            run.notes = [n for n in run.notes if n != NO_SUMMARY]
            run.notes.append(f"written by {', '.join(records[i].parts)} (separate-host commands): no launcher "
                             "wrote a summary.json; numbers and status come from the events")
        out.append(run)
    return out
