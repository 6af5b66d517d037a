"""`geotrain report` on small hand-written run directories (no processes, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geotrain.errors import GeotrainError
from geotrain.analysis.report import IMAGES, coalesce, load_run, loss_figure, main, series, timeline, write_report

T0 = 1_700_000_000.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ("us-east", "eu-west")
MERGE_BYTES = 1000  # bytes_sent == bytes_received per merge


def make_run(root: Path, name: str, *, algorithm: str = "diloco", status: str = "completed",
             failure: bool = True, summary: bool = True, topology: bool = True, rounds: int = 3, H: int = 2) -> Path:
    """A run directory like the launcher leaves: 2 sites x 2 workers, H steps per round, an eval per round."""
    d = root / name
    (d / "links").mkdir(parents=True)
    ev: list[dict] = [{"t": T0, "event": "run_started", "proc": "launcher", "run": name, "sites": list(SITES),
                       "algorithm": algorithm}]
    for i, s in enumerate(SITES):
        ev.append({"t": T0 + 1 + i * 0.1, "event": "site_ready", "proc": f"{s}/0", "site": s, "version": 0, "round": 0})
    ev.append({"t": T0 + 1.5, "event": "eval", "proc": "us-east/0", "round": 0, "step": 0, "loss": 5.0, "seconds": 0.2})
    t = T0 + 1.5
    step = 0
    for r in range(rounds):
        for _ in range(H):
            step += 1
            t += 1.0
            for s in SITES:
                ev.append({"t": t, "event": "inner_step", "proc": f"{s}/0", "site": s, "step": step, "round": r,
                           "loss": 4.0, "compute_s": 1.0, "wan_s": 0.0})
        t += 0.5
        for s in SITES:
            ev.append({"t": t, "event": "merge", "proc": f"{s}/0", "site": s, "round": r, "version": r + 1,
                       "bytes_sent": MERGE_BYTES, "bytes_received": MERGE_BYTES, "seconds": 0.5, "step": step})
        ev.append({"t": t, "event": "commit", "proc": "coordinator", "round": r, "version": r + 1, "sites": list(SITES)})
        t += 0.25
        ev.append({"t": t, "event": "eval", "proc": "us-east/0", "round": r + 1, "step": step,
                   "loss": 4.0 - r * 0.5, "seconds": 0.2})
    if failure:
        ev.append({"t": T0 + 4.2, "event": "failure", "proc": "launcher", "what": "worker", "target": "eu-west/1",
                   "happened_t": T0 + 4.0, "detected_t": T0 + 4.2, "reason": "killed by test"})
        ev.append({"t": T0 + 6.0, "event": "recovery", "proc": "launcher", "what": "worker", "target": "eu-west/1",
                   "failure_t": T0 + 4.0, "recovered_t": T0 + 6.0, "seconds": 2.0, "rounds_lost": 1})
    ev.append({"t": t + 1, "event": "run_finished", "proc": "launcher", "status": status,
               "reason": "worker us-east/0 died with exit code 1" if status == "failed" else None})
    ev.sort(key=lambda e: e["t"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    links = {"link us-east<->hub": {"bytes_forward": 3500, "bytes_backward": 3400},
             "link eu-west<->hub": {"bytes_forward": 3300, "bytes_backward": 3400}}
    for lname, st in links.items():
        short = lname.removeprefix("link ")
        (d / "links" / f"{short.replace('<->', '--')}.json").write_text(json.dumps({"name": short, **st}))
    if topology:
        (d / "topology.json").write_text(json.dumps({
            "name": name, "sites": [{"name": s, "workers": 2} for s in SITES],
            "coordinator": {"at": "hub"}, "training": {"algorithm": algorithm, "inner_steps": H, "rounds": rounds}}))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "status": status, "reason": "worker us-east/0 died with exit code 1" if status == "failed" else None,
            "run": name, "algorithm": algorithm, "rounds_planned": rounds, "rounds_completed": rounds,
            "initial_eval_loss": 5.0, "final_eval_loss": 4.0 - (rounds - 1) * 0.5,
            "wan_bytes": sum(v["bytes_forward"] + v["bytes_backward"] for v in links.values()), "links": links,
            "wall_seconds": t + 1 - T0,
            "sites": {s: {"workers": 2, "inner_steps": rounds * H, "compute_seconds": float(rounds * H),
                          "wan_wait_seconds": 0.5 * rounds, "merges": rounds} for s in SITES}}))
    return d


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_report_has_tables_images_and_failures(tmp_path):
    run = make_run(tmp_path, "diloco-a")
    report = write_report([run], run)
    assert report == run / "report.md"
    md = report.read_text()
    assert md.startswith("# geotrain report")
    for row in ("| status | completed |", "| algorithm | diloco |", "| sites × workers | 2×2 (us-east, eu-west) |",
                "| H (inner steps per round) | 2 |", "| rounds completed / planned | 3 / 3 |",
                "| initial eval loss | 5.0000 |", "| final eval loss | 3.0000 |",
                "| WAN bytes (link counters, both directions) | 13.6 kB (13,600 B) |",
                "| merge payload bytes through WAN links | 12 kB (12,000 B) |"):
        assert row in md, row
    # per site: 6 steps of 1 s compute, 3 merges of 0.5 s: 6 / 7.5 = 80 %
    assert "| us-east | 2 | 6 | 3 | 6.00 | 1.50 | 80.0 % |" in md
    assert "| eu-west | 2 | 6 | 3 | 6.00 | 1.50 | 80.0 % |" in md
    assert "## Failures, recoveries and injected faults" in md
    assert "| diloco-a (diloco) | 4.00 | failure | worker | eu-west/1 | detected after 0.20 s; killed by test |" in md
    assert "| diloco-a (diloco) | 6.00 | recovery | worker | eu-west/1 | took 2.00 s; rounds lost: 1 |" in md
    for name in IMAGES.values():
        assert f"]({name})" in md, name
        assert_png(run / name)


def test_series_has_evals_against_steps_time_and_wan_bytes(tmp_path):
    s = series(make_run(tmp_path, "r"))
    assert s.label == "r (diloco)" and s.algorithm == "diloco"
    assert s.steps == [0, 2, 4, 6]
    assert s.loss == [5.0, 4.0, 3.5, 3.0]
    assert s.wall_s == pytest.approx([1.5, 4.25, 7.0, 9.75])
    # two sites x (sent + received) per round, merges written before each eval
    assert s.wan_mb == pytest.approx([0.0, 0.004, 0.008, 0.012])


def test_two_runs_overlaid_one_legend_entry_each(tmp_path):
    a = make_run(tmp_path, "a")
    b = make_run(tmp_path, "b", algorithm="ddp", failure=False)
    for x in ("steps", "time", "wan"):
        fig = loss_figure([series(a), series(b)], x)
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels == ["a (diloco)", "b (ddp)"], (x, labels)
        assert len([ln for ln in fig.axes[0].get_lines() if ln.get_xydata().size]) == 2
    out = tmp_path / "out"
    md = write_report([a, b], out).read_text()
    assert "| a (diloco) | completed | diloco |" in md and "| b (ddp) | completed | ddp |" in md
    assert "## 1. a (diloco)" in md and "## 2. b (ddp)" in md
    for name in IMAGES.values():
        assert_png(out / name)
    assert not (a / "report.md").exists()  # --out is honoured


def test_same_directory_names_get_distinct_labels(tmp_path):
    a = make_run(tmp_path / "x", "run", failure=False, summary=False)
    b = make_run(tmp_path / "y", "run", failure=False, summary=False)
    md = write_report([a, b], tmp_path / "out").read_text()
    assert "| x/run (diloco) |" in md and "| y/run (diloco) |" in md


def test_failed_run_is_reported_and_marked_failed(tmp_path):
    run = make_run(tmp_path, "broken", status="failed", failure=False)
    md = write_report([run], run).read_text()
    assert "## 1. broken (diloco) — FAILED" in md
    assert "| status | **FAILED**: worker us-east/0 died with exit code 1 |" in md
    assert "Failures, recoveries" not in md  # no failure events, no table


def test_run_without_summary_or_topology_uses_the_events(tmp_path):
    run = make_run(tmp_path, "bare", status="failed", summary=False, topology=False, failure=False)
    (run / "links").rename(tmp_path / "no-links")
    md = write_report([run], run).read_text()
    assert "— FAILED" in md  # from run_finished
    assert "| rounds completed / planned | 3 / ? |" in md
    assert "| H (inner steps per round) | – |" in md
    assert "| us-east | ? | 6 | 3 | 6.00 | 1.50 | 80.0 % |" in md  # no topology: workers unknown
    assert "no `summary.json`" in md
    for name in IMAGES.values():
        assert_png(run / name)


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(GeotrainError, match="nope: no such run directory"):
        write_report([missing], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GeotrainError, match=r"empty: not a run directory \(no metrics.jsonl"):
        load_run(empty)
    assert main([str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("geotrain report: ") and str(missing) in err and "Traceback" not in err


def test_main_writes_into_out_and_prints_the_path(tmp_path, capsys):
    run = make_run(tmp_path, "r", failure=False)
    out = tmp_path / "reports" / "r"
    assert main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    assert (out / "report.md").is_file()


def test_timeline_merges_thousands_of_adjacent_steps(tmp_path):
    d = tmp_path / "long"
    d.mkdir()
    ev = [{"t": T0, "event": "run_started", "proc": "launcher", "sites": ["s"], "algorithm": "diloco"},
          {"t": T0 + 0.5, "event": "site_ready", "proc": "s/0", "site": "s", "version": 0, "round": 0}]
    t = T0 + 0.5
    for i in range(1, 5001):
        t += 0.01
        ev.append({"t": t, "event": "inner_step", "proc": "s/0", "site": "s", "step": i, "round": i // 1000,
                   "compute_s": 0.01, "wan_s": 0.0})
        if i % 1000 == 0:
            t += 1.0
            ev.append({"t": t, "event": "merge", "proc": "s/0", "site": "s", "round": i // 1000, "seconds": 1.0,
                       "bytes_sent": 1, "bytes_received": 1, "step": i})
    ev.append({"t": t + 1, "event": "fault_injected", "proc": "launcher", "fault": "latency", "target": "s<->hub"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    tl = timeline(d)
    assert list(tl.sites) == ["s"]
    assert len(tl.sites["s"].compute) == 5 and len(tl.sites["s"].wan) == 5
    assert len(tl.sites["s"].merges) == 5
    assert [m.kind for m in tl.markers] == ["fault_injected"]
    assert sum(b - a for a, b in tl.sites["s"].compute) == pytest.approx(50.0, rel=1e-3)
    report = write_report([d], d)
    assert_png(d / IMAGES["timeline"])
    assert "| s | ? | 5000 | 5 | 50.00 | 5.00 | 90.9 % |" in report.read_text()


def test_coalesce():
    assert coalesce([(2.0, 3.0), (0.0, 1.0), (1.0, 2.0), (5.0, 6.0)]) == [(0.0, 3.0), (5.0, 6.0)]
    assert coalesce([(0.0, 1.0), (1.05, 2.0)], gap=0.1) == [(0.0, 2.0)]
    assert coalesce([]) == []
