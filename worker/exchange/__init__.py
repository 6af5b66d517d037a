"""How a site leader's update becomes the global model: the star (through the coordinator) or the
rings (among site leaders, falling back to the star). See base.py for the interface.

A new exchange is one class with the :class:`~geotrain.worker.exchange.base.Exchange` methods and
one line in :func:`open_exchange`.
"""

from __future__ import annotations

from geotrain.events import EventLog
from geotrain.worker.context import SiteContext
from geotrain.worker.exchange.base import Exchange, Exchanged
from geotrain.worker.exchange.ring import RingExchange
from geotrain.worker.exchange.star import Joined, StarExchange

__all__ = ["Exchange", "Exchanged", "Joined", "RingExchange", "StarExchange", "open_exchange"]


def open_exchange(ctx: SiteContext, events: EventLog, *, rings: bool) -> tuple[StarExchange, Exchange]:
    """The site leader's connection to the coordinator and the exchange its merges go through: the
    rings when the topology gives this leader some and the algorithm can use them (``rings``), else the star."""
    from geotrain.worker.client import CoordinatorClient

    if ctx.coordinator == "local":  # geotrain run-local: the coordinator's engine in this process
        from geotrain.run.local import local_client

        client = local_client(ctx)
    else:
        client = CoordinatorClient(ctx.coordinator, ctx.site, timeout_s=ctx.rpc_timeout_s,
                                   retry_deadline_s=ctx.retry_deadline_s, tls=ctx.tls,
                                   window_bytes=ctx.stream_window_bytes)
    star = StarExchange(client, site=ctx.site, workers=ctx.workers, codec=ctx.codec, block=ctx.block,
                        error_feedback=ctx.error_feedback, retry_deadline_s=ctx.retry_deadline_s, events=events,
                        density=ctx.density, bits=ctx.bits, error_feedback_decay=ctx.error_feedback_decay)
    if not (rings and ctx.rings):
        return star, star
    at_start = ctx.resume_round is None and all(m.get("at_start", True) for m in ctx.rings)
    return star, RingExchange(star, memberships=ctx.rings, num_sites=ctx.num_sites, uploader=ctx.ring_uploader,
                              outer_optimizer=ctx.outer_optimizer, codec=ctx.codec, block=ctx.block,
                              at_start=at_start, tls=ctx.tls)
