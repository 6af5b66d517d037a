"""TensorChunk messages written and read without protobuf objects: the same bytes as protobuf, and
whatever protobuf would parse, with the data as a view of the received bytes."""

import os
import zlib

import pytest
from google.protobuf.message import DecodeError

from geotrain._proto import coordinator_pb2 as pb
from geotrain.wire import crc
from geotrain.wire.chunks import Chunk, as_chunk, parse_chunk, serialize_chunk

HEADER = pb.TensorHeader(site="eu", round=-2, kind="pseudo_grad", total_bytes=1 << 40, dtype="float32", crc32=7,
                         version=3, numel=5, fragment=1, ring_round=9)


def _cases():
    for header in (None, HEADER, pb.TensorHeader()):
        for offset in (0, 1, 4 << 20, 2 ** 63 - 1, -1, -(2 ** 63)):
            for data in (b"", b"\x00", os.urandom(300)):
                for c in (0, 1, 2 ** 32 - 1):
                    yield header, offset, data, c


@pytest.mark.parametrize("header,offset,data,c", list(_cases()))
def test_the_bytes_are_protobufs_and_parse_back(header, offset, data, c):
    msg = pb.TensorChunk(offset=offset, data=data, crc32=c)
    if header is not None:
        msg.header.CopyFrom(header)
    raw = serialize_chunk(None if header is None else header.SerializeToString(), offset, memoryview(data), c)
    assert raw == msg.SerializeToString()
    parsed = parse_chunk(raw)
    assert (parsed.offset, bytes(parsed.data), parsed.crc32) == (offset, data, c)
    assert parsed.header == (header if header is not None else None)


def test_the_data_is_a_view_of_the_received_bytes():
    raw = serialize_chunk(HEADER.SerializeToString(), 8, b"abcd" * 1000, 5)
    parsed = parse_chunk(raw)
    assert isinstance(parsed.data, memoryview) and parsed.data.obj is raw


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return bytes([number << 3 | wire_type]) + payload


@pytest.mark.parametrize("raw", [
    # fields in reverse order, an unknown field, a field twice (the last wins), a header in two parts
    _field(4, 0, b"\x05") + _field(3, 2, b"\x02ab") + _field(2, 0, b"\x08"),
    _field(15, 2, b"\x03xyz") + _field(3, 2, b"\x01a") + _field(4, 0, b"\x01"),
    _field(3, 2, b"\x01a") + _field(3, 2, b"\x02bc") + _field(2, 0, b"\x01") + _field(2, 0, b"\x02"),
    _field(1, 2, b"\x04\x0a\x02eu") + _field(1, 2, b"\x02\x10\x03") + _field(3, 2, b"\x01z"),
])
def test_any_other_valid_encoding_is_parsed_as_protobuf_parses_it(raw):
    expected = pb.TensorChunk.FromString(raw)
    parsed = parse_chunk(raw)
    assert (parsed.offset, bytes(parsed.data), parsed.crc32) == (expected.offset, expected.data, expected.crc32)
    assert parsed.header == (expected.header if expected.HasField("header") else None)


@pytest.mark.parametrize("raw", [b"\x1a\x05ab", b"\x10", b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                 b"\x0a\x03\xff\xff\xff", b"\x07"])
def test_bytes_that_are_no_tensor_chunk_are_refused(raw):
    with pytest.raises(DecodeError):
        pb.TensorChunk.FromString(raw)  # protobuf refuses them ...
    with pytest.raises(DecodeError):
        parse_chunk(raw)  # ... and so does the parser


def test_as_chunk_takes_protobuf_messages():
    msg = pb.TensorChunk(offset=4, data=b"xy", crc32=3)
    c = as_chunk(msg)
    assert (c.header, c.offset, c.data, c.crc32) == (None, 4, b"xy", 3)
    assert as_chunk(c) is c and isinstance(c, Chunk)
    raw = as_chunk(msg.SerializeToString())  # serialized bytes are parsed
    assert (raw.offset, bytes(raw.data), raw.crc32) == (4, b"xy", 3)


@pytest.mark.parametrize("len_a,len_b", [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 3), (4 << 20, 4 << 20), (3, 7_000_001)])
def test_crc_of_the_whole_from_the_crcs_of_its_parts(len_a, len_b):
    a, b = os.urandom(len_a), os.urandom(len_b)
    assert crc.combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)


def test_crc_combine_depends_on_the_length():
    """The bad case: the second part's length is part of the answer (a wrong one gives another CRC)."""
    a, b = os.urandom(100), os.urandom(64)
    assert crc.combine(zlib.crc32(a), zlib.crc32(b), 63) != zlib.crc32(a + b)


@pytest.mark.parametrize("n", [0, 1, 1000, (4 << 20) + 3])
def test_the_crc32_in_use_is_zlibs(n):
    data = os.urandom(n)
    assert crc.crc32(data) == zlib.crc32(data) and crc.crc32(memoryview(data)[1:], 77) == zlib.crc32(data[1:], 77)
    assert crc.IMPLEMENTATION in ("isal", "zlib")
