"""geotrain.wan.stripe: one TCP connection carried over several, real sockets end to end; the per-flow loss bound."""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import struct
import threading
import time

import pytest

from geotrain.wan.link import LinkParams, LinkProxy
from geotrain.wan.shaping import MSS, Direction, Flow
from geotrain.wan.stripe import HELLO, MAGIC, Joiner, Splitter
from tests.wan.test_link import (EchoServer, SinkServer, _exits_cleanly, _spawn_link, connect, ping_rtts, push,
                                 recv_all, servers)  # noqa: F401  (servers: the fixture)


def wait_for(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def closed_on_us(s: socket.socket) -> bool:
    """The peer closed (EOF) or reset the connection (unread bytes make a close a reset)."""
    try:
        return s.recv(16) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def striped():
    """make(target_port, streams) -> (splitter, joiner): the client dials splitter.port."""
    made = []

    def make(target_port: int, streams: int):
        joiner = Joiner("t", ("127.0.0.1", 0), ("127.0.0.1", target_port))
        joiner.start()
        splitter = Splitter("t", ("127.0.0.1", 0), ("127.0.0.1", joiner.port), streams)
        splitter.start()
        made.extend([splitter, joiner])
        return splitter, joiner
    yield make
    for end in made:
        end.stop()


@pytest.mark.parametrize("streams", [1, 3, 8])
def test_a_striped_connection_carries_both_directions_byte_for_byte(servers, striped, streams):
    echo = servers(EchoServer)
    splitter, joiner = striped(echo.port, streams)
    s = connect(splitter.port)
    payload = random.Random(streams).randbytes(3_000_000)
    got = []
    reader = threading.Thread(target=lambda: got.append(recv_all(s)))
    reader.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)  # the echo server's EOF, then its FIN back: the client's EOF
    reader.join(30)
    assert not reader.is_alive() and got[0] == payload
    s.close()
    # every thread of the relay ended at both ends once both directions were over
    assert wait_for(lambda: not splitter._live and not joiner._live)
    assert splitter.connections == joiner.connections == 1


def test_small_exchanges_keep_their_order(servers, striped):
    """Request-response traffic (gRPC's pings, headers): every frame small, order kept across 4 stripes."""
    echo = servers(EchoServer)
    splitter, _ = striped(echo.port, 4)
    s = connect(splitter.port)
    for size in (1, 64, 5000, 70_000):
        assert len(ping_rtts(s, n=10, size=size)) == 10  # ping_rtts checks each answer equals its message
    s.close()


