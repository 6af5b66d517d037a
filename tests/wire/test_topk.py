"""SparseLoCo's topk codec (geotrain.wire.compress): selection, values, the wire, error feedback.

The reference below is written independently in numpy from the paper's description (arXiv 2508.15706):
per chunk, the k largest |x|, each value rounded to one of 2**bits levels evenly spread over
[-max, max]; the rest is zero, and so is a selected element that is zero (no level is); error feedback adds
beta * residual before selecting."""

import math

import numpy as np
import pytest
import torch

from geotrain.errors import TransferCorrupt
from geotrain.wire.compress import Encoded, ErrorFeedback, decode, encode, wire_bytes


def reference(x: np.ndarray, block: int, density: float, bits: int, zero_stays_zero: bool = True) -> np.ndarray:
    out = np.zeros_like(x)
    k_full = min(block, max(1, math.ceil(density * block)))
    levels = 2 ** bits - 1
    for start in range(0, x.size, block):
        chunk = x[start:start + block]
        k = k_full if chunk.size == block else min(chunk.size, -(-k_full * chunk.size // block))
        idx = np.argsort(-np.abs(chunk), kind="stable")[:k]
        scale = np.abs(chunk[idx]).max()
        codes = np.clip(np.round((chunk[idx] / (scale if scale > 0 else 1) + 1) * levels / 2), 0, levels)
        values = scale * (codes * 2 / levels - 1)
        out[start + idx] = np.where(chunk[idx] == 0, 0.0, values) if zero_stays_zero else values
    return out


def reference_error_feedback(xs, block, density, bits, beta, compress=reference):
    """What error feedback sends each round and the residual it keeps after the last (SparseLoCo's
    Algorithm 1: e <- beta * e + delta; sent = Q(topk(e)); e <- e - sent)."""
    e, sent = np.zeros_like(xs[0], dtype=np.float64), []
    for x in xs:
        e = beta * e + x
        s = compress(e, block, density, bits)
        sent.append(s)
        e = e - s
    return sent, e


def _run_error_feedback(xs, block, density, bits, beta):
    ef = ErrorFeedback(xs[0].size, decay=beta)
    got = [decode(ef.encode(torch.from_numpy(x), "topk", block, density, bits)).numpy() for x in xs]
    return got, ef.state_dict()["residual"].numpy()


def _matches(got, residual, ref_sent, ref_residual) -> bool:
    return (all(np.allclose(g, r, rtol=1e-5, atol=1e-6) for g, r in zip(got, ref_sent))
            and np.allclose(residual, ref_residual, rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("n, block, density, bits", [(10_000, 4096, 0.02, 2), (777, 64, 0.1, 4), (5, 16, 0.5, 1),
                                                     (4096 * 3, 4096, 0.03, 8)])
def test_decode_matches_the_numpy_reference(n, block, density, bits):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = decode(encode(x, "topk", block, density, bits)).numpy()
    np.testing.assert_allclose(got, reference(x.numpy().astype(np.float64), block, density, bits).astype(np.float32),
                               rtol=1e-6, atol=1e-7)


# three rounds; the first is ~1 % non-zero (fewer than k = 82 per chunk of 4096, as in the coordinator's
# change, which holds the union of the sites' sparse updates), so that the zero rule is exercised as well
def _three_rounds(n=20_000):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    xs[0][rng.random(n) < 0.99] = 0.0
    return xs


def test_error_feedback_over_three_rounds_matches_the_reference():
    xs = _three_rounds()
    block, density, bits, beta = 4096, 0.02, 2, 0.95
    got, residual = _run_error_feedback(xs, block, density, bits, beta)
    ref_sent, ref_residual = reference_error_feedback(xs, block, density, bits, beta)
    for g, r in zip(got, ref_sent):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(residual, ref_residual, rtol=1e-4, atol=1e-5)
    # what was sent over the rounds plus what is kept is the beta-weighted sum of the updates
    weighted = sum(beta ** (2 - r) * xs[r].astype(np.float64) for r in range(3))
    kept = sum(beta ** (2 - r) * got[r].astype(np.float64) for r in range(3)) + residual
    np.testing.assert_allclose(kept, weighted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wrong", ["no decay", "decay after adding", "residual of the unquantised top-k",
                                   "zero decodes to a level"])
def test_the_reference_comparison_fails_on_a_wrong_formula(wrong):
    """The comparison above can fail: each of these plausible mistakes gives a different result."""
    xs = _three_rounds()
    block, density, bits, beta = 4096, 0.02, 2, 0.95
    got, residual = _run_error_feedback(xs, block, density, bits, beta)
    if wrong == "no decay":
        ref = reference_error_feedback(xs, block, density, bits, 1.0)
    elif wrong == "decay after adding":  # e <- beta * (e + delta)
        ref = reference_error_feedback([x * beta for x in xs], block, density, bits, beta)
    elif wrong == "residual of the unquantised top-k":
        ref = reference_error_feedback(xs, block, density, bits, beta, compress=lambda e, *a: np.where(
            reference(e, *a) != 0, e, 0.0))
    else:
        ref = reference_error_feedback(xs, block, density, bits, beta,
                                       compress=lambda e, *a: reference(e, *a, zero_stays_zero=False))
    assert _matches(got, residual, *reference_error_feedback(xs, block, density, bits, beta))
    assert not _matches(got, residual, *ref)


def test_a_chunk_with_fewer_non_zeros_than_k_sends_only_them():
    """The coordinator's change holds the union of the sites' updates: fewer than k per chunk in most
    chunks. Nothing that was zero may decode as non-zero (a zero would code to +scale/3 at 2 bits)."""
    x = torch.zeros(4096 + 300)
    x[torch.arange(0, 4096, 100)] = torch.linspace(-2, 3, 41)  # 41 non-zeros < k = 246 at 6 %
    x[4096 + 7] = -0.5  # the partial chunk: one non-zero of its 19 slots
    got = decode(encode(x, "topk", 4096, 0.06, 2))
    assert bool(((got != 0) <= (x != 0)).all())
    np.testing.assert_allclose(got.numpy(), reference(x.numpy().astype(np.float64), 4096, 0.06, 2), rtol=1e-6,
                               atol=1e-7)
    assert not np.allclose(got.numpy(), reference(x.numpy().astype(np.float64), 4096, 0.06, 2,
                                                  zero_stays_zero=False))
    assert bool((decode(encode(torch.zeros(5000), "topk", 4096, 0.06, 2)) == 0).all())


def test_bytes_are_exact_and_at_least_50x_below_fp32():
    for n in (0, 1, 4095, 4096, 4097, 123_457):
        for block, bits in ((4096, 2), (70_000, 4), (100, 8)):
            e = encode(torch.randn(n), "topk", block, 0.02, bits)
            assert len(e.payload) == wire_bytes(n, "topk", block, 0.02, bits)
    assert wire_bytes(1 << 20, "fp32") / wire_bytes(1 << 20, "topk", 4096, 0.02, 2) >= 100


def _good():
    return encode(torch.randn(150), "topk", 100, 0.1, 2)  # 2 chunks; 12-bit indices start at byte 16


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p[:-1], "bytes, expected"),
    (lambda p: bytes([0, 0, 0, 0]) + p[4:], "header is invalid"),
    (lambda p: p[:4] + bytes([3]) + p[5:], "header is invalid"),
    (lambda p: p[:8] + np.float32(np.nan).tobytes() + p[12:], "invalid scale"),
    (lambda p: p[:16] + bytes([0xFF, 0xFF, 0xFF]) + p[19:], "outside its chunk"),
])
def test_corrupt_payloads_are_refused(mutate, words):
    e = _good()
    bad = Encoded("topk", e.numel, e.block, mutate(e.payload))
    with pytest.raises(TransferCorrupt, match=words):
        decode(bad)


