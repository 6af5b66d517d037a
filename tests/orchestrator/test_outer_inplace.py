"""The in-place outer step gives the bits of OuterOptimizer.step, round after round."""

import pytest
import torch

from geotrain.config.topology import OuterOptimizerConfig
from geotrain.orchestrator.outer import OuterOptimizer
from geotrain.orchestrator.outer_inplace import InPlaceOuterOptimizer

CONFIGS = [
    OuterOptimizerConfig(),
    OuterOptimizerConfig(nesterov=False),
    OuterOptimizerConfig(momentum=0.0),
    OuterOptimizerConfig(lr=0.3, momentum=0.5, schedule={"kind": "cosine", "warmup_steps": 2, "total_steps": 6}),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["nesterov", "plain", "no-momentum", "scheduled"])
@pytest.mark.parametrize("slices", [[slice(None)], [slice(0, 40), slice(40, 101)]], ids=["whole", "fragments"])
def test_the_same_bits_as_the_outer_step(cfg, slices):
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(101, generator=gen)
    ref, fast = OuterOptimizer(cfg), InPlaceOuterOptimizer(cfg)
    p_ref, p_fast = params.clone(), params.clone()
    for rnd in range(5):
        for sl in slices:
            n = len(range(101)[sl])
            grad = torch.randn(n, generator=gen) * (10 ** rnd)
            before = p_fast.clone()
            p_ref = ref.step(p_ref, grad, sl, round=rnd)
            new = fast.step(p_fast, grad.clone(), sl, round=rnd)
            assert torch.equal(p_fast, before), "the parameters passed in are never written"
            p_fast = new
            assert torch.equal(p_ref, p_fast), (rnd, sl)
            assert (ref.buf is None) == (fast.buf is None)
            if ref.buf is not None:
                assert torch.equal(ref.buf, fast.buf)


def test_a_different_formula_is_caught():
    """The comparison above can fail: an outer step off by one ulp somewhere is not equal."""
    cfg = OuterOptimizerConfig()
    a, b = OuterOptimizer(cfg), InPlaceOuterOptimizer(cfg)
    p, g = torch.randn(64), torch.randn(64)
    good = a.step(p, g)
    bad = b.step(p, g * (1 + 2 ** -23))
    assert not torch.equal(good, bad)
