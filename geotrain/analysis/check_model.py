"""The history checker's invariants about the model itself (see geotrain.analysis.check).

``global_model_finite``
    every ``commit`` says ``finite: true`` (the coordinator's digest of the global parameters after
    the commit), and no ``model_nonfinite`` event was recorded.
``eval_loss_no_unexplained_jump``
    every eval loss is finite, and between two consecutive evals (file order) the loss grows by at
    most ``max_jump`` (``security.max_eval_loss_jump``, default 4) unless a recorded cause lies
    between them: one of :data:`CAUSES`.

Both are pure functions of the events. A history written before the coordinator recorded the digest
(no commit carries ``finite``) gives ``unknown`` for the first, never ``held``.
"""

from __future__ import annotations

import math
from typing import Sequence

from geotrain.analysis.history import HELD, UNKNOWN, VIOLATED, Verdict, and_more, at_line, of_kind
from geotrain.events import number

DEFAULT_MAX_EVAL_LOSS_JUMP = 4.0  # the topology's security.max_eval_loss_jump when a run does not say

# Events that explain a jump of the eval loss: something went wrong, or was made to, between two evals
# (a fault, a process that died or froze, a coordinator restart or a relaunch, an update that was
# refused or discarded, a round that failed, a ring given up for the star, a model that could not be
# fetched). Ordinary training events (commits, merges, joins, checkpoints) never excuse a jump.
CAUSES = ("fault_injected", "failure", "recovery", "heartbeat_lost", "coordinator_started", "fenced", "run_started",
          "merge_refused", "merge_discarded", "round_failed", "ring_abandoned", "fetch_failed", "member_lost")


def _where(i: int, e: dict) -> str:
    rnd, fragment = e.get("round"), e.get("fragment")
    lane = f" of fragment {fragment}" if fragment else ""
    return f"round {rnd}{lane} ({at_line(i)})" if rnd is not None else at_line(i)


# ---------------------------------------------------------------------------------------------
# global_model_finite


def global_model_finite(events: Sequence[dict]) -> Verdict:
    name = "global_model_finite"
    bad: list[str] = []
    judged = unjudged = 0
    largest = None  # the largest finite norm recorded, for the evidence
    for i, e in enumerate(events):
        kind = e.get("event")
        if kind == "model_nonfinite":
            bad.append(f"model_nonfinite at {_where(i, e)}" + (f": {e['reason']}" if e.get("reason") else ""))
        elif kind == "commit":
            finite = e.get("finite")
            if not isinstance(finite, bool):
                unjudged += 1
                continue
            judged += 1
            norm = number(e.get("norm"))
            if not finite:
                bad.append(f"the commit of {_where(i, e)} has finite=false")
            elif norm is not None and math.isfinite(norm):
                largest = norm if largest is None else max(largest, norm)
    if bad:
        return Verdict(name, VIOLATED, f"the global model went non-finite; first: {bad[0]}{and_more(bad)}")
    if judged == 0:
        if unjudged:
            return Verdict(name, UNKNOWN, f"none of {unjudged} commits carries `finite` (a history from before "
                                          "the coordinator recorded it)")
        return Verdict(name, UNKNOWN, "no commit to judge")
    gap = f"; {unjudged} commits without `finite` not judged" if unjudged else ""
    norm_text = f", largest norm {largest:.6g}" if largest is not None else ""
    return Verdict(name, HELD, f"{judged} commits all finite{norm_text}{gap}")


# ---------------------------------------------------------------------------------------------
# eval_loss_no_unexplained_jump


def eval_loss_no_unexplained_jump(events: Sequence[dict], max_jump: float = DEFAULT_MAX_EVAL_LOSS_JUMP) -> Verdict:
    name = "eval_loss_no_unexplained_jump"
    evals = [(i, e, number(e.get("loss"))) for i, e in of_kind(events, "eval")]
    evals = [(i, e, loss) for i, e, loss in evals if loss is not None]
    if not evals:
        return Verdict(name, UNKNOWN, "no eval event with a loss")
    nonfinite = [f"{_where(i, e)}: eval loss {loss}" for i, e, loss in evals if not math.isfinite(loss)]
    if nonfinite:
        return Verdict(name, VIOLATED, f"{len(nonfinite)} of {len(evals)} eval losses not finite; "
                                       f"first: {nonfinite[0]}")
    if len(evals) < 2:
        return Verdict(name, UNKNOWN, "a single eval: nothing to compare")
    cause_lines = [i for i, e in enumerate(events) if e.get("event") in CAUSES]
    jumps: list[str] = []
    explained: list[str] = []
    compared = 0
    growth = 0.0
    for (i, a, la), (j, b, lb) in zip(evals, evals[1:]):
        if la <= 0:  # no ratio to a loss of zero or below (not a cross-entropy): not comparable
            continue
        compared += 1
        ratio = lb / la
        growth = max(growth, ratio)
        if ratio <= max_jump:
            continue
        cause = next((k for k in cause_lines if i < k < j), None)
        text = f"{_where(i, a)} -> {_where(j, b)}: {la:.6g} -> {lb:.6g} (x{ratio:.3g})"
        if cause is None:
            jumps.append(text)
        else:
            explained.append(f"{text} after {events[cause].get('event')} ({at_line(cause)})")
    if jumps:
        return Verdict(name, VIOLATED, f"{len(jumps)} eval losses grew more than x{max_jump:g} with no recorded cause "
                                       f"in between; first: {jumps[0]}{and_more(jumps)}")
    if compared == 0:
        return Verdict(name, UNKNOWN, f"{len(evals)} evals but no positive loss to compare with")
    why = f"; {len(explained)} larger jumps explained, first: {explained[0]}" if explained else ""
    return Verdict(name, HELD, f"{compared} consecutive eval pairs, all finite, largest growth x{growth:.3g} "
                               f"(limit x{max_jump:g}){why}")
