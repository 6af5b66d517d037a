"""A local single-member etcd server, run as a child process that dies with its parent.

:class:`EtcdServer` runs ``/usr/bin/etcd`` (``$GEOTRAIN_ETCD_BIN`` overrides it, see
:func:`find_etcd`) on free ports with its data in a given folder; it is the embedded default when
a topology names no etcd endpoint, and the server the tests use. ``start`` waits until etcd's
``/health`` answers and names the last lines of etcd's log when it does not.

With ``tls`` (:class:`ServerTls`: the run's ``etcd`` pair and the pair it checks health with) the
client and peer URLs are https and both demand a certificate of the run's CA (``--client-cert-auth``,
``--peer-client-cert-auth``); with ``auth`` as well (geotrain.control.auth.grants) every start enables
etcd's auth once healthy, so that each certificate's common name is its etcd user and only the
coordinator's may write the coordinator's keys (idempotent: a restart finds it on).
"""


from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import ssl
from dataclasses import dataclass
from pathlib import Path

from geotrain.control.etcd_client import make_client, netloc
from geotrain.errors import ControlPlaneError
from geotrain.run.procs import spawn, terminate_all
from geotrain.security.pki import ETCD, TlsFiles
from geotrain.security.tls import ssl_client_context

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ServerTls:
    """An etcd server's TLS: its own pair (``server``, the run's ``etcd``: client and peer URLs) and the pair
    of the client that checks its health and enables auth (``client``: the launcher's)."""

    server: TlsFiles
    client: TlsFiles


def tls_flags(tls: ServerTls) -> list[str]:
    """etcd's flags for mutual TLS on the client and the peer URLs, trusting the run's CA only."""
    s = tls.server
    return ["--cert-file", str(s.cert), "--key-file", str(s.key), "--trusted-ca-file", str(s.ca), "--client-cert-auth",
            "--peer-cert-file", str(s.cert), "--peer-key-file", str(s.key), "--peer-trusted-ca-file", str(s.ca),
            "--peer-client-cert-auth"]


class EtcdServer:
    """A local etcd server process (the embedded default when a topology names no endpoint).

    Ports given as 0 are picked free at the first :meth:`start` and kept, so that ``stop()``
    then ``start()`` brings the same server back on the same ports and data dir.
    """

    def __init__(self, data_dir: str | Path, host: str = "127.0.0.1", client_port: int = 0,
                 peer_port: int = 0, log_path: str | Path | None = None, tls: ServerTls | None = None,
                 auth: tuple | None = None, run: str | None = None, advertise_host: str | None = None):
        """``host``: where it listens (client and peer URLs); ``advertise_host``: the name it gives clients and
        its peer (default ``host``; a Compose service listens on 0.0.0.0 and advertises its DNS name)."""
        if auth is not None and (tls is None or not run):
            raise ValueError("etcd auth needs tls (users are certificate names) and the run's name")
        self.data_dir = Path(data_dir)
        self.tls = tls
        self.auth = auth
        self.run = run
        self.auth_outcome: str | None = None
        self.host = host
        self.advertise_host = advertise_host or host
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
        return f"{self.scheme}://{netloc(self.host, self.client_port)}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

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
        client_url = f"{self.scheme}://{netloc(self.host, self.client_port)}"
        peer_url = f"{self.scheme}://{netloc(self.host, self.peer_port)}"
        client_adv = f"{self.scheme}://{netloc(self.advertise_host, self.client_port)}"
        peer_adv = f"{self.scheme}://{netloc(self.advertise_host, self.peer_port)}"
        return [
            find_etcd(),
            "--name", "default",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_adv,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_adv,
            "--initial-cluster", f"default={peer_adv}",
            "--initial-cluster-state", "new",
            # A single member elects itself fast with short ticks (lease TTLs of 1 s work too).
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *(tls_flags(self.tls) if self.tls is not None else []),
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
        if self.tls is not None:
            return self._healthy_tls()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{netloc(self._local_host, self.client_port)}/health", timeout=1.0) as resp:
                body = json.loads(resp.read().decode() or "{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return str(body.get("health")).lower() == "true"

    def _healthy_tls(self) -> bool:
        """GET /health over mutual TLS, the server checked by its name (``etcd``) like every client does."""
        try:
            ctx = ssl_client_context(self.tls.client)
            with socket.create_connection((self._local_host, self.client_port), timeout=1.0) as raw:
                with ctx.wrap_socket(raw, server_hostname=ETCD) as s:
                    s.sendall(f"GET /health HTTP/1.0\r\nHost: {ETCD}\r\n\r\n".encode())
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
        except (OSError, ssl.SSLError, ValueError):
            return False
        _, _, body = data.partition(b"\r\n\r\n")
        try:
            return str(json.loads(body.decode() or "{}").get("health")).lower() == "true"
        except (ValueError, AttributeError):
            return False

    def client(self, timeout_s: float = 5.0):
        """A pyetcd client with the health-checking pair (``tls.client``), or plaintext."""
        tls = self.tls.client if self.tls is not None else None
        return make_client(self._local_host, self.client_port, timeout_s, tls, ETCD if tls is not None else None)

    @property
    def _local_host(self) -> str:
        """Where this process reaches it: a wildcard listen address is reached on loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def _enable_auth(self, timeout_s: float) -> None:
        from geotrain.control.auth import enable_auth

        client = self.client(max(1.0, timeout_s))
        try:
            self.auth_outcome = enable_auth(client, self.run, self.auth, timeout_s=max(1.0, timeout_s))
        finally:
            client.close()

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
                if self.auth is not None:
                    try:
                        self._enable_auth(max(1.0, deadline - time.monotonic()))
                    except ControlPlaneError as exc:
                        self.stop()
                        raise ControlPlaneError(f"etcd at {self.endpoint}: start failed: {exc}") from exc
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
