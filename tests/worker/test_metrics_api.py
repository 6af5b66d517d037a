"""The SDK's metrics API checks what a script reports (geotrain.worker.metrics)."""

import math

import pytest
import torch

from geotrain.errors import GeotrainError
from geotrain.worker.metrics import MAX_SCALARS, check_scalars, eval_fields


def test_scalars_numbers_and_one_element_tensors():
    assert check_scalars("log", {"acc": 0.5, "n": 3, "t_loss": torch.tensor(1.5)}) == {"acc": 0.5, "n": 3.0,
                                                                                      "t_loss": 1.5}
    assert math.isnan(check_scalars("log", {"x": float("nan")})["x"])  # recorded; a NaN *eval* fails the run


@pytest.mark.parametrize("scalars, words", [
    ({}, "at least one scalar"),
    ({"step": 1.0}, "cannot be a scalar's name"),
    ({"bad name": 1.0}, "cannot be a scalar's name"),
    ({"x" * 65: 1.0}, "cannot be a scalar's name"),
    ({"acc": "high"}, "acc: expected a number, got str"),
    ({"acc": True}, "expected a number, got bool"),
    ({"acc": torch.ones(3)}, "one-element tensor"),
    ({f"m{i}": 1.0 for i in range(MAX_SCALARS + 1)}, f"at most {MAX_SCALARS}"),
])
def test_bad_scalars_are_refused_with_the_name(scalars, words):
    with pytest.raises(GeotrainError, match=words):
        check_scalars("diloco.log", scalars)


def test_eval_fields_carry_the_metric_name():
    assert eval_fields("mse", torch.tensor(0.25), {"r2": 0.9}) == {"loss": 0.25, "metric": "mse", "r2": 0.9}
    with pytest.raises(GeotrainError, match="expected a name like"):
        eval_fields("my metric", 1.0, {})
