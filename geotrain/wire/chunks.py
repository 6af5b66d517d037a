"""TensorChunk messages as bytes, written and read without protobuf objects.

A tensor stream's chunks are the bulk of every Merge, GetModel and InitModel. Through protobuf
objects each chunk's data was copied when the message was built, again when it was serialized,
on parsing, and on every read of ``msg.data``. Here a chunk is serialized straight from a
memoryview of the tensor (one copy, into the message's bytes) and parsed into a :class:`Chunk`
whose ``data`` is a memoryview into the bytes gRPC received (no copy): the receiver copies it
once, into its buffer (geotrain.wire.receive).

The bytes are exactly protobuf's encoding of ``TensorChunk`` (protos/geotrain/v1/coordinator.proto:
``header`` = 1, ``offset`` = 2, ``data`` = 3, ``crc32`` = 4; fields in number order, defaults
left out), so either end may use protobuf objects instead (tests, probes, geotrain.run.local), and
:func:`parse_chunk` reads any valid encoding: the canonical one here, anything else (a field twice,
unknown fields, another field order) through protobuf itself, which also refuses what is malformed.
"""

from __future__ import annotations

from geotrain._proto import coordinator_pb2 as pb

_HEADER, _OFFSET, _DATA, _CRC = 0x0A, 0x10, 0x1A, 0x20
"""The tags (field number << 3 | wire type) of TensorChunk's fields: 1 and 3 length-delimited, 2 and 4 varints."""

_EMPTY = memoryview(b"")
_U64 = (1 << 64) - 1


class Chunk:
    """One parsed chunk; ``data`` is a memoryview into the received message (or bytes)."""

    __slots__ = ("header", "offset", "data", "crc32")

    def __init__(self, header: pb.TensorHeader | None, offset: int, data, crc32: int) -> None:
        self.header = header
        self.offset = offset
        self.data = data
        self.crc32 = crc32


def as_chunk(msg) -> Chunk:
    """A :class:`Chunk` from a protobuf ``TensorChunk`` or its serialized bytes (a Chunk is returned as is)."""
    if isinstance(msg, Chunk):
        return msg
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return parse_chunk(msg)
    return Chunk(msg.header if msg.HasField("header") else None, msg.offset, msg.data, msg.crc32)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer below 2**64."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_prefix(header: bytes | None, offset: int, data_len: int) -> bytes:
    """The bytes of a chunk message before its data: the serialized header (None: none), the offset, the data's tag and length."""
    parts = []
    if header is not None:
        parts += [b"\x0a", varint(len(header)), header]
    if offset:
        parts += [b"\x10", varint(offset & _U64)]
    if data_len:
        parts += [b"\x1a", varint(data_len)]
    return b"".join(parts)


def serialize_chunk(header: bytes | None, offset: int, data, crc32: int) -> bytes:
    """A TensorChunk's bytes, as protobuf writes them; ``data`` any bytes-like object (copied once)."""
    suffix = b"\x20" + varint(crc32) if crc32 else b""
    return b"".join((chunk_prefix(header, offset, len(data)), data, suffix))


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def parse_chunk(raw: bytes) -> Chunk:
    """Parse a TensorChunk message; its ``data`` is a memoryview into ``raw``. Anything but one
    occurrence each of the four fields, in any order, is left to protobuf (which raises DecodeError on
    bytes that are no TensorChunk), so the result is always what protobuf would have parsed."""
    buf = memoryview(raw)
    end = len(buf)
    pos = 0
    header = None
    offset = crc = 0
    data = _EMPTY
    seen = set()
    try:
        while pos < end:
            tag, pos = _read_varint(buf, pos, end)
            if tag in seen:
                raise ValueError("a field twice")
            seen.add(tag)
            if tag == _HEADER or tag == _DATA:
                length, pos = _read_varint(buf, pos, end)
                if pos + length > end:
                    raise ValueError("a field longer than the message")
                value = buf[pos:pos + length]
                pos += length
                if tag == _DATA:
                    data = value
                else:
                    header = pb.TensorHeader.FromString(bytes(value))
            elif tag == _OFFSET:
                value, pos = _read_varint(buf, pos, end)
                offset = value - (1 << 64) if value >> 63 else value  # int64: two's complement
                if value > _U64:
                    raise ValueError("offset out of range")
            elif tag == _CRC:
                value, pos = _read_varint(buf, pos, end)
                crc = value & 0xFFFFFFFF  # uint32: protobuf keeps the low 32 bits
            else:
                raise ValueError("an unknown field or wire type")
    except Exception:  # noqa: BLE001 - not the canonical layout: protobuf decides (and raises on garbage)
        return as_chunk(pb.TensorChunk.FromString(bytes(raw)))
    return Chunk(header, offset, data, crc)
