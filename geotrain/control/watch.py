"""A watch on a key prefix that survives broken streams: :class:`PrefixWatch`.

pyetcd's own watcher neither reconnects nor resumes after its stream breaks, so this one drives the
etcd Watch stream itself (pyetcd's generated stubs) and resumes from the next revision after a
break; the callback gets ``(kind, key suffix, value)`` for every put and delete, in order.
Made by :meth:`ControlPlane.watch_prefix`.
"""


from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from pyetcd import etcdrpc
from pyetcd import utils as etcd_utils

from geotrain.control.etcd_client import reason

if TYPE_CHECKING:
    from geotrain.control.plane import ControlPlane

log = logging.getLogger(__name__)


class PrefixWatch:
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
                          reason(exc), self._next_rev)
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
