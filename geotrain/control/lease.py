"""A key kept alive under an etcd lease by a daemon thread: :class:`Registration`.

:meth:`ControlPlane.register` grants a lease of ``ceil(ttl_s)`` seconds (at least 1), puts the key
under it, and refreshes it every ``ttl_s / 3``. While etcd is unreachable the thread retries
quietly (every ``min(ttl_s / 3, 0.5)`` s); if the lease is gone when etcd answers again (it
expired, was revoked, or etcd lost its data) it grants a new lease and puts the same value again.
A process that dies without closing its registration leaves the key behind for at most the TTL.
"""


from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from geotrain.control.etcd_client import ETCD_ERRORS, encode, reason
from geotrain.errors import ControlPlaneError

if TYPE_CHECKING:
    from geotrain.control.plane import ControlPlane

log = logging.getLogger(__name__)


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
        self._value = encode(info)
        self._info = json.loads(self._value)
        self._lease_ttl = max(1, math.ceil(ttl_s))
        self._interval = self.ttl_s / 3.0
        self._retry = min(self._interval, 0.5)
        self._call_timeout = max(0.5, min(cp.timeout_s, self._interval))
        self._client = cp._make_client(self._call_timeout)
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
            except ETCD_ERRORS as exc:
                # NOT_FOUND: the lease already expired. Otherwise etcd is away: the TTL cleans up.
                log.debug("revoking lease of %s failed: %s", self.key, reason(exc))
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
        except ETCD_ERRORS as exc:
            raise self._cp._error(what + " (lease grant)", exc, timeout_s) from exc
        try:
            client.put(self.key, self._value, lease=lease.id)
        except ETCD_ERRORS as exc:
            try:
                client.revoke_lease(lease.id)
            except ETCD_ERRORS:
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
            except (ControlPlaneError, *ETCD_ERRORS) as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("keeping %s alive failed (%s); retrying", self.key,
                                exc if isinstance(exc, ControlPlaneError) else reason(exc))
                wait = self._retry
            except Exception:  # never let the keep-alive thread die
                log.exception("unexpected error keeping %s alive", self.key)
                wait = self._retry
