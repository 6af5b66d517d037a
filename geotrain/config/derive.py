"""The topology, turned once into what each component is told.

:func:`derive` gives a run's :class:`RunConfigs`: the workers' :class:`WorkerConfig` and a
:class:`LinkConfig` for every WAN link the launcher starts (site to coordinator, and each ring
edge). The coordinator builds its own with :func:`coordinator_config` in its own process (it
knows its epoch). Policy that is not a topology field (how long one RPC may take given the round
deadline, which τ a worker uses, who uploads a ring's mean) is decided here, once, by a named
function with its reason; components never read the Topology themselves for settings.

Adding a setting: its field in :mod:`geotrain.config.schema`, its line in the component's config
below (and the config class in :mod:`geotrain.config.components`), its use in the component.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geotrain.config.components import LinkConfig, WorkerConfig
from geotrain.config.topology import LinkSpec, OuterOptimizerConfig, Topology
from geotrain.schedule import schedule_args
from geotrain.wan.merge_plan import ring_plan, uploader


@dataclass(frozen=True)
class RunConfigs:
    """Everything the launcher hands out for one run."""

    worker: WorkerConfig
    """The same for every worker of every site."""
    site_links: dict[str, LinkConfig]
    """site -> the link between it and the coordinator's place; absent for a site that shares that place."""
    ring_links: dict[tuple[str, str], LinkConfig]
    """(ring, site) -> the ring edge from that site to its successor (ring and hierarchical merges)."""


def derive(topo: Topology, run_dir: Path) -> RunConfigs:
    """The configs of a run of ``topo`` whose directory is ``run_dir``."""
    at = topo.coordinator.at
    site_links = {}
    for site in topo.site_names:
        spec = topo.link(site, at)
        if spec is not None:
            site_links[site] = link_config(topo, f"{site}<->{at}", spec)
    ring_links = {(m.ring, site): link_config(topo, f"{m.ring}:{site}->{m.successor}", topo.link(site, m.successor))
                  for site, members in ring_plan(topo).items() for m in members}
    return RunConfigs(worker=worker_config(topo, run_dir), site_links=site_links, ring_links=ring_links)


def stream_window_bytes(topo: Topology) -> int:
    """The coordinator channel's HTTP/2 stream window for this topology (geotrain.wire.channel.window_for over the
    links between the sites and the coordinator): both ends use it."""
    from geotrain.wire.channel import window_for

    at = topo.coordinator.at
    specs = [topo.link(site, at) for site in topo.site_names]
    return window_for((s.bandwidth_mbps, s.latency_ms, s.jitter_ms) for s in specs if s is not None)


def worker_config(topo: Topology, run_dir: Path) -> WorkerConfig:
    """What every worker is told (geotrain.worker.context reads it back)."""
    tr, ck = topo.training, topo.checkpoint
    return WorkerConfig(
        algorithm=tr.algorithm, inner_steps=tr.inner_steps, rounds=tr.rounds,
        checkpoint_dir=checkpoint_dir(topo, run_dir), checkpoint_every=ck.every_rounds, checkpoint_keep=ck.keep,
        topology_sha256=topo.digest(),
        retry_deadline_s=topo.recovery.retry_deadline_s, rpc_timeout_s=rpc_timeout_s(topo),
        codec=tr.compression.codec, block=tr.compression.block, error_feedback=tr.compression.error_feedback,
        density=tr.compression.density, bits=tr.compression.bits,
        error_feedback_decay=tr.compression.error_feedback_decay,
        fragments=tr.streaming.fragments, overlap_steps=overlap_steps(topo), alpha=tr.streaming.alpha,
        num_sites=len(topo.sites), ring_uploader=uploader(topo),
        outer_optimizer=outer_optimizer(topo).model_dump(mode="json"),
        certs_dir=certs_dir(topo, run_dir), stream_window_bytes=stream_window_bytes(topo),
    )


