"""What a site does after a coordinator call fails: a pure function of (outcome, attempt, now).

No clock, no sleep, no gRPC here: the caller passes the outcome the coordinator named (or
UNAVAILABLE when it could not be reached), how many attempts failed so far and the time, and
acts on the returned decision. The table is in geotrain.wire.outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.wire.outcomes import Outcome

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 2.0


@dataclass(frozen=True)
class Retry:
    """Send the same request again after ``delay_s``."""

    delay_s: float
    reason: str


@dataclass(frozen=True)
class Rejoin:
    """The update cannot count any more: rejoin and start from the coordinator's current model."""

    reason: str


@dataclass(frozen=True)
class FetchCommitted:
    """The coordinator holds this update already (the answer was lost): wait for its commit."""

    reason: str


@dataclass(frozen=True)
class GiveUp:
    """Stop retrying: raise the error."""

    reason: str


Action = Retry | Rejoin | FetchCommitted | GiveUp


def backoff(attempt: int) -> float:
    """0.2 s, 0.4 s, 0.8 s ... at most 2 s, for the ``attempt``-th failure in a row (0-based)."""
    return min(BACKOFF_FIRST_S * 2 ** attempt, BACKOFF_MAX_S)


def next_action(outcome: Outcome | None, attempt: int, now: float, deadline: float, *,
                idempotent: bool = False) -> Action:
    """Decide what follows a failed call. ``outcome`` None means an error the coordinator did not
    name (a bug, a refusal of the request itself): give up. ``idempotent`` calls (Join, GetModel,
    Status) are also retried after a corrupt transfer; a Merge is not (it may have counted)."""
    if outcome in (Outcome.STALE, Outcome.FUTURE, Outcome.NOT_MEMBER, Outcome.INVALID_UPDATE):
        return Rejoin(f"{outcome.name.lower()}: the update cannot count in this round")
    if outcome == Outcome.DUPLICATE:
        return FetchCommitted("duplicate: the coordinator has this update; waiting for its commit")
    retryable = {Outcome.ROUND_FAILED, Outcome.UNAVAILABLE, Outcome.FENCED}
    if idempotent:
        retryable.add(Outcome.CORRUPT)
    if outcome not in retryable:
        return GiveUp(f"{outcome.name.lower() if outcome is not None else 'error'}: not retried")
    delay = backoff(attempt)
    if now + delay > deadline:
        return GiveUp(f"{outcome.name.lower()}: retry deadline passed after {attempt + 1} attempts")
    return Retry(delay, f"{outcome.name.lower()}: attempt {attempt + 1} failed; again in {delay:.1f}s")
