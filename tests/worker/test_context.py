"""SiteContext: identity from the environment, settings from one validated document, every old name readable."""

import dataclasses
import json
from pathlib import Path

import pytest

from geotrain.config.components import WorkerConfig
from geotrain.config.derive import worker_config
from geotrain.config.topology import parse_topology
from geotrain.errors import GeotrainError
from geotrain.run.site import worker_env, write_worker_config
from geotrain.worker.context import CONFIG_VAR, ENV_VARS, SiteContext, init

# Every attribute a worker (the SDK, the built-in trainer) reads as ctx.<name>, with its type before the reshape.
OLD_ATTRIBUTES = {
    "run": str, "site": str, "rank": int, "workers": int, "coordinator": str, "run_dir": (Path, type(None)),
    "etcd": (str, type(None)), "topology_path": (str, type(None)), "device": str, "master_addr": str,
    "master_port": int, "algorithm": str, "inner_steps": int, "rounds": int, "checkpoint_dir": (Path, type(None)),
    "checkpoint_every": int, "checkpoint_keep": int, "topology_sha256": str, "resume_round": (int, type(None)),
    "retry_deadline_s": float, "rpc_timeout_s": float, "codec": str, "block": int, "error_feedback": bool,
    "fragments": int, "overlap_steps": int, "alpha": float, "rings": tuple, "num_sites": int, "ring_uploader": str,
    "outer_optimizer": (dict, type(None)), "part": str, "is_leader": bool, "proc": str,
}

TOPO = parse_topology({
    "name": "ctx", "seed": 3, "sites": [{"name": "a", "workers": 2, "device": "cpu"}, {"name": "b", "workers": 1}],
    "training": {"algorithm": "streaming-diloco", "inner_steps": 12, "rounds": 5, "round_timeout_s": 400,
                 "compression": {"codec": "int8", "block": 64, "error_feedback": False},
                 "streaming": {"fragments": 3, "overlap_steps": 2, "alpha": 0.25},
                 "outer_optimizer": {"lr": 0.5, "momentum": 0.8}},
    "checkpoint": {"every_rounds": 2, "keep": 3}, "recovery": {"retry_deadline_s": 45},
})


def _launched(tmp_path: Path, rank: int = 0, **kw) -> dict[str, str]:
    """The environment geotrain launch / geotrain site give worker ``rank`` of site a."""
    path = write_worker_config(tmp_path, "a", worker_config(TOPO, tmp_path))
    return worker_env(TOPO.site("a"), rank, run=TOPO.name, run_dir=tmp_path, topology_json=tmp_path / "topology.json",
                      coordinator="127.0.0.1:7000", etcd="127.0.0.1:2379", config_path=path, master_port=29611, **kw)


def test_launched_worker_reads_identity_and_settings_with_the_old_values(tmp_path):
    rings = ({"ring": "all", "rank": 0, "world": 2, "listen": 4000, "successor": "127.0.0.1:4001", "at_start": True},)
    ctx = SiteContext.from_env(_launched(tmp_path, rank=1, resume_round=4, rings=rings))
    # identity
    assert (ctx.run, ctx.site, ctx.rank, ctx.workers, ctx.coordinator) == ("ctx", "a", 1, 2, "127.0.0.1:7000")
    assert (ctx.run_dir, ctx.etcd, ctx.topology_path) == (tmp_path, "127.0.0.1:2379", str(tmp_path / "topology.json"))
    assert (ctx.device, ctx.master_addr, ctx.master_port, ctx.resume_round) == ("cpu", "127.0.0.1", 29611, 4)
    assert ctx.rings == rings and (ctx.part, ctx.proc, ctx.is_leader) == ("a.1", "a/1", False)
    # settings: what the old GEOTRAIN_* variables carried
    assert (ctx.algorithm, ctx.inner_steps, ctx.rounds) == ("streaming-diloco", 12, 5)
    assert (ctx.checkpoint_dir, ctx.checkpoint_every, ctx.checkpoint_keep) == (tmp_path / "checkpoints", 2, 3)
    assert ctx.topology_sha256 == TOPO.digest()
    assert (ctx.retry_deadline_s, ctx.rpc_timeout_s) == (45.0, 800.0)
    assert (ctx.codec, ctx.block, ctx.error_feedback) == ("int8", 64, False)
    assert (ctx.fragments, ctx.overlap_steps, ctx.alpha) == (3, 2, 0.25)
    assert (ctx.num_sites, ctx.ring_uploader) == (2, "a")
    assert ctx.outer_optimizer == {"name": "sgd", "lr": 0.5, "momentum": 0.8, "nesterov": True,
                                   "schedule": {"kind": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1,
                                                "total_steps": 5}}  # the horizon made explicit: the run's rounds
    for name, kind in OLD_ATTRIBUTES.items():
        assert isinstance(getattr(ctx, name), kind), (name, getattr(ctx, name))


