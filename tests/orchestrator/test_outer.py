import torch

from geotrain.orchestrator.outer import OuterOptimizer, mean_of
from geotrain.config.topology import OuterOptimizerConfig


def test_outer_step_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    theta = torch.randn(50)
    ref = theta.clone().requires_grad_(False)
    p = torch.nn.Parameter(ref.clone())
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterOptimizer(OuterOptimizerConfig())
    for _ in range(4):
        g = torch.randn(50)
        p.grad = g.clone()
        opt.step()
        theta = outer.step(theta, g)
        assert torch.allclose(theta, p.detach(), atol=1e-6)


def test_plain_momentum_and_no_momentum():
    g = torch.ones(3)
    o = OuterOptimizer(OuterOptimizerConfig(momentum=0.0, lr=0.5))
    assert torch.equal(o.step(torch.zeros(3), g), torch.full((3,), -0.5))
    o = OuterOptimizer(OuterOptimizerConfig(momentum=0.5, nesterov=False, lr=1.0))
    x = o.step(torch.zeros(3), g)      # buf = 1
    x = o.step(x, g)                   # buf = 1.5
    assert torch.allclose(x, torch.full((3,), -2.5))


def test_mean_is_order_independent_and_exact():
    ups = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([3.0, 4.0]), "c": torch.tensor([5.0, 0.0])}
    assert torch.equal(mean_of(ups), torch.tensor([3.0, 2.0]))
    assert torch.equal(mean_of(dict(reversed(list(ups.items())))), mean_of(ups))
