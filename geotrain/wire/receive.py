"""Receiving one tensor stream: header checks, chunk checks, one copy of each chunk into its place.

:class:`Receiver` takes a stream's chunks (geotrain.wire.chunks.Chunk, or protobuf TensorChunk
messages) one at a time, as they arrive:

- the header first: a negative size, one above ``max_bytes``, an unknown dtype or a numel that is
  not the size are refused before anything is allocated (INVALID, or CORRUPT for the dtype);
- the buffer: when the header declares at most ``expect_bytes`` (what the receiver knows it should
  get: the model's size) the whole payload is allocated at once (``allocate``, or
  geotrain.wire.buffers.empty) and each chunk is copied straight into its place; a larger or
  unknown size grows with the data received (a stream that declares 256 MiB and sends 4 bytes
  costs 4 bytes);
- each chunk: its offset is where the previous one ended, it fits in the declared size, its CRC32
  matches (one pass of geotrain.wire.crc.crc32, which releases the GIL); the whole payload's CRC32 is
  combined from the chunks' (geotrain.wire.crc), so the data is read once;
- values as they arrive: for a float32 payload received in place, ``inspect`` (made per stream
  by ``inspector(header)``) sees every complete piece of ``inspect.piece`` values, in order, as
  soon as it is in, and may stop the stream by raising (the coordinator checks that every value
  is finite and sums the squares for the norm bound this way: geotrain.orchestrator.ingest);
  a stream that grew sees its pieces once it is complete.

:meth:`Receiver.finish` checks the size and the CRC32 and gives the :class:`Payload`.
"""

from __future__ import annotations

import numpy as np
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain.errors import TransferCorrupt
from geotrain.wire import buffers
from geotrain.wire.chunks import as_chunk
from geotrain.wire.crc import combine, crc32
from geotrain.wire.outcomes import Outcome, error_for
from geotrain.wire.payload import Payload


class Receiver:
    """One tensor stream being received (see the module docstring)."""

    def __init__(self, where: str = "", *, max_bytes: int | None = None, expect_bytes: int | None = None,
                 allocate=None, inspector=None) -> None:
        self.where = where
        self.max_bytes = max_bytes
        self.expect_bytes = expect_bytes
        self.allocate = allocate
        self.inspector = inspector
        self.header: pb.TensorHeader | None = None
        self.received = 0
        self.crc = 0
        self.tensor: torch.Tensor | None = None  # the payload allocated at once (float32 or uint8)
        self._view: memoryview | None = None  # its bytes
        self._grown: bytearray | None = None  # or the bytes so far, when it grows
        self.inspect = None
        self._inspected = 0  # values seen by ``inspect``
        self._first = True

    # ---- the stream ----
    def add(self, msg) -> None:
        """Take the next message of the stream (the first must carry the header)."""
        chunk = as_chunk(msg)
        first, self._first = self._first, False
        if first:
            if chunk.header is None:
                raise TransferCorrupt(f"{self.where}: tensor stream does not start with a header")
            self._start(chunk.header)
            if not chunk.data:
                return
        h = self.header
        data = chunk.data
        if chunk.offset != self.received:
            raise TransferCorrupt(f"{self.where}: chunk at offset {chunk.offset}, expected {self.received} "
                                  f"(site {_quote(h.site)}, round {h.round})")
        n = len(data)
        crc = crc32(data)
        if crc != chunk.crc32:
            raise TransferCorrupt(f"{self.where}: chunk at offset {chunk.offset} failed its CRC32 "
                                  f"(site {_quote(h.site)}, round {h.round})")
        end = self.received + n
        if end > h.total_bytes:
            raise TransferCorrupt(f"{self.where}: stream longer than its header's {h.total_bytes} bytes")
        if self._view is not None:
            self._view[self.received:end] = data
        else:
            self._grown += data
        self.crc = combine(self.crc, crc, n)
        self.received = end
        if self.inspect is not None and self._view is not None:
            self._inspect(end // 4)

    def finish(self) -> Payload:
        """The stream ended: check its size and CRC32; the payload."""
        if self._first:
            raise TransferCorrupt(f"{self.where}: empty tensor stream")
        h = self.header
        if self.received != h.total_bytes:
            raise TransferCorrupt(f"{self.where}: stream ended after {self.received} of {h.total_bytes} bytes "
                                  f"(site {_quote(h.site)}, round {h.round})")
        if self.crc != h.crc32:
            raise TransferCorrupt(f"{self.where}: payload failed its CRC32 (site {_quote(h.site)}, round {h.round})")
        fp32 = h.dtype == "float32"
        if self.tensor is not None:
            data = self.tensor.numpy()
        else:
            data = np.frombuffer(self._grown, dtype=np.float32 if fp32 else np.uint8)
        if self.inspect is not None:
            if self._view is None:  # a stream that grew: its pieces now
                self.tensor = torch.from_numpy(data)
            self._inspect(len(data), last=True)
        return Payload(site=h.site, round=h.round, kind=h.kind, version=h.version, data=data, crc32=h.crc32,
                       codec=h.codec or "fp32", block=h.block, numel=h.numel or len(data), fragment=h.fragment,
                       staleness=h.staleness, claimed_crc32=h.claimed_crc32, params_crc32=h.params_crc32,
                       ring_round=h.ring_round, values=self.tensor if fp32 and self._view is not None else None)

    # ---- internals ----
    def _start(self, h: pb.TensorHeader) -> None:
        where = self.where
        if h.total_bytes < 0:
            raise _invalid(f"{where}: the header declares a negative size ({h.total_bytes} bytes)")
        if self.max_bytes is not None and h.total_bytes > self.max_bytes:
            raise _invalid(f"{where}: the header declares {h.total_bytes} bytes, more than the {self.max_bytes} "
                           f"this stream may carry (site {_quote(h.site)}, round {h.round})")
        if not ((h.dtype == "float32" and h.total_bytes % 4 == 0) or h.dtype == "encoded"):
            raise TransferCorrupt(f"{where}: unsupported payload dtype {_quote(h.dtype)} / size {h.total_bytes}")
        if h.dtype == "float32" and h.numel and h.numel * 4 != h.total_bytes:
            raise _invalid(f"{where}: the header declares {h.numel} float32 values in {h.total_bytes} bytes "
                           f"(site {_quote(h.site)}, round {h.round})")
        self.header = h
        fp32 = h.dtype == "float32"
        if self.expect_bytes is not None and 0 < h.total_bytes <= self.expect_bytes:
            if fp32:
                n = h.total_bytes // 4
                tensor = self.allocate(n) if self.allocate is not None else buffers.empty(n)
            else:
                tensor = buffers.empty(h.total_bytes, torch.uint8)
            self.tensor = tensor
            self._view = memoryview(tensor.numpy()).cast("B")
        else:
            self._grown = bytearray()
        if fp32 and self.inspector is not None:
            self.inspect = self.inspector(h)

    def _inspect(self, available: int, last: bool = False) -> None:
        """Hand ``inspect`` every complete piece of the first ``available`` values (the rest too when ``last``)."""
        piece = self.inspect.piece
        while self._inspected < available and (last or self._inspected + piece <= available):
            stop = min(self._inspected + piece, available)
            self.inspect(self.tensor[self._inspected:stop])
            self._inspected = stop


def _invalid(message: str):
    """A stream the receiver refuses as a wrong request (outcome INVALID), not as a damaged one."""
    return error_for(Outcome.INVALID, message)


def _quote(text: str, limit: int = 80) -> str:
    """A header string as an error message shows it: quoted, at most ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
