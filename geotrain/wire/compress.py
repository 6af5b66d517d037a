"""Compression of what crosses the WAN: the pseudo-gradient a site sends every H steps.

A pseudo-gradient is a flat float32 CPU vector. :func:`encode` turns it into an :class:`Encoded`
whose ``payload`` is exactly the bytes that go on the wire; :func:`decode` turns it back.

Codecs (wire bytes / fp32 bytes for large vectors, block 256):

    fp32   raw little-endian float32                                         1.000
    fp16   IEEE half, round to nearest even                                  0.500
    bf16   bfloat16 (raw 16 bits, little-endian), round to nearest even      0.500
    int8   per block: one float32 scale, then codes in [-127, 127]           0.254  (260/1024)
    int4   per block: one float32 scale, then codes in [-7, 7], 2 per byte   0.129  (132/1024)
    topk   per chunk of ``block``: the ``density`` largest |x|, their in-chunk  0.0090 (density 0.02,
           indices in ceil(log2(block)) bits, ``bits``-bit codes, one         2 bits, block 4096: 111x;
           float32 scale                                                      block 256: 1/89)

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

Wire layout of topk (SparseLoCo, arXiv 2508.15706): an 8-byte header (``k`` per full chunk as uint32,
``bits`` uint8, index width uint8 (12 for chunks up to 4096 elements, 16 up to 65536, else 32), 2 zero
bytes), then one float32 scale per chunk (the largest selected |x|), then every chunk's indices (in-chunk,
sorted ascending; a chunk with fewer than k non-zero elements repeats the index of its largest element, with
its code, in the slots it cannot fill, so that nothing zero decodes as non-zero), packed (12-bit: two indices in 3 bytes, little-endian nibbles, an odd count padded
with one index 0), then every selected value's code in ``bits`` bits (``8 // bits`` codes per byte, the first in
the lowest bits). The last, partial chunk of ``r`` elements selects ``min(r, ceil(k * r / block))``.
A code ``c`` of ``L = 2**bits`` levels decodes to ``scale * (2c / (L - 1) - 1)`` (levels evenly spread
over [-scale, scale]: for 2 bits -1, -1/3, 1/3, 1 times the scale); the other elements decode to 0.
Error feedback carries what was not sent (or was rounded) to the next round, which is what makes
the 98 % that are dropped converge (the paper's Algorithm 1, with the residual's decay
``error_feedback_decay``). Sizes: :func:`wire_bytes` computes them exactly without encoding.

All work is vectorised torch/numpy; nothing loops over elements in Python.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geotrain.errors import GeotrainError, TransferCorrupt

__all__ = ["CODECS", "Encoded", "ErrorFeedback", "decode", "encode", "mean_decoded", "wire_bytes"]

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "topk")
TOPK_HEADER = struct.Struct("<IBBH")  # k per full chunk, bits, index bits, reserved (0)
TOPK_BITS = (1, 2, 4, 8)

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


def wire_bytes(numel: int, codec: str, block: int = 256, density: float = 0.02, bits: int = 2) -> int:
    """Size of the payload :func:`encode` produces for ``numel`` elements, without encoding."""
    _check_codec(codec)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise GeotrainError(f"numel must be a non-negative integer, got {numel!r}")
    if codec in _FLOAT_BYTES:
        return numel * _FLOAT_BYTES[codec]
    block = _check_block(block)
    if codec == "topk":
        return _topk_size(numel, block, topk_k(block, density), bits)
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


# ---- topk (SparseLoCo) ----

def topk_k(block: int, density: float) -> int:
    """Elements a full chunk of ``block`` sends at ``density`` (at least 1)."""
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise GeotrainError(f"topk density must be in (0, 1], got {density!r}")
    return min(block, max(1, math.ceil(density * block)))


def _index_bits(block: int) -> int:
    """Bits of one in-chunk index: as few as hold ``block - 1`` (8 at the default block of 256, 12 at SparseLoCo's
    4096). Was 12 for any block up to 4096: at 256, a third of every index was zeros on the wire."""
    return max(1, (block - 1).bit_length())


def _topk_counts(numel: int, block: int, k: int) -> tuple[int, int, int]:
    """(full chunks, elements of the last partial chunk, what that one selects)."""
    full, rest = divmod(numel, block)
    return full, rest, (min(rest, -(-k * rest // block)) if rest else 0)


def _topk_size(numel: int, block: int, k: int, bits: int) -> int:
    if bits not in TOPK_BITS:
        raise GeotrainError(f"topk bits must be one of {TOPK_BITS}, got {bits!r}")
    full, rest, k_tail = _topk_counts(numel, block, k)
    chunks = full + (1 if rest else 0)
    sent = full * k + k_tail
    index_bytes = -(-sent * _index_bits(block) // 8)  # packed, little-endian bit order
    return TOPK_HEADER.size + chunks * _SCALE_BYTES + index_bytes + -(-sent * bits // 8)


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned ``values`` (each < 2**width) as one bit stream, little-endian: value ``i`` in bits ``i*width`` ..
    ``(i+1)*width - 1``, the last byte's unused high bits 0 (at 12 bits: two values per 3 bytes)."""
    shifts = np.arange(width, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(buf, bitorder="little")[:count * width].reshape(count, width).astype(np.int64)
    return (bits << np.arange(width, dtype=np.int64)).sum(axis=1)


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    pad = (-codes.size) % per
    c = np.concatenate((codes.astype(np.uint8), np.zeros(pad, dtype=np.uint8))).reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(c << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack_codes(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    return ((buf[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


def _no_zeros(rows: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The selected in-row indices ``i`` [chunks, k], sorted ascending, with every slot that selected a zero
    pointed at the row's largest selected element instead (so it repeats that element's index and code).

    A chunk with fewer than k non-zero elements (the coordinator's change, which holds the union of the
    sites' sparse updates, in most chunks) would otherwise send zeros, and no ``bits``-bit level is zero:
    a zero codes to the level above it, +scale/3 at 2 bits, and every such slot decoded as a spurious
    +scale/3 (found by the SparseLoCo investigation, docs/results.md). An all-zero chunk has scale 0 and
    decodes to zeros whatever it selects."""
    v = rows.gather(1, i)
    top = v.abs().argmax(dim=1, keepdim=True)
    i = torch.where(v == 0, i.gather(1, top), i)
    return i.sort(dim=1)[0]


def _topk_select(x: torch.Tensor, block: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-chunk start offsets [chunks], in-chunk indices [sent], values [sent]), chunk by chunk."""
    n = x.numel()
    full, rest, k_tail = _topk_counts(n, block, k)
    idx_parts, val_parts = [], []
    if full:
        head = x[:full * block].view(full, block)
        i = _no_zeros(head, head.abs().topk(k, dim=1, sorted=False)[1])
        idx_parts.append(i.reshape(-1))
        val_parts.append(head.gather(1, i).reshape(-1))
    if rest:
        tail = x[full * block:]
        i = _no_zeros(tail[None], tail.abs().topk(k_tail, sorted=False)[1][None])[0]
        idx_parts.append(i)
        val_parts.append(tail[i])
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(val_parts) if val_parts else torch.zeros(0)
    return idx, val, torch.tensor([k] * full + ([k_tail] if rest else []), dtype=torch.int64)


def _encode_topk(x: torch.Tensor, block: int, density: float, bits: int) -> Encoded:
    if bits not in TOPK_BITS:
        raise GeotrainError(f"topk bits must be one of {TOPK_BITS}, got {bits!r}")
    k = topk_k(block, density)
    idx, val, per_chunk = _topk_select(x, block, k)
    chunk_of = torch.repeat_interleave(torch.arange(per_chunk.numel()), per_chunk)
    scale = torch.zeros(per_chunk.numel())
    if val.numel():
        scale.scatter_reduce_(0, chunk_of, val.abs(), reduce="amax", include_self=True)
    levels = (1 << bits) - 1
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[chunk_of]
    codes = ((val / safe + 1) * (levels / 2)).round_().clamp_(0, levels).to(torch.uint8)
    ib = _index_bits(block)
    index_bytes = _pack_bits(idx.numpy(), ib)
    payload = (TOPK_HEADER.pack(k, bits, ib, 0) + _le(scale.numpy(), "<f4") + index_bytes
               + _pack_codes(codes.numpy(), bits))
    return Encoded("topk", x.numel(), block, payload)


def _decode_topk(e: Encoded) -> torch.Tensor:
    n, block = e.numel, e.block
    if block < 1 or len(e.payload) < TOPK_HEADER.size:
        raise TransferCorrupt(f"topk payload for {n} elements: block {block}, {len(e.payload)} bytes")
    k, bits, ib, reserved = TOPK_HEADER.unpack_from(e.payload)
    if bits not in TOPK_BITS or ib != _index_bits(block) or reserved or not 1 <= k <= block:
        raise TransferCorrupt(f"topk payload header is invalid (k {k}, bits {bits}, index bits {ib}, block {block})")
    expected = _topk_size(n, block, k, bits)
    if len(e.payload) != expected:
        raise TransferCorrupt(f"topk payload for {n} elements (block {block}, k {k}, {bits} bits) is "
                              f"{len(e.payload)} bytes, expected {expected}")
    full, rest, k_tail = _topk_counts(n, block, k)
    chunks, sent = full + (1 if rest else 0), full * k + k_tail
    buf = np.frombuffer(e.payload, dtype=np.uint8)
    off = TOPK_HEADER.size
    scale = torch.from_numpy(buf[off:off + chunks * 4].view("<f4").astype(np.float32))
    off += chunks * 4
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        raise TransferCorrupt("topk payload carries an invalid scale")
    nbytes = -(-sent * ib // 8)
    idx = _unpack_bits(buf[off:off + nbytes], sent, ib)
    off += nbytes
    per_chunk = np.array([k] * full + ([k_tail] if rest else []), dtype=np.int64)
    chunk_of = np.repeat(np.arange(chunks), per_chunk)
    lengths = np.array([block] * full + ([rest] if rest else []), dtype=np.int64)
    if sent and bool((idx >= lengths[chunk_of]).any()):
        raise TransferCorrupt("topk payload carries an index outside its chunk")
    codes = torch.from_numpy(_unpack_codes(buf[off:], sent, bits).astype(np.float32))
    levels = (1 << bits) - 1
    values = scale[torch.from_numpy(chunk_of)] * (codes * (2.0 / levels) - 1)
    out = torch.zeros(n, dtype=torch.float32)
    if sent:
        out[torch.from_numpy(chunk_of * block + idx)] = values
    return out


def encode(x: torch.Tensor, codec: str, block: int = 256, density: float = 0.02, bits: int = 2) -> Encoded:
    """Encode a 1-D float32 CPU tensor with ``codec``; ``block`` is used by int8/int4/topk only,
    ``density`` and ``bits`` by topk only.

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
    if codec == "topk":
        return _encode_topk(x, block, density, bits)
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
    if codec == "topk":
        return _decode_topk(e)
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

    def __init__(self, numel: int, decay: float = 1.0) -> None:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise GeotrainError(f"numel must be a non-negative integer, got {numel!r}")
        if not 0 < decay <= 1:
            raise GeotrainError(f"error feedback decay must be in (0, 1], got {decay!r}")
        self.numel = numel
        self.decay = float(decay)
        self._residual = torch.zeros(numel, dtype=torch.float32)

    def encode(self, x: torch.Tensor, codec: str, block: int = 256, density: float = 0.02, bits: int = 2) -> Encoded:
        """Add the (decayed) residual to ``x``, encode, and store the new residual. On error nothing changes."""
        _check_codec(codec)
        x = _check_input(x)
        if x.numel() != self.numel:
            raise GeotrainError(f"error feedback holds {self.numel} elements, got a vector of {x.numel()}")
        compensated = x + self._residual * self.decay if self.decay != 1.0 else x + self._residual
        e = encode(compensated, codec, block, density, bits)
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

    def __init__(self, codec: str, block: int = 256, error_feedback: bool = True, *, density: float = 0.02,
                 bits: int = 2, decay: float = 1.0) -> None:
        self.codec, self.block, self.error_feedback = codec, block, error_feedback
        self.density, self.bits, self.decay = density, bits, decay
        self._feedback: dict[int, ErrorFeedback] = {}

    def encode(self, x: torch.Tensor, key: int = 0) -> Encoded | None:
        """``x`` encoded for the wire, or None for fp32 (sent as it is)."""
        if self.codec == "fp32":
            return None
        if not self.error_feedback:
            return encode(x, self.codec, self.block, self.density, self.bits)
        ef = self._feedback.setdefault(key, ErrorFeedback(x.numel(), self.decay))
        return ef.encode(x, self.codec, self.block, self.density, self.bits)

    def forget(self, key: int = 0) -> None:
        """Drop what error feedback held for ``key`` (it belonged to an update that was discarded)."""
        self._feedback.pop(key, None)
