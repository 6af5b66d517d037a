"""Tensor streams: a round trip, and the bounds a receiver checks before it allocates anything."""

import tracemalloc
import zlib

import pytest
import torch

from geotrain import errors
from geotrain._proto import coordinator_pb2 as pb
from geotrain.wire import transport
from geotrain.wire.outcomes import Outcome, outcome_of


def lying_stream(total_bytes, data=b"\0\0\0\0", **header):
    """A header that declares ``total_bytes``, then ``data`` only."""
    head = pb.TensorHeader(site="eu", round=3, kind="pseudo_grad", total_bytes=total_bytes, dtype="float32",
                           crc32=0, **header)
    return [pb.TensorChunk(header=head, offset=0, data=data, crc32=zlib.crc32(data))]


def test_a_stream_round_trips_in_chunks():
    values = torch.arange(10, dtype=torch.float32)
    payload = transport.decode(transport.encode(values, site="eu", round=2, kind="pseudo_grad", chunk_bytes=8),
                               max_bytes=40)
    assert torch.equal(payload.tensor(), values) and (payload.site, payload.round, payload.numel) == ("eu", 2, 10)


def test_a_declared_size_above_the_bound_is_refused_before_anything_is_allocated():
    tracemalloc.start()
    try:
        with pytest.raises(errors.GeotrainError) as info:
            transport.decode(lying_stream(256 << 20), where="Merge from peer", max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome_of(info.value) is Outcome.INVALID and not isinstance(info.value, errors.TransferCorrupt)
    assert "Merge from peer: the header declares 268435456 bytes, more than the 1048576" in str(info.value)
    assert peak < 1 << 20


def test_the_buffer_grows_with_the_data_received_not_with_the_declared_size():
    tracemalloc.start()
    try:  # no bound given: 256 MiB declared, 4 bytes sent, 4 bytes held
        with pytest.raises(errors.TransferCorrupt) as info:
            transport.decode(lying_stream(256 << 20), where="Merge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "stream ended after 4 of 268435456 bytes" in str(info.value)
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("total", [-4, -(2 ** 62)])
def test_a_negative_size_is_refused(total):
    with pytest.raises(errors.GeotrainError) as info:
        transport.decode(lying_stream(total), where="InitModel")
    assert outcome_of(info.value) is Outcome.INVALID and "negative size" in str(info.value)


def test_a_huge_declared_size_is_refused_by_the_bound():
    with pytest.raises(errors.GeotrainError) as info:
        transport.decode(lying_stream(2 ** 62), max_bytes=transport.MAX_STREAM_BYTES)
    assert outcome_of(info.value) is Outcome.INVALID


def test_a_header_whose_numel_is_not_its_size_is_refused():
    with pytest.raises(errors.GeotrainError) as info:
        transport.decode(lying_stream(4, numel=1000))
    assert outcome_of(info.value) is Outcome.INVALID and "declares 1000 float32 values in 4 bytes" in str(info.value)


def test_a_long_site_name_is_quoted_short_in_the_error():
    head = lying_stream(8)[0]
    head.header.site = "x" * 100_000
    with pytest.raises(errors.TransferCorrupt) as info:
        transport.decode([head])
    assert len(str(info.value)) < 300 and "(100000 characters)" in str(info.value)
