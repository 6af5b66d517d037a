"""geotrain.wire.compress: the codecs of what crosses the WAN, error feedback, and the merge mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geotrain.wire.compress import CODECS as ALL_CODECS, Encoded, ErrorFeedback, decode, encode, mean_decoded, wire_bytes
from geotrain.errors import GeotrainError, TransferCorrupt

CODECS = tuple(c for c in ALL_CODECS if c != "topk")  # the dense codecs; topk: tests/wire/test_topk.py
QMAX = {"int8": 127, "int4": 7}
SIZES = [0, 1, 2, 255, 256, 257, 511, 513, 10_000]


def _vec(n: int, seed: int = 0) -> torch.Tensor:
    """Normal values whose magnitude differs by orders of magnitude from one stretch to the next,
    so a single global scale would fail the per-block bounds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    mag = 10.0 ** torch.randint(-6, 3, (max(1, -(-n // 97)),), generator=g).float()
    return x * mag.repeat_interleave(97)[:n]


def _block_bound(x: torch.Tensor, qmax: int, block: int) -> torch.Tensor:
    """Per element: half the quantisation step of its block, scale = max|x| / qmax over the block,
    computed here in float64 independently of the implementation."""
    n = x.numel()
    nb = -(-n // block)
    xp = torch.nn.functional.pad(x.double().abs(), (0, nb * block - n)).view(nb, block)
    half_step = xp.amax(dim=1) / qmax / 2
    return half_step.repeat_interleave(block)[:n]


# ----------------------------------------------------------------------------- round trips


def test_fp32_round_trip_is_bit_exact():
    x = torch.cat([_vec(10_000), torch.tensor([0.0, -0.0, 1e-45, -3.4e38, 3.4e38, 1.17e-38])])
    y = decode(encode(x, "fp32"))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))  # -0.0 and subnormals too


@pytest.mark.parametrize("codec,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_relative_error(codec, rel):
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * 100
    if codec == "bf16":
        x = torch.cat([x, torch.tensor([1e-30, -1e30, 3e38])])  # bf16 keeps fp32's range
    y = decode(encode(x, codec))
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = (y.double() - x.double()).abs() / x.double().abs()
    assert float(err.max()) <= rel * (1 + 1e-9)
    # round to nearest even is what torch's cast does; the wire holds exactly that
    ref = x.to(torch.float16 if codec == "fp16" else torch.bfloat16).float()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("block", [1, 7, 64, 256, 1000])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 10_000])
def test_int_error_is_at_most_half_a_step_per_block(codec, block, n):
    x = _vec(n, seed=n + block)
    y = decode(encode(x, codec, block))
    assert y.dtype == torch.float32 and y.shape == x.shape
    bound = _block_bound(x, QMAX[codec], block)
    err = (y.double() - x.double()).abs()
    # float32 rounding of scale and of code * scale: a few ulps of the value
    slack = bound * 1e-5 + x.double().abs() * 2.0**-22
    excess = err - (bound + slack)
    assert float(excess.max()) <= 0, f"worst element {int(excess.argmax())}: err {float(err[excess.argmax()])}"


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_int_codes_use_the_full_range_and_zero_blocks_stay_zero(codec):
    block = 64
    x = _vec(block * 4)
    x[block : 2 * block] = 0.0  # an all-zero block
    x[2 * block + 5] = 1e-44  # a block whose only value is a subnormal
    x[2 * block + 6 : 3 * block] = 0.0
    x[2 * block : 2 * block + 5] = 0.0
    e = encode(x, codec, block)
    y = decode(e)
    assert torch.equal(y[block : 2 * block], torch.zeros(block))
    assert y[2 * block + 5] > 0  # not flushed to zero
    # the element of largest magnitude in each non-zero block is reproduced to float32 rounding
    for b in (0, 3):
        i = b * block + int(x[b * block : (b + 1) * block].abs().argmax())
        assert math.isclose(float(y[i]), float(x[i]), rel_tol=1e-6)


@pytest.mark.parametrize("codec,k", [("int8", 190), ("int4", 10)])
def test_subnormal_scales_do_not_wrap_codes(codec, k):
    # max|x| = k subnormal ulps: max|x| / qmax rounds to 1 ulp, so max|x| / scale = k > qmax
    # and an unclamped code would overflow its byte or nibble (and flip sign).
    ulp = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
    x = torch.tensor([k * ulp, -k * ulp, 3 * ulp, 0.0, 1.0])
    y = decode(encode(x, codec, block=4))
    assert torch.equal(torch.sign(y[:3]), torch.sign(x[:3]))
    assert float((y[:4] - x[:4]).abs().max()) <= k * ulp
    assert float(y[4]) == 1.0


def test_empty_vector_for_every_codec():
    for codec in CODECS:
        e = encode(torch.zeros(0), codec)
        assert e.payload == b"" and e.numel == 0
        y = decode(e)
        assert y.dtype == torch.float32 and y.shape == (0,)


def test_non_contiguous_input_is_accepted():
    base = _vec(2000)
    x = base[::2]
    for codec in CODECS:
        assert torch.equal(decode(encode(x, codec, 100)), decode(encode(x.contiguous(), codec, 100)))


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("block", [1, 3, 100, 256])
def test_wire_bytes_equals_payload_length(codec, block):
    for n in SIZES:
        e = encode(_vec(n, seed=n), codec, block)
        assert len(e.payload) == wire_bytes(n, codec, block), (codec, block, n)
        assert e.numel == n
        assert e.block == (block if codec in QMAX else 0)
        assert decode(e).numel() == n


def test_wire_bytes_formula():
    assert wire_bytes(257, "fp32") == 1028
    assert wire_bytes(257, "fp16") == wire_bytes(257, "bf16") == 514
    # 2 scale blocks (256 + 1 element) of 4 bytes, then the codes; no padding on the wire
    assert wire_bytes(257, "int8", 256) == 8 + 257
    assert wire_bytes(257, "int4", 256) == 8 + 129
    assert wire_bytes(256, "int4", 256) == 4 + 128
    assert wire_bytes(0, "int4") == 0


def test_ratios_against_fp32():
    n = 10_000_000
    fp32 = 4 * n
    assert wire_bytes(n, "fp16") / fp32 == wire_bytes(n, "bf16") / fp32 == 0.5
    assert wire_bytes(n, "int8", 256) / fp32 <= 0.27
    assert wire_bytes(n, "int4", 256) / fp32 <= 0.14
    # and the payloads really are that small
    x = torch.randn(1 << 20)
    assert len(encode(x, "int8").payload) / (4 << 20) <= 0.27
    assert len(encode(x, "int4").payload) / (4 << 20) <= 0.14


# ----------------------------------------------------------------------------- rejection


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 17, 4095, 4999])
def test_non_finite_input_is_rejected_naming_the_first_bad_index(codec, bad, where):
    x = torch.randn(5000)
    x[where] = bad
    x[4999] = bad  # a later one too: the first is named
    with pytest.raises(GeotrainError, match=rf"element {where} "):
        encode(x, codec)


