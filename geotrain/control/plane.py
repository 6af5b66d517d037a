"""geotrain's control plane: a real etcd server, and the keys a run keeps in it.

:class:`ControlPlane` (here) is one process's view of the keys of one run, on top of the
``etcd-sdk-python`` client (import name ``pyetcd``). Around it, one concept a module:

* geotrain.control.etcd_server: :class:`EtcdServer`, a local single-member etcd as a child
  process that dies with its parent (the embedded default, and the server the tests use);
* geotrain.control.etcd_client: the pyetcd client, endpoints, errors (notes on pyetcd there);
* geotrain.control.access: how a part reaches etcd (plaintext, or mutual TLS with which certificate);
* geotrain.control.auth: who may write which key (etcd users = certificate names), and turning auth on;
* geotrain.control.lease: :class:`Registration`, a key kept alive under a lease;
* geotrain.control.watch: :class:`PrefixWatch`, a watch resumed after a broken stream.

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

Who writes what (geotrain.control.auth): the coordinator every key above; a site's workers only
``members/<site>/``; the launcher and ``geotrain site`` read. With auth on, any other write is refused
``PERMISSION_DENIED`` (the ControlPlaneError's reason says so, and names the certificate).

Errors: every failure of pyetcd or gRPC is raised as
``ControlPlaneError("etcd at <endpoint>: <what> failed: <reason>")`` from the original exception.
A :class:`ControlPlane` opens no connection in its constructor; the first operation does, and
fails within ``timeout_s`` when etcd cannot be reached.
"""


from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from geotrain.control.access import EtcdAccess, etcd_access
from geotrain.control.etcd_client import (ETCD_ERRORS, encode, endpoint_scheme, make_client, netloc, parse_endpoint,
                                          permission_denied, reason)
from geotrain.control.etcd_server import EtcdServer, find_etcd
from geotrain.control.lease import Registration
from geotrain.control.watch import PrefixWatch
from geotrain.errors import ControlPlaneError

__all__ = [
    "ControlPlane",
    "EtcdAccess",
    "EtcdServer",
    "etcd_access",
    "Registration",
    "find_etcd",
    "parse_endpoint",
]

log = logging.getLogger(__name__)

ROOT = "/geotrain"

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


class ControlPlane:
    """geotrain's view of etcd for one run (keys: see the module docstring)."""

    def __init__(self, endpoint: str, run: str, timeout_s: float = 5.0, tls=None, server_name: str | None = None):
        """``tls``: the part's :class:`~geotrain.security.pki.TlsFiles` (None: plaintext); ``server_name``: verify
        etcd's certificate as that name (None: as the host dialled). :meth:`for_part` decides both."""
        self._host, self._port = parse_endpoint(endpoint)
        scheme = endpoint_scheme(endpoint)
        if scheme == "https" and tls is None:
            raise ControlPlaneError(f"etcd endpoint {endpoint!r} is https: a client certificate is needed")
        if scheme == "http" and tls is not None:
            raise ControlPlaneError(f"etcd endpoint {endpoint!r} is http:// but TLS files were given")
        self._tls = tls
        self._server_name = server_name
        self.endpoint = f"{'https' if tls is not None else 'http'}://{netloc(self._host, self._port)}"
        self.run = _component(run, "run")
        self.timeout_s = float(timeout_s)
        self._base = f"{ROOT}/{self.run}/"
        self._client = self._make_client(self.timeout_s)
        self._closed = False
        self._lock = threading.Lock()
        self._owned: set[Registration | PrefixWatch] = set()

    @classmethod
    def for_part(cls, endpoint: str | None, run: str, name: str, *, certs_dir=None, etcd=None,
                 timeout_s: float = 5.0) -> ControlPlane:
        """The control plane as the part ``name`` reaches it (geotrain.control.access.etcd_access)."""
        return cls.from_access(etcd_access(endpoint, name, certs_dir=certs_dir, etcd=etcd), run, timeout_s)

    @classmethod
    def from_access(cls, access: EtcdAccess, run: str, timeout_s: float = 5.0) -> ControlPlane:
        return cls(access.endpoint, run, timeout_s, tls=access.tls, server_name=access.server_name)

    @property
    def identity(self) -> str | None:
        """The certificate name this process presents to etcd (its etcd user); None on plaintext."""
        return self._tls.name if self._tls is not None else None

    def __repr__(self) -> str:
        return f"ControlPlane({self.endpoint!r}, run={self.run!r})"

    # -- plumbing

    def _make_client(self, timeout_s: float):
        return make_client(self._host, self._port, timeout_s, self._tls, self._server_name)

    def _key(self, key_suffix: str) -> str:
        return self._base + _suffix(key_suffix)

    def _channel(self):
        return self._client.channel

    def _error(self, what: str, exc: BaseException, timeout_s: float | None = None
               ) -> ControlPlaneError:
        text = reason(exc, timeout_s or self.timeout_s)
        if permission_denied(exc):
            text += f" (certificate {self.identity!r} may not do this: geotrain.control.auth)"
        return ControlPlaneError(f"etcd at {self.endpoint}: {what} failed: {text}")

    def _call(self, what: str, fn, *args, **kwargs):
        if self._closed:
            raise ControlPlaneError(f"etcd at {self.endpoint}: {what} failed: control plane closed")
        try:
            return fn(*args, **kwargs)
        except ETCD_ERRORS as exc:
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
        data = encode(value)
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
                           success=[tx.put(state_key, encode(state))], failure=[])
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
        return self._adopt(PrefixWatch(self, str(key_suffix), callback)).cancel

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