def outer_optimizer(topo: Topology) -> OuterOptimizerConfig:
    """training.outer_optimizer with its schedule's horizon made explicit (an absent total_steps is the run's
    training.rounds): the coordinator and the ring leaders that mirror its outer step compute the same
    learning rate for every round from it, with no state (geotrain.schedule)."""
    outer = topo.training.outer_optimizer
    if outer.schedule.total_steps is not None:
        return outer
    return outer.model_copy(update={"schedule": outer.schedule.model_copy(update={"total_steps": topo.training.rounds})})


def certs_dir(topo: Topology, run_dir: Path) -> Path | None:
    """Where a run's certificates are: security.certs if given, else ``RUN_DIR/certs`` (the launcher makes
    them there, :func:`geotrain.security.pki.ensure_run_certs`); None when security.tls is false."""
    if not topo.security.tls:
        return None
    return Path(topo.security.certs) if topo.security.certs else run_dir / "certs"


def checkpoint_dir(topo: Topology, run_dir: Path) -> Path:
    """checkpoint.path (a relative one inside RUN_DIR), else ``RUN_DIR/checkpoints`` (every part's)."""
    return run_dir / topo.checkpoint.path if topo.checkpoint.path else run_dir / "checkpoints"


# The longest a Merge call may legitimately stay open is a whole round: it is answered only when the
# round commits, up to round_timeout_s after the round's first update, and then the answer crosses
# the WAN. Twice the round deadline covers both; at least 5 minutes, so that a big model over a slow
# link is never cut off by a short round deadline.
RPC_TIMEOUT_FLOOR_S = 300.0


def rpc_timeout_s(topo: Topology) -> float:
    """Deadline of one Merge/GetModel call: max(300 s, 2 x training.round_timeout_s)."""
    return max(RPC_TIMEOUT_FLOOR_S, topo.training.round_timeout_s * 2)


def overlap_steps(topo: Topology) -> int:
    """τ: the topology has one per algorithm section, each with the default that suits it (async: 0,
    the paper's protocol; streaming: 1); a worker runs one algorithm, so it gets that one's. The
    synchronous algorithms do not overlap: they are given streaming's, which they ignore."""
    tr = topo.training
    return tr.asynchronous.overlap_steps if tr.algorithm == "async-diloco" else tr.streaming.overlap_steps


def link_config(topo: Topology, name: str, spec: LinkSpec) -> LinkConfig:
    return LinkConfig(name=name, bandwidth_mbps=spec.bandwidth_mbps, latency_ms=spec.latency_ms,
                      jitter_ms=spec.jitter_ms, loss=spec.loss, seed=topo.seed, streams=spec.streams)


def coordinator_config(topo: Topology, epoch: int = 0):
    """The coordinator engine's settings."""
    from geotrain.orchestrator.engine import EngineConfig

    tr = topo.training
    return EngineConfig(sites=tuple(topo.site_names), algorithm=tr.algorithm,
                        outer=outer_optimizer(topo), round_timeout_s=tr.round_timeout_s,
                        min_sites=topo.recovery.min_sites, epoch=epoch, checkpoint_every=topo.checkpoint.every_rounds,
                        codec=tr.compression.codec, block=tr.compression.block,
                        density=tr.compression.density, bits=tr.compression.bits,
                        error_feedback_decay=tr.compression.error_feedback_decay,
                        quorum=tr.quorum.min_sites if tr.quorum else None,
                        quorum_grace_s=tr.quorum.grace_s if tr.quorum else 0.0,
                        error_feedback=tr.compression.error_feedback,
                        fragments=tr.streaming.fragments,
                        staleness_weight=tr.asynchronous.staleness_weight,
                        delayed_nesterov=tr.asynchronous.delayed_nesterov,
                        # ring or hierarchical merges: leaders rebuild their rings when the coordinator says so
                        rings=tr.merge != "star" and len(topo.sites) > 1,
                        aggregation=tr.aggregation, trim_fraction=tr.trim_fraction,
                        max_update_norm_ratio=(topo.security.max_gradient_norm_ratio if tr.algorithm == "ddp"
                                               else topo.security.max_update_norm_ratio),
                        norm_history=topo.security.norm_history,
                        inner_schedule=schedule_args(tr.inner_optimizer.schedule, tr.rounds * tr.inner_steps),
                        inner_steps=tr.inner_steps, rounds=tr.rounds)
