"""Compression of what crosses the WAN: the pseudo-gradient a site sends every H steps.

A pseudo-gradient is a flat float32 CPU vector. :func:`encode` turns it into an :class:`Encoded`
whose ``payload`` is exactly the bytes that go on the wire; :func:`decode` turns it back.

Codecs (wire bytes / fp32 bytes for large vectors, block 256):

    fp32   raw little-endian float32                                         1.000
    fp16   IEEE half, round to nearest even                                  0.500
    bf16   bfloat16 (raw 16 bits, little-endian), round to nearest even      0.500
    int8   per block: one float32 scale, then codes in [-127, 127]           0.254  (260/1024)
    int4   per block: one float32 scale, then codes in [-7, 7], 2 per byte   0.129  (132/1024)

Wire layout of int8 / int4: ``ceil(numel / block)`` float32 scales (little-endian), then the
codes: int8 one signed byte per element; int4 ``code + 8`` in a nibble, element ``2i`` in the low
nibble of byte ``i`` and element ``2i + 1`` in the high nibble (the high nibble of the last byte is
0 when numel is odd). Nothing is padded on the wire: the codes stop at ``numel`` and a last,
partial block (``numel % block`` elements) just has its own scale.

Quantisation (int8 / int4) is symmetric absmax per block: ``scale = max|x| / qmax`` over the block,
``code = round_half_even(x / scale)``, decoded as ``code * scale``; so every element's error is at
most ``scale / 2`` (plus float32 rounding of the product). An all-zero block has scale 0 and decodes
to zeros. (Only for a block with ``max|x| < qmax * 2**-126``, below 1e-35, is the scale a float32
subnormal with few significant bits; codes are then clamped to the range and the error is at most
``max|x|`` of the block, which is absolutely negligible.)

Why float32 scales, not float16: a float16 scale underflows for blocks with ``max|x| < ~127 * 6e-8``
(it loses relative precision already below ``127 * 6e-5``, where fp16 goes subnormal) and overflows
above ``65504 * 127``. Pseudo-gradients have blocks that small (rarely-seen embedding rows, frozen or
slowly moving parameters, late-training updates), and a flushed scale silently zeroes the whole
block. A float32 scale is exactly the number the quantiser divided by, so the error bound above
holds with no extra term, for every block. It costs 2 bytes more per block than float16: 0.2 % of
the fp32 size, ~0.8 % of an int8 payload and ~1.5 % of an int4 payload at block 256.

Non-finite values: :func:`encode` rejects any NaN or +-inf with :class:`GeotrainError` naming the
first bad index, and also rejects a value that fp16/bf16 cannot represent (it would become inf on
the wire). A NaN pseudo-gradient must never be merged, and it would poison the per-block scale of
int8/int4 anyway. :func:`decode` checks the payload size and, for int8/int4, that every scale is
finite and non-negative, and for fp16/bf16/fp32 that every value is finite; a payload that fails
raises :class:`TransferCorrupt`.

:class:`ErrorFeedback` keeps, per site, what quantisation lost and adds it to the next update
(its residual belongs in the site's checkpoint: ``state_dict`` / ``load_state_dict``).

All work is vectorised torch/numpy; nothing loops over elements in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geotrain.errors import GeotrainError, TransferCorrupt

__all__ = ["CODECS", "Encoded", "ErrorFeedback", "decode", "encode", "mean_decoded", "wire_bytes"]

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")

_QMAX = {"int8": 127, "int4": 7}
_FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_SCALE_BYTES = 4  # one little-endian float32 per block
_TINY = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps  # smallest subnormal


@dataclass(frozen=True)
class Encoded:
    """One encoded vector. ``payload`` is exactly what goes on the wire; the other fields are the
    header the receiver must know (codec, element count, block size) and are not part of it."""

    codec: str
    numel: int
    block: int  # elements per scale block (int8/int4), 0 otherwise
    payload: bytes

    def __repr__(self) -> str:  # never print megabytes of payload
        return f"Encoded(codec={self.codec!r}, numel={self.numel}, block={self.block}, payload=<{len(self.payload)} bytes>)"


def _check_codec(codec: object) -> str:
    if codec not in CODECS:
        raise GeotrainError(f"unknown codec {codec!r}; valid codecs: {', '.join(CODECS)}")
    return codec  # type: ignore[return-value]


def _check_block(block: object) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise GeotrainError(f"block must be a positive integer, got {block!r}")
    return block


def wire_bytes(numel: int, codec: str, block: int = 256) -> int:
    """Size of the payload :func:`encode` produces for ``numel`` elements, without encoding."""
    _check_codec(codec)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise GeotrainError(f"numel must be a non-negative integer, got {numel!r}")
    if codec in _FLOAT_BYTES:
        return numel * _FLOAT_BYTES[codec]
    block = _check_block(block)
    scales = -(-numel // block) * _SCALE_BYTES
    codes = numel if codec == "int8" else (numel + 1) // 2
    return scales + codes


def _check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise GeotrainError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise GeotrainError(
            f"expected a 1-D float32 CPU tensor, got shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
        )
    x = x.detach().contiguous()
    i = _first_nonfinite(x)
    if i is not None:
        bad = int((~torch.isfinite(x)).sum())
        raise GeotrainError(
            f"refusing to encode a non-finite pseudo-gradient: element {i} is {float(x[i])} "
            f"({bad} of {x.numel()} elements are NaN or inf)"
        )
    return x


def _first_nonfinite(t: torch.Tensor) -> int | None:
    """Index of the first NaN/inf in a 1-D float tensor, or None. One cheap reduction when all is
    well (min/max propagate NaN and see +-inf); the full isfinite pass only to name the culprit."""
    if t.numel() == 0:
        return None
    mn, mx = t.aminmax()
    if math.isfinite(float(mn)) and math.isfinite(float(mx)):
        return None
    return int((~torch.isfinite(t)).nonzero()[0, 0])


def _le(a: np.ndarray, dtype: str) -> bytes:
    """Bytes of ``a`` as the little-endian ``dtype`` (a no-op view on little-endian hosts)."""
    return a.astype(dtype, copy=False).tobytes()


def _quantise(x: torch.Tensor, qmax: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric absmax quantisation: (scales float32 [nblocks], codes int8 [numel]).

    Whole blocks are handled as a [nfull, block] view and the partial last block on its own, so
    nothing is padded or copied beyond the one float32 buffer of quotients."""
    n = x.numel()
    if n == 0:
        return x.new_zeros(0), torch.zeros(0, dtype=torch.int8)
    full = n - n % block
    head, tail = x[:full].view(-1, block), x[full:]
    parts = []
    if full:
        mn, mx = head.aminmax(dim=1)
        parts.append(torch.maximum(mn.neg_(), mx))
    if tail.numel():
        parts.append(tail.abs().amax().reshape(1))
    absmax = torch.cat(parts) if len(parts) > 1 else parts[0]
    scale = absmax / qmax
    # absmax below qmax * (smallest subnormal) would give scale 0 for a non-zero block.
    scale = torch.where((absmax > 0) & (scale == 0), torch.full_like(scale, _TINY), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.empty(n, dtype=torch.float32)
    if full:
        torch.div(head, safe[: full // block, None], out=q[:full].view(-1, block))
    if tail.numel():
        torch.div(tail, safe[-1], out=q[full:])
    # round half to even; the clamp only matters for subnormal scales, where absmax / scale can exceed qmax
    return scale, q.round_().clamp_(-qmax, qmax).to(torch.int8)


def _dequantise(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """codes (int8 [numel]) * their block's scale, in one pass into a new float32 tensor."""
    n = codes.numel()
    out = torch.empty(n, dtype=torch.float32)
    full = n - n % block
    if full:
        torch.mul(codes[:full].view(-1, block), scale[: full // block, None], out=out[:full].view(-1, block))
    if full < n:
        torch.mul(codes[full:], scale[-1], out=out[full:])
    return out


def encode(x: torch.Tensor, codec: str, block: int = 256) -> Encoded:
    """Encode a 1-D float32 CPU tensor with ``codec``; ``block`` is used by int8/int4 only.

    Raises :class:`GeotrainError` for an unknown codec, a bad block size, a tensor that is not
    1-D float32 on the CPU, or any non-finite element (the message names the first one).
    """
    _check_codec(codec)
    x = _check_input(x)
    n = x.numel()
    if codec == "fp32":
        return Encoded(codec, n, 0, _le(x.numpy(), "<f4"))
    if codec in ("fp16", "bf16"):
        dtype = torch.float16 if codec == "fp16" else torch.bfloat16
        y = x.to(dtype)
        if n and not bool(torch.isfinite(torch.stack(x.aminmax()).to(dtype)).all()):  # rounding is monotone
            i = int((~torch.isfinite(y)).nonzero()[0, 0])
            raise GeotrainError(f"element {i} = {float(x[i])} overflows {codec}; use fp32, int8 or int4")
        return Encoded(codec, n, 0, _le(y.view(torch.int16).numpy(), "<i2"))
    block = _check_block(block)
    scale, codes = _quantise(x, _QMAX[codec], block)
    if codec == "int8":
        body = codes.numpy().tobytes()
    else:
        u = (codes + 8).to(torch.uint8)
        if n % 2:
            u = F.pad(u, (0, 1))  # high nibble of the last byte stays 0
        u = u.view(-1, 2)
        body = (u[:, 0] | (u[:, 1] << 4)).numpy().tobytes()
    return Encoded(codec, n, block, _le(scale.numpy(), "<f4") + body)


def decode(e: Encoded) -> torch.Tensor:
    """Decode an :class:`Encoded` back to a new float32 tensor of ``e.numel`` elements.

    Raises :class:`GeotrainError` for an unknown codec and :class:`TransferCorrupt` when the payload
    has the wrong size or carries a non-finite value or scale.
    """
    codec = _check_codec(e.codec)
    n = e.numel
    expected = wire_bytes(n, codec, e.block if codec in _QMAX else 256)
    if len(e.payload) != expected:
        raise TransferCorrupt(
            f"{codec} payload for {n} elements (block {e.block}) is {len(e.payload)} bytes, expected {expected}"
        )
    buf = e.payload
    if codec in _FLOAT_BYTES:
        if codec == "fp32":
            out = torch.from_numpy(np.frombuffer(buf, dtype="<f4").astype(np.float32))
        else:
            raw = torch.from_numpy(np.frombuffer(buf, dtype="<i2").astype(np.int16))
            out = raw.view(torch.float16 if codec == "fp16" else torch.bfloat16).float()
        i = _first_nonfinite(out)
        if i is not None:
            raise TransferCorrupt(f"{codec} payload carries a non-finite value at element {i}")
        return out
    block = e.block
    nblocks = -(-n // block)
    scale = torch.from_numpy(np.frombuffer(buf, dtype="<f4", count=nblocks).astype(np.float32))
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        b = int((~(torch.isfinite(scale) & (scale >= 0))).nonzero()[0, 0])
        raise TransferCorrupt(f"{codec} payload carries an invalid scale {float(scale[b])} for block {b}")
    body = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, offset=nblocks * _SCALE_BYTES).copy())
    if codec == "int8":
        codes = body.view(torch.int8)
    else:
        codes = torch.stack((body & 0xF, body >> 4), dim=1).view(-1)[:n].view(torch.int8).sub_(8)
    return _dequantise(codes, scale, block)


class ErrorFeedback:
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019 EF-SGD): the part of the update lost to
    quantisation is kept and added to the next update before it is encoded.

    One instance per site and per vector it sends. ``encode(x)`` encodes ``x + residual`` and keeps
    ``residual = (x + residual) - decode(sent)``, so over rounds the sum of what was sent differs from
    the sum of the true updates only by the current residual (bounded by about half a quantisation
    step per element) instead of by an error that grows with the number of rounds. The residual is
    part of the site's state: save it with ``state_dict`` in the checkpoint.
    """

    def __init__(self, numel: int) -> None:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise GeotrainError(f"numel must be a non-negative integer, got {numel!r}")
        self.numel = numel
        self._residual = torch.zeros(numel, dtype=torch.float32)

    def encode(self, x: torch.Tensor, codec: str, block: int = 256) -> Encoded:
        """Add the residual to ``x``, encode, and store the new residual. On error nothing changes."""
        _check_codec(codec)
        x = _check_input(x)
        if x.numel() != self.numel:
            raise GeotrainError(f"error feedback holds {self.numel} elements, got a vector of {x.numel()}")
        compensated = x + self._residual
        e = encode(compensated, codec, block)
        self._residual = compensated.sub_(decode(e))
        return e

    def state_dict(self) -> dict:
        return {"numel": self.numel, "residual": self._residual.clone()}

    def load_state_dict(self, d: dict) -> None:
        r = d.get("residual") if isinstance(d, dict) else None
        if not isinstance(r, torch.Tensor) or r.dtype != torch.float32 or r.dim() != 1 or r.numel() != self.numel:
            raise GeotrainError(f"error feedback state must hold a float32 residual of {self.numel} elements")
        if not bool(torch.isfinite(r).all()):
            raise GeotrainError("error feedback state holds a non-finite residual")
        self._residual = r.detach().to("cpu").clone()


def mean_decoded(encoded: list[Encoded]) -> torch.Tensor:
    """Decode each and average, accumulating the sum in float32 in list order (deterministic for a
    given order), then dividing by the count. All must have the same numel."""
    if not encoded:
        raise GeotrainError("mean_decoded needs at least one encoded vector")
    n = encoded[0].numel
    bad = [i for i, e in enumerate(encoded) if e.numel != n]
    if bad:
        raise GeotrainError(f"mean_decoded: entry {bad[0]} has {encoded[bad[0]].numel} elements, entry 0 has {n}")
    acc = decode(encoded[0])
    for e in encoded[1:]:
        acc.add_(decode(e))
    return acc.div_(len(encoded))



class UpdateEncoder:
    """Encodes the vectors one sender puts on the wire: with its codec and, unless turned off, with
    error feedback kept per vector (``key``: a fragment, say). The one place both the sites (their
    updates) and the coordinator (the change it sends back) compress.
    """

    def __init__(self, codec: str, block: int = 256, error_feedback: bool = True) -> None:
        self.codec, self.block, self.error_feedback = codec, block, error_feedback
        self._feedback: dict[int, ErrorFeedback] = {}

    def encode(self, x: torch.Tensor, key: int = 0) -> Encoded | None:
        """``x`` encoded for the wire, or None for fp32 (sent as it is)."""
        if self.codec == "fp32":
            return None
        if not self.error_feedback:
            return encode(x, self.codec, self.block)
        ef = self._feedback.setdefault(key, ErrorFeedback(x.numel()))
        return ef.encode(x, self.codec, self.block)

    def forget(self, key: int = 0) -> None:
        """Drop what error feedback held for ``key`` (it belonged to an update that was discarded)."""
        self._feedback.pop(key, None)
