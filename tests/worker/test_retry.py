"""The retry policy: a pure function of (outcome, attempt, now, deadline)."""

import pytest

from geotrain.wire.outcomes import Outcome
from geotrain.worker.retry import FetchCommitted, GiveUp, Rejoin, Retry, backoff, next_action


def test_backoff_doubles_up_to_two_seconds():
    assert [backoff(a) for a in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


@pytest.mark.parametrize("outcome", [Outcome.STALE, Outcome.FUTURE, Outcome.NOT_MEMBER, Outcome.INVALID_UPDATE])
def test_an_update_that_cannot_count_rejoins(outcome):
    assert isinstance(next_action(outcome, 0, now=0.0, deadline=100.0), Rejoin)


def test_a_duplicate_waits_for_the_commit():
    assert isinstance(next_action(Outcome.DUPLICATE, 3, now=0.0, deadline=100.0), FetchCommitted)


@pytest.mark.parametrize("outcome", [Outcome.ROUND_FAILED, Outcome.UNAVAILABLE, Outcome.FENCED])
def test_retryable_outcomes_are_retried_with_backoff_until_the_deadline(outcome):
    action = next_action(outcome, 2, now=10.0, deadline=100.0)
    assert isinstance(action, Retry) and action.delay_s == backoff(2)
    late = next_action(outcome, 2, now=99.5, deadline=100.0)  # 0.8 s more would pass the deadline
    assert isinstance(late, GiveUp) and "deadline" in late.reason


def test_a_corrupt_transfer_is_retried_only_for_idempotent_calls():
    assert isinstance(next_action(Outcome.CORRUPT, 0, now=0.0, deadline=10.0), GiveUp)
    assert isinstance(next_action(Outcome.CORRUPT, 0, now=0.0, deadline=10.0, idempotent=True), Retry)


@pytest.mark.parametrize("outcome", [None, Outcome.INVALID, Outcome.NOT_IN_TOPOLOGY, Outcome.RING_ABANDONED])
def test_what_the_coordinator_did_not_name_or_a_wrong_request_gives_up(outcome):
    assert isinstance(next_action(outcome, 0, now=0.0, deadline=100.0, idempotent=True), GiveUp)
