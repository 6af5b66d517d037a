"""The running sum of a round gives the bits of the mean of old (sorted site order), whatever the
order of arrival, and holds only the updates it must."""

import itertools
import random

import pytest
import torch

from geotrain.orchestrator.accumulate import RoundSum
from geotrain.orchestrator.outer import mean_of


def updates(names, n=257, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes that differ widely, so that the order of the float32 additions shows in the bits
    return {s: torch.randn(n, generator=gen) * 10 ** (i % 4 * 3) for i, s in enumerate(names)}


def run(order, ups, expected, owned=True):
    """Sites arrive in ``order``; pending = the expected ones not yet arrived."""
    rs = RoundSum()
    arrived = set()
    most_held = 0
    for site in order:
        arrived.add(site)
        rs.add(site, ups[site].clone() if owned else ups[site], frozenset(expected) - arrived, owned=owned)
        most_held = max(most_held, len(rs.held))
    return rs, most_held


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_every_order_of_arrival_gives_the_mean_of_old_bit_for_bit(k):
    names = [f"s{i}" for i in range(k)]
    ups = updates(names)
    expected = mean_of(ups)
    for order in itertools.permutations(names):
        rs, _ = run(order, ups, names)
        assert torch.equal(rs.mean(), expected), order


def test_a_partial_round_gives_the_mean_of_those_that_arrived():
    names = ["a", "b", "c", "d", "e"]
    ups = updates(names, seed=1)
    rnd = random.Random(0)
    for _ in range(30):
        order = rnd.sample(names, rnd.randint(1, 4))  # the others never arrive (a deadline commit)
        rs, _ = run(order, ups, names)
        assert torch.equal(rs.mean(), mean_of({s: ups[s] for s in order})), order


def test_a_site_that_fails_the_round_lets_the_held_ones_fold():
    ups = updates(["a", "b", "c"], seed=2)
    rs = RoundSum()
    rs.add("b", ups["b"].clone(), frozenset({"a", "c"}), owned=True)
    rs.add("c", ups["c"].clone(), frozenset({"a"}), owned=True)
    assert set(rs.held) == {"b", "c"} and rs.total is None  # a sorts first and may still send
    rs.forget_pending(frozenset())  # a's update was refused: it leaves the round
    assert rs.held == {} and rs.folded == ["b", "c"]
    assert torch.equal(rs.mean(), mean_of({"b": ups["b"], "c": ups["c"]}))


def test_two_sites_never_hold_more_than_one_update():
    ups = updates(["a", "b"])
    for order in (["a", "b"], ["b", "a"]):
        rs, most_held = run(order, ups, ["a", "b"])
        assert most_held <= 1 and rs.held == {}


def test_in_sorted_order_nothing_is_held():
    names = [f"s{i}" for i in range(6)]
    _, most_held = run(names, updates(names), names)
    assert most_held == 0


def test_the_first_owned_update_becomes_the_sum_and_a_kept_one_is_copied():
    ups = updates(["a", "b"])
    mine = ups["a"].clone()
    rs = RoundSum()
    rs.add("a", mine, frozenset({"b"}), owned=True)
    assert rs.total is mine  # no copy
    kept = ups["a"].clone()
    rs = RoundSum()
    rs.add("a", kept, frozenset({"b"}))
    rs.add("b", ups["b"], frozenset())
    rs.mean()
    assert torch.equal(kept, ups["a"]) and rs.total is not kept  # the caller's tensor is never written


def test_a_site_that_sorts_before_a_folded_one_is_refused():
    """The bad case: an arrival the fold rule did not allow for would break the sorted order; it is refused."""
    ups = updates(["a", "b"])
    rs = RoundSum()
    rs.add("b", ups["b"].clone(), frozenset(), owned=True)  # a was not pending: b folded at once
    with pytest.raises(ValueError, match="sorts before it"):
        rs.add("a", ups["a"].clone(), frozenset(), owned=True)
    with pytest.raises(ValueError, match="already in the round"):
        rs.add("b", ups["b"].clone(), frozenset(), owned=True)


def test_the_order_of_additions_shows_in_the_bits():
    """Why the sum keeps the sorted order: in arrival order the mean of three would differ."""
    ups = updates(["a", "b", "c"])
    arrival = (ups["a"] + ups["c"]) + ups["b"]
    assert not torch.equal(arrival / 3, mean_of(ups))
