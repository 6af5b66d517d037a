"""`geotrain sweep`: grid parsing, expansion, validation, resumability and the results tables.

Unit tests inject a fake runner (no processes); the tests marked slow run real launches.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain.analysis.sweep import (SweepError, expand, main, parse_grid, parse_grids, render_csv, render_markdown,
                            result_of)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"
GRID = ["--grid", "training.inner_steps=10,50,100", "--grid", "links.default.bandwidth=100mbit,1gbit"]


class FakeRunner:
    """Records calls; writes a summary.json whose numbers depend on the point; can fail or be interrupted."""

    def __init__(self, fail: set[int] = frozenset(), interrupt: set[int] = frozenset(), raise_on: set[int] = frozenset()):
        self.calls: list[tuple[Path, list[str], Path]] = []
        self.fail, self.interrupt, self.raise_on = set(fail), set(interrupt), set(raise_on)

    def __call__(self, topology_path: Path, overrides: list[str], run_dir: Path) -> dict:
        self.calls.append((topology_path, list(overrides), run_dir))
        n = len(self.calls)
        assert run_dir.is_dir()
        if n in self.interrupt:
            raise KeyboardInterrupt
        if n in self.raise_on:
            from geotrain.errors import GeotrainError

            raise GeotrainError("launch left no summary.json")
        h = int(next(o for o in overrides if o.startswith("training.inner_steps=")).split("=")[1])
        status = "failed" if n in self.fail else "completed"
        summary = {"status": status, "reason": "worker us-east/0 died with exit code 1" if status == "failed" else None,
                   "rounds_planned": 8, "rounds_completed": 8 if status == "completed" else 3,
                   "initial_eval_loss": 5.5, "final_eval_loss": 2.0 + 1.0 / h,
                   "wan_bytes": 1_000_000 * 80 // h, "wall_seconds": 10.0 + h / 10,
                   "sites": {"a": {"compute_seconds": 3.0, "wan_wait_seconds": 1.0},
                             "b": {"compute_seconds": 5.0, "wan_wait_seconds": 1.0}}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def sweep(argv: list[str], runner, capsys) -> tuple[int, str, str]:
    code = main(argv, runner=runner)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# ---------------------------------------------------------------------------------------------
# Grid parsing and expansion
# ---------------------------------------------------------------------------------------------

def test_parse_grid_commas_units_and_spaces():
    e = parse_grid("training.inner_steps=10,50,100")
    assert (e.path, e.values) == ("training.inner_steps", ("10", "50", "100"))
    e = parse_grid("links.default.bandwidth=100mbit, 1gbit")
    assert e.values == ("100mbit", "1gbit")
    assert e.override("1gbit") == "links.default.bandwidth=1gbit"
    assert parse_grid("links.default.latency=25ms,1.5s").values == ("25ms", "1.5s")
    assert parse_grid("sites[0].workers=1,2").path == "sites[0].workers"
    # commas inside YAML lists, mappings and quotes stay in their value
    assert parse_grid("training.inner_optimizer.betas=[0.9,0.95],[0.9,0.99]").values == ("[0.9,0.95]", "[0.9,0.99]")
    assert parse_grid('name="a,b",c').values == ('"a,b"', "c")
    assert parse_grid("training.rounds=3").values == ("3",)


@pytest.mark.parametrize("text, words", [
    ("training.inner_steps", "expected PATH=V1,V2"),
    ("=1,2", "path before '=' is empty"),
    ("training.inner_steps=", "no values"),
    ("training.inner_steps=10,,50", "empty value"),
    ("training.inner_steps=10,", "empty value"),
    ("training.inner_steps=10,10", "'10' is given twice"),
    ("training..inner_steps=1,2", "cannot read the path"),
    ("sites[x].workers=1,2", "cannot read the path"),
])
def test_parse_grid_rejects_bad_entries(text, words):
    with pytest.raises(SweepError) as info:
        parse_grid(text)
    assert words in str(info.value)
    assert f"--grid {text!r}" in str(info.value)
    assert info.value.exit_code == 2


def test_parse_grids_rejects_a_path_twice_or_also_in_set():
    with pytest.raises(SweepError, match="already swept"):
        parse_grids(["training.rounds=1,2", "training.rounds=3"])
    with pytest.raises(SweepError, match="also swept by --grid"):
        parse_grids(["training.rounds=1,2"], ["training.rounds=3"])
    with pytest.raises(SweepError, match="at least one --grid"):
        parse_grids([])


def test_expansion_order_is_the_product_last_entry_fastest():
    points = expand(parse_grids(["training.inner_steps=10,50,100", "links.default.bandwidth=100mbit,1gbit"]))
    assert [p.index for p in points] == [1, 2, 3, 4, 5, 6]
    assert [p.label for p in points] == [
        "training.inner_steps=10 links.default.bandwidth=100mbit",
        "training.inner_steps=10 links.default.bandwidth=1gbit",
        "training.inner_steps=50 links.default.bandwidth=100mbit",
        "training.inner_steps=50 links.default.bandwidth=1gbit",
        "training.inner_steps=100 links.default.bandwidth=100mbit",
        "training.inner_steps=100 links.default.bandwidth=1gbit",
    ]
    assert points[3].overrides == ["training.inner_steps=50", "links.default.bandwidth=1gbit"]
    assert points[0].slug == "inner_steps=10,bandwidth=100mbit"
    assert len({p.slug for p in points}) == 6


def test_slugs_are_unique_and_safe():
    points = expand(parse_grids(["links.default.bandwidth=1gbit", "links.pairs[0].bandwidth=1,2",
                                 "training.inner_optimizer.betas=[0.9,0.95]", "name=a b,a/b"]))
    slugs = [p.slug for p in points]
    assert slugs[0] == "default.bandwidth=1gbit,pairs[0].bandwidth=1,betas=0.9-0.95,name=a-b"
    assert slugs[1] == "default.bandwidth=1gbit,pairs[0].bandwidth=1,betas=0.9-0.95,name=a-b-2"  # a/b -> a-b again
    assert all("/" not in s and " " not in s for s in slugs)
    assert len(set(slugs)) == len(slugs)


# ---------------------------------------------------------------------------------------------
# Validation before anything runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, words", [
    ("links.default.bandwidth=100mbit,fast",
     ["--grid 'links.default.bandwidth=100mbit,fast' (value 'fast')", "links.default.bandwidth",
      'expected a bandwidth like "100mbit"']),
    ("training.inner_stepz=10,50", ["--grid 'training.inner_stepz=10,50'", "did you mean 'inner_steps'"]),
    ("training.inner_steps=10,0", ["(value '0')", "training.inner_steps"]),
    ("sites[5].workers=1,2", ["--grid 'sites[5].workers=1,2'", "sites[5] does not exist"]),
    ("links.default.bandwidth=1gbit,1000mbit", ["'1gbit' and '1000mbit' give the same topology"]),
])
def test_a_bad_grid_value_is_one_error_before_anything_runs(tmp_path, capsys, grid, words):
    runner = FakeRunner()
    out = tmp_path / "sweep"
    code, stdout, err = sweep([str(DEMO), "--grid", "training.rounds=1,2", "--grid", grid, "--out", str(out)],
                              runner, capsys)
    assert code == 2
    assert runner.calls == []
    assert not out.exists()
    assert err.startswith("geotrain sweep: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err and stdout == ""


def test_a_bad_combination_names_the_point(tmp_path, capsys):
    topo = tmp_path / "t.yaml"
    topo.write_text(DEMO.read_text().replace("n_head: 4", "n_head: 2"))
    runner = FakeRunner()
    # each value is fine on its own; n_embd 66 with n_head 4 is not (66 % 4 != 0)
    code, _, err = sweep([str(topo), "--grid", "model.n_embd=64,66", "--grid", "model.n_head=2,4",
                          "--out", str(tmp_path / "o")], runner, capsys)
    assert code == 2 and runner.calls == []
    assert "point 4 of the grid (model.n_embd=66 model.n_head=4)" in err
    assert "model.n_embd: must be a multiple of model.n_head (4), got 66" in err


def test_bad_set_bad_file_and_bad_out_are_errors(tmp_path, capsys):
    runner = FakeRunner()
    code, _, err = sweep([str(DEMO), *GRID, "--set", "training.rounds=-1"], runner, capsys)
    assert code == 2 and "training.rounds" in err
    code, _, err = sweep([str(tmp_path / "nope.yaml"), *GRID], runner, capsys)
    assert code == 2 and "no such topology file" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "other.txt").write_text("x")
    code, _, err = sweep([str(DEMO), *GRID, "--out", str(busy)], runner, capsys)
    assert code == 2 and "not a sweep directory" in err
    code, _, err = sweep([str(DEMO), "--out", str(tmp_path / "o")], runner, capsys)
    assert code == 2 and "--grid" in err
    assert runner.calls == []


def test_dry_run_validates_and_prints_the_plan_without_running(tmp_path, capsys):
    runner = FakeRunner()
    out = tmp_path / "sweep"
    code, stdout, _ = sweep([str(DEMO), *GRID, "--out", str(out), "--dry-run"], runner, capsys)
    assert code == 0 and runner.calls == [] and not out.exists()
    lines = stdout.splitlines()
    assert len(lines) == 7 and lines[-1] == str(out)
    assert lines[0].startswith("[1/6] training.inner_steps=10 links.default.bandwidth=100mbit")
    assert lines[0].endswith("(run)")


# ---------------------------------------------------------------------------------------------
# Running, resuming, refusing a changed sweep
# ---------------------------------------------------------------------------------------------

def test_runs_every_point_in_order_and_writes_state_and_tables(tmp_path, capsys):
    runner = FakeRunner()
    out = tmp_path / "sweep"
    code, stdout, err = sweep([str(DEMO), *GRID, "--set", "training.rounds=8", "--out", str(out)], runner, capsys)
    assert code == 0
    assert stdout.splitlines()[-1] == str(out)
    assert [c[1] for c in runner.calls][:2] == [
        ["training.rounds=8", "training.inner_steps=10", "links.default.bandwidth=100mbit"],
        ["training.rounds=8", "training.inner_steps=10", "links.default.bandwidth=1gbit"]]
    assert len(runner.calls) == 6
    assert runner.calls[0][0] == DEMO.resolve()
    assert runner.calls[0][2] == (out / "runs" / "inner_steps=10,bandwidth=100mbit").resolve()
    progress = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert len(progress) == 6
    assert progress[2].startswith("[3/6] training.inner_steps=50 links.default.bandwidth=100mbit ... done in ")
    assert progress[2].endswith("s, final loss 2.02")
    state = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["completed"] * 6
    assert state["points"][0]["run_dir"] == "runs/inner_steps=10,bandwidth=100mbit"
    assert state["set"] == ["training.rounds=8"]
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()


def test_resume_skips_completed_and_reruns_failed_and_interrupted(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [str(DEMO), *GRID, "--out", str(out)]
    # first pass: point 2 fails, point 3's runner raises, point 5 is interrupted (Ctrl-C)
    first = FakeRunner(fail={2}, raise_on={3}, interrupt={5})
    code, stdout, err = sweep(argv, first, capsys)
    assert code == 130
    assert len(first.calls) == 5
    assert stdout.splitlines()[-1] == str(out)
    assert "[2/6] training.inner_steps=10 links.default.bandwidth=1gbit ... FAILED after" in err
    assert "worker us-east/0 died with exit code 1" in err
    assert "[5/6] training.inner_steps=100 links.default.bandwidth=100mbit ... interrupted after" in err
    assert "--out" in err.splitlines()[-1]  # how to resume
    state = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["completed", "failed", "failed", "completed", "interrupted",
                                                       "pending"]
    assert state["points"][2]["reason"] == "launch left no summary.json"
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "completed", "interrupted", "pending"]
    # a stale file of the failed attempt must not survive into the new attempt
    (out / state["points"][1]["run_dir"] / "stale.txt").write_text("old")

    second = FakeRunner()
    code, stdout, err = sweep(argv, second, capsys)
    assert code == 0
    assert [c[1] for c in second.calls] == [
        ["training.inner_steps=10", "links.default.bandwidth=1gbit"],
        ["training.inner_steps=50", "links.default.bandwidth=100mbit"],
        ["training.inner_steps=100", "links.default.bandwidth=100mbit"],
        ["training.inner_steps=100", "links.default.bandwidth=1gbit"]]
    assert not (out / state["points"][1]["run_dir"] / "stale.txt").exists()
    assert "[1/6] training.inner_steps=10 links.default.bandwidth=100mbit ... skipped (completed earlier, final loss " \
           "2.10)" in err
    state = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["completed"] * 6
    assert [p["attempts"] for p in state["points"]] == [1, 2, 2, 1, 2, 1]

    third = FakeRunner()
    code, _, err = sweep(argv, third, capsys)
    assert code == 0 and third.calls == []
    assert err.count("skipped (completed earlier") == 6


def test_a_point_left_running_by_a_killed_sweep_runs_again(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [str(DEMO), "--grid", "training.inner_steps=10,50", "--out", str(out)]
    assert sweep(argv, FakeRunner(), capsys)[0] == 0
    state = json.loads((out / "sweep.json").read_text())
    state["points"][1]["status"] = "running"  # what a SIGKILLed sweep leaves
    (out / "sweep.json").write_text(json.dumps(state))
    runner = FakeRunner()
    assert sweep(argv, runner, capsys)[0] == 0
    assert [c[1] for c in runner.calls] == [["training.inner_steps=50"]]


def test_failed_points_give_exit_code_1_and_the_rest_still_run(tmp_path, capsys):
    runner = FakeRunner(fail={1})
    code, _, _ = sweep([str(DEMO), "--grid", "training.inner_steps=10,50", "--out", str(tmp_path / "o")], runner,
                       capsys)
    assert code == 1 and len(runner.calls) == 2


def test_a_changed_grid_topology_or_set_is_refused(tmp_path, capsys):
    topo = tmp_path / "t.yaml"
    topo.write_text(DEMO.read_text())
    out = tmp_path / "sweep"
    base = [str(topo), "--grid", "training.inner_steps=10,50", "--out", str(out)]
    assert sweep(base, FakeRunner(), capsys)[0] == 0
    before = (out / "sweep.json").read_text()

    runner = FakeRunner()
    code, _, err = sweep([str(topo), "--grid", "training.inner_steps=10,50,100", "--out", str(out)], runner, capsys)
    assert code == 2 and "different grid" in err
    assert "--grid training.inner_steps=10,50," in err and "--grid training.inner_steps=10,50,100" in err
    code, _, err = sweep([*base, "--set", "training.rounds=3"], runner, capsys)
    assert code == 2 and "another topology" in err
    topo.write_text(DEMO.read_text().replace("seed: 0", "seed: 1"))
    code, _, err = sweep(base, runner, capsys)
    assert code == 2 and "another topology" in err and "Traceback" not in err
    code, _, err = sweep([*base, "--dry-run"], runner, capsys)
    assert code == 2 and "another topology" in err
    assert runner.calls == []
    assert (out / "sweep.json").read_text() == before

    # the same topology under another name (or a comment added) is the same sweep
    copy = tmp_path / "copy.yaml"
    copy.write_text("# a comment\n" + DEMO.read_text())
    code, _, err = sweep([str(copy), "--grid", "training.inner_steps=10,50", "--out", str(out)], runner, capsys)
    assert code == 0 and runner.calls == []


def test_resume_survives_a_new_defaulted_field_in_the_schema(tmp_path, capsys, monkeypatch):
    """A geotrain upgrade that adds a field with a default changes Topology.digest; the sweep still resumes."""
    from geotrain.config.topology import Topology

    out = tmp_path / "sweep"
    argv = [str(DEMO), "--grid", "training.inner_steps=10,50", "--out", str(out)]
    assert sweep(argv, FakeRunner(fail={2}), capsys)[0] == 1
    digest = Topology.digest
    monkeypatch.setattr(Topology, "digest", lambda self: "upgraded-" + digest(self))
    runner = FakeRunner()
    code, _, err = sweep(argv, runner, capsys)
    assert code == 0, err
    assert [c[1] for c in runner.calls] == [["training.inner_steps=50"]]


def test_default_out_is_under_runs_with_the_topology_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = sweep([str(DEMO), "--grid", "training.inner_steps=10,50"], FakeRunner(), capsys)
    assert code == 0
    out = Path(stdout.splitlines()[-1])
    assert out.parent == Path("runs") and out.name.startswith("sweep-demo-")
    assert (tmp_path / out / "sweep.json").is_file()


# ---------------------------------------------------------------------------------------------
# The results tables and plots
# ---------------------------------------------------------------------------------------------

def test_results_csv_and_markdown_content(tmp_path, capsys):
    out = tmp_path / "sweep"
    runner = FakeRunner(fail={4}, interrupt={5})
    assert sweep([str(DEMO), *GRID, "--out", str(out)], runner, capsys)[0] == 130
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == ["point", "training.inner_steps", "links.default.bandwidth", "status", "rounds_completed",
                             "rounds_planned", "initial_eval_loss", "final_eval_loss", "wan_bytes", "wall_seconds",
                             "compute_utilisation", "compute_seconds", "wan_wait_seconds", "run_dir", "reason"]
    assert len(rows) == 6
    r = rows[0]
    assert (r["point"], r["training.inner_steps"], r["links.default.bandwidth"], r["status"]) == \
        ("1", "10", "100mbit", "completed")
    assert (r["rounds_completed"], r["rounds_planned"]) == ("8", "8")
    assert float(r["initial_eval_loss"]) == 5.5 and float(r["final_eval_loss"]) == pytest.approx(2.1)
    assert r["wan_bytes"] == "8000000" and float(r["wall_seconds"]) == 11.0
    assert float(r["compute_utilisation"]) == 0.8  # (3 + 5) / (3 + 5 + 1 + 1)
    assert r["run_dir"] == "runs/inner_steps=10,bandwidth=100mbit" and r["reason"] == ""
    assert rows[3]["status"] == "failed" and rows[3]["reason"] == "worker us-east/0 died with exit code 1"
    assert rows[3]["rounds_completed"] == "3"
    assert rows[4]["status"] == "interrupted" and rows[4]["final_eval_loss"] == ""
    assert rows[5]["status"] == "pending" and rows[5]["wan_bytes"] == ""

    md = (out / "results.md").read_text()
    assert md.startswith("# geotrain sweep of `")
    assert "| # | training.inner_steps | links.default.bandwidth | status | rounds | initial eval loss " \
           "| final eval loss | WAN MB | wall s | compute utilisation |" in md
    assert "| 1 | `10` | `100mbit` | completed | 8/8 | 5.5000 | 2.1000 | 8.00 | 11.0 | 80.0 % |" in md
    assert "| 4 | `50` | `1gbit` | **FAILED** | 3/8 | 5.5000 | 2.0200 | 1.60 | 15.0 | 80.0 % |" in md
    assert "| 5 | `100` | `100mbit` | **INTERRUPTED** | – | – | – | – | – | – |" in md
    assert "| 6 | `100` | `1gbit` | pending | – | – | – | – | – | – |" in md
    assert "- status: 3 completed, 1 failed, 1 interrupted, 1 pending" in md
    assert "worker us-east/0 died with exit code 1" in md
    assert "report-loss-vs-steps.png" not in md  # fake runs have no metrics.jsonl: no plots


def test_result_of_and_renderers_tolerate_missing_numbers():
    assert result_of({"status": "failed"}) == {
        "rounds_completed": None, "rounds_planned": None, "initial_eval_loss": None, "final_eval_loss": None,
        "wan_bytes": None, "wall_seconds": None, "compute_seconds": None, "wan_wait_seconds": None,
        "compute_utilisation": None}
    r = result_of({"final_eval_loss": float("nan"), "sites": {"a": {"compute_seconds": 0.0, "wan_wait_seconds": 0.0}}})
    assert r["final_eval_loss"] is None and r["compute_utilisation"] is None and r["compute_seconds"] == 0.0
    state = {"topology": "t|x.yaml", "set": [], "updated_at": "now", "grid": [{"path": "a", "values": ["1|2"]}],
             "points": [{"index": 1, "values": {"a": "1|2"}, "overrides": ["a=1|2"], "status": "failed",
                         "run_dir": "runs/a=1-2", "reason": "line one\nline two", "result": None}]}
    assert render_csv(state).splitlines()[1] == "1,1|2,failed,,,,,,,,,,runs/a=1-2,line one"
    md = render_markdown(state)
    assert "| 1 | `1\\|2` | **FAILED** |" in md and "line one" in md and "line two" not in md


def test_completed_runs_get_the_overlaid_loss_plots(tmp_path, capsys):
    from tests.analysis.test_report import assert_png, make_run

    def runner(topology_path, overrides, run_dir):
        make_run(run_dir.parent, run_dir.name, failure=False, rounds=2 if "training.inner_steps=10" in overrides else 3)
        return json.loads((run_dir / "summary.json").read_text())

    out = tmp_path / "sweep"
    code, _, _ = sweep([str(DEMO), "--grid", "training.inner_steps=10,50", "--out", str(out)], runner, capsys)
    assert code == 0
    report = (out / "report.md").read_text()
    assert "runs/inner_steps=10" in report and "runs/inner_steps=50" in report
    md = (out / "results.md").read_text()
    for name in ("report-loss-vs-steps.png", "report-loss-vs-time.png", "report-loss-vs-wan-bytes.png"):
        assert f"]({name})" in md
        assert_png(out / name)
    assert "[report.md](report.md)" in md


# ---------------------------------------------------------------------------------------------
# Real launches
# ---------------------------------------------------------------------------------------------

def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "geotrain.analysis.sweep", str(DEMO), "--grid", "training.inner_steps=5,10",
            "--set", "training.rounds=2", "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_sweep_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sweep"
    p = subprocess.run(_sweep_cmd(out), capture_output=True, text=True, cwd=REPO, timeout=850)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == str(out)
    assert "Traceback" not in p.stderr
    progress = [ln for ln in p.stderr.splitlines() if ln.startswith("[")]
    assert progress[0].startswith("[1/2] training.inner_steps=5 ... done in ") and ", final loss " in progress[0]
    assert progress[1].startswith("[2/2] training.inner_steps=10 ... done in ")
    rows = read_csv(out / "results.csv")
    assert [(r["training.inner_steps"], r["status"], r["rounds_completed"], r["rounds_planned"]) for r in rows] == \
        [("5", "completed", "2", "2"), ("10", "completed", "2", "2")]
    for r in rows:
        assert float(r["final_eval_loss"]) < float(r["initial_eval_loss"])
        assert int(r["wan_bytes"]) > 0 and float(r["wall_seconds"]) > 0
        assert 0 < float(r["compute_utilisation"]) <= 1
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert summary["status"] == "completed"
        topo = json.loads((out / r["run_dir"] / "topology.json").read_text())
        assert topo["training"]["inner_steps"] == int(r["training.inner_steps"]) and topo["training"]["rounds"] == 2
        assert (out / r["run_dir"] / "launch.log").is_file()
    for name in ("report.md", "results.md", "report-loss-vs-steps.png", "report-loss-vs-time.png",
                 "report-loss-vs-wan-bytes.png"):
        assert (out / name).is_file(), name

    before = (out / "results.csv").read_text()
    again = subprocess.run(_sweep_cmd(out), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("skipped (completed earlier") == 2
    assert "done in" not in again.stderr
    assert again.stdout.splitlines()[-1] == str(out)
    assert (out / "results.csv").read_text() == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_sweep_interrupted_by_sigint_stops_its_launch(tmp_path):
    from tests.integration.helpers import leftover, wait_for_event

    out = tmp_path / "sweep"
    proc = subprocess.Popen(_sweep_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        run_dir = out / "runs" / "inner_steps=5"
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_for_event(run_dir, lambda e: e["event"] == "inner_step", timeout_s=120)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    assert stdout.splitlines()[-1] == str(out)
    state = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["interrupted", "pending"]
    assert leftover(run_dir) == {}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"  # the launch cleaned up