def test_fp16_overflow_is_rejected_not_sent_as_inf():
    x = torch.zeros(10)
    x[3] = 70_000.0
    with pytest.raises(GeotrainError, match="element 3 .*fp16"):
        encode(x, "fp16")
    assert torch.isfinite(decode(encode(x, "bf16"))).all()


def test_unknown_codec_is_rejected_naming_it_and_the_valid_ones():
    for call in (
        lambda: encode(torch.zeros(4), "int2"),
        lambda: wire_bytes(4, "int2"),
        lambda: decode(Encoded("int2", 4, 0, b"")),
        lambda: ErrorFeedback(4).encode(torch.zeros(4), "int2"),
    ):
        with pytest.raises(GeotrainError, match=r"'int2'.*fp32, fp16, bf16, int8, int4"):
            call()


def test_bad_inputs_are_rejected():
    for bad in (torch.zeros(4, dtype=torch.float64), torch.zeros(2, 2), [0.0, 1.0]):
        with pytest.raises(GeotrainError):
            encode(bad, "int8")  # type: ignore[arg-type]
    for block in (0, -1, 2.5):
        with pytest.raises(GeotrainError, match="block"):
            encode(torch.zeros(4), "int8", block)  # type: ignore[arg-type]


def test_corrupt_payloads_are_detected():
    x = torch.randn(1000)
    for codec in CODECS:
        e = encode(x, codec, 100)
        with pytest.raises(TransferCorrupt, match="expected"):
            decode(Encoded(e.codec, e.numel, e.block, e.payload[:-1]))
    e = encode(x, "int8", 100)
    nan_scale = np.array([np.nan], dtype="<f4").tobytes()
    with pytest.raises(TransferCorrupt, match="scale"):
        decode(Encoded("int8", 1000, 100, nan_scale + e.payload[4:]))
    e = encode(x, "fp16")
    with pytest.raises(TransferCorrupt, match="element 0"):
        decode(Encoded("fp16", 1000, 0, np.array([np.inf], dtype="<f2").tobytes() + e.payload[2:]))


# ----------------------------------------------------------------------------- error feedback


def _drift(rounds: int, use_ef: bool) -> list[float]:
    """Send the same update every round with int4; return max |sum(sent) - sum(true)| after each.

    In each block one element is 1.0 and the rest are 0.05: the scale is 1/7, so 0.05 is 0.35 of a
    step and always rounds to 0. Without error feedback those elements never move; with it, the
    residual builds up until it crosses half a step and is sent."""
    n, block = 4096, 256
    v = torch.full((n,), 0.05)
    v[::block] = 1.0
    v[1::block] = -0.3
    ef = ErrorFeedback(n)
    sent = torch.zeros(n, dtype=torch.float64)
    out = []
    for t in range(1, rounds + 1):
        e = ef.encode(v, "int4", block) if use_ef else encode(v, "int4", block)
        sent += decode(e).double()
        out.append(float((sent - t * v.double()).abs().max()))
    return out


