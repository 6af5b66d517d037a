"""`geotrain site` (the separate-host front door) spends its restarts on faults, not on mistakes.

A site run by ``geotrain site`` restarts its worker group when a worker dies, up to
``recovery.max_restarts``. Two deaths no restart cures must stop it at once, as they stop ``geotrain
launch`` (geotrain.run.supervise.crash_loop): the user's script failing the same way twice, and the
coordinator refusing the site for good (here: it trains another model than the run's). Before, both ran
through every restart (5 here, ~5 s each) before the site gave up with "died with exit status 1".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.control.etcd_server import EtcdServer
from geotrain.events import read_events
from tests.integration.helpers import REPO, processes_mentioning, wait_for_event
from tests.integration.test_sdk_outcomes import SCRIPT, TOPOLOGY as REGRESS_TOPOLOGY
from tests.integration.test_separate_hosts import ready_port, stop

pytestmark = pytest.mark.slow
TOPOLOGY = REGRESS_TOPOLOGY + "security: {tls: false}\n"  # the SDK tests' two sites, etcd and gRPC in plaintext


def part(args: list[str], log: Path, mode: str = "normal", stdout=subprocess.DEVNULL) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "geotrain.cli", *args], stdout=stdout, stderr=err, text=True,
                                cwd=REPO, start_new_session=True, env=dict(os.environ, REGRESS_MODE=mode))


def tokyo_alone(tmp: Path, modes: dict[str, str]) -> tuple[int, str, list[dict]]:
    """etcd, the coordinator and one ``geotrain site`` per entry of ``modes`` (site -> REGRESS_MODE); waits for
    tokyo's site to exit and returns (its exit status, its stderr, its run dir's events). Stops the rest."""
    topo = tmp / "topology.yaml"
    topo.write_text(TOPOLOGY)
    logs = tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    with EtcdServer(tmp / "etcd", host="127.0.0.1", log_path=logs / "etcd.log") as etcd_server:
        etcd = etcd_server.endpoint.split("://")[-1]
        try:
            coord = part(["coordinator", str(topo), "--etcd", etcd, "--bind", "127.0.0.1:0", "--run-dir",
                          str(tmp / "coordinator")], logs / "coordinator.log", stdout=subprocess.PIPE)
            procs.append(coord)
            port = ready_port(coord, logs / "coordinator.log")
            sites = {}
            for site, mode in modes.items():
                sites[site] = part(["site", site, str(topo), "--etcd", etcd, "--coordinator", f"127.0.0.1:{port}",
                                    "--run-dir", str(tmp / site), "--script", sys.executable, str(SCRIPT)],
                                   logs / f"{site}.log", mode=mode)
                procs.append(sites[site])
                if site != "tokyo":  # joined first: its model is the run's (the coordinator takes the first site's)
                    wait_for_event(tmp / site, lambda e: e["event"] == "site_ready", timeout_s=120)
            rc = sites["tokyo"].wait(timeout=180)
        finally:
            stop(procs)
    assert not processes_mentioning(str(tmp)), "a process of the run outlived it"
    return rc, (logs / "tokyo.log").read_text(), read_events(tmp / "tokyo" / "metrics.jsonl")


def test_a_site_the_coordinator_refuses_for_good_is_not_restarted(tmp_path):
    rc, err, events = tokyo_alone(tmp_path, {"paris": "normal", "tokyo": "mismatch"})
    assert rc == 1, err
    assert "refused by the coordinator (MODEL_MISMATCH)" in err and "trains another model than the run's" in err
    assert "no restart can cure that" in err and "Traceback" not in err
    assert not [e for e in events if e["event"] == "failure"], "the site was restarted"
    crashed = [e for e in events if e["event"] == "worker_crashed"]
    assert len(crashed) == 1 and crashed[0]["outcome"] == "MODEL_MISMATCH" and crashed[0]["ours"] is True


def test_a_script_that_fails_the_same_way_twice_is_restarted_once(tmp_path):
    rc, err, events = tokyo_alone(tmp_path, {"tokyo": "crash"})
    assert rc == 1, err
    assert "failed the same way twice (ValueError at regress_user.py" in err and "my batch has the wrong shape" in err
    assert len([e for e in events if e["event"] == "failure"]) == 1  # one restart: the first could have been a fault
    assert len([e for e in events if e["event"] == "worker_crashed"]) == 2
