"""Named failpoints of the chaos suite (after etcd's tests/robustness/failpoint/).

Each failpoint has a ``name``, ``targets(topo)`` (what it can hit in this topology; empty means
not available) and ``inject(deployment, target, hold_s)``: it applies the fault, holds it for
``hold_s`` seconds, and undoes it in a ``finally`` (every fault has its undo, even when the
harness is interrupted), recording ``fault_injected`` / ``fault_healed`` in the run's
metrics.jsonl (docs/events.md) so that ``geotrain check`` sees when it happened. It returns a
:class:`FaultRecord` of what it did and when.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from geotrain.run.compose import link_files, link_service, remote_sites, site_service
from geotrain.config.topology import Topology


@dataclass
class FaultRecord:
    fault: str
    target: str
    params: dict
    injected_t: float
    healed_t: float | None = None
    notes: list[str] = field(default_factory=list)
    # What the failpoint measured, e.g. "undone": whether its undo took effect (a container running
    # again, a link back to its own parameters), "applied_s" / "restored_s" for a link.
    evidence: dict = field(default_factory=dict)

    def describe(self) -> str:
        held = f" {self.healed_t - self.injected_t:.1f}s" if self.healed_t else ""
        return f"{self.fault}({self.target}){held}"


def _confirm_status(record: FaultRecord, container, want: str) -> None:
    """Record whether the undo left the container in state ``want`` (``record.evidence["undone"]``)."""
    container.reload()
    record.evidence["undone"] = container.status == want
    if container.status != want:
        record.notes.append(f"{container.name} is {container.status} after the undo, not {want}")


class Failpoint:
    name = "?"
    kind = "site"  # what it hits: site | coordinator | etcd | link

    def targets(self, topo: Topology) -> list[str]:
        raise NotImplementedError

    def apply(self, dep, target: str, record: FaultRecord) -> None:
        raise NotImplementedError

    def undo(self, dep, target: str, record: FaultRecord) -> None:
        raise NotImplementedError

    def params(self, dep, target: str, hold_s: float) -> dict:
        return {"hold_s": hold_s}

    def hold(self, dep, record: FaultRecord, hold_s: float) -> None:
        """How long the fault stays: ``hold_s`` seconds (a failpoint whose effect is only seen when the run
        does something, e.g. writes a checkpoint, holds until it has been seen)."""
        time.sleep(hold_s)

    def inject(self, dep, target: str, hold_s: float) -> FaultRecord:
        if target not in self.targets(dep.topo):
            raise ValueError(f"failpoint {self.name}: {target!r} is not a target in this topology "
                             f"({', '.join(self.targets(dep.topo)) or 'none'})")
        params = self.params(dep, target, hold_s)
        record = FaultRecord(self.name, target, params, time.time())
        dep.chaos.emit("fault_injected", fault=self.name, target=target, params=params, duration_s=hold_s)
        try:
            self.apply(dep, target, record)
            self.hold(dep, record, hold_s)
        finally:
            try:
                self.undo(dep, target, record)
            finally:
                record.healed_t = time.time()
                dep.chaos.emit("fault_healed", fault=self.name, target=target, notes=record.notes)
        return record


class KillSite(Failpoint):
    """SIGKILL every process of a site's container (``container.kill()``), then start it again."""

    name, kind = "kill_site", "site"

    def targets(self, topo):
        return list(topo.site_names)

    def apply(self, dep, target, record):
        dep.container(site_service(target)).kill()

    def undo(self, dep, target, record):
        c = dep.container(site_service(target))
        c.reload()
        if c.status != "running":
            c.start()
        _confirm_status(record, c, "running")


class PauseSite(Failpoint):
    """Freeze a site's container (cgroup freezer: ``container.pause()``), then thaw it."""

    name, kind = "pause_site", "site"

    def targets(self, topo):
        return list(topo.site_names)

    def apply(self, dep, target, record):
        dep.container(site_service(target)).pause()

    def undo(self, dep, target, record):
        c = dep.container(site_service(target))
        c.reload()
        if c.status == "paused":
            c.unpause()
        _confirm_status(record, c, "running")


class DisconnectSite(Failpoint):
    """Cut a site's container off the network (``network.disconnect``), then connect it again
    under its service name (its DNS alias)."""

    name, kind = "disconnect_site", "site"

    def targets(self, topo):
        return list(topo.site_names)

    def apply(self, dep, target, record):
        dep.network().disconnect(dep.container(site_service(target)), force=True)

    def undo(self, dep, target, record):
        c = dep.container(site_service(target))
        c.reload()
        if dep.network().name not in c.attrs["NetworkSettings"]["Networks"]:
            dep.network().connect(c, aliases=[site_service(target)])
        c.reload()
        attached = dep.network().name in c.attrs["NetworkSettings"]["Networks"]
        record.evidence["undone"] = attached
        if not attached:
            record.notes.append(f"{c.name} is still not attached to {dep.network().name}")


class KillCoordinator(Failpoint):
    """SIGKILL the coordinator's container. The restart policy (``on-failure``) may bring it back;
    the engine does not apply it to a container killed through its API, so the harness starts it
    again when it is not running after ``hold_s`` (the record says which happened)."""

    name, kind = "kill_coordinator", "coordinator"

    def targets(self, topo):
        return ["coordinator"]

    def apply(self, dep, target, record):
        dep.container("coordinator").kill()

    def undo(self, dep, target, record):
        c = dep.container("coordinator")
        c.reload()
        if c.status == "running":
            record.notes.append("restarted by the restart policy")
        else:
            c.start()
            record.notes.append("started again by the harness")
        _confirm_status(record, c, "running")


