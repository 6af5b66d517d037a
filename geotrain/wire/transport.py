"""Tensors as streams of checksummed chunks (the wire format of every Merge, GetModel, InitModel).

A payload is one flat float32 buffer (all of a model's parameters, or its pseudo-gradient,
concatenated in ``named_parameters`` order). It travels as a header message followed by chunks
of at most ``CHUNK_BYTES``; every chunk carries its offset and CRC32 and the header carries the
CRC32 of the whole, so a lost, reordered, duplicated or corrupted chunk is caught on receipt.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain.errors import TransferCorrupt
from geotrain.wire.outcomes import Outcome, error_for

CHUNK_BYTES = 1 << 20  # 1 MiB: far under gRPC's 4 MiB message limit, large enough to be cheap


@dataclass
class Payload:
    """A received tensor stream: its header fields and the data (float32, or encoded bytes)."""

    site: str
    round: int
    kind: str
    version: int
    data: np.ndarray  # float32 1-D when codec is fp32, else the encoded bytes (uint8)
    crc32: int = 0  # CRC32 of the payload bytes (verified on receipt): a cheap fingerprint of the weights
    codec: str = "fp32"
    block: int = 0
    numel: int = 0
    fragment: int = 0
    staleness: int = 0
    claimed_crc32: int = 0
    params_crc32: int = 0
    ring_round: int = 0

    def tensor(self) -> torch.Tensor:
        """The payload as float32 (decoded if it travelled compressed)."""
        if self.codec == "fp32":
            return torch.from_numpy(self.data)
        from geotrain.wire.compress import Encoded, decode

        return decode(Encoded(codec=self.codec, numel=self.numel, block=self.block, payload=self.data.tobytes()))

    @property
    def wire_bytes(self) -> int:
        return int(self.data.nbytes)


def encode(data: np.ndarray | torch.Tensor, *, site: str = "", round: int = 0, kind: str,
           version: int = 0, chunk_bytes: int = CHUNK_BYTES, encoded=None, fragment: int = 0,
           staleness: int = 0, claimed_crc32: int = 0, params_crc32: int = 0,
           ring_round: int = 0) -> Iterator[pb.TensorChunk]:
    """Yield the messages of one stream: the header (with the first chunk), then the rest.

    ``encoded`` (a :class:`geotrain.wire.compress.Encoded`) sends compressed bytes instead of ``data``.
    """
    if encoded is not None and encoded.codec != "fp32":
        buf = memoryview(encoded.payload)
        header = pb.TensorHeader(site=site, round=round, kind=kind, total_bytes=len(buf), dtype="encoded",
                                 crc32=zlib.crc32(buf), version=version, codec=encoded.codec, block=encoded.block,
                                 numel=encoded.numel, fragment=fragment, staleness=staleness,
                                 claimed_crc32=claimed_crc32, params_crc32=params_crc32, ring_round=ring_round)
    else:
        if encoded is not None:
            from geotrain.wire.compress import decode as _dec

            data = _dec(encoded)
        if isinstance(data, torch.Tensor):
            data = data.detach().to("cpu", torch.float32).contiguous().numpy()
        buf = memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B")
        header = pb.TensorHeader(site=site, round=round, kind=kind, total_bytes=len(buf), dtype="float32",
                                 crc32=zlib.crc32(buf), version=version, codec="fp32", numel=len(buf) // 4,
                                 fragment=fragment, staleness=staleness, claimed_crc32=claimed_crc32,
                                 params_crc32=params_crc32, ring_round=ring_round)
    if len(buf) == 0:
        yield pb.TensorChunk(header=header)
        return
    for offset in range(0, len(buf), chunk_bytes):
        piece = bytes(buf[offset:offset + chunk_bytes])
        msg = pb.TensorChunk(offset=offset, data=piece, crc32=zlib.crc32(piece))
        if offset == 0:
            msg.header.CopyFrom(header)
        yield msg


MAX_STREAM_BYTES = 4 << 30
"""The most a stream may declare before the receiver knows the model's size (4 GiB)."""


