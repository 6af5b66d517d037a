"""Who talks to whom in a merge: the star, or the rings of a ring / hierarchical merge.

A pure function of the topology. ``ring``: one ring over all sites in topology order.
``hierarchical``: a ring inside every region with more than one site (its first site is the
region's leader), and a ring of region leaders when there is more than one region. Each ring
edge ``site -> successor`` is one WAN link emulator with the parameters of ``topo.link(site,
successor)``. The first site of the top ring uploads the mean to the coordinator, which stays
the authority on rounds, membership and the global model.

A member's environment entry (:meth:`RingMember.as_env`, the leader's ``GEOTRAIN_RINGS``) names its
neighbours' sites too: with TLS a ring peer verifies its successor's certificate as
``site.<successor_site>`` and accepts only ``site.<predecessor_site>`` (geotrain.wan.ring).
"""

from __future__ import annotations

from dataclasses import dataclass

from geotrain.config.topology import Topology


@dataclass(frozen=True)
class RingMember:
    ring: str  # "all", "region:<name>" or "leaders"
    site: str
    rank: int
    world: int
    successor: str
    predecessor: str

    def as_env(self, listen_port: int, successor_address: str) -> dict:
        """``successor`` is the address to dial (the link emulator's); ``successor_site`` and
        ``predecessor_site`` the neighbours whose certificates this peer expects."""
        return {"ring": self.ring, "rank": self.rank, "world": self.world, "listen": listen_port,
                "successor": successor_address, "successor_site": self.successor,
                "predecessor_site": self.predecessor}


def ring_plan(topo: Topology) -> dict[str, list[RingMember]]:
    """site -> the rings it is a member of (empty for a star merge)."""
    merge = topo.training.merge
    out: dict[str, list[RingMember]] = {s.name: [] for s in topo.sites}
    if merge == "star" or len(topo.sites) < 2:
        return out

    def ring(name: str, sites: list[str]) -> None:
        for i, site in enumerate(sites):
            out[site].append(RingMember(name, site, i, len(sites), sites[(i + 1) % len(sites)],
                                        sites[(i - 1) % len(sites)]))

    if merge == "ring":
        ring("all", topo.site_names)
        return out
    regions: dict[str, list[str]] = {}
    for s in topo.sites:
        regions.setdefault(s.region or s.name, []).append(s.name)
    for region, sites in regions.items():
        if len(sites) > 1:
            ring(f"region:{region}", sites)
    leaders = [sites[0] for sites in regions.values()]
    if len(leaders) > 1:
        ring("leaders", leaders)
    return out


def uploader(topo: Topology) -> str:
    """The site that uploads the ring's mean to the coordinator (rank 0 of the top ring)."""
    return topo.sites[0].name
