"""geotrain.worker.data: a deterministic corpus, resumable sampling, fixed evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from geotrain.errors import CheckpointCorrupt, TopologyError
from geotrain.worker.data import (
    BatchSampler,
    DataSpec,
    TextCorpus,
    eval_batches,
    evaluate,
    stdlib_root,
)
from geotrain.worker.model import GPTConfig, build_model

SMALL = DataSpec(max_bytes=300_000)


@pytest.fixture(scope="module")
def corpus() -> TextCorpus:
    return TextCorpus.load(DataSpec())  # the default: 4 MB of the standard library


def test_stdlib_corpus_is_deterministic(corpus):
    again = TextCorpus.load(DataSpec())
    assert again.fingerprint() == corpus.fingerprint()
    assert len(corpus.fingerprint()) == 16
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.eval, corpus.eval)
    assert corpus.train.dtype == np.uint8 and corpus.eval.dtype == np.uint8
    assert corpus.train.size + corpus.eval.size == DataSpec().max_bytes


def test_stdlib_corpus_is_the_same_in_another_process():
    code = (
        "from geotrain.worker.data import DataSpec, TextCorpus\n"
        "print(TextCorpus.load(DataSpec(max_bytes=300_000)).fingerprint())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == TextCorpus.load(SMALL).fingerprint()


def test_loading_is_fast():
    t0 = time.perf_counter()
    TextCorpus.load(DataSpec())
    assert time.perf_counter() - t0 < 5.0  # ~0.1 s in practice


def test_no_document_in_both_parts(corpus):
    assert corpus.train_docs and corpus.eval_docs
    assert not set(corpus.train_docs) & set(corpus.eval_docs)
    # Each part is exactly its documents, in order (only the very last one read may be cut).
    root = stdlib_root()
    last = max(corpus.train_docs + corpus.eval_docs)
    for part, docs in ((corpus.train, corpus.train_docs), (corpus.eval, corpus.eval_docs)):
        blob = b"".join(open(os.path.join(root, k), "rb").read() for k in docs)
        if last in docs:
            assert blob.startswith(part.tobytes())
        else:
            assert blob == part.tobytes()
    # eval holds roughly eval_fraction of the text
    assert 0.02 < corpus.eval.size / (corpus.train.size + corpus.eval.size) < 0.3


def test_stdlib_proper_only():
    everything = TextCorpus.load(DataSpec(max_bytes=10**9))
    keys = everything.train_docs + everything.eval_docs
    assert "os.py" in keys and "json/decoder.py" in keys
    for key in keys:
        parts = key.split("/")
        assert key.endswith(".py")
        assert not {"test", "tests", "site-packages", "__pycache__"} & set(parts[:-1]), key
        assert not key.startswith("idlelib/idle_test/"), key
    assert list(everything.train_docs) == sorted(everything.train_docs)


def test_user_files(tmp_path):
    texts = {}
    for i in range(12):
        sub = tmp_path / "notes" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        body = (f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20).encode()
        (sub / f"doc{i:02d}.txt").write_bytes(body)
        texts[f"notes/{sub.name}/doc{i:02d}.txt"] = body
    (tmp_path / "notes" / "blob.bin").write_bytes(b"abc\x00def" * 100)  # binary: skipped
    (tmp_path / "notes" / ".git").mkdir()
    (tmp_path / "notes" / ".git" / "config").write_text("hidden " * 100)  # hidden: skipped
    single = tmp_path / "extra.md"
    single.write_text("# a single file given directly\n" * 10)
    texts["extra.md"] = single.read_bytes()

    spec = DataSpec(source="files", paths=(str(tmp_path / "notes"), str(single)), eval_fraction=0.25)
    c = TextCorpus.load(spec, block_size=32)
    assert set(c.train_docs) | set(c.eval_docs) == set(texts)
    assert not set(c.train_docs) & set(c.eval_docs)
    assert c.train.tobytes() == b"".join(texts[k] for k in c.train_docs)
    assert c.eval.tobytes() == b"".join(texts[k] for k in c.eval_docs)
    assert TextCorpus.load(spec, block_size=32).fingerprint() == c.fingerprint()
    assert DataSpec(source="files", paths=[str(single)]).paths == (str(single),)


def test_single_user_file_is_split_at_the_tail(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(bytes(range(32, 127)) * 50)
    c = TextCorpus.load(DataSpec(source="files", paths=(str(f),)), block_size=64)
    assert c.train.tobytes() + c.eval.tobytes() == f.read_bytes()
    assert c.eval.size >= 65


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(TopologyError, match="nowhere"):
        TextCorpus.load(DataSpec(source="files", paths=(str(missing),)))


def test_tiny_corpus_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("too short")
    (tmp_path / "b.txt").write_text("also short")
    with pytest.raises(TopologyError, match="holds only 19 bytes"):
        TextCorpus.load(DataSpec(source="files", paths=(str(tmp_path),)), block_size=64)
    with pytest.raises(TopologyError, match="holds only"):
        TextCorpus.load(DataSpec(max_bytes=100), block_size=64)


def test_small_max_bytes_still_fills_both_parts():
    c = TextCorpus.load(DataSpec(max_bytes=20_000), block_size=256)
    assert c.train.size >= 257 and c.eval.size >= 257
    assert not set(c.train_docs) & set(c.eval_docs)


def test_spec_validation():
    with pytest.raises(TopologyError, match="data.source"):
        DataSpec(source="web")
    with pytest.raises(TopologyError, match="data.paths"):
        DataSpec(source="files")
    with pytest.raises(TopologyError, match="eval_fraction"):
        DataSpec(eval_fraction=1.0)
    with pytest.raises(TopologyError, match="max_bytes"):
        DataSpec(max_bytes=0)


def test_sampler_batches():
    data = TextCorpus.load(SMALL).train
    s = BatchSampler(data, batch_size=5, block_size=16, seed=3)
    x, y = s.next_batch()
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = BatchSampler(data, batch_size=5, block_size=16, seed=3).next_batch()
    x3, _ = BatchSampler(data, batch_size=5, block_size=16, seed=4).next_batch()
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_sampler_resume_is_exact():
    data = TextCorpus.load(SMALL).train
    s = BatchSampler(data, batch_size=4, block_size=16, seed=11)
    for _ in range(3):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # survives a trip through JSON
    expected = [s.next_batch() for _ in range(2)]

    fresh = BatchSampler(data, batch_size=4, block_size=16, seed=999)
    fresh.load_state_dict(state)
    assert fresh.batches_drawn == 3
    for (ex, ey), (gx, gy) in zip(expected, [fresh.next_batch() for _ in range(2)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)

    other = BatchSampler(data, batch_size=8, block_size=16, seed=11)
    with pytest.raises(CheckpointCorrupt, match="batch_size"):
        other.load_state_dict(state)


def test_eval_batches_are_fixed_and_spread():
    data = TextCorpus.load(SMALL).eval
    a = eval_batches(data, batch_size=4, block_size=16, n_batches=3)
    b = eval_batches(data, batch_size=4, block_size=16, n_batches=3)
    assert len(a) == 3
    for (ax, ay), (bx, by) in zip(a, b):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
        assert ax.shape == (4, 16) and torch.equal(ax[:, 1:], ay[:, :-1])
    first, last = a[0][0][0], a[-1][1][-1]
    assert torch.equal(first, torch.from_numpy(data[:16].astype(np.int64)))
    assert torch.equal(last, torch.from_numpy(data[-16:].astype(np.int64)))


def test_evaluate_restores_mode():
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = build_model(cfg, seed=0)
    batches = eval_batches(TextCorpus.load(SMALL, block_size=16).eval, 4, 16, 2)
    model.train()
    loss = evaluate(model, batches)
    assert model.training and 4.0 < loss < 7.0
    model.eval()
    assert evaluate(model, batches) == loss
    assert not model.training
    with pytest.raises(ValueError):
        evaluate(model, [])
