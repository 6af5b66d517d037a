"""Typed outcomes: the Python enum is the wire's, and each becomes the exception of the table."""

import pytest

from geotrain import errors
from geotrain._proto import coordinator_pb2 as pb
from geotrain.wire.outcomes import Outcome, error_for, outcome_of


def test_python_outcomes_are_the_protos_numbers():
    wire = {name[len("OUTCOME_"):]: number for name, number in pb.Outcome.items()}
    assert wire == {o.name: int(o) for o in Outcome}


@pytest.mark.parametrize("outcome, cls", [
    (Outcome.STALE, errors.StaleRound), (Outcome.FUTURE, errors.StaleRound), (Outcome.DUPLICATE, errors.StaleRound),
    (Outcome.NOT_MEMBER, errors.StaleRound), (Outcome.ROUND_FAILED, errors.QuorumLost),
    (Outcome.RING_ABANDONED, errors.RingAbandoned), (Outcome.FENCED, errors.CoordinatorUnavailable),
    (Outcome.UNAVAILABLE, errors.CoordinatorUnavailable), (Outcome.CORRUPT, errors.TransferCorrupt),
    (Outcome.INVALID, errors.GeotrainError), (Outcome.NOT_IN_TOPOLOGY, errors.GeotrainError),
    (Outcome.INVALID_UPDATE, errors.UpdateRefused),
])
def test_each_outcome_becomes_its_exception_and_carries_the_outcome(outcome, cls):
    exc = error_for(outcome, "why")
    assert type(exc) is cls and exc.outcome is outcome and outcome_of(exc) is outcome and str(exc) == "why"


def test_an_error_the_coordinator_did_not_name_has_no_outcome():
    assert outcome_of(errors.GeotrainError("a bug")) is None
    assert outcome_of(ValueError("not ours")) is None
    assert error_for(int(Outcome.STALE), "x").outcome is Outcome.STALE  # a number from the wire
    with pytest.raises(ValueError):
        error_for(99, "an outcome no one defined")
