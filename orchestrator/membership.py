"""The coordinator's view of who is alive, from etcd: a site whose leader's lease ended is declared dead.

Every worker keeps ``/geotrain/<run>/members/<site>/<rank>`` alive under its own lease
(geotrain.control.lease); the value carries its ``pid``. When the leader's key (rank 0) is deleted, its
lease ended: the process died (SIGKILL: within ``recovery.heartbeat_ttl_s``), froze, or could not reach
etcd for that long; or it exited and closed its registration. The coordinator then stops waiting for the
site (``CoordinatorEngine.member_lost``, rounds.lose) instead of waiting for the restart or the round's
deadline. The launcher (or a site's own supervisor) reports a death it sees faster, through the
``ReportLost`` call; this watch is what works when nothing else is there to report (a site on another
host whose machine went away).

A delete names the key, not the pid: :class:`Members` remembers each key's pid from its puts (and from
the members already registered when the watch starts), so that the engine can tell a death of the leader
that joined from one of an older incarnation (whose key a restarted leader has since taken over).
Non-leader ranks are not judged here: their death ends their site's group, and the leader's with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LEADER_RANK = 0


@dataclass(frozen=True)
class Lost:
    site: str
    pid: int
    reason: str


class Members:
    """Member key -> pid, as etcd's puts and deletes say; :meth:`observe` returns a leader's death."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.pids: dict[str, int] = {}

    def seed(self, members: dict[str, dict[int, dict]]) -> None:
        """The members registered when the watch started (ControlPlane.members(), read after it started): a
        put the watch saw meanwhile is at least as new, and is kept."""
        for site, ranks in members.items():
            for rank, info in ranks.items():
                key = f"members/{site}/{rank}"
                if key not in self.pids:
                    self._remember(key, info)

    def observe(self, kind: str, key: str, value: dict | None) -> Lost | None:
        """One watch event (``key`` relative to the run, e.g. ``members/eu/0``)."""
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "members":
            return None
        _, site, rank = parts
        if kind == "put":
            self._remember(key, value)
            return None
        pid = self.pids.pop(key, None)
        if rank != str(LEADER_RANK) or pid is None:  # a key we never saw put cannot be told from an old one
            return None
        return Lost(site, pid, f"the etcd lease of its leader (pid {pid}, {key}) ended: the process exited, died "
                               f"or froze, or was cut off from etcd for recovery.heartbeat_ttl_s ({self.ttl_s:g}s)")

    def _remember(self, key: str, info: dict | None) -> None:
        pid = info.get("pid") if isinstance(info, dict) else None
        if isinstance(pid, int) and not isinstance(pid, bool):
            self.pids[key] = pid


def watch_members(control, ttl_s: float, on_lost: Callable[[Lost], None]) -> Callable[[], None]:
    """Follow ``members/`` of ``control``'s run; ``on_lost`` runs on its own thread for every leader whose
    lease ended (the watch's thread must not wait for a commit). Returns cancel()."""
    members = Members(ttl_s)
    lock = threading.Lock()

    def on_event(kind: str, key: str, value: dict | None) -> None:
        with lock:
            lost = members.observe(kind, key, value)
        if lost is not None:
            threading.Thread(target=on_lost, args=(lost,), name="member-lost", daemon=True).start()

    cancel = control.watch_prefix("members/", on_event)
    try:
        current = control.members()
    except Exception as exc:  # noqa: BLE001 - etcd away at start: the puts to come still seed it
        log.warning("could not read the members already registered: %s", exc)
        current = {}
    with lock:
        members.seed(current)
    return cancel
