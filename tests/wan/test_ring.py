"""Tests of the ring all-reduce among site leaders (geotrain.wan.ring): exactness, identical bits on every
peer, bytes on the WAN links, corruption, dead peers, hierarchical grouping and reduction."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress

import pytest
import torch

from geotrain.errors import GeotrainError, LinkError, TransferCorrupt
from geotrain.wan.link import LinkParams, LinkProxy
from geotrain.wan.ring import (
    HEADER_BYTES,
    HELLO_BYTES,
    PIECE,
    RingPeer,
    hierarchical_all_reduce,
    hierarchical_groups,
    ring_all_reduce_bytes,
)

LOOP = "127.0.0.1"


# -- helpers -----------------------------------------------------------------------------------

def _threads(fns: list, timeout: float = 20.0) -> tuple[list, list]:
    """Run ``fns`` concurrently; return (results, exceptions) in order."""
    results: list = [None] * len(fns)
    errors: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a ring peer hung"
    return results, errors


def make_ring(world: int, timeout_s: float = 10.0, edge=None) -> list[RingPeer]:
    """``world`` connected peers on loopback. ``edge(i, successor_port) -> address`` puts something
    (a link emulator) between peer i and peer i+1."""
    peers = [RingPeer(i, world, timeout_s=timeout_s) for i in range(world)]
    ports = [p.start() for p in peers]
    addrs = [(LOOP, ports[(i + 1) % world]) if edge is None else edge(i, ports[(i + 1) % world])
             for i in range(world)]
    _, errors = _threads([lambda p=p, a=a: p.connect(a) for p, a in zip(peers, addrs)])
    assert errors == [None] * world, errors
    return peers


def all_reduce(peers: list[RingPeer], xs: list[torch.Tensor], op: str = "mean", round: int = 0):
    return _threads([lambda p=p, x=x: p.all_reduce(x, op=op, round=round) for p, x in zip(peers, xs)])


def close_all(*groups) -> None:
    for g in groups:
        for p in g:
            p.close()


def reference(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    total = torch.stack([x.double() for x in xs]).sum(0)
    return total / len(xs) if op == "mean" else total


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6 * max(scale, 1e-30))


class Tamper:
    """A one-connection TCP forwarder that flips the byte at stream offset ``flip_at`` of the forward
    (client -> target) direction; everything else passes through unchanged."""

    def __init__(self, target: tuple[str, int], flip_at: int) -> None:
        self.target, self.flip_at = target, flip_at
        self.sock = socket.socket()
        self.sock.bind((LOOP, 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.socks: list[socket.socket] = [self.sock]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):
            client, _ = self.sock.accept()
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, self.flip_at), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, flip_at: int | None) -> None:
        seen = 0
        with suppress(OSError):
            while data := src.recv(65536):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    b = bytearray(data)
                    b[flip_at - seen] ^= 0x40
                    data = bytes(b)
                seen += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("numel", [1000, 100_003, 7])
@pytest.mark.parametrize("op", ["mean", "sum"])
def test_all_reduce_matches_float64_and_is_bitwise_identical(world, numel, op):
    g = torch.Generator().manual_seed(world * 1000 + numel)
    xs = [torch.randn(numel, generator=g) * (i + 1) for i in range(world)]
    originals = [x.clone() for x in xs]
    peers = make_ring(world)
    try:
        outs, errors = all_reduce(peers, xs, op=op, round=5)
        assert errors == [None] * world
        for o in outs:
            assert torch.equal(o, outs[0])              # identical bits on every peer
        assert_close(outs[0], reference(xs, op))
        assert all(torch.equal(x, o) for x, o in zip(xs, originals))   # inputs untouched
        for i, p in enumerate(peers):
            assert p.bytes_sent == ring_all_reduce_bytes(numel, world, rank=i)
            assert p.bytes_received == ring_all_reduce_bytes(numel, world, rank=(i - 1) % world)
    finally:
        close_all(peers)


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("numel", [0, 1, 2])
def test_tiny_vectors_fewer_elements_than_peers(world, numel):
    xs = [torch.full((numel,), float(i + 1)) for i in range(world)]
    peers = make_ring(world)
    try:
        outs, errors = all_reduce(peers, xs, op="sum")
        assert errors == [None] * world
        expected = torch.full((numel,), float(sum(range(1, world + 1))))
        assert all(torch.equal(o, expected) for o in outs)
    finally:
        close_all(peers)


def test_many_rounds_on_one_ring_and_world_of_one():
    peers = make_ring(3)
    try:
        for rnd in range(5):
            xs = [torch.randn(5000) for _ in range(3)]
            outs, errors = all_reduce(peers, xs, round=rnd)
            assert errors == [None] * 3 and all(torch.equal(o, outs[0]) for o in outs)
            assert_close(outs[0], reference(xs, "mean"))
    finally:
        close_all(peers)
    solo = RingPeer(0, 1)
    solo.connect(("unused", 1))
    x = torch.randn(10)
    out = solo.all_reduce(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    solo.close()


def test_large_chunks_do_not_deadlock():
    """8 MB per peer: chunks far larger than the socket buffers (send and receive must overlap)."""
    xs = [torch.randn(2_000_000) for _ in range(4)]
    peers = make_ring(4)
    try:
        outs, errors = all_reduce(peers, xs)
        assert errors == [None] * 4 and all(torch.equal(o, outs[0]) for o in outs)
        assert_close(outs[0], reference(xs, "mean"))
        assert [p.bytes_sent for p in peers] == [ring_all_reduce_bytes(2_000_000, 4, rank=i) for i in range(4)]
    finally:
        close_all(peers)


def test_broadcast_from_any_root():
    peers = make_ring(3)
    try:
        x = torch.randn(600_001)     # three broadcast frames
        outs, errors = _threads([lambda p=p: p.broadcast(x if p.rank == 1 else torch.zeros_like(x), root=1, round=2)
                                 for p in peers])
        assert errors == [None] * 3 and all(torch.equal(o, x) for o in outs)
    finally:
        close_all(peers)


def test_bad_arguments():
    with pytest.raises(ValueError):
        RingPeer(3, 3)
    with pytest.raises(ValueError):
        RingPeer(0, 0)
    p = RingPeer(0, 2)
    with pytest.raises(ValueError):
        p.all_reduce(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        p.all_reduce(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        p.all_reduce(torch.zeros(3), op="max")
    with pytest.raises(LinkError, match="not connected"):
        p.all_reduce(torch.zeros(3))
    p.close()


# -- through link emulators ----------------------------------------------------------------------

def test_through_link_proxies_bytes_per_edge():
    world, numel = 3, 100_003
    proxies: list[LinkProxy] = []

    def edge(i: int, succ_port: int) -> tuple[str, int]:
        lp = LinkProxy(f"ring{i}->{(i + 1) % world}", (LOOP, succ_port), LinkParams(bandwidth_mbps=400, latency_ms=2))
        proxies.append(lp)
        return (LOOP, lp.start())

    xs = [torch.randn(numel) for _ in range(world)]
    direct = make_ring(world)
    linked = make_ring(world, edge=edge)
    try:
        want, errors = all_reduce(direct, xs)
        assert errors == [None] * world
        outs, errors = all_reduce(linked, xs)
        assert errors == [None] * world
        assert all(torch.equal(o, want[0]) for o in outs)       # same bits with or without the links
        for i, lp in enumerate(proxies):
            expect = ring_all_reduce_bytes(numel, world, rank=i) + HELLO_BYTES
            deadline = time.monotonic() + 2.0       # the proxy counts a chunk just after delivering it
            while lp.stats()["bytes_forward"] != expect and time.monotonic() < deadline:
                time.sleep(0.01)
            st = lp.stats()
            assert st["bytes_forward"] == expect
            nominal = 2 * (world - 1) / world * numel * 4
            assert nominal <= st["bytes_forward"] <= nominal + 2 * (world - 1) * HEADER_BYTES + HELLO_BYTES + 8
            assert st["connections"] == 1
    finally:
        close_all(direct, linked)
        for lp in proxies:
            lp.stop()


def test_connect_retries_until_the_successor_listens_behind_a_link():
    """A link emulator whose target is not up yet closes our connection; connect() retries."""
    a, b = RingPeer(0, 2, timeout_s=10), RingPeer(1, 2, timeout_s=10)
    pa = a.start()
    # b's port is not known yet: reserve one, free it, and start b on it later
    s = socket.socket()
    s.bind((LOOP, 0))
    pb = s.getsockname()[1]
    s.close()
    b.listen = (LOOP, pb)
    lp = LinkProxy("a->b", (LOOP, pb), LinkParams(bandwidth_mbps=100))
    port = lp.start()
    try:
        t = threading.Thread(target=a.connect, args=((LOOP, port),), daemon=True)
        t.start()
        time.sleep(0.5)
        b.start()
        b.connect((LOOP, pa))
        t.join(10)
        assert not t.is_alive()
        outs, errors = all_reduce([a, b], [torch.ones(10), torch.ones(10) * 3], op="sum")
        assert errors == [None, None] and all(torch.equal(o, torch.full((10,), 4.0)) for o in outs)
        assert lp.stats()["connect_errors"] >= 1
    finally:
        close_all([a, b])
        lp.stop()


# -- corruption and mismatches ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["payload", "header"])
def test_byte_flipped_in_transit_raises_transfer_corrupt(where):
    world = 3
    tampers: list[Tamper] = []
    # edge 0 -> 1: the stream starts with the hello, then the first frame's header, then its payload
    flip_at = HELLO_BYTES + (HEADER_BYTES + 100 if where == "payload" else 20)

    def edge(i: int, succ_port: int) -> tuple[str, int]:
        if i != 0:
            return (LOOP, succ_port)
        t = Tamper((LOOP, succ_port), flip_at)
        tampers.append(t)
        return (LOOP, t.port)

    peers = make_ring(world, timeout_s=30, edge=edge)
    try:
        t0 = time.monotonic()
        _, errors = all_reduce(peers, [torch.randn(3000) for _ in range(world)], round=7)
        assert time.monotonic() - t0 < 10.0         # the others fail fast, not at their 30 s timeout
        assert isinstance(errors[1], TransferCorrupt)
        msg = str(errors[1])
        assert "ring peer 1/3" in msg and "predecessor rank 0" in msg and "round 7" in msg and "step 0" in msg
        assert ("crc32" in msg) and (("header" in msg) == (where == "header"))
        assert all(isinstance(e, GeotrainError) for e in errors)      # everyone fails, nobody hangs
        with pytest.raises(LinkError, match="unusable"):
            peers[1].all_reduce(torch.zeros(3000))
    finally:
        close_all(peers)
        for t in tampers:
            t.close()


def test_round_and_size_mismatch_raise_transfer_corrupt():
    # Whoever reads the other's first frame raises TransferCorrupt and closes its connections; the other
    # raises TransferCorrupt too, or LinkError when the close reaches it before the bad frame does.
    peers = make_ring(2, timeout_s=5)
    try:
        _, errors = _threads([lambda: peers[0].all_reduce(torch.zeros(100), round=3),
                              lambda: peers[1].all_reduce(torch.zeros(100), round=4)])
        assert all(isinstance(e, (TransferCorrupt, LinkError)) for e in errors)
        corrupt = [(i, e) for i, e in enumerate(errors) if isinstance(e, TransferCorrupt)]
        assert corrupt
        for i, e in corrupt:
            assert f"round {3 + i} step 0" in str(e) and f"predecessor is at round {4 - i}" in str(e)
    finally:
        close_all(peers)
    peers = make_ring(2, timeout_s=5)
    try:
        _, errors = _threads([lambda: peers[0].all_reduce(torch.zeros(100)),
                              lambda: peers[1].all_reduce(torch.zeros(101))])
        assert all(isinstance(e, (TransferCorrupt, LinkError)) for e in errors)
        corrupt = [(i, e) for i, e in enumerate(errors) if isinstance(e, TransferCorrupt)]
        assert corrupt
        for i, e in corrupt:
            mine, theirs = (100, 101) if i == 0 else (101, 100)
            assert f"vector of {theirs} elements, this peer {mine}" in str(e)
    finally:
        close_all(peers)


# -- dead peers ------------------------------------------------------------------------------

def test_peer_that_dies_fails_the_others_fast():
    peers = make_ring(3, timeout_s=30)
    try:
        peers[2].close()                        # "dies": its connections close
        t0 = time.monotonic()
        _, errors = _threads([lambda p=p: p.all_reduce(torch.randn(50_000)) for p in peers[:2]])
        assert time.monotonic() - t0 < 10.0     # at once, not at the 30 s timeout
        assert all(isinstance(e, LinkError) for e in errors)
        # whichever failure comes first is on a link to rank 2 (rank 0 hears its predecessor close, or
        # rank 1's send to it fails); the other survivor may then fail on the link to that first one
        # (CI saw rank 0's send to rank 1 fail first), so only the first cause is certain to name rank 2
        assert any(names_rank_2(e) for e in errors), errors
    finally:
        close_all(peers)


def test_silent_peer_times_out():
    peers = make_ring(3, timeout_s=1.0)
    try:
        t0 = time.monotonic()                   # peer 2 is alive but never takes part
        _, errors = _threads([lambda p=p: p.all_reduce(torch.randn(1000), round=9) for p in peers[:2]])
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 8.0
        assert all(isinstance(e, LinkError) for e in errors)
        msg = str(errors[0])
        assert "predecessor rank 2" in msg and "sent nothing for 1s" in msg and "round 9" in msg
    finally:
        close_all(peers)


def test_blackholed_link_times_out():
    proxies: list[LinkProxy] = []

    def edge(i: int, succ_port: int) -> tuple[str, int]:
        lp = LinkProxy(f"e{i}", (LOOP, succ_port), LinkParams(bandwidth_mbps=1000))
        proxies.append(lp)
        return (LOOP, lp.start())

    peers = make_ring(2, timeout_s=1.0, edge=edge)
    try:
        proxies[0].blackhole()
        t0 = time.monotonic()
        _, errors = all_reduce(peers, [torch.randn(1000) for _ in range(2)])
        assert 0.9 <= time.monotonic() - t0 < 8.0
        assert all(isinstance(e, LinkError) for e in errors)
        assert "predecessor rank 0" in str(errors[1]) and "sent nothing" in str(errors[1])
    finally:
        close_all(peers)
        for lp in proxies:
            lp.stop()


def test_connect_to_missing_successor_times_out():
    s = socket.socket()
    s.bind((LOOP, 0))
    dead_port = s.getsockname()[1]
    s.close()
    p = RingPeer(0, 2, timeout_s=0.8)
    p.start()
    t0 = time.monotonic()
    with pytest.raises(LinkError, match=rf"successor rank 1 at 127.0.0.1:{dead_port} within 0.8s"):
        p.connect((LOOP, dead_port))
    assert time.monotonic() - t0 < 6.0
    p.close()


def test_wrong_ring_size_is_refused():
    a, b = RingPeer(0, 2, timeout_s=2), RingPeer(1, 3, timeout_s=2)
    pa, pb = a.start(), b.start()
    _, errors = _threads([lambda: a.connect((LOOP, pb)), lambda: b.connect((LOOP, pa))])
    assert all(isinstance(e, LinkError) for e in errors)
    assert "ring of 3" in str(errors[0])
    close_all([a, b])


# -- bytes formula ---------------------------------------------------------------------------

def test_ring_all_reduce_bytes():
    assert ring_all_reduce_bytes(1000, 1) == 0
    assert ring_all_reduce_bytes(1000, 4) == 2 * 3 * HEADER_BYTES + 6000
    for world in (2, 3, 4, 5):
        for numel in (0, 1, 7, 1001):
            per_rank = [ring_all_reduce_bytes(numel, world, rank=r) for r in range(world)]
            assert sum(per_rank) == world * 2 * (world - 1) * HEADER_BYTES + 2 * (world - 1) * numel * 4
            assert max(per_rank) - min(per_rank) <= 8
    assert ring_all_reduce_bytes(10, 2, itemsize=2) == 2 * HEADER_BYTES + 20
    # large chunks travel as pieces of PIECE elements, one header each: 250,000 = 3 * 65,536 + 53,392
    assert PIECE == 65536
    assert ring_all_reduce_bytes(1_000_000, 4) == 2 * 3 * 250_000 * 4 + 2 * 3 * 4 * HEADER_BYTES


# -- hierarchical ----------------------------------------------------------------------------

def test_hierarchical_groups():
    regions = {"us-east": "us", "eu-west": "eu", "us-west": "us", "ap-south": "ap", "eu-north": "eu"}
    assert hierarchical_groups(regions) == [["us-east", "us-west"], ["eu-west", "eu-north"], ["ap-south"]]
    assert hierarchical_groups({}) == []
    assert hierarchical_groups({"a": "r"}) == [["a"]]
    with pytest.raises(ValueError):
        hierarchical_groups({"a": ""})
    with pytest.raises(TypeError):
        hierarchical_groups([("a", "r")])


def make_hierarchy(groups: list[list[str]]):
    """A ring per region of more than one site, and a ring of the regions' first sites."""
    local: dict[str, RingPeer | None] = {}
    rings = []
    for group in groups:
        if len(group) > 1:
            ring = make_ring(len(group))
            rings.append(ring)
            local.update(zip(group, ring))
        else:
            local[group[0]] = None
    leader_ring = make_ring(len(groups))
    rings.append(leader_ring)
    return local, {grp[0]: leader_ring[i] for i, grp in enumerate(groups)}, rings


