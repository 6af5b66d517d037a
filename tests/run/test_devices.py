"""A cuda site this machine cannot run is refused before anything starts, naming the field (geotrain.run.devices)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from geotrain.config.topology import parse_topology
from geotrain.run.devices import cuda_problem

TOPO = """
name: gpu
sites:
  - {name: a, workers: 1}
  - {name: b, workers: 2, device: cuda}
coordinator: {at: hub}
links: {default: {bandwidth: 100mbit, latency: 5ms}}
training: {rounds: 1, inner_steps: 2}
"""


def sites(text=TOPO):
    return parse_topology(yaml.safe_load(text), source="t.yaml").sites


def test_cpu_sites_need_nothing():
    assert cuda_problem(sites(TOPO.replace(", device: cuda", "")), cuda_available=False, gpus=0) is None


def test_no_cuda_names_the_site_and_field():
    assert cuda_problem(sites(), cuda_available=False, gpus=0) == (
        "sites[1].device: site 'b' asks for cuda, and torch sees no CUDA device on this machine (device: cpu runs it here)")


@pytest.mark.parametrize("gpus, ok", [(1, False), (2, True), (8, True)])
def test_one_gpu_per_worker(gpus, ok):
    problem = cuda_problem(sites(), cuda_available=True, gpus=gpus)
    assert (problem is None) == ok
    if not ok:
        assert problem == "sites[1].workers: site 'b' runs 2 CUDA workers on this machine, which has 1 GPU (NCCL takes one GPU per worker)"


def test_every_node_of_a_site_counts_on_one_machine():
    two_nodes = sites(TOPO.replace("workers: 2, device: cuda", "workers: 1, nodes: 2, device: cuda"))
    assert "runs 2 CUDA workers" in cuda_problem(two_nodes, cuda_available=True, gpus=1)
    assert cuda_problem(two_nodes, cuda_available=True, gpus=1, only="b") is None  # one node here


def test_launch_refuses_before_starting_anything(tmp_path):
    """Through the front door, on a machine without CUDA (torch's view hidden: CUDA_VISIBLE_DEVICES empty)."""
    (tmp_path / "t.yaml").write_text(TOPO)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(tmp_path / "t.yaml"), "--run-dir",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr
    assert "sites[1].device: site 'b' asks for cuda" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_one_node_of_a_site_counts_its_own_workers():
    """`geotrain site NAME --node-rank K`: only that site, only this node's workers."""
    s = sites(TOPO.replace("workers: 2, device: cuda", "workers: 2, nodes: 3, device: cuda"))
    assert cuda_problem(s, cuda_available=True, gpus=2, only="b") is None
    assert cuda_problem(s, cuda_available=True, gpus=1, only="b").startswith(
        "sites[1].workers: site 'b' runs 2 CUDA workers")
    assert cuda_problem(s, cuda_available=False, gpus=0, only="a") is None  # site a is a CPU site


def test_site_refuses_before_reaching_etcd(tmp_path):
    """`geotrain site b`: refused on this host's GPUs before any etcd (the endpoint here is closed)."""
    (tmp_path / "t.yaml").write_text(TOPO)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "site", "b", str(tmp_path / "t.yaml"), "--etcd",
                        "127.0.0.1:1", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr
    assert "geotrain site: sites[1].device: site 'b' asks for cuda" in r.stderr
    assert "Traceback" not in r.stderr
