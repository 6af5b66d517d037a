"""geotrain.control.plane against real etcd server processes on ephemeral ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyetcd
import pytest

from geotrain.control.plane import ControlPlane, EtcdServer, find_etcd, parse_endpoint
from geotrain.errors import ControlPlaneError
from geotrain.run.procs import env_with, pid_alive, spawn

REPO = Path(__file__).resolve().parents[2]

try:
    find_etcd()
except ControlPlaneError:  # pragma: no cover - the image installs etcd
    pytest.skip("no etcd binary", allow_module_level=True)


def wait_for(pred, timeout_s: float, interval_s: float = 0.05):
    """Poll ``pred`` until it returns something truthy; return that, or the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    base = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(base / "data", log_path=base / "etcd.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cp(etcd):
    plane = ControlPlane(etcd.endpoint, run=f"t-{uuid.uuid4().hex[:8]}", timeout_s=2.0)
    yield plane
    plane.close()


class Events:
    """Collects watch callbacks; ``wait(n)`` blocks until n events arrived."""

    def __init__(self):
        self.items: list[tuple[str, str, dict | None]] = []
        self.cond = threading.Condition()

    def __call__(self, kind, key, value):
        with self.cond:
            self.items.append((kind, key, value))
            self.cond.notify_all()

    def wait(self, n: int, timeout_s: float = 5.0) -> list:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout=timeout_s)
            return list(self.items)


# ---------------------------------------------------------------------------- EtcdServer


