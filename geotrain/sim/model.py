"""What the simulator needs to know that a topology does not say: the model's size and the times.

:class:`SimParams` are given (``--params``, ``--step-s``), or fitted from a real run's history
(geotrain.sim.calibrate). Every time is in seconds of simulated time.

- ``numel``: parameters; a merge carries ``wire_bytes(numel, codec)`` up (geotrain.wire.compress, the
  codec's exact size) and ``down_bytes`` down (default: the same, fp32 for a fp32 run);
- ``step_s[site]``: one inner step of that site (its ``slowdown`` already in it when fitted; applied
  from the topology otherwise);
- ``startup_s``: from the launch to the first inner step; ``restart_s``: a killed site back at work;
  ``coordinator_restart_s``: a killed coordinator back (answering) from its persisted state;
  ``fault_clock_s``: the launcher's fault clock (``at`` and ``fault_rate`` times) starts this long after
  ``run_started`` (once it started the processes);
- ``standby_after_s``, ``standby_warm_s``, ``standby_slowdown``: a site's warm standbys (recovery.warm_standby)
  start ``standby_after_s`` after its first inner step in each life and import for ``standby_warm_s``;
  meanwhile its steps take ``standby_slowdown`` times ``step_s`` (they share the site's cores). 0 s: no such
  transient (the default when given, and where the calibration run never got past it);
- ``apply_s``: the coordinator's outer step per round; ``overhead_s[site]``: per merge, what a real
  merge costs beyond the modelled transfer (protocol, encode/decode, the site's broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from geotrain.config.schema import Topology
from geotrain.wire.compress import wire_bytes


@dataclass
class SimParams:
    numel: int
    step_s: dict[str, float]
    startup_s: float = 5.0
    restart_s: float = 5.0
    apply_s: float = 0.0
    overhead_s: dict[str, float] = field(default_factory=dict)
    down_bytes: int | None = None
    up_bytes: int | None = None
    eval_s: float = 0.0
    """The evaluating site's eval after each round (it delays that site's next round)."""
    shutdown_s: float = 1.0
    """From the last site done to the run's end (processes stopping, the summary written)."""
    coordinator_restart_s: float = 3.0
    fault_clock_s: float = 0.0
    standby_after_s: float = 0.0
    standby_warm_s: float = 0.0
    standby_slowdown: float = 1.0
    init_bytes: int | None = None
    """The initial model's fp32 bytes: the first site uploads it (InitModel), every site downloads it at Join.
    None: 4 × numel."""
    host_workers: int | None = None
    """Calibrated: the worker processes of the calibration run, all on its one host (a local launch)."""
    cpu_factor: float = 1.0
    """What :func:`on_shared_host` multiplied the CPU-bound times by (1: nothing)."""

    @classmethod
    def given(cls, topo: Topology, numel: int, step_s: float, **kw) -> "SimParams":
        """One step time for every site, scaled by its ``slowdown``."""
        return cls(numel=numel, step_s={s.name: step_s * s.slowdown for s in topo.sites}, **kw)

    def merge_bytes(self, topo: Topology) -> tuple[int, int]:
        """(up, down) bytes of one whole-model merge of one site."""
        c = topo.training.compression
        up = self.up_bytes if self.up_bytes is not None else wire_bytes(self.numel, c.codec, c.block, c.density,
                                                                            c.bits)
        down = self.down_bytes if self.down_bytes is not None else up
        return up, down

    def to_json(self) -> dict:
        return {"numel": self.numel, "step_s": self.step_s, "startup_s": self.startup_s, "restart_s": self.restart_s,
                "apply_s": self.apply_s, "overhead_s": self.overhead_s, "down_bytes": self.down_bytes,
                "up_bytes": self.up_bytes, "eval_s": self.eval_s, "shutdown_s": self.shutdown_s,
                "init_bytes": self.init_bytes, "coordinator_restart_s": self.coordinator_restart_s,
                "fault_clock_s": self.fault_clock_s, "standby_after_s": self.standby_after_s,
                "standby_warm_s": self.standby_warm_s, "standby_slowdown": self.standby_slowdown,
                "host_workers": self.host_workers, "cpu_factor": self.cpu_factor}


def replicated(topo: Topology, n: int) -> Topology:
    """``topo`` with ``n`` sites, each a copy of its first site named ``site0`` ... (links: the default; the
    coordinator where it was). For simulations past the schema's cap of MAX_SITES sites, which bounds what one
    real run's control plane takes: the copy is made without validating again (every other field was)."""
    first = topo.sites[0]
    sites = tuple(first.model_copy(update={"name": f"site{i}"}) for i in range(n))
    return topo.model_copy(update={"sites": sites})


def on_shared_host(p: SimParams, target_workers: int, cores: int) -> SimParams:
    """``p`` (calibrated on a run whose ``host_workers`` processes shared one host of ``cores`` cores) for a target
    whose ``target_workers`` processes share the same host, as every process of a local launch does.

    The CPU-bound times (steps, eval, start-up, restarts, the standbys' import, the per-merge overheads and the
    outer step) scale by ``max(1, target / cores) / max(1, calibration / cores)``: a process gets ``cores / busy``
    of a core when more are busy than there are cores. A static bound: it takes every worker as busy at once,
    which synchronous rounds nearly are, and leaves out the link emulators' and the coordinator's own CPU. On
    this 2-core machine the demo (4 workers) against three-continents (6): 1.5; measured 1.28 for the steps,
    1.56 for the start, 1.7 for the standbys' window (docs/results.md). Not for sites on hardware of their own."""
    if p.host_workers is None:
        raise ValueError("on_shared_host needs calibrated parameters (host_workers)")
    f = max(1.0, target_workers / cores) / max(1.0, p.host_workers / cores)
    q = replace(p, step_s={k: v * f for k, v in p.step_s.items()},
                overhead_s={k: v * f for k, v in p.overhead_s.items()})
    for name in ("startup_s", "restart_s", "eval_s", "standby_warm_s", "apply_s"):
        setattr(q, name, getattr(p, name) * f)
    q.cpu_factor = f
    return q

