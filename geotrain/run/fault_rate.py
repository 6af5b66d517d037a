"""Faults at a rate: a seeded Poisson process of faults for the whole run (topology ``fault_rate``).

:class:`FaultDraws` is pure: given the rate, the topology and a seed it yields the same
``(seconds after start, FaultSpec)`` sequence every time — gaps drawn from an exponential of mean
``mtbf_s``, a kind uniformly from ``kinds``, a target uniformly among those the kind applies to
(``partition_link`` only sites with a WAN link to the coordinator). The launcher's FaultScheduler
asks it for the next fault and fires it through the same failpoints as a scheduled one.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from geotrain.config.schema import FaultRateConfig, FaultSpec, Topology

MAX_DRAWS = 100_000
"""Faults one run may draw at most (a 1 s MTBF for more than a day)."""


def targets(topo: Topology, kind: str) -> list[tuple[str, str]]:
    """(failpoint kind, target) pairs a drawn ``kind`` may hit in ``topo``."""
    if kind == "kill_worker":
        return [("kill", f"worker {s.name}/{r}") for s in topo.sites for r in range(s.world_size)]
    if kind == "kill_site":
        return [("kill", f"site {s.name}") for s in topo.sites]
    if kind == "freeze_site":
        return [("freeze", f"site {s.name}") for s in topo.sites]
    if kind == "partition_link":
        return [("partition", f"link {s.name}") for s in topo.sites if topo.link(s.name, topo.coordinator.at)]
    if kind == "kill_coordinator":
        return [("kill", "coordinator")]
    raise ValueError(f"unknown fault kind {kind!r}")


class FaultDraws:
    def __init__(self, rate: FaultRateConfig, topo: Topology):
        self.rate = rate
        self.choices = {k: targets(topo, k) for k in rate.kinds}
        self.kinds = [k for k in rate.kinds if self.choices[k]]
        self._rng = random.Random(f"geotrain-fault-rate/{rate.seed}/{topo.digest()}")
        self._t = rate.start_after_s
        self.drawn = 0

    def __iter__(self) -> Iterator[tuple[float, FaultSpec]]:
        while self.kinds and self.drawn < MAX_DRAWS:
            yield self.next()

    def next(self) -> tuple[float, FaultSpec]:
        """The next fault: when (seconds after the run started) and what."""
        self._t += self._rng.expovariate(1.0 / self.rate.mtbf_s)
        kind = self._rng.choice(self.kinds)
        failpoint, target = self._rng.choice(self.choices[kind])
        self.drawn += 1
        fields = {"kind": failpoint, "target": target, "at": f"{self._t * 1000:.3f}ms"}
        if failpoint in ("freeze", "partition"):
            fields["duration"] = f"{self.rate.duration_s * 1000:.3f}ms"
        return self._t, FaultSpec.model_validate(fields)
