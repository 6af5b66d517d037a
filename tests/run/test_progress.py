"""The non-TTY progress output: one line per committed round, evals by their metric's name, every
failure and recovery as it happens, the first sign of a non-finite model (geotrain.run.progress)."""

import io
import json
from types import SimpleNamespace

from rich.console import Console

from geotrain.config.topology import parse_topology
from geotrain.events import EventLog
from geotrain.run.progress import Progress


def _progress(tmp_path):
    topo = parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 2}],
                           "training": {"rounds": 3}})
    out = io.StringIO()
    launcher = SimpleNamespace(topo=topo, run_dir=tmp_path, link_stats={})
    return Progress(launcher, console=Console(file=out, force_terminal=False, width=200)), out, \
        EventLog(tmp_path / "metrics.jsonl", "test")


def test_plain_lines_for_rounds_evals_metrics_and_failures(tmp_path):
    p, out, log = _progress(tmp_path)
    log.emit("inner_step", site="a", step=1, round=0, loss=1.0, tokens=100)
    log.emit("metric", site="a", rank=0, round=0, step=1, acc=0.9123456)
    log.emit("commit", round=0, version=1, sites=["a", "b"], fragment=0)
    log.emit("eval", site="a", round=1, step=10, loss=0.0846695825457573, metric="mse")
    log.emit("failure", what="worker", target="worker b/1", reason="worker b/1 died with SIGKILL; restarting its site")
    log.emit("recovery", what="site", target="b", seconds=4.25, rounds_lost=1)
    p.update()
    text = out.getvalue()
    assert "round    1/3 committed  sites 2" in text and "a acc 0.9123" in text
    assert "mse 0.08467" in text and "0.0846695825457573" not in text
    assert "failure  worker b/1: worker b/1 died with SIGKILL" in text
    assert "recovered  b after 4.2s, 1 round lost" in text or "recovered  b after 4.3s, 1 round lost" in text
    assert p.sites["a"]["tokens"] == 100  # declared tokens only, times the site's workers


def test_no_tokens_are_invented(tmp_path):
    p, out, log = _progress(tmp_path)
    log.emit("inner_step", site="b", step=1, round=0, loss=1.0)
    p.update()
    assert p.sites["b"]["tokens"] == 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["event"] == "inner_step"


def test_plaintext_is_said_first_and_in_the_summary(tmp_path):
    from geotrain.run.summary import compute_summary

    topo = parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}], "security": {"tls": False}})
    out = io.StringIO()
    Progress(SimpleNamespace(topo=topo, run_dir=tmp_path, link_stats={}),
             console=Console(file=out, force_terminal=False, width=200))
    assert out.getvalue().startswith("warning: security.tls is false")
    s = compute_summary([], topo, wall_seconds=1.0, link_stats={})
    assert s["security"]["tls"] is False and "plaintext" in s["security"]["warning"]
    tls = parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}]})
    assert compute_summary([], tls, wall_seconds=1.0, link_stats={})["security"] == {"tls": True}
