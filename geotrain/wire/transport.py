"""Tensors as streams of checksummed chunks (the wire format of every Merge, GetModel, InitModel).

A payload is one flat float32 buffer (all of a model's parameters, or its pseudo-gradient,
concatenated in ``named_parameters`` order). It travels as a header message followed by chunks
of at most ``CHUNK_BYTES``; every chunk carries its offset and CRC32 and the header carries the
CRC32 of the whole, so a lost, reordered, duplicated or corrupted chunk is caught on receipt.

Both ends move the bytes without protobuf objects on the hot path: :func:`encode_wire` gives the
serialized messages (each chunk copied once, from a view of the tensor, into its message;
geotrain.wire.chunks), :func:`decode` hands each message to a geotrain.wire.receive.Receiver,
which copies its data once, into the payload's buffer. One CRC32 pass per chunk gives
both its CRC32 and, combined (geotrain.wire.crc), the whole payload's. :func:`encode` gives the
same stream as protobuf messages (tests, probes, the in-process run).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain.errors import TransferCorrupt
from geotrain.wire.chunks import serialize_chunk
from geotrain.wire.crc import combine, crc32
from geotrain.wire.payload import Payload
from geotrain.wire.receive import Receiver

__all__ = ["CHUNK_BYTES", "MAX_STREAM_BYTES", "Payload", "SharedStream", "Stream", "decode", "encode", "encode_wire", "fingerprint",
           "flatten", "unflatten_into"]

CHUNK_BYTES = 4 << 20
"""4 MiB (2**20 float32 values): a quarter of gRPC's message limit here (geotrain.wire.channel); few
enough messages per payload that gRPC's per-message cost is small beside the copy (40 MB in 10)."""


