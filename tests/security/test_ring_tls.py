"""Mutual TLS on the leaders' ring edges (geotrain.wan.ring with ``tls``): the same bits as plaintext,
through a real link emulator too, and a caller without the predecessor's certificate refused."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest
import torch

from geotrain.errors import LinkError
from geotrain.security.pki import TlsFiles, init_certs, site_name
from geotrain.wan.link import LinkParams, LinkProxy
from geotrain.wan.ring import HELLO_BYTES, RingPeer, hierarchical_all_reduce, ring_all_reduce_bytes
from geotrain.wan.ring_wire import HELLO, HELLO_MAGIC, PROTOCOL

LOOP = "127.0.0.1"
SITES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("certs"), SITES, run="ring-tls")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second CA with certificates of the same names: not the run's."""
    return init_certs(tmp_path_factory.mktemp("other"), SITES, run="someone-else")


def _threads(fns: list, timeout: float = 30.0) -> tuple[list, list]:
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


def tls_peer(certs, sites: list[str], i: int, timeout_s: float = 10.0, files: TlsFiles | None = None) -> RingPeer:
    w = len(sites)
    return RingPeer(i, w, timeout_s=timeout_s, tls=files or certs.files(site_name(sites[i])),
                    expect_predecessor=site_name(sites[(i - 1) % w]), expect_successor=site_name(sites[(i + 1) % w]))


def make_ring(peers: list[RingPeer], edge=None) -> list[RingPeer]:
    w = len(peers)
    ports = [p.start() for p in peers]
    addrs = [(LOOP, ports[(i + 1) % w]) if edge is None else edge(i, ports[(i + 1) % w]) for i in range(w)]
    _, errors = _threads([lambda p=p, a=a: p.connect(a) for p, a in zip(peers, addrs)])
    assert errors == [None] * w, errors
    return peers


def close_all(*groups) -> None:
    for g in groups:
        for p in g:
            p.close()


# -- the same result ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mean", "sum"])
@pytest.mark.parametrize("numel", [7, 100_003, 700_001])
def test_tls_ring_gives_the_bits_of_the_plaintext_ring(certs, op, numel):
    sites = SITES[:3]
    xs = [torch.randn(numel) for _ in sites]
    plain = make_ring([RingPeer(i, 3, timeout_s=10) for i in range(3)])
    tls = make_ring([tls_peer(certs, sites, i) for i in range(3)])
    try:
        want, errors = _threads([lambda p=p, x=x: p.all_reduce(x, op=op, round=4) for p, x in zip(plain, xs)])
        assert errors == [None] * 3
        got, errors = _threads([lambda p=p, x=x: p.all_reduce(x, op=op, round=4) for p, x in zip(tls, xs)])
        assert errors == [None] * 3, errors
        assert all(torch.equal(g, want[0]) for g in got)
        for i, p in enumerate(tls):   # what goes into TLS is counted, as in plaintext
            assert p.bytes_sent == plain[i].bytes_sent == ring_all_reduce_bytes(numel, 3, rank=i)
            assert p.bytes_received == plain[i].bytes_received
            assert isinstance(p._send_sock, ssl.SSLSocket) and isinstance(p._recv_sock, ssl.SSLSocket)
    finally:
        close_all(plain, tls)


def test_tls_hierarchical_and_broadcast_identical_everywhere(certs):
    """Two regions of two sites: region rings and the leaders' ring, every edge over TLS."""
    x = [torch.randn(50_001) for _ in SITES]
    eu = make_ring([tls_peer(certs, ["a", "b"], i) for i in range(2)])
    us = make_ring([tls_peer(certs, ["c", "d"], i) for i in range(2)])
    leaders = make_ring([tls_peer(certs, ["a", "c"], i) for i in range(2)])
    try:
        local = [eu[0], eu[1], us[0], us[1]]
        lead = [leaders[0], None, leaders[1], None]
        outs, errors = _threads([lambda i=i: hierarchical_all_reduce(x[i], local=local[i], leaders=lead[i], world=4)
                                 for i in range(4)])
        assert errors == [None] * 4, errors
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert torch.allclose(outs[0], torch.stack(x).mean(0), atol=1e-6)
    finally:
        close_all(eu, us, leaders)


# -- refused callers ---------------------------------------------------------------------------

def victim_and_successor(certs, timeout_s: float = 2.0):
    """Peer 1 of the ring a -> b (``victim`` is b): its successor a is real and accepts it, but a's own
    dial goes nowhere, so the only caller b sees is the one a test makes."""
    victim = tls_peer(certs, ["a", "b"], 1, timeout_s=timeout_s)
    a = tls_peer(certs, ["a", "b"], 0, timeout_s=timeout_s)
    return victim, a