class KillEtcd(Failpoint):
    """SIGKILL etcd's container, then start it again (its data volume survives)."""

    name, kind = "kill_etcd", "etcd"

    def targets(self, topo):
        return ["etcd"]

    def apply(self, dep, target, record):
        dep.container("etcd").kill()

    def undo(self, dep, target, record):
        c = dep.container("etcd")
        c.reload()
        if c.status != "running":
            c.start()
        _confirm_status(record, c, "running")


class DelayLink(Failpoint):
    """Degrade a site's WAN link through its control file on the shared run directory:
    ``{"forward": {"latency_ms": L}, "backward": {"latency_ms": L}}``; removing the file restores it.

    The link writes its current parameters to its stats file every 0.5 s: after the write and after
    the removal the failpoint watches that file (up to ``confirm_s``) and records in
    ``record.evidence`` how long the link took to apply the change (``applied_s``) and to restore its
    own parameters (``restored_s``), or None when it did not within ``confirm_s``."""

    name, kind = "delay_link", "link"
    latency_ms = 200.0
    confirm_s = 3.0

    def targets(self, topo):
        return remote_sites(topo)

    def params(self, dep, target, hold_s):
        return {"hold_s": hold_s, "latency_ms": self.latency_ms, "service": link_service(target)}

    def _control(self, dep, target):
        _, control = link_files(dep.topo, target, run_dir=str(dep.run_dir))
        return control

    def _latencies(self, dep, target) -> tuple[float, float] | None:
        stats, _ = link_files(dep.topo, target, run_dir=str(dep.run_dir))
        try:
            with open(stats) as f:
                doc = json.load(f)
            return float(doc["forward"]["latency_ms"]), float(doc["backward"]["latency_ms"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _await_latency(self, dep, target, want: float) -> tuple[float | None, tuple | None]:
        t0 = time.monotonic()
        seen = None
        while time.monotonic() - t0 < self.confirm_s:
            seen = self._latencies(dep, target)
            if seen == (want, want):
                return round(time.monotonic() - t0, 2), seen
            time.sleep(0.1)
        return None, seen

    def apply(self, dep, target, record):
        path = self._control(dep, target)
        doc = {"forward": {"latency_ms": self.latency_ms}, "backward": {"latency_ms": self.latency_ms}}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)  # the link polls the file every 0.2 s: never let it read half a document
        applied_s, seen = self._await_latency(dep, target, self.latency_ms)
        record.evidence["applied_s"] = applied_s
        if applied_s is None:
            record.notes.append(f"link still at {seen} ms {self.confirm_s:g}s after the control file was written")

    def undo(self, dep, target, record):
        try:
            os.remove(self._control(dep, target))
        except FileNotFoundError:
            pass
        own = dep.topo.link(target, dep.topo.coordinator.at).latency_ms
        restored_s, seen = self._await_latency(dep, target, own)
        record.evidence["restored_s"] = restored_s
        record.evidence["latency_after_ms"] = seen
        record.evidence["undone"] = restored_s is not None
        if restored_s is None:
            record.notes.append(f"link still at {seen} ms {self.confirm_s:g}s after the control file was removed "
                                f"(its own latency: {own:g} ms)")


class FillCheckpointVolume(Failpoint):
    """Make the checkpoint volume full: geotrain's ``disk_full`` file failpoint on the shared run
    directory (``checkpoints/.failpoints/disk_full``, geotrain.run.faults) makes every checkpoint write in
    every container fail with ENOSPC, as a full volume would; removing it frees the volume."""

    name, kind = "fill_checkpoint_volume", "checkpoints"

    def targets(self, topo):
        return ["checkpoints"]

    def _path(self, dep):
        return os.path.join(str(dep.run_dir), "checkpoints", ".failpoints", "disk_full")

    def apply(self, dep, target, record):
        path = self._path(dep)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()

    held_max_s = 60.0
    """The longest the volume stays full waiting for a checkpoint write to fail."""

    def hold(self, dep, record, hold_s):
        """At least ``hold_s``, and until a checkpoint write has failed (at most :attr:`held_max_s`): a checkpoint
        is written every few rounds, and under load rounds are slow enough for a fixed window to fall between
        two writes (CI, 2026-12-03: a 4 s window between writes 5.8 s apart). Never seeing one fails the
        scenario's check, as before."""
        time.sleep(hold_s)
        deadline = time.monotonic() + self.held_max_s - hold_s
        while time.monotonic() < deadline:
            if any(e.get("event") == "checkpoint_failed" and e.get("t", 0) >= record.injected_t for e in dep.events()):
                return
            time.sleep(0.25)
        record.notes.append(f"no checkpoint write failed in {self.held_max_s:g}s of a full volume")

    def undo(self, dep, target, record):
        try:
            os.remove(self._path(dep))
        except FileNotFoundError:
            pass
        record.evidence["undone"] = not os.path.exists(self._path(dep))


FAILPOINTS: dict[str, Failpoint] = {fp.name: fp for fp in (
    KillSite(), PauseSite(), DisconnectSite(), KillCoordinator(), KillEtcd(), DelayLink(), FillCheckpointVolume())}
