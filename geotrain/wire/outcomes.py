"""Typed outcomes of coordinator calls, and the one place they become exceptions.

A refusal crosses the wire as a value (an :class:`Outcome`), never as message text that the
other side parses. The coordinator names the outcome when it refuses a call; the client turns
it into the matching :mod:`geotrain.errors` exception with :func:`error_for`; code that must
decide what to do next asks :func:`outcome_of` (or the exception's ``outcome``), never ``str(exc)``.

    Outcome            exception               what the site does next (geotrain.worker.retry)
    STALE              StaleRound              rejoin: the round was committed without this update
    FUTURE             StaleRound              rejoin: fetch the version the round needs first
    DUPLICATE          StaleRound              fetch the commit: the coordinator holds this update
    NOT_MEMBER         StaleRound              rejoin: the site was dropped from the round
    ROUND_FAILED       QuorumLost              send again: too few sites, the round reopened
    RING_ABANDONED     RingAbandoned           merge this round through the star
    FENCED             CoordinatorUnavailable  retry: a newer coordinator takes over
    UNAVAILABLE        CoordinatorUnavailable  retry with backoff until the deadline
    CORRUPT            TransferCorrupt         retry (idempotent calls) or fail
    INVALID            GeotrainError           fail: the request itself is wrong
    NOT_IN_TOPOLOGY    GeotrainError           fail: this site is not in the run's topology
    INVALID_UPDATE     UpdateRefused           rejoin: the update's values cannot count (length,
                                               a non-finite value, a norm far above the recent ones)
    MODEL_MISMATCH     ModelMismatch           fail: the site trains another model than the run's
                                               (parameter names, shapes, dtypes; at Join)
    FORBIDDEN          Forbidden               fail: the caller's certificate does not allow the call
                                               (geotrain.orchestrator.authz)

On the wire (protos/geotrain/v1/coordinator.proto) a refused call ends with a gRPC status code and
a serialized ``Refusal`` (outcome, reason, round, site) in its trailing metadata under
:data:`REFUSAL_KEY`; the servicer (geotrain.orchestrator.server) sets it, the client
(geotrain.worker.client) reads it. An error without one (the coordinator could not be reached, the
client's own deadline) is known by its status code alone.
"""

from __future__ import annotations

import enum

from geotrain import errors


REFUSAL_KEY = "geotrain-refusal-bin"
"""Trailing-metadata key of a refused call's serialized Refusal (binary: the name ends in -bin)."""


class Outcome(enum.IntEnum):
    """Why a call did not succeed (OK: it did). Numbers are the wire's (protos: ``Outcome``)."""

    OK = 0
    STALE = 1
    FUTURE = 2
    DUPLICATE = 3
    NOT_MEMBER = 4
    ROUND_FAILED = 5
    RING_ABANDONED = 6
    FENCED = 7
    UNAVAILABLE = 8
    CORRUPT = 9
    INVALID = 10
    NOT_IN_TOPOLOGY = 11
    INVALID_UPDATE = 12
    MODEL_MISMATCH = 13
    FORBIDDEN = 14


_EXCEPTION = {
    Outcome.STALE: errors.StaleRound,
    Outcome.FUTURE: errors.StaleRound,
    Outcome.DUPLICATE: errors.StaleRound,
    Outcome.NOT_MEMBER: errors.StaleRound,
    Outcome.ROUND_FAILED: errors.QuorumLost,
    Outcome.RING_ABANDONED: errors.RingAbandoned,
    Outcome.FENCED: errors.CoordinatorUnavailable,
    Outcome.UNAVAILABLE: errors.CoordinatorUnavailable,
    Outcome.CORRUPT: errors.TransferCorrupt,
    Outcome.INVALID: errors.GeotrainError,
    Outcome.NOT_IN_TOPOLOGY: errors.GeotrainError,
    Outcome.INVALID_UPDATE: errors.UpdateRefused,
    Outcome.MODEL_MISMATCH: errors.ModelMismatch,
    Outcome.FORBIDDEN: errors.Forbidden,
}


PERMANENT = frozenset({Outcome.INVALID, Outcome.NOT_IN_TOPOLOGY, Outcome.MODEL_MISMATCH, Outcome.FORBIDDEN})
"""Refusals no restart of the site can cure: the coordinator refuses the same request the same way again (the
site's name, its model, its certificate). A worker that dies of one is not restarted (geotrain.run.supervise)."""


def error_for(outcome: Outcome, message: str) -> errors.GeotrainError:
    """The exception for a refused call; it carries the outcome (``exc.outcome``)."""
    exc = _EXCEPTION.get(Outcome(outcome), errors.GeotrainError)(message)
    exc.outcome = Outcome(outcome)
    return exc


def outcome_of(exc: BaseException) -> Outcome | None:
    """The outcome a geotrain exception carries (None: not a refusal by the coordinator)."""
    return getattr(exc, "outcome", None)
