"""Checkpoints: atomic parts, verification, fallback to the previous good one, crash safety."""

import json
import subprocess
import sys

import pytest
import torch

from geotrain.storage import checkpoint as ck
from geotrain.errors import CheckpointCorrupt

PARTS = ["coordinator", "us.0"]


def write_round(root, rnd, value=1.0):
    for part in PARTS:
        ck.write_part(root, rnd, part, {"model": {"w": torch.full((100,), value + rnd)}}, {"round": rnd, "part": part}, "abc")


def test_write_verify_load_roundtrip(tmp_path):
    write_round(tmp_path, 3)
    manifest = ck.verify_checkpoint(tmp_path / "round-000003" / "coordinator")
    assert manifest["round"] == 3 and manifest["topology_sha256"] == "abc"
    assert {f["path"] for f in manifest["files"]} == {"model.safetensors", "state.json"}
    tensors, state = ck.load_part(tmp_path, 3, "coordinator")
    assert torch.equal(tensors["model"]["w"], torch.full((100,), 4.0)) and state == {"round": 3, "part": "coordinator"}
    assert ck.verify_checkpoint(tmp_path / "round-000003")["parts"].keys() == set(PARTS)


def corrupt(path, how):
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how,words", [("flip", "sha256 does not match"), ("truncate", "truncated"), ("delete", "missing")])
def test_corrupt_part_is_refused_and_named(tmp_path, how, words):
    write_round(tmp_path, 1)
    target = tmp_path / "round-000001" / "us.0" / "model.safetensors"
    corrupt(target, how)
    with pytest.raises(CheckpointCorrupt) as info:
        ck.verify_checkpoint(target.parent)
    assert str(target) in str(info.value) and words in str(info.value)
    with pytest.raises(CheckpointCorrupt):
        ck.load_part(tmp_path, 1, "us.0")


def test_latest_complete_falls_back_over_a_corrupt_newer_one(tmp_path):
    write_round(tmp_path, 1)
    write_round(tmp_path, 2)
    corrupt(tmp_path / "round-000002" / "coordinator" / "model.safetensors", "flip")
    info = ck.latest_complete(tmp_path, PARTS)
    assert info.round == 1
    rounds = ck.list_rounds(tmp_path, PARTS)
    assert [(r.round, r.complete) for r in rounds] == [(1, True), (2, False)] and "sha256" in rounds[1].problem


def test_incomplete_round_is_not_used(tmp_path):
    write_round(tmp_path, 1)
    ck.write_part(tmp_path, 2, "coordinator", {"model": {"w": torch.zeros(3)}}, {}, "abc")  # us.0 never wrote round 2
    assert ck.latest_complete(tmp_path, PARTS).round == 1
    assert "missing parts: us.0" in ck.list_rounds(tmp_path, PARTS)[1].problem


@pytest.mark.parametrize("crash_at", ["wrote model.safetensors", "before rename"])
def test_crash_in_the_middle_of_a_write_leaves_the_previous_checkpoint(tmp_path, crash_at):
    """A process killed between file writes or before the rename: the previous checkpoint still loads."""
    write_round(tmp_path, 1)
    code = f"""
import os, signal, torch
from geotrain.storage import checkpoint as ck
def hook(step):
    if step == {crash_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
ck._crash_hook = hook
for part in {PARTS!r}:
    ck.write_part({str(tmp_path)!r}, 2, part, {{"model": {{"w": torch.zeros(100)}}}}, {{}}, "abc")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    info = ck.latest_complete(tmp_path, PARTS)
    assert info.round == 1
    tensors, _ = ck.load_part(tmp_path, 1, "coordinator")
    assert torch.equal(tensors["model"]["w"], torch.full((100,), 2.0))
    # the half-written part never appears under its final name
    assert not (tmp_path / "round-000002" / "coordinator").exists()


def test_prune_keeps_the_last_k_of_each_writer(tmp_path):
    for r in range(1, 6):
        write_round(tmp_path, r)
        for part in PARTS:
            ck.prune(tmp_path, part, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004", "round-000005"]


def test_a_writer_killed_while_pruning_leaves_no_half_deleted_part(tmp_path, monkeypatch):
    """SIGKILL in the middle of deleting an old part (seen in CI): the deletion stops after one file. No part
    that lists files it no longer has may remain visible; the next prune removes what was left."""
    for r in (1, 2, 3):
        write_round(tmp_path, r)
    real_rmtree = ck.shutil.rmtree

    class Killed(BaseException):
        pass

    def dies_midway(path, ignore_errors=False):
        victim = next(p for p in sorted(tmp_path.glob("**/*.safetensors")) if str(p).startswith(str(path)))
        victim.unlink()  # the first file went, then the process died
        raise Killed

    monkeypatch.setattr(ck.shutil, "rmtree", dies_midway)
    with pytest.raises(Killed):
        ck.prune(tmp_path, "us.0", keep=1)
    for part in (p for d in tmp_path.glob("round-*") for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        ck.verify_checkpoint(part)  # every visible part is whole
    assert not (tmp_path / "round-000001" / "us.0").exists()
    assert [i.problem for i in ck.list_rounds(tmp_path, PARTS)][0] == "missing parts: us.0"
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    ck.prune(tmp_path, "us.0", keep=1)
    assert list(tmp_path.glob("round-*/.tmp-*")) == []
    assert [i.round for i in ck.list_rounds(tmp_path, PARTS) if i.complete] == [3]


def test_background_writer_does_not_block_and_reports(tmp_path):
    saved = []
    w = ck.BackgroundWriter(tmp_path, "coordinator", "abc", keep=2, on_saved=lambda *a: saved.append(a))
    big = torch.randn(2_000_000)
    stall = w.submit(1, {"model": {"w": big}}, {"round": 1})
    big.zero_()  # the snapshot was taken: later changes do not leak into the checkpoint
    w.flush()
    w.close()
    assert stall < 1.0 and saved and saved[0][0] == 1
    tensors, _ = ck.load_part(tmp_path, 1, "coordinator")
    assert tensors["model"]["w"].abs().sum() > 0


def test_background_writer_survives_a_full_disk(tmp_path, monkeypatch):
    w = ck.BackgroundWriter(tmp_path, "coordinator", "abc")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "write_part", full)
    w.submit(1, {"model": {"w": torch.zeros(3)}}, {})
    w.flush()
    w.close()
    assert w.errors and "No space left" in str(w.errors[0])


def test_cli_verify_and_ls(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    from geotrain.config.topology import parse_topology

    topo = parse_topology({"name": "t", "sites": [{"name": "us", "workers": 1}]})
    (run / "topology.json").write_text(json.dumps(topo.model_dump(mode="json")))
    write_round(run / "checkpoints", 1)
    write_round(run / "checkpoints", 2)
    corrupt(run / "checkpoints" / "round-000002" / "us.0" / "state.json", "truncate")
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "checkpoint", "verify", str(run)], capture_output=True, text=True)
    assert r.returncode == 1 and "ok   " in r.stdout and "BAD" in r.stdout and "truncated" in r.stdout
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "checkpoint", "ls", str(run)], capture_output=True, text=True)
    assert r.returncode == 0 and "BAD" in r.stdout and "ok" in r.stdout
    r = subprocess.run([sys.executable, "-m", "geotrain.cli", "resume", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a geotrain run directory" in r.stderr and "Traceback" not in r.stderr