def test_the_environment_carries_identity_only(tmp_path):
    env = _launched(tmp_path)
    ours = {k for k in env if k.startswith("GEOTRAIN_")}
    assert ours <= set(ENV_VARS), ours - set(ENV_VARS)
    for setting in ("GEOTRAIN_INNER_STEPS", "GEOTRAIN_CODEC", "GEOTRAIN_RPC_TIMEOUT_S", "GEOTRAIN_OUTER"):
        assert setting not in env
    assert json.loads(Path(env[CONFIG_VAR]).read_text())["inner_steps"] == 12
    assert "GEOTRAIN_RINGS" not in env  # only a ring member's leader gets memberships


def test_every_setting_reads_as_an_attribute_and_names_do_not_collide():
    identity = {f.name for f in dataclasses.fields(SiteContext)}
    assert not identity & set(WorkerConfig.model_fields)
    ctx = SiteContext(run="r", site="s", rank=0, workers=1, coordinator="c", config=WorkerConfig(inner_steps=7))
    for name in WorkerConfig.model_fields:
        assert getattr(ctx, name) == getattr(ctx.config, name)
    assert ctx.inner_steps == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.inner_steps = 3


def test_hand_built_context_has_the_old_defaults():
    ctx = SiteContext(run="t", site="a", rank=0, workers=1, coordinator="127.0.0.1:1")
    assert (ctx.algorithm, ctx.inner_steps, ctx.rounds, ctx.checkpoint_every, ctx.checkpoint_keep) == ("diloco", 10, 1, 0, 2)
    assert (ctx.rpc_timeout_s, ctx.retry_deadline_s, ctx.codec, ctx.block, ctx.error_feedback) == (300.0, 120.0, "fp32", 256, True)
    assert (ctx.fragments, ctx.overlap_steps, ctx.alpha, ctx.num_sites, ctx.ring_uploader) == (1, 0, 0.5, 1, "")
    assert ctx.outer_optimizer is None and ctx.checkpoint_dir is None and ctx.rings == () and ctx.resume_round is None


def test_without_a_document_the_settings_are_the_defaults():
    ctx = SiteContext.from_env({"GEOTRAIN_SITE": "a", "GEOTRAIN_COORDINATOR": "h:1"})
    assert ctx.config == WorkerConfig() and (ctx.run, ctx.rank, ctx.workers) == ("geotrain", 0, 1)


def test_identity_env_round_trips():
    ctx = SiteContext(run="r", site="s", rank=2, workers=3, coordinator="c:1", run_dir=Path("/x"), etcd="e:2",
                      topology_path="/t.json", device="cuda", master_port=1234, resume_round=0,
                      rings=({"ring": "all", "rank": 2},))
    assert SiteContext.from_env(ctx.identity_env()) == ctx


def test_missing_identity_names_the_variables():
    with pytest.raises(GeotrainError, match="GEOTRAIN_SITE, GEOTRAIN_COORDINATOR not set.*geotrain launch"):
        SiteContext.from_env({})


@pytest.mark.parametrize("var, text", [("GEOTRAIN_SITE_RANK", "one"), ("MASTER_PORT", "x"),
                                       ("GEOTRAIN_RINGS", "[1, 2]"), ("GEOTRAIN_RINGS", "{not json")])
def test_bad_identity_variable_is_named(var, text):
    with pytest.raises(GeotrainError, match=var):
        SiteContext.from_env({"GEOTRAIN_SITE": "a", "GEOTRAIN_COORDINATOR": "h:1", var: text})


def test_bad_document_named_with_its_key(tmp_path):
    doc = tmp_path / "worker-config.a.json"
    doc.write_text(json.dumps({"inner_steps": 5, "inner_stepz": 6}))
    with pytest.raises(GeotrainError) as info:
        SiteContext.from_env({"GEOTRAIN_SITE": "a", "GEOTRAIN_COORDINATOR": "h:1", CONFIG_VAR: str(doc)})
    assert str(info.value).startswith(f"{doc}: inner_stepz: unknown key")


def test_explicit_context_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("GEOTRAIN_SITE", "from-env")
    monkeypatch.setenv("GEOTRAIN_COORDINATOR", "h:1")
    given = SiteContext(run="r", site="explicit", rank=0, workers=1, coordinator="c:1")
    assert init(given) is given
    assert init().site == "from-env"
