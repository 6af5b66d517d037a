"""The ring and async decisions of rounds.py: pure functions, each with a case that refuses."""

import pytest

from geotrain.orchestrator.rounds import Decision, admit_async, async_weight, merge_mode, ring_commit

COMMIT = Decision("commit", "all 2 sites reported for round 4")


def test_a_rounds_first_update_pins_its_mode():
    assert merge_mode(None, True, 4, 4).action == "ring"
    assert merge_mode(None, False, 4, 4).action == "star"
    assert merge_mode("ring", True, 4, 4).action == "ring"
    assert merge_mode("star", False, 4, 4).action == "star"


def test_a_ring_update_for_a_star_round_is_refused():
    d = merge_mode("star", True, 4, 4)
    assert d.action == "ring_abandoned" and not d and "through the star" in d.reason


def test_a_star_update_for_the_ring_round_being_collected_abandons_the_ring():
    d = merge_mode("ring", False, 4, 4)
    assert d.action == "abandon_ring" and "ring broke" in d.reason
    assert merge_mode("ring", False, 3, 4).action == "ring"  # an old round: admit refuses it as stale


def test_a_ring_round_commits_when_every_leader_claims_the_uploaded_mean():
    d = ring_commit(4, COMMIT, uploaded=(123,), claimed=frozenset({123}))
    assert d and d.action == "commit"


@pytest.mark.parametrize("ready, uploaded, claimed, why", [
    (COMMIT, (123,), frozenset({123, 7}), "{7, 123}".replace("{", "[").replace("}", "]")),
    (COMMIT, (), frozenset({123}), "0 means uploaded"),
    (COMMIT, (123, 123), frozenset({123}), "2 means uploaded"),
    (Decision("commit_partial", "deadline"), (123,), frozenset({123}), "commit_partial"),
])
def test_a_ring_round_that_cannot_commit_goes_back_to_the_star(ready, uploaded, claimed, why):
    d = ring_commit(4, ready, uploaded, claimed)
    assert not d and d.action == "abandon" and why in d.reason and "retried through the star" in d.reason


def test_async_admission_refuses_unknown_sites_a_missing_model_and_duplicates():
    sites = frozenset({"a", "b"})
    assert admit_async("a", 3, sites=sites, applied=3, has_model=True).action == "accept"
    assert admit_async("mars", 0, sites=sites, applied=0, has_model=True).action == "unknown_site"
    assert admit_async("a", 0, sites=sites, applied=0, has_model=False).action == "unknown_site"
    d = admit_async("a", 2, sites=sites, applied=3, has_model=True)
    assert d.action == "duplicate" and not d and "never applied twice" in d.reason


def test_async_weight_counts_versions_behind():
    w = async_weight("inverse", version=7, based_on=4, n_sites=2)
    assert (w.staleness, w.weight) == (3, 0.25) and "3 behind" in w.reason
    assert async_weight("excess", version=7, based_on=6, n_sites=2).weight == 1.0
    assert async_weight("inverse", version=4, based_on=9, n_sites=2).staleness == 0  # never negative
    with pytest.raises(ValueError):
        async_weight("bogus", version=1, based_on=0, n_sites=2)