class Stream:
    """One payload ready to send: its header (with the whole payload's CRC32) and its chunks' CRC32s,
    from one CRC32 pass over the data (geotrain.wire.crc); :meth:`messages` serializes the chunks as they are taken.

    ``encoded`` (a :class:`geotrain.wire.compress.Encoded`) sends compressed bytes instead of ``data``.
    ``data`` is read again when the messages are made: it must not change in between.
    """

    def __init__(self, data: np.ndarray | torch.Tensor | None = None, *, site: str = "", round: int = 0, kind: str,
                 version: int = 0, chunk_bytes: int = CHUNK_BYTES, encoded=None, fragment: int = 0,
                 staleness: int = 0, claimed_crc32: int = 0, params_crc32: int = 0, ring_round: int = 0) -> None:
        if encoded is not None and encoded.codec != "fp32":
            buf = memoryview(encoded.payload).cast("B")
            fields = dict(dtype="encoded", codec=encoded.codec, block=encoded.block, numel=encoded.numel)
        else:
            if encoded is not None:
                from geotrain.wire.compress import decode as _dec

                data = _dec(encoded)
            if isinstance(data, torch.Tensor):
                data = data.detach().to("cpu", torch.float32).contiguous().numpy()
            buf = memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B")
            fields = dict(dtype="float32", codec="fp32", numel=len(buf) // 4)
        self.chunk_bytes = chunk_bytes
        self.buf = buf
        self.chunks: list[tuple[int, int]] = []
        """(offset, CRC32) of every chunk."""
        total = 0
        for offset in range(0, len(buf), chunk_bytes):
            piece = buf[offset:offset + chunk_bytes]
            crc = crc32(piece)
            total = combine(total, crc, len(piece))
            self.chunks.append((offset, crc))
        self.crc32 = total
        """The whole payload's CRC32 (for float32 values: transport.fingerprint of them)."""
        self.header = pb.TensorHeader(site=site, round=round, kind=kind, total_bytes=len(buf), crc32=total,
                                      version=version, fragment=fragment, staleness=staleness,
                                      claimed_crc32=claimed_crc32, params_crc32=params_crc32, ring_round=ring_round,
                                      **fields)

    @property
    def payload_bytes(self) -> int:
        return len(self.buf)

    def messages(self) -> Iterator[bytes]:
        """The serialized messages: the header with the first chunk, then the rest (each chunk copied once)."""
        head = self.header.SerializeToString()
        if not self.chunks:
            yield serialize_chunk(head, 0, b"", 0)
            return
        size = self.chunk_bytes
        for i, (offset, crc) in enumerate(self.chunks):
            yield serialize_chunk(head if i == 0 else None, offset, self.buf[offset:offset + size], crc)

    def pb_messages(self) -> Iterator[pb.TensorChunk]:
        """The same stream as protobuf messages."""
        if not self.chunks:
            yield pb.TensorChunk(header=self.header)
            return
        size = self.chunk_bytes
        for i, (offset, crc) in enumerate(self.chunks):
            msg = pb.TensorChunk(offset=offset, data=bytes(self.buf[offset:offset + size]), crc32=crc)
            if i == 0:
                msg.header.CopyFrom(self.header)
            yield msg


class SharedStream:
    """One :class:`Stream` sent to many receivers (a round's answer to every waiting site): each
    message is serialized once, by the first receiver that gets to it, and the same bytes go to all.
    The first message can go out before the last is made.

    ``gate``, if given, is called before each receiver's last message and may block or raise: the
    coordinator streams a round's answer while it makes the round durable, and holds the last message
    back until it is (a receiver can use nothing of a stream before its last message: the payload's
    CRC32 is checked on the whole)."""

    def __init__(self, stream: Stream, gate=None) -> None:
        self.stream = stream
        self.gate = gate
        self._lock = threading.Lock()
        self._made: list[bytes] = []
        self._source = stream.messages()
        self.count = max(1, len(stream.chunks))

    def messages(self) -> Iterator[bytes]:
        for i in range(self.count):
            with self._lock:
                while len(self._made) <= i:
                    self._made.append(next(self._source))
                msg = self._made[i]
            if i == self.count - 1 and self.gate is not None:
                self.gate()
            yield msg


def encode_wire(data: np.ndarray | torch.Tensor | None = None, **fields) -> Iterator[bytes]:
    """The serialized messages of one stream (:class:`Stream`'s arguments): the header with the first
    chunk, then the rest. The CRC32s are computed first (the header carries the whole payload's); each
    chunk is copied into its message as it is taken, so the caller may send one while the next is made."""
    yield from Stream(data, **fields).messages()


def encode(data: np.ndarray | torch.Tensor | None = None, **fields) -> Iterator[pb.TensorChunk]:
    """The stream of :func:`encode_wire` as protobuf messages (the same bytes once serialized)."""
    yield from Stream(data, **fields).pb_messages()


MAX_STREAM_BYTES = 4 << 30
"""The most a stream may declare before the receiver knows the model's size (4 GiB)."""


def decode(messages: Iterable, *, where: str = "", max_bytes: int | None = None, expect_bytes: int | None = None,
           allocate=None, inspector=None) -> Payload:
    """Reassemble one stream (protobuf TensorChunk messages or geotrain.wire.chunks.Chunk); raise
    TransferCorrupt naming ``where`` on any inconsistency.

    A header that declares a negative size, or more than ``max_bytes`` (the model's size once the
    receiver knows it), is refused before anything is allocated, with an error whose outcome is
    INVALID (the request itself is wrong). A stream that declares at most ``expect_bytes`` is
    received into one buffer allocated up front (``allocate(numel)`` for float32, if given); else
    the buffer grows with the data received, never to the declared size up front: a stream that
    declares 256 MiB and sends 4 bytes costs 4 bytes. ``inspector``: geotrain.wire.receive.Receiver.
    """
    receiver = Receiver(where, max_bytes=max_bytes, expect_bytes=expect_bytes, allocate=allocate, inspector=inspector)
    for msg in messages:
        receiver.add(msg)
    return receiver.finish()


def fingerprint(flat: torch.Tensor | np.ndarray) -> int:
    """CRC32 of a flat float32 buffer, as carried in stream headers (weights fingerprints in events)."""
    if isinstance(flat, torch.Tensor):
        flat = flat.detach().to("cpu", torch.float32).contiguous().numpy()
    return crc32(memoryview(np.ascontiguousarray(flat, dtype=np.float32)).cast("B"))


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
