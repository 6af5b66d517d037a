"""The learning-rate schedules (geotrain.schedule) at given steps, and the outer one at given rounds."""

from __future__ import annotations

import math

import pytest
import torch

from geotrain.config.topology import OuterOptimizerConfig
from geotrain.orchestrator.outer import OuterOptimizer, outer_lr
from geotrain.schedule import lr_at, lr_factor


def test_warmup_is_linear_from_one_step_and_never_zero():
    assert [lr_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_runs_from_peak_to_floor_and_stays_there():
    kw = dict(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(9, **kw) == 1.0  # last warmup step
    assert lr_factor(10, **kw) == 1.0  # decay starts at the peak
    assert lr_factor(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of peak and floor
    assert lr_factor(110, **kw) == pytest.approx(0.1)
    assert lr_factor(10_000, **kw) == pytest.approx(0.1)  # the floor after total_steps
    values = [lr_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_linear_decay_and_constant():
    assert lr_factor(5, kind="linear", total_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(123, kind="constant") == 1.0
    assert lr_at(3, base_lr=2e-3, kind="linear", total_steps=4, min_lr_ratio=0.5) == pytest.approx(2e-3 * 0.625)


@pytest.mark.parametrize("kw, words", [
    (dict(kind="square"), "schedule kind"),
    (dict(kind="cosine"), "needs total_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_bad_schedules_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        lr_factor(3, **kw)


def test_outer_lr_follows_its_schedule_by_round():
    cfg = OuterOptimizerConfig(lr=0.8, momentum=0.0, schedule={"kind": "cosine", "warmup_steps": 2, "total_steps": 10,
                                                                "min_lr_ratio": 0.25})
    assert [round(outer_lr(cfg, r), 6) for r in (0, 1, 2, 10, 50)] == [0.4, 0.8, 0.8, 0.2, 0.2]
    assert outer_lr(cfg, None) == 0.8
    opt = OuterOptimizer(cfg)
    params, grad = torch.ones(4), torch.full((4,), 0.5)
    assert torch.equal(opt.step(params, grad, round=0), params - 0.4 * grad)
    assert torch.equal(opt.step(params, grad, round=10), params - 0.2 * grad)


def test_constant_outer_schedule_is_the_old_outer_step_bit_for_bit():
    """A constant schedule without warmup must leave the outer step exactly as it was (lr × update)."""
    cfg = OuterOptimizerConfig(lr=0.7, momentum=0.9, nesterov=True)
    a, b = OuterOptimizer(cfg), torch.optim.SGD([torch.nn.Parameter(torch.zeros(8))], lr=0.7, momentum=0.9,
                                               nesterov=True)
    theta = torch.linspace(-1, 1, 8)
    p = b.param_groups[0]["params"][0]
    p.data.copy_(theta)
    for r in range(5):
        g = torch.sin(torch.arange(8.0) + r)
        theta = a.step(theta, g, round=r)
        p.grad = g.clone()
        b.step()
    assert torch.allclose(theta, p.data, atol=1e-6) and math.isfinite(float(theta.sum()))
