"""The topology turned into each component's config, once: values, the named policies, the links."""

from pathlib import Path

import pytest

from geotrain.config.components import WorkerConfig
from geotrain.config.derive import RPC_TIMEOUT_FLOOR_S, checkpoint_dir, derive, overlap_steps, rpc_timeout_s, worker_config
from geotrain.config.topology import apply_override, parse_topology
from geotrain.wan.merge_plan import ring_plan

BASE = {"name": "d", "seed": 5, "sites": [{"name": "a", "workers": 1, "region": "r1"},
                                          {"name": "b", "workers": 1, "region": "r2"},
                                          {"name": "c", "workers": 1, "region": "r1"}]}


def topo(*overrides: str):
    raw = BASE
    for item in overrides:
        raw = apply_override(raw, item)
    return parse_topology(raw)


def test_worker_config_is_built_from_every_field_explicitly():
    # adding a WorkerConfig field without its derive line would leave it at its hand-built default
    cfg = worker_config(topo(), Path("/run"))
    assert cfg.model_fields_set == set(WorkerConfig.model_fields)


def test_worker_config_values():
    t = topo("training.algorithm=async-diloco", "training.inner_steps=20", "training.rounds=4",
             "training.compression.codec=bf16", "training.compression.block=32", "training.async.overlap_steps=3",
             "training.streaming.alpha=0.75", "training.streaming.fragments=2", "checkpoint.every_rounds=0",
             "checkpoint.keep=5", "recovery.retry_deadline_s=9.5", "training.outer_optimizer.lr=0.3")
    cfg = worker_config(t, Path("/run"))
    assert (cfg.algorithm, cfg.inner_steps, cfg.rounds) == ("async-diloco", 20, 4)
    assert (cfg.codec, cfg.block, cfg.error_feedback) == ("bf16", 32, True)
    assert (cfg.overlap_steps, cfg.alpha, cfg.fragments) == (3, 0.75, 2)
    assert (cfg.checkpoint_dir, cfg.checkpoint_every, cfg.checkpoint_keep) == (Path("/run/checkpoints"), 0, 5)
    assert (cfg.retry_deadline_s, cfg.topology_sha256, cfg.num_sites) == (9.5, t.digest(), 3)
    assert cfg.outer_optimizer == {"name": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True,
                                   "schedule": {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1,
                                                "total_steps": 4}}  # the horizon made explicit: the run's rounds


@pytest.mark.parametrize("round_timeout_s, want", [(10, RPC_TIMEOUT_FLOOR_S), (150, 300.0), (151, 302.0), (1000.5, 2001.0)])
def test_rpc_timeout_is_twice_the_round_deadline_at_least_the_floor(round_timeout_s, want):
    assert rpc_timeout_s(topo(f"training.round_timeout_s={round_timeout_s}")) == want


@pytest.mark.parametrize("algorithm, want", [("async-diloco", 4), ("streaming-diloco", 2), ("diloco", 2), ("ddp", 2)])
def test_overlap_steps_is_the_running_algorithms(algorithm, want):
    t = topo(f"training.algorithm={algorithm}", "training.async.overlap_steps=4", "training.streaming.overlap_steps=2",
             "training.inner_steps=10")
    assert overlap_steps(t) == want == worker_config(t, Path("/r")).overlap_steps


@pytest.mark.parametrize("merge", ["ring", "hierarchical"])
def test_ring_uploader_is_rank_0_of_the_top_ring(merge):
    t = topo(f"training.merge={merge}")
    members = [m for ms in ring_plan(t).values() for m in ms]
    top = "all" if merge == "ring" else "leaders"
    rank0 = next(m.site for m in members if m.ring == top and m.rank == 0)
    assert worker_config(t, Path("/r")).ring_uploader == rank0 == "a"


def test_checkpoint_dir_is_the_topologys_or_the_run_dirs():
    assert checkpoint_dir(topo(), Path("/run")) == Path("/run/checkpoints")
    assert checkpoint_dir(topo("checkpoint.path=/ck"), Path("/run")) == Path("/ck")
    # a relative path is inside the run directory (one that climbs out of it is refused while loading)
    assert checkpoint_dir(topo("checkpoint.path=ck/a/../b"), Path("/run")) == Path("/run/ck/a/../b")


def test_a_link_per_remote_site_with_its_pair_spec():
    t = topo("coordinator.at=b", "links.default.bandwidth=1gbit", "links.default.latency=5ms",
             "links.pairs=[{between: [a, b], bandwidth: 10mbit, latency: 80ms, jitter: 2ms, loss: 0.01, streams: 8}]")
    links = derive(t, Path("/r")).site_links
    assert sorted(links) == ["a", "c"]  # b holds the coordinator: no WAN between them
    a, c = links["a"], links["c"]
    assert (a.name, a.bandwidth_mbps, a.latency_ms, a.jitter_ms, a.loss, a.seed, a.streams) == \
        ("a<->b", 10.0, 80.0, 2.0, 0.01, 5, 8)
    assert (c.name, c.bandwidth_mbps, c.latency_ms, c.loss, c.streams) == ("c<->b", 1000.0, 5.0, 0.0, 1)


def test_a_link_per_ring_edge():
    t = topo("training.merge=hierarchical",
             "links.pairs=[{between: [c, a], bandwidth: 7mbit, latency: 3ms}]")
    rings = derive(t, Path("/r")).ring_links
    plan = ring_plan(t)
    assert sorted(rings) == sorted((m.ring, site) for site, ms in plan.items() for m in ms)
    edge = rings[("region:r1", "c")]  # c -> a in region r1
    assert (edge.name, edge.bandwidth_mbps, edge.latency_ms) == ("region:r1:c->a", 7.0, 3.0)
    assert derive(topo(), Path("/r")).ring_links == {}  # star
