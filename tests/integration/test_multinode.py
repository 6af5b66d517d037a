"""Multi-node sites for real: nodes in their own network namespaces, torchrun, a dead node.

Each "host" is a Linux network namespace with its own address (scripts/netns.sh: veth pairs into a
bridge; root), so the two nodes of a site meet over a real network: node 0's agent hosts the site's
store on its namespace's address, gloo connects across the bridge. etcd and the coordinator listen
on the bridge's address in this namespace. The same run with the site as 1 node x 2 workers must end
at the same loss, bit for bit: the batches come from (seed, site, site rank), the site averages its
two workers' gradients with one gloo all-reduce of two ranks (a + b, the same sum whichever rank
adds), so the reduction order is the same whether the ranks share a host or not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.control.etcd_server import EtcdServer
from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, processes_mentioning, started_pids, summary, wait_for_event
from tests.integration.test_separate_hosts import ready_port, stop

pytestmark = pytest.mark.slow
NETNS = REPO / "scripts" / "netns.sh"
PREFIX = "gtmn"


def topology(us_east: str, rounds: int = 3, extra: str = "") -> str:
    return f"""\
name: multinode
seed: 0
sites:
  - {{name: us-east, {us_east}}}
  - {{name: eu-west, workers: 1}}
coordinator: {{at: hub}}
links:
  default: {{bandwidth: 1gbit, latency: 1ms}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}}
