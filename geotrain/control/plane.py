"""geotrain's control plane: a real etcd server, and the keys a run keeps in it.

Two things live here:

* :class:`EtcdServer` runs a local single-member etcd (``/usr/bin/etcd``; ``$GEOTRAIN_ETCD_BIN``
  overrides it) as a child process that dies with its parent. It is the embedded default
  when a topology names no etcd endpoint, and the server the tests use.
* :class:`ControlPlane` is one process's view of the keys of one run, on top of the
  ``etcd-sdk-python`` client (import name ``pyetcd``).

Keys of run ``<run>`` (every value is a JSON object, UTF-8):

``/geotrain/<run>/coordinator``
    ``{"address": "host:port", "pid": int, "epoch": int, ...}``, put under the coordinator's
    lease by :meth:`ControlPlane.set_coordinator`; it vanishes within its TTL when the
    coordinator dies. ``epoch`` grows by one with every ``set_coordinator`` of the run.
``/geotrain/<run>/coordinator_epoch``
    the last epoch handed out (a decimal integer, not JSON-wrapped), bumped in a transaction.
``/geotrain/<run>/members/<site>/<rank>``
    the member's info (whatever the member registered), under that process's lease
    (:meth:`ControlPlane.register_member`).
``/geotrain/<run>/state``
    the run state ``{"round": int, "version": int, ...}`` (:meth:`ControlPlane.put_state`).
``/geotrain/<run>/events/...``
    reserved.

Leases: :meth:`ControlPlane.register` grants a lease of ``ceil(ttl_s)`` seconds (at least 1),
puts the key under it, and refreshes it every ``ttl_s / 3`` from a daemon thread. While etcd is
unreachable the thread retries quietly (every ``min(ttl_s / 3, 0.5)`` s); if the lease is gone
when etcd answers again (it expired, was revoked, or etcd lost its data) it grants a new lease
and puts the same value again. A process that dies without closing its registration leaves the
key behind for at most the TTL.

Errors: every failure of pyetcd or gRPC is raised as
``ControlPlaneError("etcd at <endpoint>: <what> failed: <reason>")`` from the original exception.
A :class:`ControlPlane` opens no connection in its constructor; the first operation does, and
fails within ``timeout_s`` when etcd cannot be reached.

Notes on pyetcd 0.0.7 that shaped this module:

* Its client marks its only endpoint "failed" after one UNAVAILABLE/DEADLINE_EXCEEDED error and
  then refuses every call for 300 s with ``ValueError('Trying to use a failed node')``. The
  clients here are built with ``Endpoint(time_retry=0)`` so that the next call simply retries.
* ``refresh_lease`` is a one-request LeaseKeepAlive stream per call; an expired lease answers
  ``TTL == 0`` (not an error), and revoking an unknown lease is a raw ``NOT_FOUND`` RpcError.
* Its watcher neither reconnects nor resumes after the stream breaks, and a failed call on the
  client closes it. :meth:`ControlPlane.watch_prefix` therefore drives the etcd Watch stream
  itself (pyetcd's generated stubs) and resumes from the next revision after a break.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exceptions
from pyetcd import utils as etcd_utils

from geotrain.errors import ControlPlaneError
from geotrain.run.procs import spawn, terminate_all

__all__ = [
    "ControlPlane",
    "EtcdServer",
    "Registration",
    "find_etcd",
    "parse_endpoint",
]

log = logging.getLogger(__name__)

ROOT = "/geotrain"
DEFAULT_CLIENT_PORT = 2379

# gRPC channel options: reconnect quickly after etcd comes back (the default backoff grows to
# two minutes), never go through an HTTP proxy from the environment, and notice a dead peer on
# a long-lived watch stream (etcd's default --grpc-keepalive-min-time is 5 s). Not set on
# purpose: grpc.min_reconnect_backoff_ms, which gRPC core also uses as the connect timeout (a
# small value makes connections over a slow emulated WAN link fail after that many ms).
_GRPC_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]

# Exceptions that mean "the etcd operation failed" (ValueError: pyetcd's failed-node refusal,
# or gRPC's "Cannot invoke RPC on closed channel!").
_ETCD_ERRORS = (etcd_exceptions.Etcd3Exception, grpc.RpcError, ValueError)


# --------------------------------------------------------------------------------------------
# helpers


def find_etcd() -> str:
    """Path of the etcd binary: ``$GEOTRAIN_ETCD_BIN``, else ``etcd`` on PATH, else /usr/bin/etcd."""
    env = os.environ.get("GEOTRAIN_ETCD_BIN")
    if env:
        return env
    found = shutil.which("etcd")
    if found:
        return found
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    raise ControlPlaneError("etcd binary not found (install etcd or set GEOTRAIN_ETCD_BIN)")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"http://host:port"``, ``"host:port"`` or ``"host"`` -> ``(host, port)``. https is refused."""
    text = str(endpoint).strip()
    if not text:
        raise ControlPlaneError("etcd endpoint is empty")
    parts = urlsplit(text if "://" in text else "//" + text)
    if parts.scheme not in ("", "http"):
        raise ControlPlaneError(
            f"etcd endpoint {endpoint!r}: scheme {parts.scheme!r} is not supported (use http://host:port)")
    try:
        port = parts.port
    except ValueError as exc:
        raise ControlPlaneError(f"etcd endpoint {endpoint!r}: invalid port") from exc
    host = parts.hostname
    if not host or parts.path not in ("", "/"):
        raise ControlPlaneError(f"etcd endpoint {endpoint!r} is not of the form http://host:port")
    return host, port if port is not None else DEFAULT_CLIENT_PORT


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException, timeout_s: float | None = None) -> str:
    """A one-line reason for a pyetcd/gRPC failure (pyetcd hides the gRPC status in __context__)."""
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if isinstance(rpc, grpc.RpcError) and hasattr(rpc, "code"):
        try:
            code = rpc.code()
            details = rpc.details() or ""
        except Exception:  # pragma: no cover - a malformed RpcError
            code, details = None, ""
        if code is not None:
            text = f"{code.name}: {details}".rstrip(": ")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
                text += f" (no answer within {timeout_s:g} s)"
            return text
    return str(exc) or type(exc).__name__


