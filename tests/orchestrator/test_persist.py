"""The coordinator's state store: per epoch, two tensor files written in turn, in place; its metadata names
the durable one; the highest epoch's state is the one a restart reads."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from geotrain.errors import GeotrainError
from geotrain.orchestrator.persist import CoordinatorState, StateStore, tensor_files, write_safetensors


def state(rnd: int, n: int = 1000, epoch: int = 2) -> CoordinatorState:
    return CoordinatorState(round=rnd, params=torch.full((n,), float(rnd)), momentum=torch.arange(n, dtype=torch.float32) * rnd,
                            epoch=epoch, members=("a", "b"), version=rnd)


def names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_write_safetensors_is_read_back_by_safetensors_over_a_longer_old_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"big": torch.randn(10_000)}, str(path))
    tensors = {"params": torch.randn(1001), "momentum": torch.randn(3, 7), "empty": torch.zeros(0),
               "ints": torch.arange(5)}
    size = write_safetensors(path, tensors)
    assert os.path.getsize(path) == size
    got = load_file(str(path))
    assert set(got) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="'half' has dtype torch.float16"):
        write_safetensors(path, {"half": torch.zeros(2, dtype=torch.float16)})


def test_the_two_files_alternate_and_the_named_one_is_never_written(tmp_path):
    store = StateStore(tmp_path)
    named = []
    for rnd in range(1, 5):
        store.save(state(rnd))
        named.append(json.loads((tmp_path / "state-e2.json").read_text())["file"])
        loaded = StateStore(tmp_path).load()  # as a restarted coordinator reads it
        assert loaded.round == rnd and torch.equal(loaded.params, state(rnd).params) and loaded.epoch == 2
        assert torch.equal(loaded.momentum, state(rnd).momentum) and loaded.members == ("a", "b")
    a, b = tensor_files(2)
    assert named == [a, b, a, b]
    StateStore(tmp_path).save(state(5))  # a new store of the same epoch (no etcd) writes the other file first
    assert json.loads((tmp_path / "state-e2.json").read_text())["file"] == a
    assert names(tmp_path) == [a, b, "state-e2.json"]


def test_a_write_that_dies_half_way_leaves_the_durable_state_intact(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    calls = []

    def dies(fd, buffers, offset):  # the process dies after the header and part of the first tensor
        calls.append(offset)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed mid-write")
        return os.pwrite(fd, bytes(buffers[0])[:100], offset)

    monkeypatch.setattr(os, "pwritev", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save(state(3))
    monkeypatch.undo()
    loaded = StateStore(tmp_path).load()
    assert loaded.round == 2 and torch.equal(loaded.params, state(2).params)  # round 3 never became durable


def test_a_paused_older_coordinator_cannot_damage_the_newer_ones_state(tmp_path):
    """Epoch 2 is paused mid-commit, epoch 3 takes over and commits; epoch 2 wakes up and persists
    (its publish, fenced, comes after): a restart still resumes from epoch 3's state."""
    old, new = StateStore(tmp_path), StateStore(tmp_path)
    old.save(state(4, epoch=2))
    new.save(state(5, epoch=3))
    assert names(tmp_path) == [tensor_files(3)[0], "state-e3.json"]  # the lower epoch's files are gone
    old.save(state(5, epoch=2))  # the paused one's round 5, never published
    old.save(state(6, epoch=2))
    loaded = StateStore(tmp_path).load()
    assert (loaded.epoch, loaded.round) == (3, 5) and torch.equal(loaded.params, state(5).params)
    new.save(state(6, epoch=3))
    assert names(tmp_path) == [*tensor_files(3), "state-e3.json"]


def test_a_state_written_before_epochs_were_in_the_names_still_loads_and_is_removed(tmp_path):
    save_file({"params": torch.ones(4), "momentum": torch.zeros(4)}, str(tmp_path / "state-7.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps({"round": 7, "epoch": 1, "members": ["a"]}))
    store = StateStore(tmp_path)
    old = store.load()
    assert old.round == 7 and old.epoch == 1 and torch.equal(old.params, torch.ones(4))
    store.save(state(8, epoch=1))
    assert names(tmp_path) == [tensor_files(1)[0], "state-e1.json"]
    assert store.load().round == 8


@pytest.mark.parametrize("meta", [{"round": 3, "epoch": 4, "file": "../elsewhere.safetensors"},
                                  {"round": 3, "epoch": 4, "file": "state-e5-a.safetensors"},
                                  {"round": 3, "epoch": 5, "file": "state-e4-a.safetensors"}])
def test_a_metadata_file_naming_another_file_or_epoch_is_not_read(tmp_path, meta):
    save_file({"params": torch.ones(4)}, str(tmp_path / "elsewhere.safetensors"))
    store_dir = tmp_path / "coordinator"
    store_dir.mkdir()
    (store_dir / "state-e4.json").write_text(json.dumps(meta))
    with pytest.raises(GeotrainError, match=r"state-e4.json: its epoch .* is not the one its name says"):
        StateStore(store_dir).load()


@pytest.mark.parametrize("name", ["state-e4.json", "state.json"])
@pytest.mark.parametrize("text", ['{"round": 3, "epo', "[1, 2]", "\xff\xfe"])
def test_a_damaged_metadata_file_is_an_error_not_a_fresh_start(tmp_path, name, text):
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(GeotrainError, match=f"{name}: (not readable as|holds a JSON list)"):
        StateStore(tmp_path).load()
