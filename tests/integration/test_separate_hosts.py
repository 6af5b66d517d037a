"""Three hosts made with the separate-host commands, each with its own run dir, reported as ONE run.

The recipe of docs/architecture.md ("Processes on separate hosts"), on one machine: ``geotrain
certs init`` (TLS is the default); etcd with the run's ``etcd`` certificate and auth (EtcdServer(tls=, auth=)); ``geotrain coordinator ... --run-dir A``; a ``geotrain link`` in
front of the coordinator per site (the WAN; us-east's counters land in B/links, eu-west's in
A/links); ``geotrain site NAME ... --coordinator LINK --run-dir B`` (and C). Then ``geotrain report A
B C`` must read them as one run: every planned round committed, the link counters' bytes, both sites.
"""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geotrain.control.auth import grants
from geotrain.control.etcd_server import EtcdServer, ServerTls
from geotrain.security.pki import ETCD, LAUNCHER, CertDir
from tests.integration.helpers import REPO, leftover, processes_mentioning

pytestmark = pytest.mark.slow

SITES = ("us-east", "eu-west")
ROUNDS, H = 3, 3
TOPOLOGY = f"""\
name: three-hosts
seed: 0
sites:
  - {{name: us-east, workers: 1}}
  - {{name: eu-west, workers: 1}}
coordinator:
  at: hub
links:
  default: {{bandwidth: 100mbit, latency: 5ms}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}}
data: {{source: stdlib, max_bytes: 200000}}
training:
  algorithm: diloco
  inner_steps: {H}
  rounds: {ROUNDS}
  batch_size: 4
  eval_batches: 1
"""


def geotrain(*args: str, log: Path) -> subprocess.Popen:
    """One part, as a host would run it: stdout piped (READY <port>), stderr to its own file."""
    err = open(log, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "geotrain.cli", *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=REPO, start_new_session=True)
    finally:
        err.close()


def ready_port(proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> int:
    """The port of a part's ``READY <port>`` line (the coordinator and a link print one once serving)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return int(line.split()[1])
            if not line and proc.poll() is not None:
                break
    finally:
        sel.close()
    raise AssertionError(f"{proc.args[3]} printed no READY line (exit {proc.poll()}): {log.read_text()[-2000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every part still running (links flush their counters on it), then SIGKILL the stubborn."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        if p.stdout:
            p.stdout.close()


def test_three_hosts_are_reported_as_one_run(tmp_path):
    topo = tmp_path / "three-hosts.yaml"
    topo.write_text(TOPOLOGY)
    A, B, C = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    certs, logs = tmp_path / "certs", tmp_path / "logs"
    logs.mkdir()
    made = subprocess.run([sys.executable, "-m", "geotrain.cli", "certs", "init", str(topo), "-o", str(certs)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    procs: list[subprocess.Popen] = []
    # The run's etcd: mutual TLS with the run's `etcd` pair, auth on (each part writes only its keys as its certificate).
    pki = CertDir(certs)
    etcd_server = EtcdServer(tmp_path / "etcd", log_path=logs / "etcd.log", run="three-hosts", auth=grants("three-hosts", SITES),
                             tls=ServerTls(pki.files(ETCD), pki.files(LAUNCHER)))
    with etcd_server:
        etcd = etcd_server.endpoint.replace("https://", "")
        try:
            coord = geotrain("coordinator", str(topo), "--etcd", etcd, "--bind", "127.0.0.1:0", "--run-dir", str(A),
                             "--certs", str(certs), "--linger", "2", log=logs / "coordinator.log")
            procs.append(coord)
            coord_port = ready_port(coord, logs / "coordinator.log")
            link_ports = {}
            for site, stats_dir in (("us-east", B), ("eu-west", A)):
                (stats_dir / "links").mkdir(parents=True, exist_ok=True)  # `geotrain link` does not create it
                log = logs / f"link-{site}.log"
                link = geotrain("link", "--name", f"{site}<->hub", "--listen", "127.0.0.1:0",
                                "--target", f"127.0.0.1:{coord_port}", "--bandwidth", "100mbit", "--latency", "5ms",
                                "--stats-file", str(stats_dir / "links" / f"{site}--hub.json"), log=log)
                procs.append(link)
                link_ports[site] = ready_port(link, log)
            sites = {}
            for site, run_dir in (("us-east", B), ("eu-west", C)):
                sites[site] = geotrain("site", site, str(topo), "--etcd", etcd,
                                       "--coordinator", f"127.0.0.1:{link_ports[site]}", "--certs", str(certs),
                                       "--run-dir", str(run_dir), log=logs / f"site-{site}.log")
                procs.append(sites[site])
            for site, p in sites.items():
                assert p.wait(timeout=90) == 0, (logs / f"site-{site}.log").read_text()[-3000:]
            # Every round committed: the coordinator exits by itself after --linger.
            assert coord.wait(timeout=60) == 0, (logs / "coordinator.log").read_text()[-3000:]
        finally:
            stop(procs)  # the links (they never exit by themselves), and anything a failure left running
        assert all(p.poll() is not None for p in procs)

    # Nothing is left behind: the sites' workers, the parts, etcd (its data dir is under tmp_path).
    assert leftover(B) == {} and leftover(C) == {}
    deadline = time.monotonic() + 5
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path)) == []

    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "geotrain.cli", "report", str(A), str(B), str(C), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "\n## 2. " not in report, report  # one run, not three
    assert f"Run directories (one run, from separate hosts): `{A}`, `{B}`, `{C}`" in report
    assert "| status | completed |" in report, report
    assert f"| rounds completed / planned | {ROUNDS} / {ROUNDS} |" in report
    wan = next(line for line in report.splitlines() if line.startswith("| WAN bytes (link counters"))
    assert "| – |" not in wan and "(0 B)" not in wan, wan  # both links' counters, non-zero
    for site in SITES:
        row = next((line for line in report.splitlines() if line.startswith(f"| {site} | 1 | ")), None)
        assert row is not None, report
        assert row.startswith(f"| {site} | 1 | {ROUNDS * H} | {ROUNDS} |"), row
    for png in ("report-loss-vs-steps.png", "report-timeline.png", "report-link-bytes.png"):
        assert (out / png).is_file(), png

    # The three histories checked as one: the sites' merges against the coordinator's commits.
    checked = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(A), str(B), str(C), "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    verdicts = {v["invariant"]: v["status"] for v in json.loads(checked.stdout)["verdicts"]}
    assert verdicts["sites_agree_after_merge"] == "held" and verdicts["rounds_committed_once_in_order"] == "held", verdicts

    # The bytes come from the counters of both links, found in two different host dirs.
    from geotrain.analysis.hosts import combine
    from geotrain.analysis.rundir import load_run

    (run,) = combine([load_run(A), load_run(B), load_run(C)])
    links = run.link_bytes()
    assert set(links) == {"us-east<->hub", "eu-west<->hub"}
    assert all(f > 0 and b > 0 for f, b in links.values()), links
    assert run.wan_bytes == sum(f + b for f, b in links.values())
    # TLS records and gRPC framing on top of the tensors: the counters hold at least the merge payloads
    assert run.wan_bytes >= run.merge_wan_bytes() > 0