def _suffix(key_suffix: str) -> str:
    suffix = str(key_suffix).strip("/")
    if not suffix:
        raise ValueError("key_suffix must not be empty")
    return suffix


def _component(name: str, what: str) -> str:
    text = str(name)
    if not text or "/" in text:
        raise ValueError(f"{what} must be a non-empty string without '/': {name!r}")
    return text


def _encode(value: dict) -> bytes:
    if not isinstance(value, dict):
        raise TypeError(f"control-plane values are JSON objects, got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (all bound at once, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _format_log_line(line: str) -> str:
    """etcd's zap JSON log line -> ``level msg key=value ...`` (no stack traces), else as is."""
    line = line.strip()
    try:
        rec = json.loads(line)
    except ValueError:
        return line[:400]
    if not isinstance(rec, dict):
        return line[:400]
    extra = " ".join(f"{k}={v}" for k, v in rec.items()
                     if k not in ("level", "ts", "caller", "msg", "stacktrace"))
    return f"{rec.get('level', '?')}: {rec.get('msg', '')} {extra}".strip()[:400]


# --------------------------------------------------------------------------------------------
# EtcdServer


class EtcdServer:
    """A local etcd server process (the embedded default when a topology names no endpoint).

    Ports given as 0 are picked free at the first :meth:`start` and kept, so that ``stop()``
    then ``start()`` brings the same server back on the same ports and data dir.
    """

    def __init__(self, data_dir: str | Path, host: str = "127.0.0.1", client_port: int = 0,
                 peer_port: int = 0, log_path: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.host = host
        self.client_port = int(client_port)
        self.peer_port = int(peer_port)
        self.log_path = Path(log_path) if log_path is not None else None
        self._auto_client_port = self.client_port == 0
        self._auto_peer_port = self.peer_port == 0
        self._started_once = False
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._log_offset = 0

    # -- properties

    @property
    def endpoint(self) -> str:
        if not self.client_port:
            raise ControlPlaneError("etcd server has no client port yet (call start())")
        return f"http://{_netloc(self.host, self.client_port)}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"EtcdServer({str(self.data_dir)!r}, {self.host}:{self.client_port}, {state})"

    # -- lifecycle

    def _argv(self) -> list[str]:
        client_url = f"http://{_netloc(self.host, self.client_port)}"
        peer_url = f"http://{_netloc(self.host, self.peer_port)}"
        return [
            find_etcd(),
            "--name", "default",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
            "--initial-cluster-state", "new",
            # A single member elects itself fast with short ticks (lease TTLs of 1 s work too).
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]

    def start(self, timeout_s: float = 15.0) -> str:
        """Start etcd and wait until ``/health`` says true; returns the client endpoint URL.

        If a port is taken ("address already in use"), ports picked here are picked again
        before the first successful start; afterwards (a restart, which keeps its ports) and for
        ports given explicitly the same ports are retried until ``timeout_s``.
        """
        if self.running():
            return self.endpoint
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.client_port or not self.peer_port:
                client, peer = _free_ports(self.host, 2)
                self.client_port = self.client_port or client
                self.peer_port = self.peer_port or peer
            try:
                endpoint = self._start_once(max(3.0, deadline - time.monotonic()))
            except ControlPlaneError as exc:
                if "address already in use" not in str(exc) or time.monotonic() >= deadline:
                    raise
                log.info("etcd ports %d/%d: one is busy; retrying", self.client_port,
                         self.peer_port)
                if not self._started_once:
                    self.client_port = 0 if self._auto_client_port else self.client_port
                    self.peer_port = 0 if self._auto_peer_port else self.peer_port
                time.sleep(0.1)
                continue
            self._started_once = True
            return endpoint

    def _open_log(self):
        # Opened readable too, so the tail can be read back through the same descriptor. Without
        # a log_path the log is an already-unlinked temporary file: nothing is left behind.
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.log_path, "a+b")
        else:
            fd, name = tempfile.mkstemp(prefix="geotrain-etcd-", suffix=".log")
            os.unlink(name)
            f = os.fdopen(fd, "a+b")
        self._log_offset = f.tell()
        return f

    def _log_tail(self, lines: int = 12) -> str:
        if self._log_file is None:
            return "(no log)"
        try:
            fd = self._log_file.fileno()
            size = os.fstat(fd).st_size
            start = max(self._log_offset, size - 64_000)
            data = os.pread(fd, max(0, size - start), start)
        except (OSError, ValueError) as exc:
            return f"(log unreadable: {exc})"
        text = data.decode("utf-8", "replace")
        tail = [_format_log_line(ln) for ln in text.splitlines() if ln.strip()][-lines:]
        return "\n".join(tail) if tail else "(log is empty)"

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.endpoint}/health", timeout=1.0) as resp:
                body = json.loads(resp.read().decode() or "{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")).lower() == "true"

    def _start_once(self, timeout_s: float) -> str:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self._open_log()
        argv = self._argv()
        try:
            self._proc = spawn(argv, stdout=self._log_file, stderr=self._log_file)
        except OSError as exc:
            self._close_log()
            raise ControlPlaneError(f"etcd at {self.endpoint}: start failed: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        while True:
            status = self._proc.poll()
            if status is not None:
                tail = self._log_tail()
                self.stop()
                raise ControlPlaneError(
                    f"etcd at {self.endpoint}: start failed: etcd exited with status {status} "
                    f"(data dir {self.data_dir}); log tail:\n{tail}")
            if self._healthy():
                log.info("etcd up at %s (pid %d, data dir %s)", self.endpoint, self._proc.pid,
                         self.data_dir)
                return self.endpoint
            if time.monotonic() >= deadline:
                tail = self._log_tail()
                self.stop()
                raise ControlPlaneError(
                    f"etcd at {self.endpoint}: start failed: not healthy within {timeout_s:g} s "
                    f"(data dir {self.data_dir}); log tail:\n{tail}")
            time.sleep(0.05)

    def _close_log(self) -> None:
        if self._log_file is not None:
            try:
                self._log_file.close()
            except OSError:
                pass
            self._log_file = None

    def stop(self) -> None:
        """SIGTERM, up to 5 s grace, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is not None:
            terminate_all([proc], grace_s=5.0)
        self._close_log()

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# ControlPlane


def _make_client(host: str, port: int, timeout_s: float) -> pyetcd.MultiEndpointEtcd3Client:
    # time_retry=0: never put the (only) endpoint in pyetcd's 300 s "failed node" quarantine.
    ep = pyetcd.Endpoint(host, port, secure=False, time_retry=0.0, opts=_GRPC_OPTIONS)
    return pyetcd.MultiEndpointEtcd3Client(endpoints=[ep], timeout=timeout_s)


class Registration:
    """A key kept alive under a lease by a daemon thread. Made by :meth:`ControlPlane.register`.

    ``alive`` is True while the registration is open and etcd confirmed the lease less than
    one TTL ago. ``close()`` stops the thread and revokes the lease (the key goes at once).
    """

    def __init__(self, cp: ControlPlane, key_suffix: str, info: dict, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.key_suffix = key_suffix
        self.key = cp._key(key_suffix)
        self.ttl_s = float(ttl_s)
        self._cp = cp
        self._value = _encode(info)
        self._info = json.loads(self._value)
        self._lease_ttl = max(1, math.ceil(ttl_s))
        self._interval = self.ttl_s / 3.0
        self._retry = min(self._interval, 0.5)
        self._call_timeout = max(0.5, min(cp.timeout_s, self._interval))
        self._client = _make_client(cp._host, cp._port, self._call_timeout)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._lease_id: int | None = None
        self._last_ok = 0.0
        self.reregistrations = 0
        try:
            self._grant_and_put(self._cp.timeout_s, client=cp._client)
        except BaseException:
            self._client.close()
            raise
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"geotrain-lease:{key_suffix}", daemon=True)
        self._thread.start()

    # -- public

    @property
    def info(self) -> dict:
        return dict(self._info)

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def alive(self) -> bool:
        return (not self._closed and self._lease_id is not None
                and time.monotonic() - self._last_ok < self._lease_ttl)

    def close(self) -> None:
        """Stop keeping the key alive and revoke the lease (the key is deleted now). Idempotent;
        never raises: if etcd cannot be reached the key simply expires within its TTL."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._call_timeout * 4 + 1.0)
        lease_id = self._lease_id
        if lease_id is not None:
            try:
                self._client.revoke_lease(lease_id)
            except _ETCD_ERRORS as exc:
                # NOT_FOUND: the lease already expired. Otherwise etcd is away: the TTL cleans up.
                log.debug("revoking lease of %s failed: %s", self.key, _reason(exc))
        self._lease_id = None
        self._client.close()
        self._cp._forget(self)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registration({self.key!r}, ttl={self.ttl_s:g}s, alive={self.alive})"

    # -- internals

    def _grant_and_put(self, timeout_s: float, client=None) -> None:
        client = client or self._client
        what = f"register {self.key}"
        try:
            lease = client.lease(self._lease_ttl)
        except _ETCD_ERRORS as exc:
            raise self._cp._error(what + " (lease grant)", exc, timeout_s) from exc
        try:
            client.put(self.key, self._value, lease=lease.id)
        except _ETCD_ERRORS as exc:
            try:
                client.revoke_lease(lease.id)
            except _ETCD_ERRORS:
                pass
            raise self._cp._error(what, exc, timeout_s) from exc
        self._lease_id = lease.id
        self._last_ok = time.monotonic()

    def _refresh(self) -> bool:
        """Refresh the lease; False if etcd says it no longer exists."""
        responses = self._client.refresh_lease(self._lease_id)
        for resp in responses:
            if resp.TTL > 0:
                return True
        return False

    def _keep_alive(self) -> None:
        wait = self._interval
        failing_since: float | None = None
        while not self._stop.wait(wait):
            try:
                if self._lease_id is not None and self._refresh():
                    self._last_ok = time.monotonic()
                else:
                    if self._stop.is_set():
                        return
                    log.warning("lease of %s is gone; registering it again", self.key)
                    self._lease_id = None
                    self._grant_and_put(self._call_timeout)
                    self.reregistrations += 1
                if failing_since is not None:
                    log.info("etcd answers again; %s kept alive after %.1f s",
                             self.key, time.monotonic() - failing_since)
                    failing_since = None
                wait = self._interval
            except (ControlPlaneError, *_ETCD_ERRORS) as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("keeping %s alive failed (%s); retrying", self.key,
                                exc if isinstance(exc, ControlPlaneError) else _reason(exc))
                wait = self._retry
            except Exception:  # never let the keep-alive thread die
                log.exception("unexpected error keeping %s alive", self.key)
                wait = self._retry


class _PrefixWatch:
    """One watch on a key prefix, resumed from the next revision whenever the stream breaks."""

    def __init__(self, cp: ControlPlane, key_suffix: str,
                 callback: Callable[[str, str, dict | None], Any]):
        self._cp = cp
        self._callback = callback
        self._prefix = cp._key(key_suffix) if key_suffix.strip("/") else cp._base
        self._prefix_b = self._prefix.encode()
        self._range_end = etcd_utils.prefix_range_end(self._prefix_b)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call = None
        self._requests: queue.Queue | None = None
        # The current revision: the stream starts right after it, so nothing put after
        # watch_prefix() returns is missed even if the stream is established later.
        resp = cp._call(f"watch {self._prefix}", cp._client.get_response, self._prefix,
                        count_only=True)
        self._next_rev = resp.header.revision + 1
        self._thread = threading.Thread(target=self._run, name=f"geotrain-watch:{self._prefix}",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()
        with self._lock:
            self._end_stream()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._cp._forget(self)

    def _end_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
        if self._call is not None:
            self._call.cancel()

    def _run(self) -> None:
        backoff = 0.1
        stub = etcdrpc.WatchStub(self._cp._channel())
        while not self._stop.is_set():
            requests: queue.Queue = queue.Queue()
            requests.put(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
                key=self._prefix_b, range_end=self._range_end, start_revision=self._next_rev)))

            def request_iter(q=requests):
                while True:
                    item = q.get()
                    if item is None:
                        return
                    yield item

            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    call = stub.Watch(request_iter(), metadata=self._cp._client.metadata)
                except ValueError:  # the channel was closed under us: the watch is over
                    return
                self._call, self._requests = call, requests
            try:
                for resp in call:
                    if resp.compact_revision:
                        log.warning("watch %s: revisions before %d were compacted; events lost",
                                    self._prefix, resp.compact_revision)
                        self._next_rev = resp.compact_revision
                        break
                    if resp.canceled:
                        log.warning("watch %s canceled by etcd: %s", self._prefix,
                                    resp.cancel_reason)
                        break
                    if resp.created and resp.header.revision + 1 < self._next_rev:
                        # etcd's revision went backwards: it came back without its data.
                        # Best effort only: if the new etcd has already passed the old
                        # revision when the watch reconnects, the events in between are missed.
                        log.warning("watch %s: etcd is at revision %d, before %d (data lost?);"
                                    " watching from there", self._prefix, resp.header.revision,
                                    self._next_rev)
                        self._next_rev = resp.header.revision + 1
                        backoff = 0.0
                        break
                    for event in resp.events:
                        self._next_rev = event.kv.mod_revision + 1
                        self._dispatch(event)
                    backoff = 0.1
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.debug("watch %s broke (%s); resuming at revision %d", self._prefix,
                          _reason(exc), self._next_rev)
            finally:
                with self._lock:
                    requests.put(None)
                    call.cancel()
                    self._call = self._requests = None
            if self._stop.wait(backoff):
                return
            backoff = min(max(backoff * 2, 0.1), 2.0)

    def _dispatch(self, event) -> None:
        key = event.kv.key.decode("utf-8", "replace")
        suffix = key[len(self._cp._base):]
        if event.type == event.DELETE:
            kind, value = "delete", None
        else:
            kind = "put"
            try:
                value = json.loads(event.kv.value)
            except ValueError:
                log.warning("watch %s: value of %s is not JSON", self._prefix, key)
                value = None
        if self._stop.is_set():
            return
        try:
            self._callback(kind, suffix, value)
        except Exception:
            log.exception("watch callback for %s failed on %s %s", self._prefix, kind, suffix)


