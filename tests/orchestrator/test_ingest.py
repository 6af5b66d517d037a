"""Values checked as they arrive: the norm is the same whether checked piece by piece or whole, within
float32 rounding of the float64 norm of old, and a non-finite value stops the stream."""

import math

import pytest
import torch

from geotrain.orchestrator.ingest import PIECE, NonFiniteValues, Squares, ValueCheck, l2_norm


def old_norm(values, chunk=1 << 20):
    """geotrain.orchestrator.engine._norm before it moved to ingest.l2_norm."""
    total = 0.0
    for piece in values.reshape(-1).split(chunk):
        total += float(piece.double().square().sum())
    return math.sqrt(total)


@pytest.mark.parametrize("n", [1, 1000, PIECE, 2 * PIECE + 12345])
@pytest.mark.parametrize("scale", [1e-3, 1e3, 1e25])
def test_the_norm_as_it_arrives_is_the_norm_of_the_whole(n, scale):
    values = torch.randn(n) * scale  # 1e25: squares overflow float32, the piece is summed in float64
    check = ValueCheck()
    for piece in values.split(PIECE):
        check(piece)
    assert check.norm == l2_norm(values) and check.seen == n  # bit for bit
    assert math.isfinite(check.norm) and check.norm == pytest.approx(old_norm(values), rel=1e-5)


def test_the_exact_sum_is_the_old_one_bit_for_bit():
    values = torch.randn(PIECE + 7)
    squares = Squares()
    assert math.sqrt(sum(squares.exact(p) for p in values.split(PIECE))) == old_norm(values)


def test_the_scratch_is_reused_and_the_values_are_not_written():
    squares = Squares()
    values = torch.randn(10)
    before = values.clone()
    squares.exact(values)
    scratch = squares._scratch
    squares.exact(torch.randn(7))
    assert squares._scratch is scratch and torch.equal(values, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_piece_with_a_non_finite_value_is_refused_and_not_counted(bad):
    check = ValueCheck("update from 'eu' for round 3")
    check(torch.ones(PIECE))
    piece = torch.ones(PIECE)
    piece[17] = bad
    with pytest.raises(NonFiniteValues, match="update from 'eu' for round 3: a value among") as info:
        check(piece)
    assert info.value.index == PIECE and check.total == PIECE and check.seen == PIECE


def test_large_finite_values_are_finite():
    """float32's largest values squared stay finite in float64: no false refusal."""
    check = ValueCheck()
    check(torch.full((PIECE,), 3.4e38))
    assert math.isfinite(check.norm)
