"""The merged weights equal the DiLoCo formula, through the real gRPC coordinator and the SDK.

Two sites (threads, one worker each) start from the same model. Their inner steps are known in
advance (a fake gradient that depends on site, step and current weights), so the expected global
weights after each round can be computed directly: mean pseudo-gradient, then SGD with Nesterov
momentum (lr 0.7, momentum 0.9). Three rounds exercise the momentum buffer.
"""

import threading

import torch

from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.server import create_server
from geotrain.sdk import DiLoCo, SiteContext
from geotrain.config.topology import OuterOptimizerConfig

SITES = ["asia", "eu"]
H, ROUNDS, INNER_LR = 3, 3, 0.1


def fake_grad(site_idx: int, step: int, w: torch.Tensor) -> torch.Tensor:
    return 0.05 * (site_idx + 1) * (step % H + 1) * torch.ones_like(w) + 0.1 * w


def expected_trajectory(w0: torch.Tensor) -> list[torch.Tensor]:
    outer_lr, mu = 0.7, 0.9
    theta, buf, out = w0.clone().double(), None, []
    for r in range(ROUNDS):
        deltas = []
        for i in range(len(SITES)):
            w = theta.clone()
            for k in range(H):
                w = w - INNER_LR * fake_grad(i, r * H + k, w)
            deltas.append(theta - w)
        delta = sum(deltas) / len(deltas)
        buf = delta.clone() if buf is None else mu * buf + delta
        theta = theta - outer_lr * (delta + mu * buf)
        out.append(theta.clone())
    return out


def run_sites(outer: OuterOptimizerConfig):
    service = CoordinatorEngine(EngineConfig(sites=tuple(SITES), outer=outer))
    server, port = create_server(service)
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    seen: dict[str, list[torch.Tensor]] = {s: [] for s in SITES}
    errors = []

    def site(i: int, name: str) -> None:
        try:
            lin = torch.nn.Linear(3, 4, bias=False)
            with torch.no_grad():
                lin.weight.copy_(w0 if i == 0 else torch.zeros_like(w0))  # only the first site's init is used
            opt = torch.optim.SGD(lin.parameters(), lr=INNER_LR)
            ctx = SiteContext(run="t", site=name, rank=0, workers=1, coordinator=f"127.0.0.1:{port}")
            if i == 1:
                threading.Event().wait(0.5)  # let site 0 provide the initial model
            with DiLoCo(lin, opt, inner_steps=H, context=ctx) as dl:
                for step in range(ROUNDS * H):
                    lin.weight.grad = fake_grad(i, step, lin.weight.detach())
                    opt.step()
                    if dl.step():
                        seen[name].append(lin.weight.detach().clone())
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=site, args=(i, s)) for i, s in enumerate(SITES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.stop(0)
    assert not errors, errors
    assert service.state.round == ROUNDS
    return w0, seen


def test_three_rounds_of_merges_match_the_formula():
    w0, seen = run_sites(OuterOptimizerConfig())
    expected = expected_trajectory(w0)
    for name in SITES:
        assert len(seen[name]) == ROUNDS
        for r in range(ROUNDS):
            assert torch.allclose(seen[name][r].double(), expected[r], atol=1e-6, rtol=0), (name, r)


def test_formula_check_catches_a_wrong_outer_step():
    """Plain momentum instead of Nesterov agrees on round 0 but not after: the check can fail."""
    w0, seen = run_sites(OuterOptimizerConfig(nesterov=False))
    expected = expected_trajectory(w0)
    assert torch.allclose(seen["eu"][0].double(), expected[0], atol=1e-6) is False or \
        not torch.allclose(seen["eu"][1].double(), expected[1], atol=1e-6)
    assert not torch.allclose(seen["eu"][2].double(), expected[2], atol=1e-6)
