"""The per-component configs: the worker's document validated on read, a link's command line exact."""

import json
import subprocess
import sys

import pytest

from geotrain.config.components import LinkConfig, WorkerConfig, _exact
from geotrain.errors import GeotrainError
from geotrain.units import parse_bandwidth_mbps, parse_duration_ms


def test_document_round_trips(tmp_path):
    cfg = WorkerConfig(algorithm="async-diloco", inner_steps=7, checkpoint_dir=tmp_path / "ck", rpc_timeout_s=301.5,
                       alpha=0.1 + 0.2, outer_optimizer={"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True})
    assert WorkerConfig.read(cfg.write(tmp_path / "w.json")) == cfg


# document -> (key the message must name, words it must contain)
BAD_DOCUMENTS = {
    '{"inner_steps": 5, "rounds_": 2}': ("rounds_", "unknown key (known keys: algorithm, inner_steps"),
    '{"inner_steps": "10"}': ("inner_steps", "valid integer, got '10'"),
    '{"error_feedback": 1}': ("error_feedback", "valid boolean"),
    '{"algorithm": "gossip"}': ("algorithm", "'gossip'"),
    '{"checkpoint_dir": 3}': ("checkpoint_dir", "got 3"),
    '{"outer_optimizer": {"lr": 0.7, "momentun": 0.9}}': ("outer_optimizer", "momentun"),
    '[1, 2]': ("", "must be a JSON object, got list"),
    '{"inner_steps": 5': ("", "not valid JSON"),
}


@pytest.mark.parametrize("text", sorted(BAD_DOCUMENTS))
def test_bad_document_is_one_error_naming_file_and_key(tmp_path, text):
    path = tmp_path / "worker-config.a.json"
    path.write_text(text)
    key, words = BAD_DOCUMENTS[text]
    with pytest.raises(GeotrainError) as info:
        WorkerConfig.read(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}"), msg
    assert words in msg and "\n" not in msg, msg


def test_missing_document(tmp_path):
    with pytest.raises(GeotrainError, match="worker-config.x.json: cannot read the worker config: No such file"):
        WorkerConfig.read(tmp_path / "worker-config.x.json")


@pytest.mark.parametrize("body, words", [
    (b'{"a": "' + b"x" * (1 << 20) + b'"}', "larger than 1024 KiB"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"inner_steps": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"caf\xe9": 1}', "not valid JSON"),  # not UTF-8
])
def test_a_hostile_document_is_one_bounded_error(tmp_path, body, words):
    path = tmp_path / "worker-config.x.json"
    path.write_bytes(body)
    with pytest.raises(GeotrainError) as info:
        WorkerConfig.read(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and words in msg and "\n" not in msg and len(msg) < 300, msg


@pytest.mark.parametrize("x", [100.0, 25.0, 0.01, 1234.5678, 1e-7, 1e7, 0.1 + 0.2, 123456789.125])
def test_link_numbers_read_back_as_the_launcher_wrote_them(x):
    # the link emulator parses exactly the values of the old command line (f"{x}mbit", f"{x}ms", str(x))
    assert float(_exact(x)) == x
    assert parse_bandwidth_mbps(f"{_exact(x)}mbit") == parse_bandwidth_mbps(f"{x}mbit")
    assert parse_duration_ms(f"{_exact(x)}ms") == parse_duration_ms(f"{x}ms")


def test_exact_is_short_where_it_can_be():
    assert [_exact(x) for x in (100.0, 0.0, 0.01, 1234.5678)] == ["100", "0", "0.01", "1234.5678"]


@pytest.mark.parametrize("streams", [1, 4])
def test_link_started_with_its_args_holds_its_params(tmp_path, streams):
    cfg = LinkConfig(name="a<->hub", bandwidth_mbps=12.5, latency_ms=40.0, jitter_ms=1.5, loss=0.001, seed=9,
                     streams=streams)
    stats = tmp_path / "s.json"
    args = cfg.args(listen="127.0.0.1:0", target="127.0.0.1:1", stats_file=str(stats),
                    control_file=str(tmp_path / "c.json"))
    assert "--control-file" not in cfg.args(listen="l:0", target="t:1", stats_file="s")
    proc = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "link", *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("READY ")
        doc = json.loads(stats.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert doc["name"] == "a<->hub" and doc["streams"] == streams
    assert ("--streams" in args) == (streams > 1)
    want = {"bandwidth_mbps": 12.5, "latency_ms": 40.0, "jitter_ms": 1.5, "loss": 0.001}
    for direction in ("forward", "backward"):
        assert {k: doc[direction][k] for k in want} == want