def test_server_starts_serves_and_stops(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "etcd.log"
    with EtcdServer(data, log_path=log) as server:
        endpoint = server.endpoint
        assert endpoint.startswith("http://127.0.0.1:") and server.client_port > 0
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        assert server.process is not None and server.process.pid == pid
        plane = ControlPlane(endpoint, run="r1")
        plane.put_json("hello", {"a": 1})
        assert plane.get_json("hello") == {"a": 1}
        plane.close()
        assert (data / "member").is_dir(), "etcd did not use the data dir"
        assert log.stat().st_size > 0
    assert not pid_alive(pid), "etcd process survived stop()"
    assert server.process.returncode is not None
    server.stop()  # idempotent
    with pytest.raises(ControlPlaneError):
        ControlPlane(endpoint, run="r1", timeout_s=1.0).get_json("hello")


def test_server_start_failure_reports_log_tail(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("I am a file")
    server = EtcdServer(not_a_dir)
    with pytest.raises(ControlPlaneError) as info:
        server.start(timeout_s=10.0)
    msg = str(info.value)
    assert "log tail" in msg
    assert "not a directory" in msg  # etcd's own words, from its log
    assert server.process is not None and server.process.poll() is not None


def test_server_start_on_busy_port_fails_with_reason(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = EtcdServer(tmp_path / "data", client_port=port)
        t0 = time.monotonic()
        with pytest.raises(ControlPlaneError, match="address already in use"):
            server.start(timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert server.client_port == port  # an explicit port is never replaced


def test_parse_endpoint():
    assert parse_endpoint("http://10.0.0.1:2400") == ("10.0.0.1", 2400)
    assert parse_endpoint("etcd:2401") == ("etcd", 2401)
    assert parse_endpoint("etcd") == ("etcd", 2379)
    assert parse_endpoint("https://etcd:2379") == ("etcd", 2379)  # TLS: geotrain.control.access
    with pytest.raises(ControlPlaneError):
        parse_endpoint("ftp://etcd:2379")


# ---------------------------------------------------------------------------- registrations

CHILD = """
import sys, time
from geotrain.control.plane import ControlPlane
cp = ControlPlane(sys.argv[1], sys.argv[2])
cp.register_member("siteA", 3, {"host": "child"}, ttl_s=float(sys.argv[3]))
print("registered", flush=True)
time.sleep(120)
"""


def test_member_vanishes_after_its_process_is_killed(cp, etcd):
    ttl = 2.0
    child = spawn([sys.executable, "-c", CHILD, etcd.endpoint, cp.run, str(ttl)],
                  stdout=subprocess.PIPE, cwd=str(REPO),
                  env=env_with(PYTHONPATH=str(REPO)))
    try:
        assert child.stdout.readline().strip() == b"registered"
        assert cp.members() == {"siteA": {3: {"host": "child"}}}
        time.sleep(ttl)  # the child's keep-alive holds the member past its TTL
        assert "siteA" in cp.members()
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        gone = wait_for(lambda: cp.members() == {}, timeout_s=ttl + 2.0)
        elapsed = time.monotonic() - killed
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert gone, f"member still registered {elapsed:.1f} s after SIGKILL"
    assert elapsed > 0.3, "member went away at once: it was not the lease that removed it"


def test_registration_keeps_alive_and_close_removes_at_once(cp):
    reg = cp.register_member("siteB", 0, {"addr": "h:1"}, ttl_s=1.0)
    assert reg.alive
    time.sleep(2.5)  # > 2 TTLs: only the keep-alive thread keeps it
    assert cp.members() == {"siteB": {0: {"addr": "h:1"}}}
    assert reg.alive
    reg.close()
    assert cp.members() == {}
    assert not reg.alive
    reg.close()  # idempotent
    with cp.register("custom/key", {"x": 1}, ttl_s=5.0):
        assert cp.get_json("custom/key") == {"x": 1}
    assert cp.get_json("custom/key") is None


def test_lost_lease_is_recreated(cp, etcd):
    reg = cp.register_member("siteC", 1, {"n": 1}, ttl_s=1.5)
    host, port = parse_endpoint(etcd.endpoint)
    other = pyetcd.client(host, port, timeout=2)
    other.revoke_lease(reg.lease_id)  # as if it had expired
    other.close()
    assert cp.members() == {}
    assert wait_for(lambda: cp.members() == {"siteC": {1: {"n": 1}}}, timeout_s=3.0)
    assert reg.reregistrations == 1 and reg.alive
    reg.close()
    assert cp.members() == {}


def test_close_revokes_everything(etcd):
    plane = ControlPlane(etcd.endpoint, run=f"t-{uuid.uuid4().hex[:8]}")
    plane.register_member("s", 0, {}, ttl_s=30)
    events = Events()
    plane.watch_prefix("", events)
    observer = ControlPlane(etcd.endpoint, run=plane.run)
    assert observer.members() == {"s": {0: {}}}
    plane.close()
    assert observer.members() == {}
    observer.put_json("after", {})
    time.sleep(0.3)
    assert ("put", "after", {}) not in events.items
    with pytest.raises(ControlPlaneError):
        plane.get_state()
    observer.close()


# ---------------------------------------------------------------------------- plain keys


def test_state_round_trip_and_runs_are_separate(cp, etcd):
    assert cp.get_state() is None
    state = {"round": 7, "version": 3, "sites": ["a", "b"], "lr": 0.5}
    cp.put_state(state)
    assert cp.get_state() == state
    other = ControlPlane(etcd.endpoint, run=cp.run + "-other")
    assert other.get_state() is None
    other.close()
    assert cp.delete("state") and cp.get_state() is None


def test_coordinator_address_waits(cp):
    assert cp.coordinator_address() is None
    t0 = time.monotonic()
    assert cp.coordinator_address(wait_s=0.3) is None
    assert time.monotonic() - t0 >= 0.3

    regs = []
    timer = threading.Timer(0.5, lambda: regs.append(cp.set_coordinator("10.1.2.3:7000")))
    timer.start()
    t0 = time.monotonic()
    address = cp.coordinator_address(wait_s=5.0)
    waited = time.monotonic() - t0
    timer.join()
    assert address == "10.1.2.3:7000"
    assert 0.4 <= waited < 3.0
    first = cp.get_json("coordinator")
    assert first["pid"] == os.getpid() and first["epoch"] == regs[0].info["epoch"]
    regs[0].close()
    assert cp.coordinator_address() is None
    second = cp.set_coordinator("10.1.2.3:7001", {"note": "x"})
    assert second.info["epoch"] == first["epoch"] + 1 and second.info["note"] == "x"
    assert cp.coordinator_address() == "10.1.2.3:7001"
    second.close()


# ---------------------------------------------------------------------------- watches


def test_watch_prefix_sees_puts_and_deletes(cp):
    events = Events()
    cancel = cp.watch_prefix("members/", events)
    cp.put_json("state", {"round": 1})  # outside the prefix
    reg = cp.register_member("siteA", 0, {"addr": "a:1"}, ttl_s=5.0)
    reg.close()
    got = events.wait(2)
    assert got == [("put", "members/siteA/0", {"addr": "a:1"}),
                   ("delete", "members/siteA/0", None)]
    cancel()
    cp.put_json("members/siteA/1", {"late": True})
    time.sleep(0.3)
    assert len(events.items) == 2, "callback ran after cancel()"
    cancel()  # idempotent


# ---------------------------------------------------------------------------- etcd outages


def test_registration_and_watch_survive_etcd_restart(tmp_path):
    # the waits are bounds, not expectations: generous, so that a loaded machine (CI beside other work) passes
    data = tmp_path / "data"
    server = EtcdServer(data, log_path=tmp_path / "etcd.log")
    server.start()
    plane = ControlPlane(server.endpoint, run="outage", timeout_s=1.0)
    try:
        reg = plane.register_member("siteA", 0, {"addr": "a:1"}, ttl_s=1.5)
        events = Events()
        plane.watch_prefix("state", events)

        # 1. etcd goes away for longer than the TTL, then comes back on the same ports and data.
        server.stop()
        for _ in range(2):  # a raw pyetcd client refuses every call after the first failure
            with pytest.raises(ControlPlaneError, match="etcd at http://127.0.0.1:"):
                plane.get_state()
        assert wait_for(lambda: not reg.alive, timeout_s=10.0), "alive while etcd is down"
        server.start()
        assert wait_for(lambda: _members_or_none(plane) == {"siteA": {0: {"addr": "a:1"}}},
                        timeout_s=15.0)
        assert wait_for(lambda: reg.alive, timeout_s=10.0)
        time.sleep(3.0)  # two TTLs: the keep-alive thread is working again
        assert plane.members() == {"siteA": {0: {"addr": "a:1"}}}
        plane.put_state({"round": 2, "version": 1})
        assert events.wait(1, timeout_s=15.0) == [("put", "state", {"round": 2, "version": 1})]

        # 2. etcd comes back without its data (the lease is unknown): the key is put again.
        server.stop()
        shutil.rmtree(data)
        server.start()
        assert wait_for(lambda: _members_or_none(plane) == {"siteA": {0: {"addr": "a:1"}}},
                        timeout_s=15.0), "registration did not come back"
        assert reg.reregistrations >= 1
        reg.close()
        assert plane.members() == {}
    finally:
        plane.close()
        server.stop()


def _members_or_none(plane):
    try:
        return plane.members()
    except ControlPlaneError:
        return None


def test_unreachable_endpoint_raises_control_plane_error():
    port = free_port()  # nothing listens there
    plane = ControlPlane(f"127.0.0.1:{port}", run="r", timeout_s=1.0)
    for op in (plane.get_state, lambda: plane.put_state({"round": 0}), plane.members,
               lambda: plane.register_member("s", 0, {}), lambda: plane.watch_prefix("", print)):
        t0 = time.monotonic()
        with pytest.raises(ControlPlaneError) as info:
            op()
        assert time.monotonic() - t0 < 1.5
        assert f"etcd at http://127.0.0.1:{port}: " in str(info.value)
        assert "UNAVAILABLE" in str(info.value)
        assert info.value.__cause__ is not None
    t0 = time.monotonic()
    with pytest.raises(ControlPlaneError):
        plane.coordinator_address(wait_s=0.5)
    assert time.monotonic() - t0 >= 0.5
    plane.close()


def test_silent_endpoint_times_out_with_control_plane_error():
    # A socket that completes TCP handshakes but never speaks HTTP/2.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        plane = ControlPlane(f"127.0.0.1:{silent.getsockname()[1]}", run="r", timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(ControlPlaneError, match="DEADLINE_EXCEEDED") as info:
            plane.get_state()
        elapsed = time.monotonic() - t0
        plane.close()
    assert 0.8 <= elapsed < 3.0
    assert "get /geotrain/r/state failed" in str(info.value)
