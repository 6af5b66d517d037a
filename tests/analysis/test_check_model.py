"""The history checker's model invariants (geotrain/analysis/check_model.py): global_model_finite and
eval_loss_no_unexplained_jump hold on a good history, are violated on a broken one, and are unknown
where the history carries no evidence (an older run without the commit digest)."""

from __future__ import annotations

import json
import math

import pytest

from geotrain.analysis.check import check_run, main, run_max_eval_loss_jump
from geotrain.analysis.check_model import CAUSES, eval_loss_no_unexplained_jump, global_model_finite
from tests.analysis.test_check import commit, ev, eval_, fault, good_history, verdicts, write_run


def digest(history: list[dict], bad_round: int | None = None) -> list[dict]:
    """The history as a coordinator that records the digest writes it: every commit has finite/norm,
    the one of ``bad_round`` finite=false."""
    out = []
    for e in history:
        if e["event"] == "commit":
            bad = e["round"] == bad_round
            e = {**e, "finite": not bad, "norm": None if bad else 10.0 + e["round"]}
        out.append(e)
    return out


def with_evals(losses: list[float], between: dict[int, dict] | None = None) -> list[dict]:
    """Commits and evals of rounds 0..n-1 with these eval losses; ``between[r]`` goes right before the
    eval of round r."""
    h = [ev("run_started", "launcher"), ev("coordinator_started", epoch=1)]
    for r, loss in enumerate(losses):
        if r:
            h.append(commit(r - 1))
        if between and r in between:
            h.append(between[r])
        h.append(eval_(loss, 10 * r))
    return h


# ---- global_model_finite ----------------------------------------------------------------------


def test_finite_commits_hold():
    v = verdicts(digest(good_history(4)))["global_model_finite"]
    assert v.status == "held" and "4 commits all finite" in v.evidence and "largest norm 13" in v.evidence


def test_a_commit_with_finite_false_is_violated_naming_its_round():
    v = global_model_finite(digest(good_history(4), bad_round=2))
    assert v.status == "violated"
    assert "round 2" in v.evidence and "finite=false" in v.evidence, v.evidence


def test_a_model_nonfinite_event_is_violated_even_without_digests():
    h = good_history(3)
    h.insert(-1, ev("model_nonfinite", round=2, reason="3 of 120576 parameters are nan"))
    v = global_model_finite(h)
    assert v.status == "violated" and "model_nonfinite at round 2" in v.evidence and "nan" in v.evidence


def test_a_history_without_the_digest_is_unknown_not_held():
    v = global_model_finite(good_history(4))
    assert v.status == "unknown" and "none of 4 commits" in v.evidence
    assert global_model_finite([]).status == "unknown"


def test_a_mix_of_old_and_new_commits_is_judged_on_those_that_say():
    h = digest(good_history(2)) + [commit(2), commit(3)]
    v = global_model_finite(h)
    assert v.status == "held" and "2 commits without `finite` not judged" in v.evidence
    h[-1] = {**h[-1], "finite": False}
    assert global_model_finite(h).status == "violated"


# ---- eval_loss_no_unexplained_jump ------------------------------------------------------------


def test_good_history_eval_losses_hold():
    v = verdicts(good_history(4))["eval_loss_no_unexplained_jump"]
    assert v.status == "held" and "4 consecutive eval pairs" in v.evidence


def test_a_tenfold_jump_with_no_cause_is_violated():
    v = eval_loss_no_unexplained_jump(with_evals([5.0, 3.0, 30.0, 2.5]))
    assert v.status == "violated", v
    assert "3 -> 30" in v.evidence and "round 1" in v.evidence and "round 2" in v.evidence, v.evidence


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_eval_loss_is_violated(loss):
    v = eval_loss_no_unexplained_jump(with_evals([5.0, 3.0, loss]))
    assert v.status == "violated" and f"eval loss {loss}" in v.evidence and "round 2" in v.evidence, v.evidence


def test_a_nonfinite_eval_loss_is_violated_whatever_came_before():
    """A cause explains a jump, never a NaN."""
    v = eval_loss_no_unexplained_jump(with_evals([5.0, 3.0, math.nan], between={2: fault()}))
    assert v.status == "violated"


