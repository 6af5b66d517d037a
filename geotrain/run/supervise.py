"""The launcher's decisions about its children, as pure functions (no processes, no clocks).

When a process of the run exits, :func:`on_exit` says what to do, given the recovery policy
of the topology and how often that group was restarted already:

- a worker that exits 0 is done; one that dies restarts its whole site (the site's process group
  cannot take a new member mid-flight), which rejoins at the next round, unless the policy is
  ``fail`` or the site used up its restarts;
- the coordinator is restarted (it takes up from its persisted state) unless the policy is
  ``fail``; etcd and link emulators are restarted on the same ports;
- anything beyond ``max_restarts`` fails the run, naming the process;
- :func:`crash_loop`: a worker that raises the same error of the script's (type, line, message) as
  the crash that caused its site's previous restart fails the run at once, with the traceback: that is
  the user's bug, and restart budgets are for faults; so does one the coordinator refused for good (its
  model, its name or its certificate is not the run's): no restart can cure it.
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.config.topology import RecoveryConfig
from geotrain.wire.outcomes import PERMANENT

_PERMANENT = frozenset(o.name for o in PERMANENT)


@dataclass(frozen=True)
class Action:
    action: str  # done | restart | fail | crash_loop (fail, with the script's traceback) | kill
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


def crash_signature(crash: dict) -> tuple:
    """What makes two crashes "the same way": the error's type, where it was raised, and its message."""
    return crash.get("error"), crash.get("location"), crash.get("message")


def crash_loop(name: str, crash: dict | None, previous: dict | None, signalled: bool) -> Action | None:
    """Fail at once when ``crash`` (this exit's ``worker_crashed`` event) repeats ``previous`` (the one that
    restarted the site last time), or when the coordinator refused the worker for good (a PERMANENT outcome of
    geotrain.wire.outcomes: its name, its model, its certificate; the same refusal would follow every restart).
    Not a crash loop: no record (killed, or exited by itself), geotrain's other errors (``ours``: faults of the
    infrastructure), or a group member that died of a signal this time (a fault injected or the OOM killer; its
    peers' errors are consequences)."""
    if crash is None or signalled:
        return None
    if crash.get("outcome") in _PERMANENT:
        return Action("crash_loop", f"{name} was refused by the coordinator ({crash['outcome']}): "
                                    f"{crash.get('message', '')}\nno restart can cure that, so it is not restarted")
    if previous is None or crash.get("ours"):
        return None
    if crash_signature(crash) != crash_signature(previous):
        return None
    at = f"round {crash['round']}, step {crash['step']}" if crash.get("step") is not None else "start-up"
    return Action("crash_loop", f"{name} failed the same way twice ({crash['error']} at {crash['location']}, {at}): "
                          f"a bug in the script, not a fault, so it is not restarted again\n"
                          f"{str(crash.get('traceback', '')).rstrip()}")
