"""Nothing a run starts listens beyond the interface it was configured for (loopback, for a one-host run):
the coordinator (coordinator.host), its Prometheus endpoint, etcd, the link emulators, the ring peers,
and a site's process group (a rendezvous file and gloo on ``lo``, not torch's TCPStore on every interface).

Listening sockets are read from /proc/net/tcp and /proc/net/tcp6 and matched to processes by their
socket inodes in /proc/<pid>/fd (no psutil needed)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, started_pids

LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    inode: int


def _ip(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp*: the address as 32-bit words in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listeners() -> list[Listener]:
    """Every listening TCP socket of this host (network namespace)."""
    out = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != LISTEN:
                continue
            addr, port = f[1].split(":")
            out.append(Listener(_ip(addr), int(port, 16), int(f[9])))
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listeners_of(pids: dict[str, int]) -> dict[str, set[tuple[str, int]]]:
    """name -> the (address, port) its process listens on, now."""
    by_inode = {entry.inode: entry for entry in listeners()}
    out: dict[str, set[tuple[str, int]]] = {}
    for name, pid in pids.items():
        for inode in socket_inodes(pid):
            if inode in by_inode:
                out.setdefault(name, set()).add((by_inode[inode].address, by_inode[inode].port))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)      # ::ffff:127.0.0.1 (gRPC listens on a tcp6 socket)
    return (mapped or ip).is_loopback


def wide(seen: dict[str, set[tuple[str, int]]]) -> dict[str, set[tuple[str, int]]]:
    """The listeners that are not on loopback (a wildcard 0.0.0.0 / ::, or a real interface)."""
    out = {}
    for name, addrs in seen.items():
        bad = {(a, p) for a, p in addrs if not is_loopback(a)}
        if bad:
            out[name] = bad
    return out


# -- the checker can fail ------------------------------------------------------------------------

def test_wide_flags_wildcards_and_interfaces_not_loopback():
    seen = {"coordinator": {("127.0.0.1", 5000)}, "worker a/0": {("0.0.0.0", 29500), ("127.0.0.1", 4000)},
            "etcd": {("::", 2379)}, "link": {("::1", 7000)}, "other": {("10.1.2.3", 80)},
            "grpc": {("::ffff:127.0.0.1", 6000)}, "mapped": {("::ffff:10.0.0.1", 6001)}}
    assert wide(seen) == {"worker a/0": {("0.0.0.0", 29500)}, "etcd": {("::", 2379)}, "other": {("10.1.2.3", 80)},
                          "mapped": {("::ffff:10.0.0.1", 6001)}}


def test_the_scanner_sees_this_process_listen_on_a_wildcard():
    with socket.socket() as anyif, socket.socket() as loop:
        anyif.bind(("0.0.0.0", 0))
        anyif.listen()
        loop.bind(("127.0.0.1", 0))
        loop.listen()
        seen = listeners_of({"me": os.getpid()})
        assert ("0.0.0.0", anyif.getsockname()[1]) in seen["me"]
        assert ("127.0.0.1", loop.getsockname()[1]) in seen["me"]
        assert wide(seen) == {"me": {("0.0.0.0", anyif.getsockname()[1])}}


# -- a real run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_with_two_worker_sites_and_rings_listens_on_loopback_only(tmp_path):
    """The demo (two sites of two workers) with ring merges and TLS on: sample every process's listeners
    while it runs; every one is on loopback, and the workers' process groups were seen listening."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "geotrain.cli", "launch", str(REPO / "topologies" / "demo.yaml"), "--run-dir",
            str(run_dir), "--quiet", "--set", "training.rounds=3", "--set", "training.merge=ring"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen: dict[str, set[tuple[str, int]]] = {}
    try:
        while proc.poll() is None:
            pids = started_pids(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
            for name, addrs in listeners_of({"launcher": proc.pid, **pids}).items():
                seen.setdefault(name, set()).update(addrs)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, err
    roles = {name.split(" ")[0] for name in seen}
    assert {"coordinator", "etcd", "worker", "link"} <= roles, seen
    followers = [n for n in seen if n.startswith("worker ") and n.endswith("/1")]
    assert followers, seen      # gloo's pair listeners of rank 1: the process group was sampled
    assert wide(seen) == {}, wide(seen)