def test_a_nonfinite_eval_survives_the_file_round_trip(tmp_path):
    """An eval loss of NaN is written as JSON's NaN by EventLog and read back as a float nan."""
    run = write_run(tmp_path / "run", with_evals([5.0, math.nan]))
    assert "NaN" in (run / "metrics.jsonl").read_text()
    vs = {v.invariant: v for v in check_run(run)}
    assert vs["eval_loss_no_unexplained_jump"].status == "violated"


@pytest.mark.parametrize("cause", [
    ev("fault_injected", "launcher", fault="kill", target="worker eu-west/0", params={}, duration_s=0),
    ev("failure", "launcher", what="worker", target="worker eu-west/0", reason="died"),
    ev("coordinator_started", epoch=2, round=2),
    ev("merge_refused", site="eu-west", round=1, action="stale", reason="late"),
    ev("round_failed", round=1, reason="deadline"),
])
def test_a_jump_after_a_recorded_cause_holds(cause):
    v = eval_loss_no_unexplained_jump(with_evals([5.0, 3.0, 30.0, 2.5], between={2: cause}))
    assert v.status == "held", v
    assert "1 larger jumps explained" in v.evidence and cause["event"] in v.evidence
    assert cause["event"] in CAUSES


def test_a_cause_before_the_earlier_eval_explains_nothing():
    v = eval_loss_no_unexplained_jump(with_evals([5.0, 3.0, 30.0], between={1: fault()}))
    assert v.status == "violated"


def test_the_factor_is_configurable():
    h = with_evals([5.0, 3.0, 9.0])  # x3
    assert eval_loss_no_unexplained_jump(h, 4.0).status == "held"
    assert eval_loss_no_unexplained_jump(h, 2.0).status == "violated"
    assert verdicts(h, max_eval_loss_jump=2.0)["eval_loss_no_unexplained_jump"].status == "violated"


def test_no_evals_or_one_eval_is_unknown():
    assert eval_loss_no_unexplained_jump([]).status == "unknown"
    assert eval_loss_no_unexplained_jump(with_evals([5.0])).status == "unknown"


# ---- from a run directory and the command -----------------------------------------------------


def test_the_factor_comes_from_the_runs_topology(tmp_path):
    run = write_run(tmp_path / "run", with_evals([5.0, 3.0, 9.0]))  # x3
    assert run_max_eval_loss_jump(run) == 4.0  # no topology.json: the default
    (run / "topology.json").write_text(json.dumps({"name": "t"}))
    assert run_max_eval_loss_jump(run) == 4.0  # a topology from before the field
    (run / "topology.json").write_text(json.dumps({"security": {"max_eval_loss_jump": 2.5}}))
    assert {v.invariant: v.status for v in check_run(run)}["eval_loss_no_unexplained_jump"] == "violated"
    assert {v.invariant: v.status for v in check_run(run, max_eval_loss_jump=5)}["eval_loss_no_unexplained_jump"] == "held"


def test_a_bad_factor_in_the_topology_is_a_clear_error(tmp_path, capsys):
    run = write_run(tmp_path / "run", with_evals([5.0, 3.0]))
    (run / "topology.json").write_text(json.dumps({"security": {"max_eval_loss_jump": 0.5}}))
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "security.max_eval_loss_jump" in err[0] and "0.5" in err[0], err


@pytest.mark.parametrize("bad", ["1", "0.5", "nan", "inf"])
def test_a_bad_factor_on_the_command_line_is_a_clear_error(tmp_path, capsys, bad):
    run = write_run(tmp_path / "run", with_evals([5.0, 3.0]))
    assert main([str(run), "--max-eval-loss-jump", bad]) == 2
    assert "--max-eval-loss-jump" in capsys.readouterr().err


def test_check_fails_a_history_with_a_nonfinite_commit(tmp_path, capsys):
    run = write_run(tmp_path / "run", digest(good_history(4), bad_round=1))
    assert main([str(run), "--json"]) == 1
    by = {v["invariant"]: v for v in json.loads(capsys.readouterr().out)["verdicts"]}
    assert by["global_model_finite"]["status"] == "violated"
