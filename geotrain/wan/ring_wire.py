"""The wire of the leaders' ring (geotrain.wan.ring): framing, chunking, codecs, and the bytes it costs.

Wire format (TCP, one connection per ring edge, peer ``i`` dials ``i+1``; in a run the address
dialled is the link emulator's in front of the successor):

* handshake: the dialler sends ``HELLO`` (magic, protocol, rank, world, crc32); the acceptor
  answers ``ACK`` (magic, rank, world). A dial through a link emulator whose target is not up yet
  is closed by the emulator without an ``ACK`` and retried until the timeout;
* with TLS (``RingPeer(tls=...)``, geotrain.security.tls) every byte above and below runs inside a
  mutual TLS session set up first: the dialler verifies the acceptor's certificate *by name*
  (``site.<successor>``: the address dialled is the link emulator's, which forwards the encrypted
  bytes untouched), and the acceptor requires a certificate from the run's CA and checks that its
  name is its predecessor's. A connection whose TLS handshake fails (no certificate, another CA,
  plaintext) is dropped and the acceptor waits on; one with another part's certificate is answered
  ``REFUSE`` (``ACK``'s layout, magic :data:`REFUSE_MAGIC`), so both ends fail at once naming the
  certificate. The counts below (and ``bytes_sent``/``bytes_received``) are of what goes into TLS;
  the link emulator counts TLS records: the handshake (a few KiB per connection) and about
  22 bytes per record of at most 16 KiB more;
* a chunk travels as messages of at most :data:`PIECE` elements (256 KiB), and a piece is passed
  on as soon as it has arrived, so a step does not wait for the whole previous chunk and the links
  do not idle one latency per step;
* every message is a 56-byte header (magic, kind, world, round, sender rank, step, chunk index,
  piece index, numel of the whole vector, payload length, payload crc32, header crc32) and the raw
  float32 payload. A receiver checks every field against what it expects, so a byte flipped in
  transit, a peer at another round or step, or a peer with a vector of another size raises
  :class:`~geotrain.errors.TransferCorrupt` naming the predecessor, the round and the step.

:func:`chunk_bounds` splits a vector into one chunk per peer, :func:`piece_bounds` a chunk into
messages; :func:`ring_all_reduce_bytes` counts what one all-reduce sends; :class:`Codec` is how
the pieces travel (float32, or encoded by geotrain.wire.compress).
"""

from __future__ import annotations

import math
import socket
import struct

import numpy as np
import torch

PROTOCOL = 1
MSG_MAGIC = b"GTRM"
HELLO_MAGIC = b"GTRH"
ACK_MAGIC = b"GTRA"
REFUSE_MAGIC = b"GTRN"                # the acceptor refuses the certificate the dialler presented
# magic, kind, pad, world, round, sender, step, chunk, piece, numel, nbytes, payload crc32
HDR = struct.Struct("!4sBxHqIIIIQQI")
HDR_CRC = struct.Struct("!I")
HEADER_BYTES = HDR.size + HDR_CRC.size          # framing bytes per message (56)
HELLO = struct.Struct("!4sHIII")                  # magic, protocol, rank, world, crc32 of the rest
ACK = struct.Struct("!4sII")                      # magic, rank, world
HELLO_BYTES = HELLO.size
ACK_BYTES = ACK.size

KIND_REDUCE_SCATTER = 0
KIND_ALL_GATHER = 1
KIND_BROADCAST = 2
KIND_NAMES = {KIND_REDUCE_SCATTER: "reduce-scatter", KIND_ALL_GATHER: "all-gather", KIND_BROADCAST: "broadcast"}

SEND_SLICE = 1 << 20            # sendall() in slices: its timeout is per slice, i.e. an inactivity timeout
RECV_SLICE = 1 << 20
PIECE = 1 << 16                 # elements per message (256 KiB): chunks travel as pieces, pipelined
OPS = ("sum", "mean")


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(numel)``; the first ``numel % parts`` are one longer."""
    base, rem = divmod(numel, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < rem else 0)
        out.append((start, end))
        start = end
    return out


def piece_bounds(lo: int, hi: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """``[lo, hi)`` in messages of at most ``piece`` elements; always at least one (possibly empty)."""
    if hi <= lo:
        return [(lo, lo)]
    return [(s, min(s + piece, hi)) for s in range(lo, hi, piece)]


def ring_all_reduce_bytes(numel: int, world: int, itemsize: int = 4, rank: int | None = None) -> int:
    """Bytes one peer sends in one :meth:`RingPeer.all_reduce` of ``numel`` elements, framing included.

    The payload is ``2 * (world-1)/world * numel * itemsize``; the framing one header of
    :data:`HEADER_BYTES` per message (a chunk travels as messages of at most :data:`PIECE`
    elements, so ``2 * (world-1)`` headers for small vectors, about one per 256 KiB for large ones).
    With ``rank`` the exact count for that peer (chunks differ by one element when
    ``numel % world != 0``); without, the mean over peers rounded up. The one-off handshake
    (:data:`HELLO_BYTES` per connection) is not included.
    """
    if numel < 0 or world < 1 or itemsize < 1:
        raise ValueError(f"numel >= 0, world >= 1, itemsize >= 1 required, got {numel}, {world}, {itemsize}")
    if world == 1:
        return 0
    if rank is None:
        return math.ceil(sum(ring_all_reduce_bytes(numel, world, itemsize, r) for r in range(world)) / world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    bounds = chunk_bounds(numel, world)
    # reduce-scatter sends every chunk but (rank+1), all-gather every chunk but (rank+2)
    total = 0
    for skip in ((rank + 1) % world, (rank + 2) % world):
        for c, (lo, hi) in enumerate(bounds):
            if c != skip:
                total += (hi - lo) * itemsize + len(piece_bounds(lo, hi)) * HEADER_BYTES
    return total


def check_vector(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu":
        raise ValueError(f"{what}: expected a 1-D float32 CPU tensor, got {x.dtype} of shape "
                         f"{tuple(x.shape)} on {x.device}")


class Codec:
    """How the pieces of one all-reduce travel: float32 as they are, or encoded (geotrain.wire.compress)."""

    def __init__(self, codec: str, block: int) -> None:
        self.codec, self.block, self.plain = codec, block, codec == "fp32"

    def size(self, numel: int) -> int:
        from geotrain.wire.compress import wire_bytes

        return wire_bytes(numel, self.codec, self.block)

    def wire(self, arr: np.ndarray) -> np.ndarray:
        """What to send for ``arr``: ``arr`` itself (fp32; it must not change until sent) or its encoding."""
        if self.plain:
            return arr
        from geotrain.wire.compress import encode

        return np.frombuffer(encode(torch.from_numpy(np.ascontiguousarray(arr)), self.codec, self.block).payload,
                             dtype=np.uint8)

    def decode(self, raw: np.ndarray, numel: int) -> np.ndarray:
        from geotrain.wire.compress import Encoded, decode

        return decode(Encoded(self.codec, numel, self.block, raw.tobytes())).numpy()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)
