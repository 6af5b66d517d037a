"""Shared helpers of geotrain.events: reading the events back, log tails for error messages, numeric fields."""

from geotrain.events import EventLog, log_tail, number, read_events


def test_read_events_skips_a_torn_last_line_and_garbage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = EventLog(path, "test")
    log.emit("a", t=1.0)
    log.close()
    with open(path, "a") as f:
        f.write("not json\n{\"event\": \"torn\"")
    assert [e["event"] for e in read_events(path)] == ["a"]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_log_tail_names_the_file_and_keeps_the_last_lines(tmp_path):
    path = tmp_path / "launch.log"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    assert log_tail(path, lines=2) == f"; last lines of {path}:\n    line 8\n    line 9"


def test_log_tail_is_empty_without_a_log(tmp_path):
    assert log_tail(None) == ""
    assert log_tail(tmp_path / "missing.log") == ""
    (tmp_path / "empty.log").write_text("\n\n")
    assert log_tail(tmp_path / "empty.log") == ""


def test_number_takes_ints_and_floats_but_not_bools_or_text():
    assert number(3) == 3.0 and isinstance(number(3), float)
    assert number(2.5) == 2.5
    assert number(True) is None and number("1") is None and number(None) is None
