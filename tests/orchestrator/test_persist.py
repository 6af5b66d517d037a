"""The coordinator's state store: two tensor files written in turn, in place; state.json names the durable one."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from geotrain.errors import GeotrainError
from geotrain.orchestrator.persist import FILES, CoordinatorState, StateStore, write_safetensors


def state(rnd: int, n: int = 1000) -> CoordinatorState:
    return CoordinatorState(round=rnd, params=torch.full((n,), float(rnd)), momentum=torch.arange(n, dtype=torch.float32) * rnd,
                            epoch=2, members=("a", "b"), version=rnd)


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
        meta = json.loads((tmp_path / "state.json").read_text())
        named.append(meta["file"])
        loaded = StateStore(tmp_path).load()  # as a restarted coordinator reads it
        assert loaded.round == rnd and torch.equal(loaded.params, state(rnd).params)
        assert torch.equal(loaded.momentum, state(rnd).momentum) and loaded.members == ("a", "b")
    assert named == [FILES[0], FILES[1], FILES[0], FILES[1]]
    # a restarted coordinator's store writes the other file first
    StateStore(tmp_path).save(state(5))
    assert json.loads((tmp_path / "state.json").read_text())["file"] == FILES[0]


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


def test_a_state_written_before_the_two_files_still_loads_and_is_cleaned_up(tmp_path):
    save_file({"params": torch.ones(4), "momentum": torch.zeros(4)}, str(tmp_path / "state-7.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps({"round": 7, "epoch": 1, "members": ["a"]}))
    store = StateStore(tmp_path)
    old = store.load()
    assert old.round == 7 and torch.equal(old.params, torch.ones(4))
    store.save(state(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILES[0], "state.json"]


def test_a_state_json_naming_another_path_is_not_read(tmp_path):
    secret = tmp_path / "elsewhere.safetensors"
    save_file({"params": torch.ones(4)}, str(secret))
    store_dir = tmp_path / "coordinator"
    store_dir.mkdir()
    (store_dir / "state.json").write_text(json.dumps({"round": 3, "file": "../elsewhere.safetensors"}))
    with pytest.raises(GeotrainError, match=r"state.json: 'file' is '../elsewhere.safetensors', not one of"):
        StateStore(store_dir).load()
    StateStore(store_dir).save(state(4))  # a new state is written beside it, in its own files
    assert StateStore(store_dir).load().round == 4
