"""Aggregation rules, coordinate-wise, with known numbers; a byzantine value the mean follows and
the robust rules ignore."""

import pytest
import torch

from geotrain.orchestrator.aggregate import AGGREGATORS, Mean, Median, TrimmedMean, aggregator
from geotrain.orchestrator.outer import mean_of


def ups(*rows):
    return {f"s{i}": torch.tensor(r, dtype=torch.float32) for i, r in enumerate(rows)}


def test_the_mean_is_the_coordinators_mean_bit_for_bit():
    u = {s: torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i, s in enumerate("dcba")}
    assert torch.equal(Mean()(u), mean_of(u))


def test_known_numbers():
    u = ups([1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -1000.0])
    assert torch.equal(Mean()(u), torch.tensor([22.0, -180.0]))
    assert torch.equal(Median()(u), torch.tensor([3.0, 20.0]))
    # n=5, trim 0.25: floor(1.25) = 1 dropped at each end, per coordinate
    assert torch.equal(TrimmedMean(0.25)(u), torch.tensor([3.0, 20.0]))
    assert torch.equal(TrimmedMean(0.4)(u), torch.tensor([3.0, 20.0]))  # floor(2.0) = 2: the median
    assert torch.equal(Median()(ups([1.0], [2.0], [3.0], [10.0])), torch.tensor([2.5]))


def test_a_byzantine_value_moves_the_mean_but_not_the_robust_rules():
    honest = [[1.0, -1.0], [1.2, -0.8], [0.8, -1.2]]
    clean = ups(*honest)
    poisoned = ups(*honest, [1e6, -1e6])
    assert abs(Mean()(poisoned)[0] - Mean()(clean)[0]) > 1e5
    for rule in (Median(), TrimmedMean(0.25)):
        robust = rule(poisoned)
        assert (robust - torch.tensor([1.0, -1.0])).abs().max() <= 0.2 + 1e-6, (rule.name, robust)


def test_fewer_than_three_sites_is_the_mean_in_effect():
    for u in (ups([1.0, 2.0]), ups([1.0, 2.0], [3.0, 7.0])):
        for rule in (Median(), TrimmedMean(0.25), TrimmedMean(0.49)):
            assert torch.equal(rule(u), mean_of(u))


def test_the_registry_builds_each_rule_and_refuses_an_unknown_one():
    assert set(AGGREGATORS) == {"mean", "trimmed-mean", "median"}
    assert aggregator("trimmed-mean", 0.1).trim_fraction == 0.1 and aggregator("median").name == "median"
    with pytest.raises(ValueError, match="unknown aggregation 'krum'"):
        aggregator("krum")
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)


def test_the_engine_commits_the_outer_step_of_the_configured_rule():
    from geotrain.config.topology import OuterOptimizerConfig
    from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
    from geotrain.orchestrator.outer import OuterOptimizer
    from geotrain.orchestrator.results import Update

    class Quiet:
        def emit(self, *a, **k):
            pass

    sites = ("a", "b", "c", "d")
    u = {s: torch.tensor([float(i + 1), 100.0 if s == "d" else 1.0]) for i, s in enumerate(sites)}
    e = CoordinatorEngine(EngineConfig(sites=sites, aggregation="trimmed-mean", trim_fraction=0.25), events=Quiet())
    e.init_model("a", torch.zeros(2))
    for s in sites[:-1]:
        with e._cond:
            up = Update(site=s, round=0, kind="pseudo_grad", version=0, values=u[s])
            e._admit(e.lanes[0], up, 0.0, e._validate(e.lanes[0], up, 0.0))
    e.merge(Update(site="d", round=0, kind="pseudo_grad", version=0, values=u["d"]), 0.0, lambda: True)
    expected = OuterOptimizer(OuterOptimizerConfig()).step(torch.zeros(2), TrimmedMean(0.25)(u))
    assert torch.equal(e.params, expected) and TrimmedMean(0.25)(u)[1] == 1.0


def test_the_coordinator_is_told_the_topologys_aggregation_and_norm_bound():
    from geotrain.config.derive import coordinator_config
    from geotrain.config.topology import load_topology

    topo = load_topology("topologies/demo.yaml", ["training.aggregation=median", "security.norm_history=5",
                                                  "security.max_update_norm_ratio=null"])
    cfg = coordinator_config(topo)
    assert (cfg.aggregation, cfg.norm_history, cfg.max_update_norm_ratio) == ("median", 5, None)
    default = coordinator_config(load_topology("topologies/demo.yaml"))
    assert (default.aggregation, default.trim_fraction, default.max_update_norm_ratio) == ("mean", 0.25, 10.0)