class ControlPlane:
    """geotrain's view of etcd for one run (keys: see the module docstring)."""

    def __init__(self, endpoint: str, run: str, timeout_s: float = 5.0):
        self._host, self._port = parse_endpoint(endpoint)
        self.endpoint = f"http://{_netloc(self._host, self._port)}"
        self.run = _component(run, "run")
        self.timeout_s = float(timeout_s)
        self._base = f"{ROOT}/{self.run}/"
        self._client = _make_client(self._host, self._port, self.timeout_s)
        self._closed = False
        self._lock = threading.Lock()
        self._owned: set[Registration | _PrefixWatch] = set()

    def __repr__(self) -> str:
        return f"ControlPlane({self.endpoint!r}, run={self.run!r})"

    # -- plumbing

    def _key(self, key_suffix: str) -> str:
        return self._base + _suffix(key_suffix)

    def _channel(self):
        return self._client.channel

    def _error(self, what: str, exc: BaseException, timeout_s: float | None = None
               ) -> ControlPlaneError:
        return ControlPlaneError(
            f"etcd at {self.endpoint}: {what} failed: {_reason(exc, timeout_s or self.timeout_s)}")

    def _call(self, what: str, fn, *args, **kwargs):
        if self._closed:
            raise ControlPlaneError(f"etcd at {self.endpoint}: {what} failed: control plane closed")
        try:
            return fn(*args, **kwargs)
        except _ETCD_ERRORS as exc:
            raise self._error(what, exc) from exc

    def _adopt(self, thing):
        with self._lock:
            if self._closed:
                thing.close() if isinstance(thing, Registration) else thing.cancel()
                raise ControlPlaneError(f"etcd at {self.endpoint}: control plane closed")
            self._owned.add(thing)
        return thing

    def _forget(self, thing) -> None:
        with self._lock:
            self._owned.discard(thing)

    # -- plain keys

    def put_json(self, key_suffix: str, value: dict) -> None:
        key = self._key(key_suffix)
        data = _encode(value)
        self._call(f"put {key}", self._client.put, key, data)

    def get_json(self, key_suffix: str) -> dict | None:
        key = self._key(key_suffix)
        raw, _meta = self._call(f"get {key}", self._client.get, key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ControlPlaneError(
                f"etcd at {self.endpoint}: get {key} failed: value is not JSON: {raw[:80]!r}"
            ) from exc

    def delete(self, key_suffix: str) -> bool:
        """Delete one key; True if it existed."""
        key = self._key(key_suffix)
        return bool(self._call(f"delete {key}", self._client.delete, key))

    def put_state(self, state: dict) -> None:
        self.put_json("state", state)

    def get_state(self) -> dict | None:
        return self.get_json("state")

    def put_state_fenced(self, state: dict, epoch: int) -> bool:
        """Put the run state only if ``epoch`` is still the newest coordinator epoch (the fencing token).

        Returns False when a newer coordinator has taken over: the caller must stop committing.
        """
        state_key, epoch_key = self._key("state"), self._key("coordinator_epoch")
        tx = self._client.transactions
        ok, _ = self._call(f"fenced put {state_key}", self._client.transaction,
                           compare=[tx.value(epoch_key) == str(int(epoch))],
                           success=[tx.put(state_key, _encode(state))], failure=[])
        return bool(ok)

    def ping(self) -> None:
        """Raise ControlPlaneError unless etcd answers within the timeout."""
        self._call("status", self._client.status)

    # -- leased keys

    def register(self, key_suffix: str, info: dict, ttl_s: float = 3.0) -> Registration:
        """Put ``/geotrain/<run>/<key_suffix>`` under a new lease kept alive in the background."""
        if self._closed:
            raise ControlPlaneError(f"etcd at {self.endpoint}: register failed: control plane closed")
        return self._adopt(Registration(self, _suffix(key_suffix), info, ttl_s))

    def register_member(self, site: str, rank: int, info: dict, ttl_s: float = 3.0) -> Registration:
        site = _component(site, "site")
        if isinstance(rank, bool) or int(rank) != rank or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        return self.register(f"members/{site}/{int(rank)}", info, ttl_s)

    def members(self) -> dict[str, dict[int, dict]]:
        """``{site: {rank: info}}`` of the members whose leases are alive."""
        prefix = self._key("members") + "/"
        resp = self._call(f"get {prefix}*", self._client.get_prefix_response, prefix)
        out: dict[str, dict[int, dict]] = {}
        for kv in resp.kvs:
            rest = kv.key.decode("utf-8", "replace")[len(prefix):]
            site, _, rank = rest.partition("/")
            try:
                rank_i = int(rank)
                info = json.loads(kv.value)
            except ValueError:
                log.warning("ignoring malformed member key %s", prefix + rest)
                continue
            out.setdefault(site, {})[rank_i] = info
        return {site: dict(sorted(ranks.items())) for site, ranks in sorted(out.items())}

    def _next_epoch(self) -> int:
        key = self._key("coordinator_epoch")
        tx = self._client.transactions
        for _ in range(50):
            raw, meta = self._call(f"get {key}", self._client.get, key)
            current = int(raw) if raw is not None else 0
            compare = ([tx.version(key) == 0] if raw is None
                       else [tx.mod(key) == meta.mod_revision])
            ok, _ = self._call(f"bump {key}", self._client.transaction, compare=compare,
                               success=[tx.put(key, str(current + 1))], failure=[])
            if ok:
                return current + 1
        raise ControlPlaneError(f"etcd at {self.endpoint}: bump {key} failed: too much contention")

    def set_coordinator(self, address: str, info: dict | None = None, ttl_s: float = 3.0
                        ) -> Registration:
        """Announce this process as the run's coordinator. The value is ``info`` plus
        ``address``, ``epoch`` (new, larger than every earlier one) and ``pid`` (this process
        unless ``info`` names one). ``Registration.info["epoch"]`` tells the epoch."""
        value = dict(info or {})
        value["address"] = str(address)
        value.setdefault("pid", os.getpid())
        value["epoch"] = self._next_epoch()
        return self.register("coordinator", value, ttl_s)

    def coordinator(self) -> dict | None:
        """The coordinator's value, or None when none is registered."""
        return self.get_json("coordinator")

    def coordinator_address(self, wait_s: float = 0.0) -> str | None:
        """The coordinator's "host:port", polling until it appears or ``wait_s`` elapsed (then
        None). etcd errors are retried while waiting; one that persists to the end is raised."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                value = self.get_json("coordinator")
                error = None
            except ControlPlaneError as exc:
                value, error = None, exc
            if value and value.get("address"):
                return str(value["address"])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if error is not None:
                    raise error
                return None
            time.sleep(min(0.1, remaining))

    # -- watches

    def watch_prefix(self, key_suffix: str, callback: Callable[[str, str, dict | None], Any]
                     ) -> Callable[[], None]:
        """Call ``callback(event_type, key_suffix, value)`` for every put ("put", parsed JSON)
        and delete ("delete", None) under ``/geotrain/<run>/<key_suffix>`` from now on.

        ``key_suffix`` in the callback is relative to ``/geotrain/<run>/`` (e.g.
        ``"members/a/0"``); an empty ``key_suffix`` watches the whole run. Callbacks run one at
        a time on a background thread; the watch survives etcd restarts (it resumes at the
        next revision). Returns ``cancel()``; no callback starts after it returns.
        """
        return self._adopt(_PrefixWatch(self, str(key_suffix), callback)).cancel

    # -- lifecycle

    def close(self) -> None:
        """Close every registration (revoking its lease) and watch made here, then the client."""
        with self._lock:
            if self._closed:
                return
            owned = list(self._owned)
        for thing in owned:
            try:
                thing.close() if isinstance(thing, Registration) else thing.cancel()
            except Exception:
                log.exception("closing %r failed", thing)
        with self._lock:
            self._closed = True
            self._owned.clear()
        self._client.close()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
