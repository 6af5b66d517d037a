"""The recipe in the topology: model presets, per-site and token data, schedules, clipping; bad values
each give one clear error naming the field (through the front door: `geotrain validate`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from geotrain.config.topology import MODEL_PRESETS, model_vocab, parse_topology
from geotrain.errors import TopologyError
from geotrain.worker.main import gpt_config
from geotrain.worker.model import build_model

SITES = [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}]


def topo(**sections):
    return parse_topology({"name": "t", "sites": sections.pop("sites", SITES), **sections}, source="t.yaml")


@pytest.mark.parametrize("preset, params_millions", [("demo", 0.12), ("tiny", 0.85), ("35m", 19.6)])  # bytes: vocab 256
def test_presets_give_the_named_shapes(preset, params_millions):
    t = topo(model={"preset": preset})
    shape = MODEL_PRESETS[preset]
    assert (t.model.n_layer, t.model.n_head, t.model.n_embd, t.model.block_size) == (
        shape["n_layer"], shape["n_head"], shape["n_embd"], shape["block_size"])
    assert build_model(gpt_config(t), seed=0).num_params() / 1e6 == pytest.approx(params_millions, rel=0.02)


def test_the_35m_and_gpt2_presets_at_their_vocabularies():
    """35m with a 32k vocabulary (the paper's) is ~35 M parameters; gpt2-small at 50257 tokens is GPT-2's 124 M."""
    def count(cfg):  # embedding (tied head) + positions + per block 12·C² + 13·C + final norm
        C, L = cfg.n_embd, cfg.n_layer
        return cfg.vocab_size * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C

    t35 = topo(model={"preset": "35m", "vocab_size": 32000})
    assert count(gpt_config(t35)) / 1e6 == pytest.approx(35.8, abs=0.5)
    g2 = topo(model={"preset": "gpt2-small", "vocab_size": 50257})
    assert count(gpt_config(g2)) / 1e6 == pytest.approx(124.4, abs=0.5)
    small = topo(model={"preset": "tiny", "n_layer": 2})  # written beside a preset: it wins
    assert (small.model.n_layer, small.model.n_embd) == (2, 128)
    assert build_model(gpt_config(small), seed=0).num_params() == count(gpt_config(small))


def test_per_site_data_and_the_model_vocabulary_of_token_files(tmp_path):
    t = topo(sites=[{"name": "a", "workers": 1},
                    {"name": "b", "workers": 1, "data": {"source": "tokens", "paths": ["b.bin"], "vocab_size": 50257}}],
             data={"source": "stdlib"})
    assert t.site("a").data is None and t.site("b").data.source == "tokens"
    assert model_vocab(t) == 50257  # the largest corpus vocabulary
    assert gpt_config(t).vocab_size == 50257


@pytest.mark.parametrize("section, words", [
    ({"model": {"preset": "huge"}}, "model.preset: input should be"),
    ({"data": {"source": "tokens", "paths": ["x.bin"]}}, "data.vocab_size: `source: tokens` needs"),
    ({"data": {"source": "tokens", "paths": ["x.bin"], "vocab_size": 100_000}}, "data.dtype: uint16 holds token ids below 65536"),
    ({"data": {"source": "tokens", "paths": ["x.bin"], "vocab_size": 10, "dtype": "int8"}}, "data.dtype: input should be"),
    ({"data": {"source": "files"}}, "data.paths: `source: files` needs at least one path"),
    ({"sites": [{"name": "a", "workers": 1, "data": {"source": "stdlib", "paths": ["x"]}}]}, r"sites\[0\].data.paths"),
    ({"model": {"vocab_size": 100}}, "model.vocab_size: 100 is smaller than the vocabulary of data"),
    ({"training": {"inner_optimizer": {"schedule": {"kind": "cosine", "warmup_steps": 20, "total_steps": 10}}}},
     "training.inner_optimizer.schedule.warmup_steps: 20 inner steps of warmup is longer"),
    ({"training": {"inner_optimizer": {"clip_grad_norm": 0}}}, "clip_grad_norm"),
    ({"training": {"outer_optimizer": {"schedule": {"kind": "step"}}}}, "training.outer_optimizer.schedule.kind"),
])
def test_bad_recipe_values_name_their_field(section, words):
    with pytest.raises(TopologyError, match=words):
        topo(**section)


def test_a_run_shorter_than_its_warmup_is_not_refused():
    """--set training.rounds=1 on a shipped topology whose warmup is longer: the lr is still ramping at the end."""
    t = topo(training={"rounds": 1, "inner_steps": 5, "inner_optimizer": {"schedule": {"kind": "cosine", "warmup_steps": 20}},
                       "outer_optimizer": {"schedule": {"warmup_steps": 3}}})
    assert t.training.rounds == 1


def validate(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "geotrain.cli", "validate", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_validate_reads_the_data_files_and_names_the_missing_one(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    head = "name: t\nsites:\n  - {name: a, workers: 1}\n"
    ok = validate(tmp_path, head + "  - {name: b, workers: 1, data: {source: tokens, paths: [train.bin], vocab_size: 5000}}\n")
    assert ok.returncode == 0, ok.stderr
    assert "sites[1].data: 1 token file(s), 5,000 uint16 tokens, vocab 5000" in ok.stdout
    missing = validate(tmp_path, head + "  - {name: b, workers: 1, data: {source: files, paths: [gone.txt]}}\n")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().endswith("gone.txt does not exist") and "sites[1].data.paths[0]" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    odd = validate(tmp_path, head + "data: {source: tokens, paths: [odd.bin], vocab_size: 50}\n")
    assert odd.returncode == 2 and "data.paths: " in odd.stderr and "not a whole number of uint16 tokens" in odd.stderr


def test_an_external_etcds_relative_files_are_relative_to_the_topology_file(tmp_path):
    from geotrain.config.topology import load_topology

    (tmp_path / "t.yaml").write_text("name: t\nsites: [{name: a, workers: 1}]\n"
                                     "etcd: {endpoint: 'etcd.example:2379', ca_file: certs/ca.pem, "
                                     "cert_file: certs/me.pem, key_file: /abs/me.key}\n")
    t = load_topology(tmp_path / "t.yaml")
    assert t.etcd.ca_file == str(tmp_path / "certs" / "ca.pem") and t.etcd.key_file == "/abs/me.key"
