"""Model fingerprints: which parameters a site trains, and the first difference from the run's."""

import pytest
import torch.nn as nn

from geotrain.orchestrator.engine import CoordinatorEngine, EngineConfig
from geotrain.orchestrator.fingerprint import decode_spec, encode_spec, first_difference, model_spec
from geotrain.orchestrator.results import Refused
from geotrain.wire.outcomes import Outcome


def test_spec_names_shapes_dtypes_in_order_and_skips_frozen():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    m[1].bias.requires_grad_(False)
    assert model_spec(m) == [("0.weight", (3, 4), "float32"), ("0.bias", (3,), "float32"), ("1.weight", (1, 3), "float32")]
    assert decode_spec(encode_spec(model_spec(m))) == model_spec(m)


def test_first_difference_names_both_tensors_and_counts():
    run = [("a.weight", (16, 4), "float32"), ("a.bias", (16,), "float32")]
    assert first_difference(run, list(run), "tokyo", "paris") is None
    why = first_difference(run, [("b.weight", (16, 4), "float32"), ("a.bias", (16,), "float32")], "tokyo", "paris")
    assert "tensor 0 is 'b.weight' [16, 4] float32 at tokyo, 'a.weight' [16, 4] float32 in the run's model" in why
    why = first_difference(run, run + [("c", (3,), "float32")], "tokyo", "paris")
    assert "83 parameters in 3 tensors" in why and "80 in 2" in why and "'c' [3] float32 at tokyo, nothing" in why
    assert "bfloat16" in first_difference(run, [(n, s, "bfloat16") for n, s, _ in run], "tokyo", "paris")


@pytest.mark.parametrize("text", ["{", "[1]", '[["a", [-1], "float32"]]', '[["a", [2], 3]]', "x" * (5 << 20)])
def test_malformed_fingerprints_are_refused_invalid(text):
    engine = CoordinatorEngine(EngineConfig(sites=("a",)))
    with pytest.raises(Refused) as info:
        engine.join("a", 1, 1, 0.0, model_spec=text)
    assert info.value.outcome == Outcome.INVALID


def test_the_engine_refuses_a_second_model():
    engine = CoordinatorEngine(EngineConfig(sites=("paris", "tokyo")))
    engine.join("paris", 1, 1, 0.0, model_spec=encode_spec([("w", (2, 2), "float32")]))
    engine.join("paris", 1, 1, 0.0, model_spec=encode_spec([("w", (2, 2), "float32")]))  # a rejoin: the same
    with pytest.raises(Refused) as info:
        engine.join("tokyo", 1, 2, 0.0, model_spec=encode_spec([("v", (4,), "float32")]))
    assert info.value.outcome == Outcome.MODEL_MISMATCH and "'v' [4] float32 at tokyo" in info.value.message
