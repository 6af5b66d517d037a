"""The crash-loop rule (geotrain.run.supervise.crash_loop) and the crash record (geotrain.worker.crash)."""

from geotrain.run.supervise import crash_loop
from geotrain.worker.crash import crash_record


def _crash(message="boom", location="train.py:3 in main", ours=False, step=3):
    return {"error": "ValueError", "message": message, "location": location, "ours": ours, "round": 0, "step": step,
            "traceback": "Traceback (most recent call last):\n  ...\nValueError: boom"}


def test_the_same_script_error_twice_is_a_crash_loop():
    action = crash_loop("worker a/0", _crash(), _crash(), signalled=False)
    assert action.action == "crash_loop"
    assert "ValueError at train.py:3 in main" in action.reason and "Traceback" in action.reason


def test_a_first_crash_is_restarted():
    assert crash_loop("worker a/0", _crash(), None, signalled=False) is None


def test_a_different_error_is_not_a_loop():
    assert crash_loop("worker a/0", _crash(message="other"), _crash(), signalled=False) is None
    assert crash_loop("worker a/0", _crash(location="train.py:9 in main"), _crash(), signalled=False) is None


def test_geotrain_errors_and_signals_are_faults():
    assert crash_loop("worker a/0", _crash(ours=True), _crash(ours=True), signalled=False) is None
    assert crash_loop("worker a/0", _crash(), _crash(), signalled=True) is None
    assert crash_loop("worker a/0", None, _crash(), signalled=False) is None


def test_crash_record_names_the_line_and_hides_addresses():
    def fail():
        raise ValueError("object at 0x7f00deadbeef is bad")
    try:
        fail()
    except ValueError as exc:
        rec = crash_record(exc, "paris", 1)
    assert rec["error"] == "ValueError" and rec["location"].startswith("test_crash_loop.py:")
    assert rec["location"].endswith("in fail") and "0x7f00" not in rec["message"] and rec["ours"] is False
    assert "Traceback" in rec["traceback"] and rec["site"] == "paris" and rec["rank"] == 1


def test_a_refusal_for_good_fails_at_once_and_a_passing_one_is_a_fault():
    from geotrain.wire.outcomes import PERMANENT, Outcome

    for outcome in PERMANENT:
        action = crash_loop("worker a/0", _crash(ours=True) | {"outcome": outcome.name}, None, signalled=False)
        assert action is not None and action.action == "crash_loop", outcome
        assert f"refused by the coordinator ({outcome.name})" in action.reason and "no restart" in action.reason
    for outcome in (Outcome.UNAVAILABLE, Outcome.FENCED, Outcome.CORRUPT, Outcome.STALE):  # a restart may cure these
        crash = _crash(ours=True) | {"outcome": outcome.name}
        assert crash_loop("worker a/0", crash, crash, signalled=False) is None, outcome
    # killed by a signal meanwhile: the refusal may be a consequence; restarted as a fault
    assert crash_loop("worker a/0", _crash(ours=True) | {"outcome": "FORBIDDEN"}, None, signalled=True) is None


def test_crash_record_carries_the_coordinators_outcome():
    from geotrain.wire.outcomes import Outcome, error_for

    try:
        raise error_for(Outcome.MODEL_MISMATCH, "site b trains another model than the run's")
    except Exception as exc:  # noqa: BLE001
        rec = crash_record(exc, "b", 0)
    assert rec["outcome"] == "MODEL_MISMATCH" and rec["ours"] is True and rec["error"] == "ModelMismatch"
    try:
        raise ValueError("mine")
    except ValueError as exc:
        assert crash_record(exc, "b", 0)["outcome"] is None
