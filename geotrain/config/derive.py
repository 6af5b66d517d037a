"""The topology, turned once into what each component is told.

Policy that is not a topology field (for instance how long one RPC may take, given the round
deadline) is decided here, once, with its reason; components never read the Topology themselves
for settings.
"""

from __future__ import annotations

from geotrain.config.topology import Topology


def coordinator_config(topo: Topology, epoch: int = 0):
    """The coordinator engine's settings."""
    from geotrain.orchestrator.server import CoordinatorConfig

    tr = topo.training
    return CoordinatorConfig(sites=tuple(topo.site_names), algorithm=tr.algorithm,
                             outer=tr.outer_optimizer, round_timeout_s=tr.round_timeout_s,
                             min_sites=topo.recovery.min_sites, epoch=epoch, checkpoint_every=topo.checkpoint.every_rounds,
                             codec=tr.compression.codec, block=tr.compression.block,
                             error_feedback=tr.compression.error_feedback,
                             fragments=tr.streaming.fragments,
                             staleness_weight=tr.asynchronous.staleness_weight,
                             delayed_nesterov=tr.asynchronous.delayed_nesterov,
                             # ring or hierarchical merges: leaders rebuild their rings when the coordinator says so
                             rings=tr.merge != "star" and len(topo.sites) > 1)