def test_indices_take_the_fewest_bits_their_chunk_needs_and_round_trip():
    from geotrain.wire.compress import TOPK_HEADER, _pack_bits, _unpack_bits

    rng = np.random.default_rng(0)
    for width in (1, 7, 8, 12, 17, 32):
        v = rng.integers(0, 1 << width, size=1001, dtype=np.uint64)
        packed = _pack_bits(v, width)
        assert len(packed) == -(-1001 * width // 8)
        assert np.array_equal(_unpack_bits(np.frombuffer(packed, np.uint8), 1001, width), v.astype(np.int64))
    # 12 bits: two indices in 3 bytes, low nibble of the middle byte is the first one's top bits (the old layout)
    assert _pack_bits(np.array([0xABC, 0x123]), 12) == bytes([0xBC, 0x3A, 0x12])
    # block 256: 8-bit indices, one byte each (12 bits were sent before: 1/44 of fp32 both ways became 1/58)
    n, k = 256 * 10, 6
    e = encode(torch.randn(n), "topk", 256, 0.02, 2)
    assert len(e.payload) == TOPK_HEADER.size + 10 * 4 + 10 * k + -(-10 * k * 2 // 8)
    x = torch.randn(600)
    for block in (2, 3, 100, 300):  # 1, 2, 7, 9 bits: every sent index lands on its chunk's top half
        got = decode(encode(x, "topk", block, 0.5, 8))  # 8-bit codes have no zero level: sent = nonzero
        want = torch.zeros(600, dtype=torch.bool)
        for c in range(0, 600, block):
            chunk = x[c:c + block].abs()
            want[c + chunk.topk(-(-chunk.numel() // 2)).indices] = True
        assert torch.equal(got != 0, want), block