def test_hierarchical_all_reduce_identical_everywhere():
    regions = {"us1": "us", "eu1": "eu", "us2": "us", "ap1": "ap", "eu2": "eu", "us3": "us"}
    groups = hierarchical_groups(regions)
    sites = list(regions)
    local, leaders, rings = make_hierarchy(groups)
    g = torch.Generator().manual_seed(1)
    xs = {s: torch.randn(10_001, generator=g) for s in sites}
    try:
        outs, errors = _threads([lambda s=s: hierarchical_all_reduce(xs[s], local=local[s], leaders=leaders.get(s),
                                                                     world=len(sites), op="mean", round=1)
                                 for s in sites])
        assert errors == [None] * len(sites)
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert_close(outs[0], reference(list(xs.values()), "mean"))
    finally:
        close_all(*rings)


# -- compressed pieces -----------------------------------------------------------------------

@pytest.mark.parametrize("codec,rel", [("int8", 0.02), ("int4", 0.3), ("bf16", 0.006), ("fp16", 0.001)])
@pytest.mark.parametrize("world,numel", [(2, 1000), (4, 150_007), (3, 2)])
def test_compressed_all_reduce_is_identical_everywhere_close_and_small(codec, rel, world, numel):
    """Every piece travels encoded; partial sums are re-encoded at each hop, finished chunks are
    encoded once by their owner and passed on as bytes: every peer ends with the same bits, near
    the exact mean, having sent the codec's share of the fp32 bytes."""
    from geotrain.wire.compress import wire_bytes

    g = torch.Generator().manual_seed(world + numel)
    xs = [torch.randn(numel, generator=g) * (i + 1) for i in range(world)]
    peers = make_ring(world)
    try:
        outs, errors = _threads([lambda p=p, x=x: p.all_reduce(x, op="mean", round=2, codec=codec)
                                 for p, x in zip(peers, xs)])
        assert errors == [None] * world
        assert all(torch.equal(o, outs[0]) for o in outs)
        ref = reference(xs, "mean")
        err = (outs[0].double() - ref).norm() / ref.norm()
        assert err < rel, err
        if numel >= 1000:  # the codec's share of what fp32 would send (and a header per piece)
            fp32_payload = 2 * (world - 1) / world * numel * 4
            headers = 2 * (world - 1) * (numel // (world * PIECE) + 2) * HEADER_BYTES
            sent = sum(p.bytes_sent for p in peers) / world
            assert sent <= 1.05 * fp32_payload * wire_bytes(numel, codec) / (4 * numel) + headers, sent
    finally:
        close_all(peers)


def test_compressed_all_reduce_differs_from_fp32_so_the_check_can_fail():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5000, generator=g) for _ in range(2)]
    peers = make_ring(2)
    try:
        plain, _ = all_reduce(peers, xs, op="mean", round=0)
        packed, errors = _threads([lambda p=p, x=x: p.all_reduce(x, op="mean", round=1, codec="int8")
                                   for p, x in zip(peers, xs)])
        assert errors == [None, None]
        assert not torch.equal(plain[0], packed[0])
        with pytest.raises(Exception, match="codec"):
            peers[0].all_reduce(xs[0], codec="zip")
    finally:
        close_all(peers)


def test_compressed_hierarchical_all_reduce_identical_everywhere():
    regions = {"us1": "us", "eu1": "eu", "us2": "us", "eu2": "eu"}
    groups = hierarchical_groups(regions)
    local, leaders, rings = make_hierarchy(groups)
    g = torch.Generator().manual_seed(2)
    xs = {s: torch.randn(20_001, generator=g) for s in regions}
    try:
        outs, errors = _threads([lambda s=s: hierarchical_all_reduce(xs[s], local=local[s], leaders=leaders.get(s),
                                                                     world=4, op="mean", round=1, codec="int8")
                                 for s in regions])
        assert errors == [None] * 4
        assert all(torch.equal(o, outs[0]) for o in outs)
        ref = reference(list(xs.values()), "mean")
        assert (outs[0].double() - ref).norm() / ref.norm() < 0.03
    finally:
        close_all(*rings)


def names_rank_2(err: BaseException) -> bool:
    """The error of a survivor of a 3-ring whose rank 2 died names it rightly (test_ring_tls uses it too)."""
    msg = str(err)
    if "predecessor rank 2" in msg:
        return "closed the connection" in msg
    return "successor rank 2" in msg and "failed" in msg
