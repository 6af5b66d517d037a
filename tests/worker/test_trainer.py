"""The built-in trainer (geotrain/worker/main.py) stops on an eval loss that is not finite."""

import math

import pytest

from geotrain.errors import GeotrainError
from geotrain.worker.main import require_finite_eval


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_eval_loss_stops_the_trainer(loss):
    with pytest.raises(GeotrainError, match=f"eval loss at round 3 \\(inner step 30\\) is {loss}: the global model diverged"):
        require_finite_eval(loss, 3, 30)


def test_a_finite_eval_loss_goes_on():
    require_finite_eval(2.5, 3, 30)
    require_finite_eval(0.0, 0, 0)