def connect_victim(victim: RingPeer, a: RingPeer, caller) -> tuple[BaseException | None, object]:
    """Run victim.connect (its successor is a) while a dials a dead port and ``caller(victim_port)`` calls
    the victim; return (the victim's error, what the caller returned or raised)."""
    vport, aport = victim.start(), a.start()
    dead = socket.socket()
    dead.bind((LOOP, 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    results, errors = _threads([lambda: victim.connect((LOOP, aport)), lambda: a.connect((LOOP, dead_port)),
                                lambda: caller(vport)])
    return errors[0], (errors[2] or results[2])


def test_a_caller_without_a_certificate_is_dropped_and_named(certs):
    victim, a = victim_and_successor(certs)

    def no_cert(port: int):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(certs.path / "ca.pem"))     # trusts the run, has no certificate
        with socket.create_connection((LOOP, port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=site_name("b")) as s:
                hello = HELLO.pack(HELLO_MAGIC, PROTOCOL, 0, 2, 0)
                s.sendall(hello)
                try:
                    return s.recv(12)     # the server's alert, or EOF: never an ACK
                except ssl.SSLError as exc:
                    return exc

    try:
        err, answer = connect_victim(victim, a, no_cert)
        assert isinstance(err, LinkError)
        msg = str(err)
        assert "ring peer 1/2" in msg and "predecessor rank 0 did not connect" in msg
        assert "refused meanwhile" in msg and "TLS handshake failed" in msg and "CERTIFICATE" in msg.upper()
        assert answer == b"" or isinstance(answer, OSError), answer     # an alert, a reset or EOF: never an ACK
    finally:
        close_all([victim, a])


def test_a_plaintext_caller_is_dropped_and_named(certs):
    victim, a = victim_and_successor(certs)
    plain = RingPeer(0, 2, timeout_s=2.0)        # the same ring, without TLS

    def call(port: int):
        return plain.connect((LOOP, port))

    try:
        err, answer = connect_victim(victim, a, call)
        assert isinstance(err, LinkError) and "refused meanwhile" in str(err) and "TLS handshake failed" in str(err)
        assert isinstance(answer, LinkError) and "cannot connect to successor rank 1" in str(answer)
    finally:
        close_all([victim, a, plain])


def test_a_certificate_of_another_ca_is_refused_at_both_ends(certs, other_ca):
    victim, a = victim_and_successor(certs)
    o = other_ca.files(site_name("a"))
    # trusts the run's CA (so it gets as far as presenting its certificate), presents another CA's site.a
    forged = RingPeer(0, 2, timeout_s=2.0, tls=TlsFiles(ca=certs.path / "ca.pem", cert=o.cert, key=o.key, name=o.name),
                      expect_predecessor=site_name("b"), expect_successor=site_name("b"))
    try:
        err, answer = connect_victim(victim, a, lambda port: forged.connect((LOOP, port)))
        assert isinstance(err, LinkError) and "refused meanwhile" in str(err)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err)
        assert isinstance(answer, LinkError)
        assert "successor rank 1" in str(answer) and "refused this peer's certificate 'site.a'" in str(answer)
    finally:
        close_all([victim, a, forged])


def test_a_peer_of_another_ca_refuses_the_runs_successor(certs, other_ca):
    """The dialling end verifies too: a peer whose CA is another one does not take the run's b as b."""
    b = tls_peer(certs, ["a", "b"], 1, timeout_s=2.0)
    stranger = tls_peer(other_ca, ["a", "b"], 0, timeout_s=2.0)
    try:
        bport, sport = b.start(), stranger.start()
        _, errors = _threads([lambda: stranger.connect((LOOP, bport)), lambda: b.connect((LOOP, sport))])
        assert isinstance(errors[0], LinkError)
        assert re.search(r"successor rank 1 at 127.0.0.1:\d+ is not 'site.b'.*verif", str(errors[0])), errors[0]
        assert isinstance(errors[1], LinkError)     # and b does not take the stranger as its successor a either
    finally:
        close_all([b, stranger])


def test_another_sites_certificate_is_refused_at_once_naming_both(certs):
    victim, a = victim_and_successor(certs, timeout_s=10.0)
    # c holds a certificate of this run's CA, but b's predecessor is a
    c = RingPeer(0, 2, timeout_s=10.0, tls=certs.files(site_name("c")), expect_predecessor=site_name("b"),
                 expect_successor=site_name("b"))
    try:
        err, answer = connect_victim(victim, a, lambda port: c.connect((LOOP, port)))
        assert isinstance(err, LinkError)
        assert "presented the certificate of 'site.c', expected its predecessor rank 0 'site.a'; refused" in str(err)
        assert isinstance(answer, LinkError)
        assert "refused this peer's certificate 'site.c'" in str(answer) and "not the predecessor" in str(answer)
    finally:
        close_all([victim, a, c])


def test_a_successor_with_another_sites_certificate_is_refused(certs):
    """a dials what should be b; c answers (its certificate is the run's, its name is not b's)."""
    a = tls_peer(certs, ["a", "b"], 0, timeout_s=2.0)
    c = RingPeer(1, 2, timeout_s=2.0, tls=certs.files(site_name("c")), expect_predecessor=site_name("a"),
                 expect_successor=site_name("a"))
    try:
        port = c.start()
        a.start()
        results, errors = _threads([lambda: a.connect((LOOP, port)), lambda: c.connect((LOOP, 1))])
        assert isinstance(errors[0], LinkError)
        assert "is not 'site.b'" in str(errors[0]) and "mismatch" in str(errors[0]).lower()
    finally:
        close_all([a, c])


def test_tls_needs_the_neighbours_names_and_readable_files(certs, tmp_path):
    with pytest.raises(ValueError, match="expect_predecessor and expect_successor"):
        RingPeer(0, 2, tls=certs.files(site_name("a")))
    RingPeer(0, 1, tls=certs.files(site_name("a"))).close()    # a ring of one has no neighbours
    missing = TlsFiles(ca=certs.path / "ca.pem", cert=tmp_path / "nope.pem", key=tmp_path / "nope-key.pem",
                       name="site.a")
    p = RingPeer(0, 2, tls=missing, expect_predecessor="site.b", expect_successor="site.b")
    with pytest.raises(LinkError, match=r"ring peer 0/2: cannot load its certificate .*nope.pem"):
        p.start()
    p.close()


# -- through a real link emulator ----------------------------------------------------------------

def test_tls_through_link_emulators_same_bits_and_the_links_count_tls_records(certs):
    """The emulator forwards the encrypted bytes untouched: the ring's result is the plaintext ring's,
    and each link counts what TLS sent, i.e. the ring's bytes plus the handshake and per-record overhead."""
    sites, numel = SITES[:3], 300_007
    proxies: list[LinkProxy] = []

    def edge(i: int, succ_port: int) -> tuple[str, int]:
        lp = LinkProxy(f"ring{i}->{(i + 1) % 3}", (LOOP, succ_port), LinkParams(bandwidth_mbps=400, latency_ms=2))
        proxies.append(lp)
        return (LOOP, lp.start())

    xs = [torch.randn(numel) for _ in sites]
    plain = make_ring([RingPeer(i, 3, timeout_s=10) for i in range(3)])
    linked = make_ring([tls_peer(certs, sites, i) for i in range(3)], edge=edge)
    try:
        want, errors = _threads([lambda p=p, x=x: p.all_reduce(x) for p, x in zip(plain, xs)])
        assert errors == [None] * 3
        got, errors = _threads([lambda p=p, x=x: p.all_reduce(x) for p, x in zip(linked, xs)])
        assert errors == [None] * 3, errors
        assert all(torch.equal(g, want[0]) for g in got)
        for i, lp in enumerate(proxies):
            inner = ring_all_reduce_bytes(numel, 3, rank=i) + HELLO_BYTES
            assert linked[i].bytes_sent + HELLO_BYTES == inner
            deadline = time.monotonic() + 5.0       # the proxy counts a chunk just after delivering it
            while lp.stats()["bytes_forward"] <= inner and time.monotonic() < deadline:
                time.sleep(0.02)
            st = lp.stats()
            # TLS 1.3: the client's handshake (hello, certificate, verify, finished: ~1-2 KiB) and
            # 22 bytes per record of at most 16 KiB; frames are written one sendall each
            records = inner // 16384 + 4 * 2 * 3 + 8
            assert inner < st["bytes_forward"] <= inner + 4096 + 22 * records, (st["bytes_forward"], inner)
            assert st["bytes_backward"] > 0 and st["connections"] == 1
    finally:
        close_all(plain, linked)
        for lp in proxies:
            lp.stop()


# -- failures on a TLS edge ----------------------------------------------------------------------

def test_a_tls_peer_that_dies_fails_the_others_naming_it(certs):
    sites = SITES[:3]
    peers = make_ring([tls_peer(certs, sites, i, timeout_s=30) for i in range(3)])
    try:
        peers[2].close()
        _, errors = _threads([lambda p=p: p.all_reduce(torch.randn(50_000)) for p in peers[:2]])
        assert all(isinstance(e, LinkError) for e in errors), errors
        from tests.wan.test_ring import names_rank_2

        assert any(names_rank_2(e) for e in errors), errors  # why any, not the first: tests/wan/test_ring.py
    finally:
        close_all(peers)


def test_a_byte_flipped_on_a_tls_edge_fails_the_ring(certs):
    """TLS authenticates every record: a byte changed in transit never reaches the ring's own checks."""
    from tests.wan.test_ring import Tamper

    sites = SITES[:3]
    tampers: list[Tamper] = []

    def edge(i: int, succ_port: int) -> tuple[str, int]:
        if i != 0:
            return (LOOP, succ_port)
        t = Tamper((LOOP, succ_port), 4000)      # past the handshake: inside an application data record
        tampers.append(t)
        return (LOOP, t.port)

    peers = make_ring([tls_peer(certs, sites, i, timeout_s=30) for i in range(3)], edge=edge)
    try:
        _, errors = _threads([lambda p=p: p.all_reduce(torch.randn(30_000), round=2) for p in peers])
        assert all(isinstance(e, LinkError) for e in errors), errors
        assert "predecessor rank 0" in str(errors[1]) and "SSLError" in str(errors[1])
    finally:
        close_all(peers)
        for t in tampers:
            t.close()
