"""The vocabulary of the history checker (geotrain.analysis.check): verdicts, and how a history is read.

A history is the list of events of a run's ``metrics.jsonl`` in file order (docs/events.md). It is
cut into launches (``run_started``; ``geotrain resume`` starts one at a checkpoint's round) and,
inside each, coordinator incarnations (``coordinator_started``): :func:`shape` finds the
*rebases* (a launch's first coordinator: rounds from its round on may be redone) and the
*restarts* (a later coordinator of the same launch: it must carry on where the last one stopped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

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
    "global_model_finite",
    "eval_loss_no_unexplained_jump",
)


@dataclass(frozen=True)
class Verdict:
    """One promise and what the history says about it."""

    invariant: str  # stable id, one of INVARIANTS
    status: str     # "held" | "violated" | "unknown"
    evidence: str   # one line: what was checked, how many, the first counter-example

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# helpers


def of_kind(events: Sequence[dict], kind: str) -> list[tuple[int, dict]]:
    """(line index, event) of every event of one kind, in file order."""
    return [(i, e) for i, e in enumerate(events) if isinstance(e, dict) and e.get("event") == kind]


def as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def rounds_span(rounds: Iterable[int]) -> str:
    rounds = list(rounds)
    if not rounds:
        return "no rounds"
    return f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {min(rounds)}-{max(rounds)}"


def at_line(i: int) -> str:
    return f"line {i + 1}"

# ---------------------------------------------------------------------------------------------
# the shape of a history: launches (run_started, possibly `geotrain resume`) and coordinator
# incarnations (coordinator_started) inside them


@dataclass(frozen=True)
class Rebase:
    """A launch's first coordinator: the round (== version) the run (re)starts from."""

    line: int
    round: int | None  # None: not declared (an old history): carry on from what came before
    how: str           # "start" | "resume from checkpoint round R" | "relaunch at round R"
    asked: int | None  # the checkpoint round `geotrain resume` asked for (run_started.resume_round)
    declared: int | None  # the round the coordinator said it starts at (coordinator_started.round)


@dataclass(frozen=True)
class Restart:
    """A coordinator incarnation after the first of its launch."""

    line: int
    event: dict
    round: int | None  # the round it declared it starts collecting (== committed rounds), if it says


def shape(events: Sequence[dict]) -> tuple[dict[int, Rebase], dict[int, Restart]]:
    """(line -> rebase, line -> restart). A history without run_started is one launch."""
    rebases: dict[int, Rebase] = {}
    restarts: dict[int, Restart] = {}
    launches = 0
    resume_round: int | None = None
    coordinators_in_launch = 0
    for i, e in enumerate(events):
        kind = e.get("event")
        if kind == "run_started":
            launches += 1
            resume_round = as_int(e.get("resume_round"))
            coordinators_in_launch = 0
        elif kind == "coordinator_started":
            declared = as_int(e.get("round"))
            if coordinators_in_launch == 0:
                first = launches <= 1
                rnd = declared if declared is not None else resume_round if resume_round is not None else (0 if first else None)
                if resume_round is not None:
                    how = f"resume from checkpoint round {resume_round}"
                elif first and not rnd:
                    how = "start"
                else:
                    how = f"relaunch at round {rnd}" if rnd is not None else "relaunch"
                rebases[i] = Rebase(i, rnd, how, resume_round, declared)
            else:
                restarts[i] = Restart(i, e, declared)
            coordinators_in_launch += 1
    return rebases, restarts


def and_more(problems: list[str]) -> str:
    return f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
