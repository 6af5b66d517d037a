"""The ring (or hierarchical) exchange: site leaders all-reduce their pseudo-gradients among themselves.

One round (docs/algorithms.md): the leaders all-reduce the pseudo-gradient over their rings
(geotrain.wan.ring; hierarchical: inside the region first, then among region leaders), each applies
the outer step itself with a mirrored copy of the coordinator's outer optimizer, the site named
``ring_uploader`` uploads the mean and the others its CRC32, and the coordinator answers with the
CRC32 of the weights it committed, which must equal this leader's.

Any failure abandons the rings (a ``ring_abandoned`` event) and the round goes through the star
(:class:`~geotrain.worker.exchange.star.StarExchange`). When every site has merged a round through
the star, the coordinator's answer names the round at which to rebuild them (``ring_round``): the
leader then fetches the coordinator's outer momentum as of that round and reconnects.

With ``tls`` (the site's certificate, ``SiteContext.tls``) every ring edge is mutual TLS: a leader
accepts only its predecessor's certificate ``site.<predecessor_site>`` and verifies its successor's
``site.<successor_site>`` (the names in its GEOTRAIN_RINGS entries, geotrain.wan.merge_plan).
"""

from __future__ import annotations

import time

import torch

from geotrain.errors import GeotrainError, TransferCorrupt
from geotrain.wire.transport import fingerprint
from geotrain.worker.exchange.base import Exchanged
from geotrain.worker.exchange.star import StarExchange

REBUILD_TIMEOUT_S = 20.0  # rebuilding the rings mid-run: how long a leader waits for its ring neighbours
START_TIMEOUT_S = 60.0  # building them at the run's start


