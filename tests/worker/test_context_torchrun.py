"""SiteContext.from_env under torchrun and for multi-node sites; the nodes' start agreement; node options."""

from pathlib import Path

import pytest

from geotrain.config.topology import parse_topology
from geotrain.errors import GeotrainError
from geotrain.run.nodes import next_start
from geotrain.run.site import NodeArgs, node_problem, site_env, worker_env
from geotrain.worker.context import SiteContext

TOPO = parse_topology({"name": "x", "sites": [{"name": "a", "workers": 2, "nodes": 2}, {"name": "b", "workers": 1}]})
KW = dict(run="x", run_dir=Path("/tmp/run"), topology_json=Path("/tmp/run/t.json"), coordinator="10.0.0.1:5000",
          etcd="10.0.0.1:2379", config_path=Path("/tmp/run/c.json"))
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none"}


def context(env: dict) -> SiteContext:
    env = dict(env)
    env.pop("GEOTRAIN_WORKER_CONFIG", None)  # no settings document here: WorkerConfig()'s defaults
    return SiteContext.from_env(env)


def test_a_torchrun_worker_is_a_geotrain_worker_with_the_site_env_only():
    ctx = context(site_env(TOPO.site("a"), **KW) | TORCHRUN)
    assert (ctx.site, ctx.rank, ctx.workers, ctx.local_rank, ctx.local_workers, ctx.node_rank) == ("a", 3, 4, 1, 2, 1)
    assert ctx.multi_node and not ctx.is_leader and ctx.device_index == 1 and ctx.elastic_run_id == "none"
    assert (ctx.master_addr, ctx.master_port, ctx.coordinator) == ("10.0.0.2", 29400, "10.0.0.1:5000")


def test_site_env_names_no_rank_and_the_site_size_over_its_nodes():
    env = site_env(TOPO.site("a"), **KW)
    assert env["GEOTRAIN_SITE_WORKERS"] == "4"
    assert not {"GEOTRAIN_SITE_RANK", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)


def test_torchrun_world_size_that_disagrees_with_the_topology_is_a_clear_error():
    env = site_env(TOPO.site("a"), **KW) | TORCHRUN | {"WORLD_SIZE": "3", "RANK": "1"}
    with pytest.raises(GeotrainError, match="GEOTRAIN_SITE_WORKERS='4' but WORLD_SIZE='3'"):
        context(env)


@pytest.mark.parametrize("bad, match", [({"RANK": "4"}, "rank 4 is outside the site's 4 workers"),
                                        ({"LOCAL_WORLD_SIZE": "5"}, "LOCAL_WORLD_SIZE=5 does not fit"),
                                        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside this node's 2 workers"),
                                        ({"RANK": "x"}, "RANK='x'")])
def test_impossible_ranks_are_refused(bad, match):
    env = {"GEOTRAIN_SITE": "a", "GEOTRAIN_COORDINATOR": "h:1"} | TORCHRUN | bad
    with pytest.raises(GeotrainError, match=match):
        context(env)


def test_worker_env_of_a_multinode_site_is_read_back_as_its_node_and_rank():
    for rank in range(4):
        env = worker_env(TOPO.site("a"), rank, **KW, master_port=29511, master_addr="10.0.0.2", rendezvous="t/1")
        ctx = context(env)
        assert (ctx.rank, ctx.workers, ctx.node_rank, ctx.local_rank, ctx.rendezvous) == (rank, 4, rank // 2, rank % 2, "t/1")
        assert ctx.multi_node and env["RANK"] == str(rank) and env["GROUP_RANK"] == str(rank // 2)
        assert "GLOO_SOCKET_IFNAME" not in env or env["GLOO_SOCKET_IFNAME"] != "lo"  # not pinned to loopback
    one = context(worker_env(TOPO.site("b"), 0, **KW, master_port=29512))
    assert (one.workers, one.multi_node, one.rendezvous) == (1, False, None)


def test_next_start_follows_node_0_and_a_new_token():
    assert next_start(None, 0, None) is None  # node 0 has made no start yet
    assert next_start("t", 1, None) == ("t", 1)
    assert next_start("t", 1, ("t", 1)) is None  # still the start this node joined: wait
    assert next_start("t", 2, ("t", 1)) == ("t", 2)
    assert next_start("u", 1, ("t", 5)) == ("u", 1)  # node 0's agent started over


def test_node_options_are_checked_against_the_site():
    assert node_problem(TOPO.site("b"), NodeArgs()) is None
    assert "--master-addr" in node_problem(TOPO.site("a"), NodeArgs(rank=1))
    assert "--node-rank 2" in node_problem(TOPO.site("a"), NodeArgs(rank=2, master_addr="h"))
    assert "--master-port 0" in node_problem(TOPO.site("a"), NodeArgs(rank=0, master_addr="h", master_port=0))
    assert node_problem(TOPO.site("a"), NodeArgs(rank=1, master_addr="h")) is None


def test_nodes_in_the_topology():
    assert parse_topology({"name": "x", "sites": [{"name": "a", "workers": 3}]}).sites[0].nodes == 1
    assert TOPO.site("a").world_size == 4
    assert parse_topology({"name": "x", "sites": [{"name": "a", "workers": 1, "nodes": 2}],
                           "faults": [{"kind": "kill", "target": "worker a/1", "at_round": 1}]}).faults
    with pytest.raises(GeotrainError, match=r"sites\[0\]\.nodes: input should be greater than or equal to 1, got 0"):
        parse_topology({"name": "x", "sites": [{"name": "a", "workers": 1, "nodes": 0}]})
    with pytest.raises(GeotrainError, match=r"sites\[0\]\.nodes: 32 nodes x 64 workers = 2048 processes in site 'a'"):
        parse_topology({"name": "x", "sites": [{"name": "a", "workers": 64, "nodes": 32}]})


def test_geotrain_site_without_master_addr_for_a_multinode_site_says_so(tmp_path, capsys):
    from geotrain.run.site import main

    topo = tmp_path / "t.yaml"
    topo.write_text("name: x\nsites:\n  - {name: a, workers: 1, nodes: 2}\n")
    code = main(["a", str(topo), "--etcd", "127.0.0.1:1", "--node-rank", "1", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "site 'a' spans 2 nodes: give every node --node-rank K and --master-addr HOST" in err
    assert "Traceback" not in err
