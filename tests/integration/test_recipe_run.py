"""The recipe through the front door: a launch on token files of the user's own, each site on its own corpus
(the non-IID case), with a warmup + cosine schedule and clipping; every site reads the right data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from geotrain.events import read_events
from tests.integration.helpers import REPO, leftover, summary

pytestmark = pytest.mark.slow


def test_per_site_token_files_and_the_schedule(tmp_path):
    rng = np.random.default_rng(0)
    # site a's corpus uses token ids 0..499, site b's 500..999: a site reading the other's would show it
    rng.integers(0, 500, 60_000).astype(np.uint16).tofile(tmp_path / "a.bin")
    (500 + rng.integers(0, 500, 60_000)).astype(np.uint16).tofile(tmp_path / "b.bin")
    (tmp_path / "t.yaml").write_text("""
name: per-site
seed: 0
sites:
  - {name: a, workers: 1, data: {source: tokens, paths: [a.bin], vocab_size: 1000}}
  - {name: b, workers: 2, data: {source: tokens, paths: [b.bin], vocab_size: 1000}}
links: {default: {bandwidth: 1gbit, latency: 5ms}}
model: {preset: demo}
security: {tls: false}
training:
  rounds: 3
  inner_steps: 4
  batch_size: 4
  eval_batches: 2
  inner_optimizer: {lr: 0.003, clip_grad_norm: 1.0, schedule: {kind: cosine, warmup_steps: 3, min_lr_ratio: 0.1}}
  outer_optimizer: {lr: 0.7, momentum: 0.5, schedule: {kind: cosine}}
""")
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(tmp_path / "t.yaml"), "--run-dir",
                        str(run_dir)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "model (demo)  168k parameters" in r.stderr and "FLOP/token" in r.stderr and "vocab 1000" in r.stderr  # printed at start
    assert not leftover(run_dir)
    events = read_events(run_dir / "metrics.jsonl")
    data = {e["site"]: e for e in events if e["event"] == "data"}
    assert data["a"]["field"] == "sites[0].data" and "a.bin" in data["a"]["description"]
    assert data["b"]["field"] == "sites[1].data" and "b.bin" in data["b"]["description"]
    assert data["a"]["fingerprint"] != data["b"]["fingerprint"]
    model = next(e for e in events if e["event"] == "model")
    assert model["vocab_size"] == 1000 and model["params"] > 0 and model["flops_per_token"] > 6 * 64 * 64
    # the inner lr followed warmup then cosine over the run's 12 steps, at every site
    lrs = [e["lr"] for e in events if e["event"] == "inner_step" and e["site"] == "a"]
    assert lrs[:3] == pytest.approx([0.001, 0.002, 0.003]) and lrs[-1] < 0.001
    assert all(e.get("grad_norm") is not None for e in events if e["event"] == "inner_step")
    s = summary(run_dir)
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    assert s["model"]["params"] == model["params"]
    # the first site evaluates on its own held-out tail: uniform over 500 ids, so loss falls towards ln 500
    assert s["final_eval_loss"] < s["initial_eval_loss"]


def test_muon_with_the_shipped_schedules_resumes_bit_for_bit(tmp_path):
    """MuLoCo's inner optimizer under the shipped recipe (inner warmup + cosine, outer warmup): a run killed
    after a checkpoint and resumed ends with the uninterrupted run's weights, bit for bit."""
    import os
    import signal

    import torch

    from tests.integration.helpers import start_launch, wait_for_event
    from tests.integration.test_recovery import final_params

    demo = REPO / "topologies" / "demo.yaml"
    args = ["--set", "training.rounds=5", "--set", "training.inner_optimizer.name=muon",
            "--set", "training.inner_optimizer.lr=0.01"]
    base = tmp_path / "base"
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(demo), "--run-dir", str(base), "--quiet",
                        *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    launcher = start_launch(demo, killed, *args)
    wait_for_event(killed, lambda e: e["event"] == "checkpoint_saved" and e["round"] >= 2, timeout_s=120)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert not leftover(killed, wait_s=10)
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "resume", str(killed), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert torch.equal(final_params(killed), final_params(base)), "resumed weights differ from the uninterrupted run"
    lrs = [e["lr"] for e in read_events(killed / "metrics.jsonl") if e["event"] == "inner_step" and e["site"] == "us-east"]
    assert lrs[0] == pytest.approx(0.01 / 20) and max(lrs) == pytest.approx(0.01, rel=0.01)  # warmup, then cosine


def test_a_compiled_model_trains_the_same_parameters_as_eager_to_the_last_bits(tmp_path):
    # model.compile: the workers run torch.compile'd forward and loss; the module trained, merged, fingerprinted
    # and saved is the same one, so the run completes like the eager one and ends where it does up to fused-kernel
    # rounding
    (tmp_path / "t.yaml").write_text("""
name: compiled
seed: 0
sites: [{name: a, workers: 1}, {name: b, workers: 1}]
links: {default: {bandwidth: 1gbit, latency: 2ms}}
model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 32}
data: {source: stdlib, max_bytes: 200000}
security: {tls: false}
training: {rounds: 2, inner_steps: 3, batch_size: 4, eval_batches: 1}
""")
    finals = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"run-{compiled}"
        r = subprocess.run([sys.executable, "-m", "geotrain.cli", "launch", str(tmp_path / "t.yaml"), "--run-dir",
                            str(run_dir), "--quiet", "--set", f"model.compile={str(compiled).lower()}"],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert not leftover(run_dir)
        events = read_events(run_dir / "metrics.jsonl")
        assert next(e for e in events if e["event"] == "model")["compile"] is compiled
        s = summary(run_dir)
        assert s["status"] == "completed" and s["rounds_completed"] == 2
        finals[compiled] = s["final_eval_loss"]
    assert finals[True] == pytest.approx(finals[False], rel=1e-4), finals
