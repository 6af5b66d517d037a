"""The launcher's decisions about its children, as pure functions (no processes, no clocks).

When a process of the run exits, :func:`on_exit` says what to do, given the recovery policy
of the topology and how often that group was restarted already:

- a worker that exits 0 is done; one that dies restarts its whole site (the site's process group
  cannot take a new member mid-flight), which rejoins at the next round, unless the policy is
  ``fail`` or the site used up its restarts;
- the coordinator is restarted (it takes up from its persisted state) unless the policy is
  ``fail``; etcd and link emulators are restarted on the same ports;
- anything beyond ``max_restarts`` fails the run, naming the process.
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.config.topology import RecoveryConfig


@dataclass(frozen=True)
class Action:
    action: str  # done | restart | fail
    reason: str


def on_exit(role: str, name: str, rc: int, how: str, restarts: int, policy: RecoveryConfig) -> Action:
    if role == "worker" and rc == 0:
        return Action("done", f"{name} finished")
    if restarts >= policy.max_restarts:
        return Action("fail", f"{name} died with {how}, and its group was already restarted {restarts} times "
                              f"(recovery.max_restarts = {policy.max_restarts})")
    if role == "worker":
        if policy.worker_failure == "fail":
            return Action("fail", f"{name} died with {how} (recovery.worker_failure = fail)")
        return Action("restart", f"{name} died with {how}; restarting its site")
    if role == "coordinator":
        if policy.coordinator_failure == "fail":
            return Action("fail", f"{name} died with {how} (recovery.coordinator_failure = fail)")
        return Action("restart", f"{name} died with {how}; restarting it from its persisted state")
    if role in ("etcd", "link"):
        return Action("restart", f"{name} died with {how}; restarting it on the same ports")
    return Action("fail", f"{name} died with {how}")


def heartbeat_lost(now: float, last_seen: float | None, alive: bool, ttl_s: float) -> Action | None:
    """A process that is alive but whose etcd lease expired is frozen (SIGSTOP keeps its sockets open)."""
    if not alive or last_seen is None:
        return None
    if now - last_seen > ttl_s * 2:
        return Action("kill", f"no heartbeat for {now - last_seen:.1f}s (lease TTL {ttl_s:g}s): frozen")
    return None