def decode(messages: Iterable[pb.TensorChunk], *, where: str = "", max_bytes: int | None = None) -> Payload:
    """Reassemble one stream; raise TransferCorrupt naming ``where`` on any inconsistency.

    A header that declares a negative size, or more than ``max_bytes`` (the model's size once the
    receiver knows it), is refused before anything is allocated, with an error whose outcome is
    INVALID (the request itself is wrong). The buffer grows with the data received, never to the
    declared size up front: a stream that declares 256 MiB and sends 4 bytes costs 4 bytes.
    """
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise TransferCorrupt(f"{where}: empty tensor stream") from None
    if not first.HasField("header"):
        raise TransferCorrupt(f"{where}: tensor stream does not start with a header")
    h = first.header
    if h.total_bytes < 0:
        raise _invalid(f"{where}: the header declares a negative size ({h.total_bytes} bytes)")
    if max_bytes is not None and h.total_bytes > max_bytes:
        raise _invalid(f"{where}: the header declares {h.total_bytes} bytes, more than the {max_bytes} "
                       f"this stream may carry (site {_quote(h.site)}, round {h.round})")
    if not ((h.dtype == "float32" and h.total_bytes % 4 == 0) or h.dtype == "encoded"):
        raise TransferCorrupt(f"{where}: unsupported payload dtype {_quote(h.dtype)} / size {h.total_bytes}")
    if h.dtype == "float32" and h.numel and h.numel * 4 != h.total_bytes:
        raise _invalid(f"{where}: the header declares {h.numel} float32 values in {h.total_bytes} bytes "
                       f"(site {_quote(h.site)}, round {h.round})")
    out = bytearray()
    received = 0
    for msg in _chain(first, it):
        if not msg.data and msg is first:
            continue
        if msg.offset != received:
            raise TransferCorrupt(f"{where}: chunk at offset {msg.offset}, expected {received} (site {_quote(h.site)}, round {h.round})")
        if zlib.crc32(msg.data) != msg.crc32:
            raise TransferCorrupt(f"{where}: chunk at offset {msg.offset} failed its CRC32 (site {_quote(h.site)}, round {h.round})")
        end = received + len(msg.data)
        if end > h.total_bytes:
            raise TransferCorrupt(f"{where}: stream longer than its header's {h.total_bytes} bytes")
        out += msg.data
        received = end
    if received != h.total_bytes:
        raise TransferCorrupt(f"{where}: stream ended after {received} of {h.total_bytes} bytes (site {_quote(h.site)}, round {h.round})")
    if zlib.crc32(out) != h.crc32:
        raise TransferCorrupt(f"{where}: payload failed its CRC32 (site {_quote(h.site)}, round {h.round})")
    data = np.frombuffer(out, dtype=np.float32 if h.dtype == "float32" else np.uint8)
    return Payload(site=h.site, round=h.round, kind=h.kind, version=h.version, data=data, crc32=h.crc32,
                   codec=h.codec or "fp32", block=h.block, numel=h.numel or len(data), fragment=h.fragment,
                   staleness=h.staleness, claimed_crc32=h.claimed_crc32, params_crc32=h.params_crc32,
                   ring_round=h.ring_round)


def _invalid(message: str):
    """A stream the receiver refuses as a wrong request (outcome INVALID), not as a damaged one."""
    return error_for(Outcome.INVALID, message)


def _quote(text: str, limit: int = 80) -> str:
    """A header string as an error message shows it: quoted, at most ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _chain(first, rest):
    yield first
    yield from rest


def fingerprint(flat: torch.Tensor | np.ndarray) -> int:
    """CRC32 of a flat float32 buffer, as carried in stream headers (weights fingerprints in events)."""
    if isinstance(flat, torch.Tensor):
        flat = flat.detach().to("cpu", torch.float32).contiguous().numpy()
    return zlib.crc32(memoryview(np.ascontiguousarray(flat, dtype=np.float32)).cast("B"))


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat float32 CPU tensor."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    """Copy a flat buffer back into ``tensors`` (in place, any device)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    if offset != flat.numel():
        raise TransferCorrupt(f"payload has {flat.numel()} values, the model {offset}")