class RingExchange:
    """A leader's rings (``memberships``: its GEOTRAIN_RINGS entries), in front of ``star``."""

    def __init__(self, star: StarExchange, *, memberships: tuple, num_sites: int, uploader: str,
                 outer_optimizer: dict | None, codec: str, block: int, at_start: bool, tls=None):
        self.star = star
        self.tls = tls
        self.memberships = memberships
        self.num_sites = num_sites
        self.uploader = uploader
        self.outer_cfg = outer_optimizer or {}
        self.codec, self.block = codec, block
        self.at_start = at_start
        self.site = star.site
        self.events = star.events
        self._rings: dict = {}
        self._outer = None  # the mirrored outer optimizer, made when the rings are built

    def begin(self, round: int) -> None:
        """Build the rings now when the run starts fresh; otherwise wait for the coordinator's word."""
        if round == 0 and self.at_start:
            self._connect(round, timeout_s=START_TIMEOUT_S)

    def traffic(self) -> tuple[int, int]:
        return self.star.traffic()

    def exchange(self, update: torch.Tensor, base: torch.Tensor, *, round: int, base_version: int,
                 fragment: int = 0, part: slice = slice(None), fetch_after: int = 0) -> Exchanged:
        if not self._rings and self.star.ring_round == round:
            self._rebuild(round)
        if self._rings:
            result = self._ring_round(update, base, round)
            if result is not None:
                return result
        return self.star.exchange(update, base, round=round, base_version=base_version, fragment=fragment,
                                  part=part, fetch_after=fetch_after)

    def close(self) -> None:
        for peer in self._rings.values():
            peer.close()
        self._rings = {}
        self.star.close()

    # ---- the rings ----
    def _connect(self, round: int, timeout_s: float, momentum: torch.Tensor | None = None,
                 started: float | None = None) -> None:
        """Build this leader's rings (geotrain.wan.merge_plan); the outer step then runs here too, mirrored
        (from ``momentum``, the coordinator's outer momentum, when the rings are rebuilt mid-run: always
        at a round > 0, since the coordinator's ring_round is the round after a star round)."""
        from geotrain.config.topology import OuterOptimizerConfig
        from geotrain.orchestrator.outer import OuterOptimizer
        from geotrain.wan.ring import RingPeer

        t0 = time.perf_counter() if started is None else started
        try:
            for m in self.memberships:
                peer = RingPeer(m["rank"], m["world"], listen=("127.0.0.1", m["listen"]), timeout_s=timeout_s,
                                **self._identities(m))
                peer.start()
                self._rings[m["ring"]] = peer
            for m in self.memberships:
                host, port = m["successor"].rsplit(":", 1)
                self._rings[m["ring"]].connect((host, int(port)))
        except GeotrainError as exc:
            self._abandon(round, f"could not build the rings: {exc}")
            return
        self._outer = OuterOptimizer(OuterOptimizerConfig(**self.outer_cfg))
        self._outer.buf = momentum
        self.events.emit("rings_ready", site=self.site, rings=sorted(self._rings), round=round,
                         rebuilt=round > 0, seconds=_rounded(time.perf_counter() - t0))

    def _identities(self, m: dict) -> dict:
        """The TLS arguments of the RingPeer for membership ``m`` (none for plaintext)."""
        if self.tls is None:
            return {}
        from geotrain.security.pki import site_name

        missing = [k for k in ("predecessor_site", "successor_site") if not m.get(k)]
        if missing:
            raise GeotrainError(f"site {self.site}: ring {m.get('ring')!r} membership has no "
                                  f"{' or '.join(missing)}: cannot check its neighbours' certificates")
        return {"tls": self.tls, "expect_predecessor": site_name(m["predecessor_site"]),
                "expect_successor": site_name(m["successor_site"])}

    def _rebuild(self, round: int) -> None:
        """The coordinator said: every site merged the last round through the star, rebuild the rings
        for this one. The ring's outer step is mirrored here, so first fetch the coordinator's outer
        momentum as of this round (the star rounds moved it). Any failure: this round goes through the star."""
        t0 = time.perf_counter()
        try:
            p = self.star.fetch(round, what="momentum")
        except GeotrainError as exc:
            self.events.emit("ring_abandoned", site=self.site, round=round, reason=f"no outer momentum: {exc}")
            return
        if p.version != round:  # the round moved on without us: not a ring round any more
            self.events.emit("ring_abandoned", site=self.site, round=round,
                             reason=f"the coordinator is at version {p.version}, not {round}")
            return
        momentum = p.tensor().clone() if p.numel else None
        self._connect(round, timeout_s=REBUILD_TIMEOUT_S, momentum=momentum, started=t0)

    def _abandon(self, round: int, reason: str) -> None:
        for peer in self._rings.values():
            peer.close()
        if self._rings:
            self.events.emit("ring_abandoned", site=self.site, round=round, reason=reason)
        self._rings = {}

    def _ring_round(self, update: torch.Tensor, base: torch.Tensor, round: int) -> Exchanged | None:
        """All-reduce the pseudo-gradient among leaders, step the mirrored outer optimizer, have the
        coordinator confirm. None: the ring failed, merge this round through the star."""
        from geotrain.wan.ring import hierarchical_all_reduce

        local = next((p for name, p in self._rings.items() if name.startswith("region:")), None)
        leaders = self._rings.get("leaders") or self._rings.get("all")
        try:
            mean = hierarchical_all_reduce(update, local=local, leaders=leaders, world=self.num_sites,
                                           op="mean", round=round, codec=self.codec, block=self.block)
            claimed = fingerprint(mean)
            upload = self.site == self.uploader
            p = self.star.client.merge(mean if upload else torch.zeros(0), round=round,
                                       kind="ring_mean" if upload else "ring_ack", version=round,
                                       claimed_crc32=claimed)
            new = self._outer.step(base, mean, round=round)
            if p.kind != "ring_commit" or p.params_crc32 != fingerprint(new):
                raise TransferCorrupt(f"site {self.site}, round {round}: after the ring merge the coordinator "
                                      f"holds weights with CRC32 {p.params_crc32}, this site {fingerprint(new)}")
            return Exchanged(new, p.version)
        except GeotrainError as exc:
            self._abandon(round, str(exc))
            return None


def _rounded(seconds: float) -> float:
    """Seconds as events record them (``round`` is a parameter name above)."""
    return round(seconds, 6)
