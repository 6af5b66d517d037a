"""geotrain.run.summary: which events show that a run's global model went non-finite (the launcher fails
the run on the first one)."""

from __future__ import annotations

import math

import pytest

from geotrain.run.summary import model_failure, nonfinite_model


@pytest.mark.parametrize("event, words", [
    ({"event": "commit", "round": 3, "finite": False, "norm": math.nan}, ["commit of round 3", "non-finite"]),
    ({"event": "model_nonfinite", "round": 2, "reason": "12 parameters are inf"}, ["round 2", "12 parameters are inf"]),
    ({"event": "eval", "round": 1, "step": 10, "loss": math.nan}, ["eval loss at round 1 is nan"]),
    ({"event": "eval", "round": 4, "step": 40, "loss": -math.inf}, ["eval loss at round 4 is -inf"]),
])
def test_a_nonfinite_sign_is_named(event, words):
    reason = nonfinite_model(event)
    assert reason is not None and all(w in reason for w in words), reason


@pytest.mark.parametrize("event", [
    {"event": "commit", "round": 3, "finite": True, "norm": 12.5},
    {"event": "commit", "round": 3},  # an older coordinator: no digest, no verdict
    {"event": "eval", "round": 1, "loss": 2.5},
    {"event": "eval", "round": 1, "loss": None},
    {"event": "inner_step", "site": "eu-west", "loss": math.nan},  # a site's own training loss is not the global model
])
def test_healthy_or_silent_events_are_not_a_failure(event):
    assert nonfinite_model(event) is None


def test_model_failure_is_the_first_sign():
    history = [{"event": "eval", "round": 0, "loss": 5.5}, {"event": "commit", "round": 0, "finite": True},
               {"event": "commit", "round": 1, "finite": False, "norm": math.inf},
               {"event": "eval", "round": 2, "loss": math.nan}]
    assert "commit of round 1" in model_failure(history)
    assert model_failure(history[:2]) is None
    assert model_failure([]) is None


def _topo(rounds=4, algorithm="diloco"):
    from geotrain.config.topology import parse_topology

    return parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                           "training": {"rounds": rounds, "algorithm": algorithm}}, source="t.yaml")


def test_history_failure_names_a_nonfinite_model_before_missing_rounds():
    from geotrain.run.summary import history_failure

    topo = _topo()
    steps = [{"event": "inner_step", "site": "a", "step": 1, "round": 0}]
    full = steps + [{"event": "commit", "round": r, "finite": True} for r in range(4)]
    assert history_failure(full, topo) is None
    assert history_failure(full[:3], topo) == "the run exited after round 2 of 4 (training.rounds)"
    bad = full[:2] + [{"event": "commit", "round": 1, "finite": False, "norm": math.nan}]
    assert history_failure(bad, topo).startswith("the global model went non-finite: ")


def test_shortfall_no_step_early_exit_and_complete():
    from geotrain.run.summary import shortfall

    topo = _topo()
    assert "no site called diloco.step()" in shortfall([], topo, script=True)
    steps = [{"event": "inner_step", "site": "a", "step": 1, "round": 0}]
    commits = [{"event": "commit", "round": r} for r in range(2)]
    assert shortfall(steps + commits, topo, script=True) == "the script exited after round 2 of 4 (training.rounds)"
    assert shortfall(steps + commits, topo) == "the run exited after round 2 of 4 (training.rounds)"
    full = steps + [{"event": "commit", "round": r} for r in range(4)]
    assert shortfall(full, topo, script=True) is None
    # a resumed run commits some rounds twice: counted once
    assert shortfall(full + commits, topo) is None


def test_async_rounds_are_counted_from_commits_per_site():
    """async DiLoCo: a site killed after the coordinator committed its update, before it logged its merge,
    still merged; a site with fewer commits than planned is a shortfall."""
    from geotrain.run.summary import rounds_completed, shortfall

    topo = _topo(rounds=3, algorithm="async-diloco")
    steps = [{"event": "inner_step", "site": "a", "step": 1, "round": 0}]
    commits = [{"event": "commit", "round": v, "version": v + 1, "sites": [site]}
               for v, site in enumerate(["a", "b", "a", "b", "a", "b"])]
    merges = [{"event": "merge", "site": c["sites"][0], "round": c["round"]} for c in commits[:-1]]  # b's last lost
    assert rounds_completed(steps + commits + merges, topo) == 3
    assert shortfall(steps + commits + merges, topo) is None
    assert shortfall(steps + commits[:-1] + merges, topo) == "the run exited after round 2 of 3 (training.rounds)"


def test_launch_record_round_trip_and_refusal(tmp_path):
    import pytest

    from geotrain.errors import RunFailed
    from geotrain.run.launch import read_launch_record, write_launch_record

    assert read_launch_record(tmp_path) == (None, None)
    write_launch_record(tmp_path, ["python", "train.py"], "/work")
    assert read_launch_record(tmp_path) == (["python", "train.py"], "/work")
    (tmp_path / "launch.json").write_text('{"script": "rm -rf /"}')
    with pytest.raises(RunFailed, match="launch.json: not a launch record"):
        read_launch_record(tmp_path)