def test_the_stripes_carry_equal_shares(servers):
    """Between the ends a link emulator: it sees one connection per stripe, each with about a P-th of the bytes."""
    sink = servers(SinkServer)
    joiner = Joiner("t", ("127.0.0.1", 0), ("127.0.0.1", sink.port))
    proxy = LinkProxy("t", ("127.0.0.1", joiner.start()), LinkParams(1000))
    splitter = Splitter("t", ("127.0.0.1", 0), ("127.0.0.1", proxy.start()), 4)
    try:
        s = connect(splitter.start())
        total = 4_000_000
        _, sha = push(s, total)
        assert sink.done.wait(30)
        s.close()
        assert sink.nbytes == total and sink.sha.hexdigest() == sha
        assert proxy.stats()["connections"] == 4
        assert wait_for(lambda: splitter.shares)
        (shares,) = splitter.shares  # bytes each stripe carried from the client's side
        assert max(shares) - min(shares) <= 256 * 1024 + 12 and sum(shares) > total
        st = proxy.stats()
        frames = -(-total // (256 * 1024))
        assert total < st["bytes_forward"] <= total + 4 * 12 * (frames + 8) + 4 * 24  # headers and hellos only
    finally:
        splitter.stop()
        proxy.stop()
        joiner.stop()


def test_the_joiner_refuses_what_is_not_a_stripe_and_goes_on(servers, striped):
    echo = servers(EchoServer)
    splitter, joiner = striped(echo.port, 2)
    for bad in (b"HTTP/1.1 GET /\r\n\r\n" + b"x" * 8,  # not the magic
                HELLO.pack(MAGIC, b"a" * 16, 0, 0),  # a count of 0
                HELLO.pack(MAGIC, b"b" * 16, 5, 2)):  # an index past the count
        c = socket.create_connection(("127.0.0.1", joiner.port), timeout=5)
        c.sendall(bad)
        assert closed_on_us(c)
        c.close()
    assert wait_for(lambda: joiner.refused == 3)
    s = connect(splitter.port)  # the real thing still works
    assert len(ping_rtts(s, n=3)) == 3
    s.close()


def test_a_joiner_without_its_target_tears_the_client_down(striped):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nobody listens there
    splitter, _ = striped(port, 3)
    s = connect(splitter.port)
    assert closed_on_us(s)
    s.close()


def test_a_reset_at_the_far_end_resets_the_client(servers, striped):
    """The target resets its connection mid-stream: the client's connection ends too, nothing is left running."""

    class Resetter(SinkServer):
        def handle(self, c):
            c.recv(1000)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    target = servers(Resetter)
    splitter, joiner = striped(target.port, 4)
    s = connect(splitter.port)
    ended = threading.Event()

    def keep_sending():
        try:
            while True:
                s.sendall(b"z" * 65536)
        except OSError:
            ended.set()

    threading.Thread(target=keep_sending, daemon=True).start()
    assert ended.wait(15)
    s.close()
    assert wait_for(lambda: not splitter._live and not joiner._live)


def test_the_loss_bound_is_per_flow_and_the_bandwidth_shared():
    """Direction.schedule, by hand: 1 Gbit/s, 35 ms each way, 1e-4 loss (Mathis: 2.52 MB/s per flow). Four flows
    each get the bound; a fifth connection on the same clock cannot push the whole past the bandwidth."""
    p = LinkParams(1000, latency_ms=35, loss=1e-4)
    d = Direction("f", p)
    d.peer = Direction("b", p)
    mathis = MSS * 1.22 / (0.070 * math.sqrt(1e-4))
    assert d.rate_bytes_per_s(p) == pytest.approx(mathis)
    assert d.rate_bytes_per_s(p, 4) == pytest.approx(4 * mathis)
    assert d.rate_bytes_per_s(p, 1000) == pytest.approx(125e6)
    rng = random.Random(0)
    rng.random = lambda: 1.0  # never a lost segment: only the rate caps, the times exact
    flows = [Flow() for _ in range(4)]
    ends = [d.schedule(1_000_000, 0.0, rng, f)[0] for f in flows]
    for end in ends:  # each flow at its own bound: 1 MB / 2.52 MB/s + 35 ms, whatever the others do
        assert end == pytest.approx(1_000_000 / mathis + 0.035)
    # the shared clock moved by 4 MB at the bandwidth only
    assert d.busy_until == pytest.approx(4_000_000 / 125e6)
    # without a flow (the simulator): one clock at `flows` flows together
    sim = Direction("s", p, flows=4)
    sim.peer = Direction("b", p)
    assert sim.schedule(4_000_000, 0.0, rng)[0] == pytest.approx(4_000_000 / (4 * mathis) + 0.035)


def test_link_process_with_streams_counts_its_flows_and_stops_cleanly(servers, tmp_path):
    sink = servers(SinkServer)
    proc, port = _spawn_link(sink.port, tmp_path, "--streams", "3", "--loss", "0.001")
    try:
        s = connect(port)
        _, sha = push(s, 500_000)
        assert sink.done.wait(30)
        s.close()
        assert sink.sha.hexdigest() == sha and sink.nbytes == 500_000
        time.sleep(0.7)  # a stats write
        proc.send_signal(signal.SIGTERM)
        assert _exits_cleanly(proc, tmp_path) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    st = json.loads((tmp_path / "stats.json").read_text())
    assert st["streams"] == 3 and st["connections"] == 3  # the emulated WAN carried three flows
    assert st["listen"] == f"127.0.0.1:{port}" and st["target"] == f"127.0.0.1:{sink.port}"
    assert 500_000 < st["bytes_forward"] < 500_000 + 3 * 12 * 8 + 3 * 24


def test_link_process_refuses_streams_out_of_range(tmp_path):
    import subprocess
    import sys

    for bad in ("0", "65"):
        r = subprocess.run([sys.executable, "-m", "geotrain.cli", "link", "--target", "127.0.0.1:9", "--bandwidth",
                            "10mbit", "--streams", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--streams must be 1..64" in r.stderr and "Traceback" not in r.stderr
