"""geotrain.wire.crc: the combine operators are built once, correctly, whichever threads ask first.

The coordinator receives every site's stream on its own gRPC thread, so the first round's chunks are
combined by several threads at once while the operators of 2**k zero bytes are being built. Found by
a benchmark under tracemalloc (slow bytecode): two threads squared the same last operator and both
appended it, every later operator was wrong, and every payload of that process failed its CRC32.
"""

from __future__ import annotations

import threading
import time
import zlib

from geotrain.wire import crc


def test_operators_built_by_racing_threads_are_right(monkeypatch):
    monkeypatch.setattr(crc, "_POWERS", [])
    square = crc._square

    def slow_square(matrix):  # a thread switch in the middle of every build step
        time.sleep(0.002)
        return square(matrix)

    monkeypatch.setattr(crc, "_square", slow_square)
    a, b = b"geotrain" * 3, bytes(range(256)) * 5
    len_b = 1 << 22  # 4 MiB: operators up to 2**22 zero bytes
    tail = b * (len_b // len(b)) + b[: len_b % len(b)]
    want = zlib.crc32(a + tail)
    got: list[int] = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        got.append(crc.combine(zlib.crc32(a), zlib.crc32(tail), len_b))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 8
    assert len(crc._POWERS) == 23
    monkeypatch.undo()
    assert crc.combine(zlib.crc32(a), zlib.crc32(tail), len_b) == want
