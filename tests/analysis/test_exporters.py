"""TensorBoard event files and the Prometheus endpoint, fed from geotrain events (geotrain/analysis/exporters.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tensorboardX")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from geotrain.events import EventLog  # noqa: E402
from geotrain.analysis.exporters import (  # noqa: E402
    PrometheusExporter,
    TensorBoardExporter,
    export_tensorboard,
    read_scalars,
    read_texts,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "topologies" / "demo.yaml"
T0 = 1_700_000_000.0


def _ev(event: str, proc: str, t: float, **fields) -> dict:
    return {"t": T0 + t, "event": event, "proc": proc, **fields}


def synthetic_events() -> list[dict]:
    """Two sites, two DiLoCo rounds of two inner steps, one site failure and recovery, one fault."""
    return [
        _ev("run_started", "launcher", 0, run="demo", sites=["us-east", "eu-west"], algorithm="diloco"),
        _ev("eval", "us-east/0", 1, round=0, step=0, loss=5.5, seconds=0.3),
        _ev("inner_step", "us-east/0", 2, site="us-east", step=1, round=0, loss=5.25, compute_s=0.25, wan_s=0.0),
        _ev("inner_step", "eu-west/0", 2, site="eu-west", step=1, round=0, loss=5.5, compute_s=0.5, wan_s=0.0),
        _ev("inner_step", "us-east/0", 3, site="us-east", step=2, round=0, loss=5.0, compute_s=0.25, wan_s=0.125),
        _ev("inner_step", "eu-west/0", 3, site="eu-west", step=2, round=0, loss=4.75, compute_s=0.5, wan_s=0.25),
        _ev("commit", "coordinator", 4, round=0, version=1, sites=["eu-west", "us-east"], crc32=1, epoch=1,
            wait_s=0.75, apply_s=0.01),
        _ev("merge", "us-east/0", 4.1, site="us-east", round=0, version=1, bytes_sent=1000, bytes_received=2000,
            seconds=1.5, step=2, crc32=1),
        _ev("merge", "eu-west/0", 4.2, site="eu-west", round=0, version=1, bytes_sent=1000, bytes_received=2000,
            seconds=2.5, step=2, crc32=1, staleness=1),
        _ev("eval", "us-east/0", 5, round=1, step=2, loss=4.5, seconds=0.3),
        _ev("fault_injected", "launcher", 5.5, fault="partition", target="link eu-west<->hub",
            params={"loss": 1.0}, duration_s=2.0),
        _ev("failure", "coordinator", 6, what="site", target="eu-west", happened_t=T0 + 5.6, detected_t=T0 + 6,
            reason="missed the round deadline"),
        _ev("inner_step", "us-east/0", 6.5, site="us-east", step=3, round=1, loss=4.5, compute_s=0.25, wan_s=0.0),
        _ev("inner_step", "us-east/0", 7, site="us-east", step=4, round=1, loss=4.25, compute_s=0.25, wan_s=0.0),
        _ev("commit", "coordinator", 8, round=1, version=2, sites=["us-east"], crc32=2, epoch=1, wait_s=3.5,
            apply_s=0.02, staleness={"us-east": 0}),
        _ev("merge", "us-east/0", 8.1, site="us-east", round=1, version=2, bytes_sent=500, bytes_received=700,
            seconds=0.5, step=4, crc32=2),
        _ev("fault_healed", "launcher", 8.5, fault="partition", target="link eu-west<->hub"),
        _ev("recovery", "coordinator", 9, what="site", target="eu-west", failure_t=T0 + 5.6, recovered_t=T0 + 9,
            seconds=3.4, rounds_lost=1),
        _ev("eval", "us-east/0", 9.5, round=2, step=4, loss=4.0, seconds=0.3),
        _ev("run_finished", "launcher", 10, status="completed", reason=None),
    ]


def approx_points(points):
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in points]


# ---- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_scalars_from_events(tmp_path):
    exporter = TensorBoardExporter(tmp_path)
    for e in synthetic_events():
        exporter.add(e)
    exporter.close()
    exporter.close()  # idempotent

    log_dir = tmp_path / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # one writer per run
    s = read_scalars(log_dir)
    assert s["eval/loss"] == approx_points([(0, 5.5), (2, 4.5), (4, 4.0)])
    assert s["train/loss/us-east"] == approx_points([(1, 5.25), (2, 5.0), (3, 4.5), (4, 4.25)])
    assert s["train/loss/eu-west"] == approx_points([(1, 5.5), (2, 4.75)])
    assert s["train/compute_s/eu-west"] == approx_points([(1, 0.5), (2, 0.5)])
    assert s["train/wan_s/us-east"] == approx_points([(1, 0.0), (2, 0.125), (3, 0.0), (4, 0.0)])
    assert s["wan/merge_seconds/us-east"] == approx_points([(0, 1.5), (1, 0.5)])
    assert s["wan/merge_seconds/eu-west"] == approx_points([(0, 2.5)])
    assert s["wan/bytes/us-east"] == approx_points([(0, 3000), (1, 1200)])
    assert s["wan/bytes_sent/us-east"] == approx_points([(0, 1000), (1, 500)])
    assert s["wan/bytes_received/eu-west"] == approx_points([(0, 2000)])
    assert s["wan/staleness/eu-west"] == approx_points([(0, 1)])
    assert "wan/staleness/us-east" not in s  # only where the event carries it
    assert s["coordinator/wait_s"] == approx_points([(0, 0.75), (1, 3.5)])
    assert s["coordinator/apply_s"] == approx_points([(0, 0.01), (1, 0.02)])
    assert s["coordinator/sites"] == approx_points([(0, 2), (1, 1)])
    assert s["coordinator/staleness/us-east"] == approx_points([(1, 0)])
    assert "coordinator/staleness/eu-west" not in s
    # markers: x = highest round seen so far
    assert s["failures/site"] == approx_points([(1, 1)])
    assert s["recoveries/site"] == approx_points([(1, 1)])
    assert s["recovery_seconds/site"] == approx_points([(1, 3.4)])
    assert s["faults/injected"] == approx_points([(1, 1)])
    assert s["faults/active"] == approx_points([(1, 1), (1, 0)])
    texts = read_texts(log_dir)["faults"]
    assert [step for step, _ in texts] == [1, 1]
    assert "injected **partition** on `link eu-west<->hub`" in texts[0][1]
    assert "healed **partition**" in texts[1][1]


def test_tensorboard_wall_time_is_the_event_time(tmp_path):
    from geotrain.analysis.exporters import _summary_values

    with TensorBoardExporter(tmp_path) as exporter:
        exporter.add(_ev("eval", "us-east/0", 42, round=0, step=0, loss=1.0))
    [(step, wall_time, value)] = list(_summary_values(tmp_path / "tensorboard"))
    assert (step, value.tag) == (0, "eval/loss")
    assert wall_time == pytest.approx(T0 + 42)


def test_tensorboard_skips_missing_and_non_numeric_fields(tmp_path):
    with TensorBoardExporter(tmp_path) as exporter:
        exporter.add(_ev("eval", "us-east/0", 1, round=0, step=0, loss=None))
        exporter.add(_ev("eval", "us-east/0", 1, round=0, loss=3.0))  # no step
        exporter.add(_ev("inner_step", "us-east/0", 2, site="us-east", step=1, round=0, loss="nan?", compute_s=0.5))
        exporter.add(_ev("merge", "us-east/0", 3, site="us-east", round=0, seconds=True))
        exporter.add(_ev("site_joined", "coordinator", 4, site="us-east", workers=2, round=0))
        exporter.add({"no": "event"})
        exporter.add("not a dict")  # type: ignore[arg-type]
    s = read_scalars(tmp_path / "tensorboard")
    assert set(s) == {"train/compute_s/us-east"}
    with pytest.raises(RuntimeError):
        exporter.add(_ev("eval", "us-east/0", 1, round=0, step=0, loss=1.0))


def test_export_tensorboard_batch_is_idempotent(tmp_path):
    log = EventLog(tmp_path / "metrics.jsonl", proc="test")
    for e in synthetic_events():
        e = dict(e)
        e.pop("proc")
        log.emit(e.pop("event"), **e)
    log.close()

    log_dir = export_tensorboard(tmp_path)
    assert log_dir == tmp_path / "tensorboard"
    first = read_scalars(log_dir)
    assert first["eval/loss"] == approx_points([(0, 5.5), (2, 4.5), (4, 4.0)])
    assert export_tensorboard(str(tmp_path)) == log_dir
    assert read_scalars(log_dir) == first  # replaced, not appended
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1

    export_tensorboard(tmp_path, replace=False)
    assert len(read_scalars(log_dir)["eval/loss"]) == 6


def test_export_tensorboard_needs_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        export_tensorboard(tmp_path)


def test_reader_ignores_a_torn_tail_and_rejects_corruption(tmp_path):
    with TensorBoardExporter(tmp_path) as exporter:
        for step in range(3):
            exporter.add(_ev("eval", "us-east/0", step, round=step, step=step, loss=float(step)))
    [path] = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data = path.read_bytes()

    path.write_bytes(data[:-5])  # a writer still appending
    assert read_scalars(tmp_path / "tensorboard")["eval/loss"] == [(0, 0.0), (1, 1.0)]

    corrupt = bytearray(data)
    corrupt[-6] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt"):
        read_scalars(tmp_path / "tensorboard")


def test_tensorboard_itself_reads_the_files(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with TensorBoardExporter(tmp_path) as exporter:
        for e in synthetic_events():
            exporter.add(e)
    acc = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"eval/loss", "train/loss/us-east", "wan/bytes/eu-west", "coordinator/wait_s"} <= set(acc.Tags()["scalars"])
    assert [(p.step, p.value) for p in acc.Scalars("eval/loss")] == approx_points([(0, 5.5), (2, 4.5), (4, 4.0)])


# ---- Prometheus -------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_prometheus_metrics_from_events():
    exporter = PrometheusExporter(port=0)
    port = exporter.start()
    try:
        assert port > 0 and exporter.start() == port  # start twice: same server
        for e in synthetic_events():
            exporter.observe(e)
        exporter.set_link_bytes("us-east<->hub", forward=965647, backward=1447735)
        exporter.set_link_bytes("us-east<->hub", forward=1000000, backward=1500000)  # totals: replaced
        text = scrape(port)
    finally:
        exporter.stop()

    lines = text.splitlines()
    assert "geotrain_rounds_committed_total 2.0" in lines
    assert "geotrain_live_sites 2.0" in lines  # eu-west failed, then recovered
    assert 'geotrain_merge_seconds{site="us-east"} 0.5' in lines
    assert 'geotrain_wan_bytes_total{direction="sent",site="us-east"} 1500.0' in lines \
        or 'geotrain_wan_bytes_total{site="us-east",direction="sent"} 1500.0' in lines
    assert "# TYPE geotrain_round_wait_seconds histogram" in lines

    assert value(text, "geotrain_round") == 1
    assert value(text, "geotrain_global_version") == 2
    assert value(text, "geotrain_round_wait_seconds_count") == 2
    assert value(text, "geotrain_round_wait_seconds_sum") == pytest.approx(4.25)
    assert value(text, "geotrain_round_wait_seconds_bucket", le="1.0") == 1
    assert value(text, "geotrain_round_wait_seconds_bucket", le="5.0") == 2
    assert value(text, "geotrain_merge_seconds", site="eu-west") == 2.5
    assert value(text, "geotrain_wan_bytes_total", site="us-east", direction="received") == 2700
    assert value(text, "geotrain_wan_bytes_total", site="eu-west", direction="sent") == 1000
    assert value(text, "geotrain_link_bytes_total", link="us-east<->hub", direction="forward") == 1000000
    assert value(text, "geotrain_link_bytes_total", link="us-east<->hub", direction="backward") == 1500000
    assert value(text, "geotrain_staleness", site="eu-west") == 1  # from its merge
    assert value(text, "geotrain_staleness", site="us-east") == 0  # commit mapping and merge without one
    assert value(text, "geotrain_eval_loss") == 4.0
    assert value(text, "geotrain_failures_total", what="site") == 1
    assert value(text, "geotrain_recoveries_total", what="site") == 1
    assert value(text, "geotrain_recovery_seconds", what="site") == pytest.approx(3.4)
    assert value(text, "geotrain_faults_injected_total", fault="partition") == 1


def test_prometheus_staleness_on_commit():
    exporter = PrometheusExporter()
    exporter.observe(_ev("commit", "coordinator", 1, round=3, version=4, sites=["a", "b"], wait_s=1.0,
                         staleness={"a": 2}))
    exporter.observe(_ev("commit", "coordinator", 2, round=4, version=5, sites=["c"], wait_s=1.0, staleness=3))
    exporter.observe(_ev("round_failed", "coordinator", 3, round=5, reason="quorum"))
    exporter.observe(_ev("merge_refused", "coordinator", 4, site="b", round=2, action="stale", reason="old"))
    from prometheus_client import generate_latest

    text = generate_latest(exporter.registry).decode()
    assert value(text, "geotrain_staleness", site="a") == 2
    assert value(text, "geotrain_staleness", site="b") == 0
    assert value(text, "geotrain_staleness", site="c") == 3
    assert value(text, "geotrain_rounds_failed_total") == 1
    assert value(text, "geotrain_merges_refused_total", action="stale") == 1


def test_prometheus_live_sites():
    from prometheus_client import generate_latest

    exporter = PrometheusExporter()

    def live() -> float:
        return value(generate_latest(exporter.registry).decode(), "geotrain_live_sites")

    exporter.observe(_ev("coordinator_started", "coordinator", 0, sites=["a", "b", "c"], epoch=1))
    assert live() == 0
    exporter.observe(_ev("site_joined", "coordinator", 1, site="a", workers=2, round=0))
    exporter.observe(_ev("site_joined", "coordinator", 1, site="b", workers=2, round=0))
    assert live() == 2
    # synchronous: the sites of the latest commit; a site's failure counts at once
    exporter.observe(_ev("commit", "coordinator", 2, round=0, version=1, sites=["a", "b", "c"], wait_s=0.1))
    assert live() == 3
    exporter.observe(_ev("failure", "coordinator", 3, what="site", target="c", reason="deadline"))
    exporter.observe(_ev("failure", "launcher", 3, what="worker", target="worker a/1", reason="exit 1"))
    assert live() == 2
    exporter.observe(_ev("recovery", "coordinator", 4, what="site", target="c", seconds=1.0))
    assert live() == 3
    exporter.observe(_ev("commit", "coordinator", 5, round=1, version=2, sites=["a"], wait_s=0.1))
    assert live() == 1
    # asynchronous (async-diloco: one site per commit, with weight and staleness): the last N commits
    for i, site in enumerate(["a", "b", "a", "c", "a", "b"]):
        exporter.observe(_ev("commit", "coordinator", 6 + i, round=2 + i, version=3 + i, sites=[site],
                             staleness=i % 2, weight=1.0, wait_s=0.0))
    assert live() == 3
    for i in range(3):  # only a from now on: b and c fall out of the last 3 commits
        exporter.observe(_ev("commit", "coordinator", 20 + i, round=10 + i, version=11 + i, sites=["a"],
                             staleness=0, weight=1.0, wait_s=0.0))
    assert live() == 1


def test_prometheus_a_merge_without_staleness_keeps_the_commits():
    from prometheus_client import generate_latest

    exporter = PrometheusExporter()
    exporter.observe(_ev("commit", "coordinator", 1, round=7, version=8, sites=["a"], staleness=3, weight=0.25,
                         wait_s=0.0))
    exporter.observe(_ev("merge", "a/0", 2, site="a", round=4, version=8, bytes_sent=10, bytes_received=10,
                         seconds=0.5))
    exporter.observe(_ev("merge", "b/0", 2, site="b", round=4, version=8, bytes_sent=10, bytes_received=10,
                         seconds=0.5))
    text = generate_latest(exporter.registry).decode()
    assert value(text, "geotrain_staleness", site="a") == 3
    assert value(text, "geotrain_staleness", site="b") == 0


def test_prometheus_exporters_do_not_share_metrics():
    a, b = PrometheusExporter(), PrometheusExporter()
    pa, pb = a.start(), b.start()
    try:
        assert pa != pb
        a.observe(_ev("commit", "coordinator", 1, round=0, version=1, sites=["x"], wait_s=0.1))
        assert value(scrape(pa), "geotrain_rounds_committed_total") == 1
        assert value(scrape(pb), "geotrain_rounds_committed_total") == 0
    finally:
        a.stop()
        b.stop()


def test_prometheus_stop_frees_the_port():
    exporter = PrometheusExporter(port=0, host="127.0.0.1")
    port = exporter.start()
    assert "geotrain_live_sites" in scrape(port)
    exporter.stop()
    exporter.stop()  # idempotent

    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with socket.socket() as s:  # nobody listens there any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    again = PrometheusExporter(port=port)
    try:
        assert again.start() == port
        assert "geotrain_live_sites" in scrape(port)
    finally:
        again.stop()


def test_prometheus_follows_a_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = EventLog(path, proc="coordinator")
    log.emit("commit", round=0, version=1, sites=["a", "b"], wait_s=0.5)
    exporter = PrometheusExporter()
    port = exporter.start()
    try:
        exporter.follow(path, interval_s=0.05)
        with pytest.raises(RuntimeError):
            exporter.follow(path)
        log.emit("commit", round=1, version=2, sites=["a"], wait_s=0.5)
        deadline = time.monotonic() + 10
        while value(scrape(port), "geotrain_rounds_committed_total") < 2:
            assert time.monotonic() < deadline, "the follower never saw the second commit"
            time.sleep(0.05)
        assert value(scrape(port), "geotrain_live_sites") == 1
    finally:
        exporter.stop()
        log.close()


# ---- a real run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(DEMO), "--set", "training.rounds=2",
                        "--run-dir", str(run_dir), "--quiet"], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr

    log_dir = export_tensorboard(run_dir)
    s = read_scalars(log_dir)
    assert [step for step, _ in s["eval/loss"]] == [0, 10, 20]  # before training and after each round
    assert all(v > 0 for _, v in s["eval/loss"])
    for site in ("us-east", "eu-west"):
        assert [step for step, _ in s[f"train/loss/{site}"]] == list(range(1, 21))
        assert [rnd for rnd, _ in s[f"wan/bytes/{site}"]] == [0, 1]
        assert all(v > 0 for _, v in s[f"wan/bytes/{site}"])
    assert [rnd for rnd, _ in s["coordinator/wait_s"]] == [0, 1]

    exporter = PrometheusExporter()
    from geotrain.events import read_events

    exporter.observe_all(read_events(run_dir / "metrics.jsonl"))
    from prometheus_client import generate_latest

    text = generate_latest(exporter.registry).decode()
    assert value(text, "geotrain_rounds_committed_total") == 2
    assert value(text, "geotrain_live_sites") == 2
