"""Receiving a tensor stream into a buffer allocated once: the bad cases (short stream, oversized chunk,
wrong dtype, a damaged chunk, values refused as they arrive) each stop it with the right error."""

import zlib

import pytest
import torch

from geotrain import errors
from geotrain._proto import coordinator_pb2 as pb
from geotrain.wire import transport
from geotrain.wire.chunks import parse_chunk
from geotrain.wire.receive import Receiver
from geotrain.wire.outcomes import Outcome, outcome_of


def wire(values, chunk_bytes=64, **fields):
    return [parse_chunk(m) for m in transport.encode_wire(values, site="eu", round=1, kind="pseudo_grad",
                                                         chunk_bytes=chunk_bytes, **fields)]


class Allocator:
    def __init__(self):
        self.calls = []

    def __call__(self, n):
        self.calls.append(n)
        self.buffer = torch.full((n,), -7.0)
        return self.buffer


def test_a_stream_is_received_in_place_into_the_buffer_allocated_for_it():
    values = torch.randn(100)
    alloc = Allocator()
    payload = transport.decode(wire(values), expect_bytes=400, allocate=alloc)
    assert alloc.calls == [100] and torch.equal(payload.tensor(), values)
    assert payload.tensor().data_ptr() == alloc.buffer.data_ptr()  # no copy after the chunks'
    assert payload.crc32 == zlib.crc32(values.numpy().tobytes())


def test_a_stream_larger_than_expected_grows_with_its_data_instead():
    values = torch.randn(100)
    alloc = Allocator()
    payload = transport.decode(wire(values), expect_bytes=399, allocate=alloc)
    assert alloc.calls == [] and torch.equal(payload.tensor(), values)


def test_a_short_stream_is_refused():
    msgs = wire(torch.randn(100))
    with pytest.raises(errors.TransferCorrupt, match="stream ended after 320 of 400 bytes"):
        transport.decode(msgs[:-2], expect_bytes=400)


def test_an_oversized_chunk_is_refused_before_it_is_copied():
    values = torch.randn(16)
    msgs = wire(values, chunk_bytes=32)
    data = bytes(msgs[1].data) + b"\x00" * 8  # the last chunk runs 8 bytes past the declared size
    msgs[1] = pb.TensorChunk(offset=32, data=data, crc32=zlib.crc32(data))
    alloc = Allocator()
    receiver = Receiver("Merge", expect_bytes=64, allocate=alloc)
    receiver.add(msgs[0])
    with pytest.raises(errors.TransferCorrupt, match="stream longer than its header's 64 bytes"):
        receiver.add(msgs[1])
    assert torch.equal(alloc.buffer[8:], torch.full((8,), -7.0))  # nothing of it was written


@pytest.mark.parametrize("dtype", ["float16", "int8", ""])
def test_a_wrong_dtype_is_refused_before_anything_is_allocated(dtype):
    msgs = wire(torch.randn(8))
    msgs[0].header.dtype = dtype
    alloc = Allocator()
    with pytest.raises(errors.TransferCorrupt, match="unsupported payload dtype"):
        transport.decode(msgs, expect_bytes=32, allocate=alloc)
    assert alloc.calls == []


def test_a_damaged_chunk_or_payload_is_refused():
    msgs = wire(torch.randn(32))
    bad = bytearray(msgs[1].data)
    bad[0] ^= 1
    msgs[1].data = memoryview(bytes(bad))
    with pytest.raises(errors.TransferCorrupt, match="chunk at offset 64 failed its CRC32"):
        transport.decode(msgs, expect_bytes=128)
    msgs = wire(torch.randn(32))
    msgs[0].header.crc32 ^= 1
    with pytest.raises(errors.TransferCorrupt, match="payload failed its CRC32"):
        transport.decode(msgs, expect_bytes=128)


def test_a_reordered_stream_is_refused():
    msgs = wire(torch.randn(64))  # 4 chunks of 64 bytes
    with pytest.raises(errors.TransferCorrupt, match="chunk at offset 128, expected 64"):
        transport.decode([msgs[0], msgs[2], msgs[1], msgs[3]], expect_bytes=256)


def test_a_declared_size_above_the_bound_is_invalid_not_corrupt():
    msgs = wire(torch.randn(32))
    with pytest.raises(errors.GeotrainError) as info:
        transport.decode(msgs, max_bytes=64, expect_bytes=128)
    assert outcome_of(info.value) is Outcome.INVALID


class Pieces:
    piece = 10

    def __init__(self, stop_at=None):
        self.seen = []
        self.stop_at = stop_at

    def __call__(self, values):
        self.seen.append(values.clone())
        if self.stop_at is not None and len(self.seen) == self.stop_at:
            raise errors.GeotrainError("stop")


@pytest.mark.parametrize("expect", [400, None], ids=["in place", "grown"])
@pytest.mark.parametrize("chunk_bytes", [12, 40, 64, 400])
def test_the_inspector_sees_every_value_once_in_pieces_in_order(expect, chunk_bytes):
    values = torch.randn(100)
    pieces = Pieces()
    transport.decode(wire(values, chunk_bytes=chunk_bytes), expect_bytes=expect, inspector=lambda h: pieces)
    assert [p.numel() for p in pieces.seen] == [10] * 10
    assert torch.equal(torch.cat(pieces.seen), values)


def test_an_inspector_stops_the_stream_as_soon_as_a_piece_is_in():
    """The values are checked as they arrive: the stream is not read past the piece that was refused."""
    values = torch.randn(100)
    msgs = wire(values, chunk_bytes=40)  # one piece per chunk
    taken = []

    def stream():
        for m in msgs:
            taken.append(m)
            yield m

    with pytest.raises(errors.GeotrainError, match="stop"):
        transport.decode(stream(), expect_bytes=400, inspector=lambda h: Pieces(stop_at=3))
    assert len(taken) == 3


def test_no_inspector_for_encoded_payloads():
    from geotrain.wire.compress import UpdateEncoder

    enc = UpdateEncoder("int8", 16, False).encode(torch.randn(64), 0)
    made = []
    payload = transport.decode(wire(None, encoded=enc), expect_bytes=256, inspector=made.append)
    assert made == [] and payload.codec == "int8"
