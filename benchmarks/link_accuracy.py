"""How faithful is the user-space link emulator? Configured vs measured goodput and RTT.

Each setting runs one ``geotrain link`` process (``geotrain.wan.link.main``, as the launcher runs it);
this process pushes bytes through it to a sink and pings an echo server through it.

* goodput = bytes / (time of the last byte at the sink - time of the first send - one-way latency),
  expected = the model's rate: min(bandwidth, Mathis bound when loss > 0).
* RTT = median of 64-byte ping-pongs, expected = 2 * latency (+ serialization of 2 x 64 bytes).
* The 10 Gbit/s, 0 ms row shows the raw throughput Python threads reach; "loopback" is the same
  transfer without any proxy, for reference.

Run: .venv/bin/python benchmarks/link_accuracy.py   (about 30 s). Writes benchmarks/results/link_accuracy.json.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from geotrain.wan.link import MSS

RESULTS = Path(__file__).resolve().parent / "results" / "link_accuracy.json"

# (label, bandwidth Mbit/s, one-way latency ms, loss)
SETTINGS = [
    ("10mbit-100ms", 10, 100, 0.0),
    ("100mbit-50ms", 100, 50, 0.0),
    ("1gbit-5ms", 1000, 5, 0.0),
    ("10gbit-0ms", 10000, 0, 0.0),
    ("100mbit-20ms-loss0.001", 100, 20, 0.001),
]
PUSH_SECONDS = 2.0
MAX_PUSH_BYTES = 2_500_000_000


class Sink:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.nbytes, self.last = 0, 0.0
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        c, _ = self.sock.accept()
        buf = bytearray(1 << 20)
        while k := c.recv_into(buf):
            self.nbytes += k
            self.last = time.monotonic()
        c.close()
        self.sock.close()
        self.done.set()


class Echo:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        c, _ = self.sock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while d := c.recv(65536):
            c.sendall(d)
        c.close()
        self.sock.close()


def push(port: int, sink: Sink, total: int) -> float:
    s = socket.create_connection(("127.0.0.1", port))
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        s.sendall(block[:n] if n < len(block) else block)
        sent += n
    s.shutdown(socket.SHUT_WR)
    if not sink.done.wait(120):
        raise RuntimeError(f"sink got {sink.nbytes} of {total} bytes")
    s.close()
    return sink.last - t0


def rtts(port: int, n: int) -> list[float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    for i in range(n + 1):
        msg = bytes([i % 256]) * 64
        t = time.monotonic()
        s.sendall(msg)
        got = b""
        while len(got) < 64:
            got += s.recv(64 - len(got))
        if i:                       # the first one warms up the connection's threads
            out.append(time.monotonic() - t)
    s.close()
    return out


def start_link(target: int, bw: float, lat: float, loss: float, stats: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from geotrain.wan.link import main; raise SystemExit(main())", "--name", "bench",
         "--target", f"127.0.0.1:{target}", "--bandwidth", f"{bw}mbit", "--latency", f"{lat}ms",
         "--loss", str(loss), "--stats-file", str(stats)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        raise RuntimeError(f"link did not start: {line!r}")
    return proc, int(line.split()[1])


def stop_link(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    if proc.wait(10) != 0:
        raise RuntimeError(f"link exited with {proc.returncode}")


def model_rate_mbps(bw: float, lat: float, loss: float) -> float:
    if loss <= 0:
        return bw
    rtt = max(2 * lat / 1000, 0.001)
    return min(bw, MSS * 1.22 / (rtt * math.sqrt(loss)) * 8 / 1e6)


def main() -> int:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stats_path = RESULTS.parent / ".link_accuracy_stats.json"
    rows = []

    sink = Sink()
    total = MAX_PUSH_BYTES // 2
    loop_s = push(sink.port, sink, total)
    loopback_mbps = total * 8 / loop_s / 1e6

    for label, bw, lat, loss in SETTINGS:
        expected = model_rate_mbps(bw, lat, loss)
        total = int(min(expected * 1e6 / 8 * PUSH_SECONDS, MAX_PUSH_BYTES))
        sink = Sink()
        proc, port = start_link(sink.port, bw, lat, loss, stats_path)
        try:
            elapsed = push(port, sink, total) - lat / 1000
        finally:
            stop_link(proc)
        counted = json.loads(stats_path.read_text())["bytes_forward"]
        echo = Echo()
        proc, port = start_link(echo.port, bw, lat, 0.0, stats_path)
        try:
            samples = rtts(port, 10 if lat >= 100 else 20)
        finally:
            stop_link(proc)
        goodput = total * 8 / elapsed / 1e6
        rtt_expected = 2 * lat / 1000 + 2 * 64 * 8 / (bw * 1e6)
        rtt = statistics.median(samples)
        rows.append({
            "setting": label, "bandwidth_mbps": bw, "latency_ms": lat, "loss": loss, "bytes": total,
            "bytes_counted_by_link": counted,
            "goodput_expected_mbps": round(expected, 3), "goodput_mbps": round(goodput, 3),
            "goodput_ratio": round(goodput / expected, 4),
            "rtt_expected_ms": round(rtt_expected * 1000, 3), "rtt_median_ms": round(rtt * 1000, 3),
            "rtt_min_ms": round(min(samples) * 1000, 3), "rtt_max_ms": round(max(samples) * 1000, 3),
            "rtt_ratio": round(rtt / rtt_expected, 4) if lat > 0 else None,
        })
    stats_path.unlink(missing_ok=True)

    print(f"{'setting':<24} {'goodput exp':>12} {'measured':>10} {'ratio':>7}   {'RTT exp ms':>10} "
          f"{'median':>9} {'ratio':>7}  bytes ok")
    for r in rows:
        ratio = f"{r['rtt_ratio']:.4f}" if r["rtt_ratio"] is not None else "-"
        print(f"{r['setting']:<24} {r['goodput_expected_mbps']:>12.1f} {r['goodput_mbps']:>10.1f} "
              f"{r['goodput_ratio']:>7.4f}   {r['rtt_expected_ms']:>10.3f} {r['rtt_median_ms']:>9.3f} {ratio:>7}  "
              f"{r['bytes_counted_by_link'] == r['bytes']}")
    print(f"loopback without proxy: {loopback_mbps:.0f} Mbit/s; raw through the link process "
          f"(10gbit-0ms row): {rows[3]['goodput_mbps']:.0f} Mbit/s")
    RESULTS.write_text(json.dumps({
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "loopback_mbps": round(loopback_mbps, 1), "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
