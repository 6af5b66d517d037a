"""SparseLoCo's topk codec (geotrain.wire.compress): selection, values, the wire, error feedback.

The reference below is written independently in numpy from the paper's description (arXiv 2508.15706):
per chunk, the k largest |x|, each value rounded to one of 2**bits levels evenly spread over
[-max, max]; the rest is zero; error feedback adds beta * residual before selecting."""

import math

import numpy as np
import pytest
import torch

from geotrain.errors import TransferCorrupt
from geotrain.wire.compress import Encoded, ErrorFeedback, decode, encode, wire_bytes


def reference(x: np.ndarray, block: int, density: float, bits: int) -> np.ndarray:
    out = np.zeros_like(x)
    k_full = min(block, max(1, math.ceil(density * block)))
    levels = 2 ** bits - 1
    for start in range(0, x.size, block):
        chunk = x[start:start + block]
        k = k_full if chunk.size == block else min(chunk.size, -(-k_full * chunk.size // block))
        idx = np.argsort(-np.abs(chunk), kind="stable")[:k]
        scale = np.abs(chunk[idx]).max()
        codes = np.clip(np.round((chunk[idx] / (scale if scale > 0 else 1) + 1) * levels / 2), 0, levels)
        out[start + idx] = scale * (codes * 2 / levels - 1)
    return out


@pytest.mark.parametrize("n, block, density, bits", [(10_000, 4096, 0.02, 2), (777, 64, 0.1, 4), (5, 16, 0.5, 1),
                                                     (4096 * 3, 4096, 0.03, 8)])
def test_decode_matches_the_numpy_reference(n, block, density, bits):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = decode(encode(x, "topk", block, density, bits)).numpy()
    np.testing.assert_allclose(got, reference(x.numpy().astype(np.float64), block, density, bits).astype(np.float32),
                               rtol=1e-6, atol=1e-7)


def test_error_feedback_over_three_rounds_matches_the_reference():
    rng = np.random.default_rng(0)
    n, block, density, bits, beta = 20_000, 4096, 0.02, 2, 0.9
    ef = ErrorFeedback(n, decay=beta)
    residual = np.zeros(n)
    sent_total, true_total = np.zeros(n), np.zeros(n)
    for _ in range(3):
        x = rng.standard_normal(n).astype(np.float32)
        compensated = x + beta * residual
        ref_sent = reference(compensated.astype(np.float64), block, density, bits)
        residual = compensated - ref_sent
        got = decode(ef.encode(torch.from_numpy(x), "topk", block, density, bits)).numpy()
        np.testing.assert_allclose(got, ref_sent, rtol=1e-5, atol=1e-6)
        sent_total += got
        true_total += x
    np.testing.assert_allclose(ef.state_dict()["residual"].numpy(), residual, rtol=1e-4, atol=1e-5)


def test_a_wrong_formula_is_caught():
    """The reference check can fail: keeping the k smallest instead of the largest differs."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    got = decode(encode(x, "topk", 4096, 0.02, 2)).numpy()
    wrong = reference(-np.abs(x.numpy()) * 0 + x.numpy()[::-1].copy(), 4096, 0.02, 2)
    assert not np.allclose(got, wrong)


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
