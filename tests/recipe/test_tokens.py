"""Pre-tokenized token files (nanoGPT's flat .bin): memory-mapped, sampled exactly and resumably, checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geotrain.errors import TopologyError
from geotrain.worker.data import BatchSampler, DataSpec, eval_batches, load_corpus
from geotrain.worker.tokens import TokenStream


def write_tokens(path, tokens, dtype="uint16"):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return str(path)


def test_a_token_file_is_read_as_written_and_never_loaded_whole(tmp_path):
    tokens = (np.arange(5000) * 7919) % 50257
    f = write_tokens(tmp_path / "train.bin", tokens)
    c = load_corpus(DataSpec(source="tokens", paths=(f,), vocab_size=50257, eval_fraction=0.1), block_size=16)
    assert isinstance(c.train._maps[0], np.memmap)  # a map of the file, not a copy in memory
    assert (c.train.size, c.eval.size) == (4500, 500)  # the last 10 % is held out
    assert np.array_equal(c.train[np.arange(4500)], tokens[:4500])
    assert np.array_equal(c.eval[np.arange(500)], tokens[4500:])
    s = BatchSampler(c.train, batch_size=4, block_size=16, seed=3)
    x, y = s.next_batch()
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    start = int(np.flatnonzero(tokens == int(x[0, 0]))[0])
    assert np.array_equal(x[0].numpy(), tokens[start:start + 16])


def test_several_files_are_one_stream_in_the_order_given_across_boundaries(tmp_path):
    a, b = np.arange(0, 100), np.arange(100, 250)
    fa, fb = write_tokens(tmp_path / "a.bin", a, "uint32"), write_tokens(tmp_path / "b.bin", b, "uint32")
    s = TokenStream((fa, fb), "uint32", vocab_size=1000, field="data.paths")
    assert s.size == 250
    assert np.array_equal(s[np.array([[98, 99, 100, 101]])], [[98, 99, 100, 101]])  # a window over the seam
    part = s.part(90, 110)
    assert np.array_equal(part[np.arange(20)], np.arange(90, 110))


def test_sampling_resumes_exactly(tmp_path):
    f = write_tokens(tmp_path / "t.bin", np.arange(3000) % 97)
    c = load_corpus(DataSpec(source="tokens", paths=(f,), vocab_size=97), block_size=8)
    a = BatchSampler(c.train, 2, 8, seed=11)
    for _ in range(5):
        a.next_batch()
    saved = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    b = BatchSampler(c.train, 2, 8, seed=999)
    b.load_state_dict(saved)
    got = [b.next_batch() for _ in range(3)]
    assert all(torch.equal(w[0], g[0]) and torch.equal(w[1], g[1]) for w, g in zip(want, got))


def test_eval_paths_are_the_held_out_part(tmp_path):
    f = write_tokens(tmp_path / "train.bin", np.zeros(400))
    v = write_tokens(tmp_path / "val.bin", np.ones(300))
    c = load_corpus(DataSpec(source="tokens", paths=(f,), eval_paths=(v,), vocab_size=2), block_size=8)
    assert (c.train.size, c.eval.size) == (400, 300)
    (x, _), = eval_batches(c.eval, 2, 8, 1)
    assert int(x.min()) == 1  # every eval window comes from val.bin


@pytest.mark.parametrize("case, words", [
    ("missing", "data.paths: .*does not exist"),
    ("odd_size", "not a whole number of uint16 tokens"),
    ("too_big_id", "token id 70000 at token 5 of .* is not below data.vocab_size 50257"),
    ("wrong_dtype", "is not below data.vocab_size"),  # uint16 tokens read as uint32
    ("too_short", "need at least"),
])
def test_bad_token_files_say_what_is_wrong_and_where(tmp_path, case, words):
    path = tmp_path / "t.bin"
    dtype = "uint16"
    if case == "odd_size":
        path.write_bytes(b"\x01\x00\x02")
    elif case == "too_big_id":
        t = np.full(2000, 7)
        t[5] = 70000
        write_tokens(path, t, "uint32")
        dtype = "uint32"
    elif case == "wrong_dtype":
        write_tokens(path, np.full(2000, 300), "uint16")  # read as uint32: each id is 300 + 300·65536
        dtype = "uint32"
    elif case == "too_short":
        write_tokens(path, np.arange(10))
    spec = DataSpec(source="tokens", paths=(str(path),), dtype=dtype, vocab_size=50257)
    with pytest.raises(TopologyError, match=words):
        c = load_corpus(spec, block_size=16)
        BatchSampler(c.train, 64, 16, seed=0).next_batch()
        eval_batches(c.eval, 4, 16, 2)