data: {{source: stdlib, max_bytes: 200000}}
security: {{tls: false}}
training:
  algorithm: diloco
  inner_steps: 3
  rounds: {rounds}
  batch_size: 4
  eval_batches: 1
{extra}"""


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (scripts/netns.sh)"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) on this machine"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def _namespaces_reach_each_other(a: str, b: str, b_addr: str) -> str | None:
    """One TCP connection from namespace ``a`` to a listener in ``b`` (what gloo and the site's store
    need): None, or what went wrong. Bridged traffic meets iptables' FORWARD chain where br_netfilter
    is loaded (Docker's policy there is DROP): scripts/netns.sh lets the bridge's traffic through."""
    listen = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c",
                               "import socket; s = socket.create_server(('0.0.0.0', 0)); print(s.getsockname()[1], flush=True);"
                               " s.settimeout(10); c, _ = s.accept(); c.sendall(b'ok')"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(listen.stdout.readline())
        got = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c",
                              f"import socket; print(socket.create_connection(({b_addr!r}, {port}), timeout=5).recv(2).decode())"],
                             capture_output=True, text=True, timeout=30)
        return None if got.stdout.strip() == "ok" else (got.stderr.strip()[-300:] or "no answer")
    finally:
        listen.kill()
        listen.wait()


@pytest.fixture
def hosts():
    """Three namespaces (their addresses) and the bridge's address (this host, seen from them)."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    up = subprocess.run(["bash", str(NETNS), "up", "3", PREFIX], capture_output=True, text=True, timeout=60)
    if up.returncode != 0:
        subprocess.run(["bash", str(NETNS), "down", PREFIX], capture_output=True, timeout=60)
        pytest.skip(f"scripts/netns.sh up failed here (no veth/bridge support?): {up.stderr.strip()[-500:]}")
    addr = {k: subprocess.run(["bash", str(NETNS), "addr", str(k), PREFIX], capture_output=True, text=True,
                              check=True).stdout.strip() for k in range(4)}
    try:
        reach = _namespaces_reach_each_other(f"{PREFIX}-1", f"{PREFIX}-2", addr[2])
        assert reach is None, f"namespace {PREFIX}-1 cannot reach {PREFIX}-2 across the bridge: {reach}"
        yield addr
    finally:
        down = subprocess.run(["bash", str(NETNS), "down", PREFIX], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{PREFIX}-" not in left, left


def part(args: list[str], log: Path, netns: str | None = None, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """A geotrain command, in namespace ``netns`` (None: this one)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with open(log, "wb") as err:
        return subprocess.Popen([*prefix, sys.executable, "-m", "geotrain.cli", *args], stdout=stdout, stderr=err,
                                text=True, cwd=REPO, start_new_session=True)


def run_sites(tmp: Path, topo_text: str, bind: str, sites: list[tuple[str, str | None, list[str]]]) -> Path:
    """etcd and the coordinator on ``bind`` here, then every ``(site, namespace, extra args)`` as a
    ``geotrain site``; returns the run directory (shared by every part). Waits for all to finish."""
    tmp.mkdir()
    topo = tmp / "topology.yaml"
    topo.write_text(topo_text)
    run_dir, logs = tmp / "run", tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    with EtcdServer(tmp / "etcd", host=bind, log_path=logs / "etcd.log") as etcd_server:
        etcd = etcd_server.endpoint.split("://")[-1]
        try:
            coord = part(["coordinator", str(topo), "--etcd", etcd, "--bind", f"{bind}:0", "--run-dir", str(run_dir),
                          "--linger", "2"], logs / "coordinator.log", stdout=subprocess.PIPE)
            procs.append(coord)
            port = ready_port(coord, logs / "coordinator.log")
            named = []
            for i, (site, ns, extra) in enumerate(sites):
                log = logs / f"site-{site}-{i}.log"
                named.append((log, part(["site", site, str(topo), "--etcd", etcd, "--coordinator", f"{bind}:{port}",
                                         "--run-dir", str(run_dir), *extra], log, netns=ns)))
                procs.append(named[-1][1])
            for log, p in named:
                assert p.wait(timeout=240) == 0, log.read_text()[-3000:]
            assert coord.wait(timeout=60) == 0, (logs / "coordinator.log").read_text()[-3000:]
        finally:
            stop(procs)
    assert all(p.poll() is not None for p in procs)
    return run_dir


def final_eval(run_dir: Path) -> float:
    evals = [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    assert evals, "no eval event"
    return evals[-1]["loss"], evals[-1]["round"]


@pytest.mark.netns
def test_two_nodes_in_two_namespaces_train_like_one_node_of_two(hosts, tmp_path):
    br = hosts[0]
    two_nodes = run_sites(tmp_path / "two-nodes", topology("workers: 1, nodes: 2"), br, [
        ("us-east", f"{PREFIX}-1", ["--node-rank", "0", "--master-addr", hosts[1], "--master-port", "29511"]),
        ("us-east", f"{PREFIX}-2", ["--node-rank", "1", "--master-addr", hosts[1], "--master-port", "29511"]),
        ("eu-west", f"{PREFIX}-3", []),
    ])
    one_node = run_sites(tmp_path / "one-node", topology("workers: 2"), br, [
        ("us-east", f"{PREFIX}-1", []),
        ("eu-west", f"{PREFIX}-3", []),
    ])
    loss2, round2 = final_eval(two_nodes)
    loss1, round1 = final_eval(one_node)
    assert round1 == round2 == 3
    assert loss2 == loss1, (loss2, loss1)  # bit-identical: see the module docstring
    # the two nodes really were two hosts: rank 1's worker ran in the second namespace and reached node 0's
    # address across the bridge (its gloo pair and the store's connection)
    ev = read_events(two_nodes / "metrics.jsonl")
    assert {e["name"] for e in ev if e["event"] == "process_started"} >= {"worker us-east/0", "worker us-east/1"}
    merges = [e for e in ev if e["event"] == "merge" and e.get("site") == "us-east"]
    assert len(merges) == 3
    assert not processes_mentioning(str(tmp_path))


@pytest.mark.netns
def test_a_dead_node_restarts_its_site_in_both_namespaces(hosts, tmp_path):
    """Node 1's worker is SIGKILLed mid-run: both nodes' agents start the group again (node 0 makes the new
    start, geotrain.run.nodes), the site rejoins, every round is committed."""
    br = hosts[0]
    tmp = tmp_path / "kill"
    tmp.mkdir()
    topo = tmp / "topology.yaml"
    topo.write_text(topology("workers: 1, nodes: 2", rounds=8))
    run_dir, logs = tmp / "run", tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    with EtcdServer(tmp / "etcd", host=br, log_path=logs / "etcd.log") as etcd_server:
        etcd = etcd_server.endpoint.split("://")[-1]
        try:
            coord = part(["coordinator", str(topo), "--etcd", etcd, "--bind", f"{br}:0", "--run-dir", str(run_dir),
                          "--linger", "2"], logs / "coordinator.log", stdout=subprocess.PIPE)
            procs.append(coord)
            port = ready_port(coord, logs / "coordinator.log")
            common = ["--etcd", etcd, "--coordinator", f"{br}:{port}", "--run-dir", str(run_dir)]
            node = ["--master-addr", hosts[1], "--master-port", "29512"]
            sites = [part(["site", "us-east", str(topo), *common, "--node-rank", "0", *node], logs / "n0.log", f"{PREFIX}-1"),
                     part(["site", "us-east", str(topo), *common, "--node-rank", "1", *node], logs / "n1.log", f"{PREFIX}-2"),
                     part(["site", "eu-west", str(topo), *common], logs / "eu.log", f"{PREFIX}-3")]
            procs += sites
            wait_for_event(run_dir, lambda e: e["event"] == "merge" and e.get("site") == "us-east" and e.get("version", 0) >= 2)
            victim = started_pids(run_dir)["worker us-east/1"]
            os.kill(victim, signal.SIGKILL)
            for p, log in zip(sites, ("n0", "n1", "eu")):
                assert p.wait(timeout=240) == 0, (logs / f"{log}.log").read_text()[-3000:]
            assert coord.wait(timeout=60) == 0, (logs / "coordinator.log").read_text()[-3000:]
        finally:
            stop(procs)
    ev = read_events(run_dir / "metrics.jsonl")
    starts = [e for e in ev if e["event"] == "process_started" and e["name"] == "worker us-east/0"]
    assert len(starts) >= 2, "node 0 did not start its worker again"
    assert any(e["event"] == "failure" and e.get("target") == "worker us-east/1" for e in ev)
    assert [e["round"] for e in ev if e["event"] == "commit"] == list(range(8))
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run_dir)], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert check.returncode == 0 and " 0 violated" in check.stdout, check.stdout + check.stderr
    assert not processes_mentioning(str(tmp_path))


def test_killing_a_node_of_a_launched_two_node_site_restarts_it_and_the_history_checks(tmp_path):
    """`geotrain launch` starts both nodes here (a TCP rendezvous on loopback); a scheduled kill of node 1's
    worker restarts the site, which rejoins; `geotrain check` passes the run's history."""
    topo = tmp_path / "t.yaml"
    fault = "faults:\n  - {kind: kill, target: worker us-east/1, at_round: 2}\n"
    topo.write_text(topology("workers: 1, nodes: 2", rounds=6, extra=fault).replace("security: {tls: false}\n", ""))
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(topo), "--run-dir", str(run_dir), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(run_dir)
    assert s["status"] == "completed" and s["rounds_completed"] == 6
    assert s["sites"]["us-east"]["workers"] == 2
    ev = read_events(run_dir / "metrics.jsonl")
    assert any(e["event"] == "failure" and e.get("target") == "worker us-east/1" for e in ev)
    assert any(e["event"] == "recovery" and e.get("target") == "worker us-east/1" for e in ev)
    check = subprocess.run([sys.executable, "-m", "geotrain.cli", "check", str(run_dir)], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not leftover(run_dir)
    assert not processes_mentioning(str(run_dir))


def test_a_user_script_under_torchrun_completes_a_run(tmp_path):
    """No geotrain launcher for the workers: `geotrain site NAME TOPOLOGY --exec python -m torch.distributed.run
    ... train_sdk.py` hands the site's environment to torchrun, which starts the ranks (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR ...); the SDK's geotrain.init() takes them as they are."""
    from geotrain.run.site import free_port

    script = str(REPO / "docs" / "examples" / "train_sdk.py")

    def torchrun(n: int) -> list[str]:
        return ["--exec", sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0", script]

    run_dir = run_sites(tmp_path / "torchrun", topology("workers: 2"), "127.0.0.1", [
        ("us-east", None, torchrun(2)), ("eu-west", None, torchrun(1))])
    ev = read_events(run_dir / "metrics.jsonl")
    assert [e["round"] for e in ev if e["event"] == "commit"] == [0, 1, 2]
    # the leader told the coordinator torchrun's WORLD_SIZE: both of us-east's ranks were one group
    assert {e["site"]: e["workers"] for e in ev if e["event"] == "site_joined"} == {"us-east": 2, "eu-west": 1}
    assert {e["proc"] for e in ev if e["event"] == "inner_step"} == {"us-east/0", "eu-west/0"}
    assert not processes_mentioning(str(tmp_path))



@pytest.mark.netns
def test_torchrun_across_two_namespaces_runs_a_user_script(hosts, tmp_path):
    """A 2-node site whose workers torchrun starts, one torchrun per "host" (namespace), static rendezvous
    on node 0's address; geotrain only hands each torchrun the site's environment (--exec)."""
    script = str(REPO / "docs" / "examples" / "train_sdk.py")

    def torchrun(k: int) -> list[str]:
        return ["--exec", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k),
                "--nproc-per-node", "1", "--master-addr", hosts[1], "--master-port", "29513", "--max-restarts", "0",
                script]

    run_dir = run_sites(tmp_path / "torchrun-2", topology("workers: 1, nodes: 2"), hosts[0], [
        ("us-east", f"{PREFIX}-1", ["--node-rank", "0", *torchrun(0)]),
        ("us-east", f"{PREFIX}-2", ["--node-rank", "1", *torchrun(1)]),
        ("eu-west", f"{PREFIX}-3", ["--script", sys.executable, script])])  # the same model at both sites
    ev = read_events(run_dir / "metrics.jsonl")
    assert [e["round"] for e in ev if e["event"] == "commit"] == [0, 1, 2]
    assert {e["site"]: e["workers"] for e in ev if e["event"] == "site_joined"} == {"us-east": 2, "eu-west": 1}
    assert not processes_mentioning(str(tmp_path))


@pytest.mark.netns
def test_netns_script_is_idempotent_and_cleans_up_a_failed_up():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = "gtmnx"

    def sh(*args, env=None):
        return subprocess.run(["bash", str(NETNS), *args], capture_output=True, text=True, timeout=60,
                              env=None if env is None else os.environ | env)

    def made() -> list[str]:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        return [n for n in (names + links).split() if n.startswith(prefix)]

    try:
        assert sh("up", "2", prefix).returncode == 0 and sh("up", "2", prefix).returncode == 0, "up twice"
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{prefix}-1" in ns and f"{prefix}-2" in ns
        addr = subprocess.run(["ip", "netns", "exec", f"{prefix}-2", "ip", "-o", "-4", "addr", "show", "eth0"],
                              capture_output=True, text=True).stdout
        assert sh("addr", "2", prefix).stdout.strip() + "/24" in addr
        assert sh("down", prefix).returncode == 0 and sh("down", prefix).returncode == 0, "down twice"
        assert made() == []
        assert sh("up", "0", prefix).returncode == 2  # a bad count: refused before anything is made
        failed = sh("up", "2", prefix, env={"GEOTRAIN_NETNS_NET": "10.999"})  # no such address: fails half-way
        assert failed.returncode != 0 and "removing what was made" in failed.stderr, failed.stderr
        assert made() == []
    finally:
        sh("down", prefix)
