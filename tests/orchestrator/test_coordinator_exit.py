"""A coordinator on its own host exits when the run is done (orchestrator.main: run_done, should_exit),
and creates its run directory."""

import subprocess
import sys
import time

from geotrain.config.topology import parse_topology
from geotrain.orchestrator.engine import CoordinatorEngine
from geotrain.config.derive import coordinator_config
from geotrain.orchestrator.main import run_done, should_exit


def test_should_exit_only_when_done_idle_and_allowed():
    assert should_exit(True, 31.0, 30.0)
    assert not should_exit(True, 10.0, 30.0)
    assert not should_exit(False, 100.0, 30.0)
    assert not should_exit(True, 1e9, None)  # --stay


def test_run_done_counts_rounds_the_algorithms_way():
    for algorithm, rounds in (("diloco", 3), ("ddp", 3)):
        topo = parse_topology({"name": "t", "sites": [{"name": "a", "workers": 1}],
                               "training": {"algorithm": algorithm, "rounds": rounds, "inner_steps": 2}})
        engine = CoordinatorEngine(coordinator_config(topo))
        assert not run_done(engine, topo)
        if algorithm == "ddp":
            engine.version = rounds * 2
        else:
            for lane in engine.lanes:
                lane.state = type(lane.state)(round=rounds, expected=lane.state.expected)
        assert run_done(engine, topo)


def test_the_coordinator_creates_its_run_dir_and_exits_when_done(tmp_path):
    import torch

    from geotrain.worker.client import CoordinatorClient

    topology = tmp_path / "t.yaml"
    topology.write_text("name: t\nsites: [{name: a, workers: 1}]\ntraining: {rounds: 1}\n"
                        "coordinator: {prometheus_port: null}\nsecurity: {tls: false}\n")
    run_dir = tmp_path / "deep" / "run"
    coord = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "coordinator", str(topology), "--run-dir",
                              str(run_dir), "--linger", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(coord.stdout.readline().split()[1])
        client = CoordinatorClient(f"127.0.0.1:{port}", "a", timeout_s=30)
        client.join(1)
        client.init_model(torch.zeros(4))
        client.get_model(0)
        client.merge(torch.full((4,), 0.1), round=0, kind="pseudo_grad")  # the run's only round
        client.close()
        assert coord.wait(timeout=30) == 0  # done, and nothing committed for 0.5 s: it exits by itself
    finally:
        if coord.poll() is None:
            coord.kill()
    assert '"reason":"done"' in (run_dir / "metrics.jsonl").read_text()


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    topology = tmp_path / "t.yaml"
    topology.write_text("name: t\nsites: [{name: a, workers: 1}]\n")
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "coordinator", str(topology), "--run-dir",
                        str(tmp_path / "file" / "run")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--run-dir" in r.stderr and "Traceback" not in r.stderr