def test_error_feedback_keeps_the_cumulative_error_bounded():
    rounds = 200
    with_ef = _drift(rounds, use_ef=True)
    without = _drift(rounds, use_ef=False)
    # With EF the cumulative error is the current residual: under one quantisation step
    # (max|x + residual| / 7 < 0.2) at every round, not growing.
    assert max(with_ef) < 0.2
    assert max(with_ef[rounds // 2 :]) <= max(with_ef[: rounds // 2]) + 1e-6
    # Without EF it grows linearly: 0.05 lost per round.
    assert without[-1] == pytest.approx(0.05 * rounds, rel=1e-3)
    assert without[-1] / without[rounds // 2 - 1] == pytest.approx(2.0, rel=1e-3)
    assert without[-1] > 40 * max(with_ef)


def test_error_feedback_identity_for_lossless_codec_and_residual_definition():
    x = _vec(3000)
    ef = ErrorFeedback(3000)
    assert decode(ef.encode(x, "fp32")).equal(x)
    assert ef.state_dict()["residual"].abs().max() == 0
    e = ef.encode(x, "int8", 128)
    assert torch.equal(ef.state_dict()["residual"], x - decode(e))


def test_error_feedback_state_round_trips_through_a_checkpoint():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1000, generator=g) for _ in range(6)]
    a = ErrorFeedback(1000)
    for x in xs[:3]:
        a.encode(x, "int4", 64)
    b = ErrorFeedback(1000)
    b.load_state_dict(a.state_dict())
    for x in xs[3:]:
        assert a.encode(x, "int4", 64).payload == b.encode(x, "int4", 64).payload
    sd = a.state_dict()
    sd["residual"].fill_(123.0)  # a copy: mutating it does not touch the live state
    assert a.state_dict()["residual"].abs().max() < 1
    with pytest.raises(GeotrainError):
        ErrorFeedback(999).load_state_dict(a.state_dict())


def test_error_feedback_rejects_bad_input_without_changing_state():
    ef = ErrorFeedback(100)
    ef.encode(torch.randn(100), "int4", 32)
    before = ef.state_dict()["residual"]
    x = torch.randn(100)
    x[42] = float("nan")
    with pytest.raises(GeotrainError, match="element 42"):
        ef.encode(x, "int4", 32)
    with pytest.raises(GeotrainError, match="100"):
        ef.encode(torch.randn(99), "int4", 32)
    assert torch.equal(ef.state_dict()["residual"], before)


# ----------------------------------------------------------------------------- merge mean


@pytest.mark.parametrize("codec", CODECS)
def test_mean_decoded_matches_float64_mean_within_quantisation_tolerance(codec):
    k, n, block = 5, 10_000, 256
    xs = [_vec(n, seed=10 + i) for i in range(k)]
    got = mean_decoded([encode(x, codec, block) for x in xs])
    assert got.dtype == torch.float32 and got.shape == (n,)
    ref = torch.stack([x.double() for x in xs]).mean(0)
    absx = torch.stack([x.double().abs() for x in xs])
    if codec in QMAX:
        quant = torch.stack([_block_bound(x, QMAX[codec], block) for x in xs]).mean(0)
    else:
        rel = {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}[codec]
        quant = rel * absx.mean(0)
        if codec == "fp16":
            quant = quant + 2.0**-25  # fp16 subnormal spacing for the tiny stretches
    # float32 accumulation of k terms and the final division: a few ulps of the summands
    fp32_sum = (k + 1) * 2.0**-24 * absx.mean(0) * 2
    assert float(((got.double() - ref).abs() - quant * (1 + 1e-5) - fp32_sum).max()) <= 0


def test_mean_decoded_sums_in_float32_in_list_order():
    xs = [_vec(4000, seed=i) * (10.0 ** (3 * i)) for i in range(4)]
    enc = [encode(x, "fp32") for x in xs]
    acc = torch.zeros(4000)
    for x in xs:
        acc = acc + x
    assert torch.equal(mean_decoded(enc), acc / 4)
    assert torch.equal(mean_decoded(enc), mean_decoded(list(enc)))  # deterministic


def test_mean_decoded_mixed_codecs_and_errors():
    x = torch.randn(300)
    got = mean_decoded([encode(x, "fp32"), encode(x, "int8", 100), encode(x, "bf16")])
    assert torch.allclose(got, x, atol=float(x.abs().max()) / 127)
    with pytest.raises(GeotrainError):
        mean_decoded([])
    with pytest.raises(GeotrainError, match="entry 1"):
        mean_decoded([encode(x, "fp32"), encode(x[:299], "fp32")])
