"""Pre-tokenized corpora: nanoGPT's flat token files, memory-mapped, never loaded whole.

A token file (``train.bin``, ``val.bin`` of nanoGPT's ``data/*/prepare.py``) is the token ids back to
back as little-endian ``uint16`` or ``uint32``, with no header. ``data.source: tokens`` names one or
more of them (``data.paths``), read as ONE stream in the order given; the held-out part is either
``data.eval_paths`` (``val.bin``) or the last ``eval_fraction`` of that stream.

:class:`TokenStream` is the stream: a list of ``np.memmap`` views and their offsets. Indexing it with an
array of positions (what :func:`geotrain.worker.data.BatchSampler` does to cut windows) reads only
those positions from the page cache, whichever file each falls in, so a corpus of many GB costs its
windows' pages, not its size. Every read is checked against the vocabulary: a token id at or above
``data.vocab_size`` (a file written with another tokenizer, or read as the wrong ``dtype``) stops the
run with the file and the position named, instead of indexing past the embedding table.

What is checked when the corpus is opened (each a :class:`~geotrain.errors.TopologyError` naming the
field): every file exists and is a regular file; its size is a whole number of tokens of ``dtype``
(a uint32 file read as uint16 is still a whole number, but its high halves are zeros: the vocabulary
check on the first batch catches the reverse, uint16 read as uint32); train and eval each hold at
least ``block_size + 1`` tokens.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from geotrain.errors import TopologyError

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class TokenStream:
    """Positions ``[lo, hi)`` of the concatenation of some token files, read on demand."""

    ndim = 1

    def __init__(self, files: Sequence[str], dtype: str, vocab_size: int | None, field: str,
                 lo: int = 0, hi: int | None = None, _maps: list | None = None):
        self.files = tuple(files)
        self.dtype_name = dtype
        self.vocab_size = vocab_size
        self.field = field
        self._maps = _maps if _maps is not None else [_open(f, dtype, field) for f in self.files]
        sizes = np.array([m.shape[0] for m in self._maps], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self._starts[-1])
        self.lo = lo
        self.hi = total if hi is None else hi
        if not 0 <= self.lo <= self.hi <= total:
            raise ValueError(f"TokenStream: [{lo}, {hi}) is not inside [0, {total})")

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def __len__(self) -> int:
        return self.size

    def part(self, lo: int, hi: int) -> "TokenStream":
        """Positions ``[lo, hi)`` of this stream (no copy)."""
        return TokenStream(self.files, self.dtype_name, self.vocab_size, self.field, self.lo + lo, self.lo + hi,
                           _maps=self._maps)

    def __getitem__(self, idx) -> np.ndarray:
        """The tokens at integer positions ``idx`` (an array of any shape), as int64."""
        pos = np.asarray(idx, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.size):
            raise IndexError(f"TokenStream: positions outside [0, {self.size})")
        flat = pos.reshape(-1) + self.lo
        which = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int64)
        for f in np.unique(which):
            sel = which == f
            out[sel] = self._maps[f][flat[sel] - self._starts[f]]
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            bad = int(np.argmax(out >= self.vocab_size))
            f = int(which[bad])
            raise TopologyError(
                f"{self.field}: token id {int(out[bad])} at token {int(flat[bad] - self._starts[f])} of "
                f"{self.files[f]} is not below data.vocab_size {self.vocab_size} (written with another "
                f"tokenizer, or not {self.dtype_name}? set data.dtype to the type the file was written as)")
        return out.reshape(pos.shape)

    def fingerprint(self) -> str:
        """16 hex digits over the files' names, sizes, the range, and their first and last MiB (cheap)."""
        h = hashlib.sha256()
        h.update(f"{self.dtype_name}/{self.lo}/{self.hi}".encode())
        for f, m in zip(self.files, self._maps):
            h.update(os.path.basename(f).encode())
            h.update(int(m.shape[0]).to_bytes(8, "big"))
            h.update(np.asarray(m[: 1 << 19]).tobytes())
            h.update(np.asarray(m[-(1 << 19):]).tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TokenStream({len(self.files)} file(s) of {self.dtype_name}, {self.size:,} tokens)"


def _open(path: str, dtype: str, field: str) -> np.memmap:
    if dtype not in DTYPES:
        raise TopologyError(f"{field}: dtype {dtype!r} is not a token type; use uint16 or uint32")
    if not os.path.exists(path):
        raise TopologyError(f"{field}: {path} does not exist")
    if not os.path.isfile(path):
        raise TopologyError(f"{field}: {path} is not a regular file (a token file: the ids back to back)")
    size = os.path.getsize(path)
    width = DTYPES[dtype].itemsize
    if size == 0:
        raise TopologyError(f"{field}: {path} is empty")
    if size % width:
        raise TopologyError(f"{field}: {path} holds {size} bytes, not a whole number of {dtype} tokens "
                            f"({width} bytes each): is it another dtype, or not a token file?")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


class TokenCorpus:
    """Train and eval parts of a pre-tokenized corpus (both :class:`TokenStream`)."""

    def __init__(self, train: TokenStream, eval: TokenStream, description: str):
        self.train = train
        self.eval = eval
        self.description = description

    @classmethod
    def load(cls, spec, block_size: int = 64, field: str = "data") -> "TokenCorpus":
        """``spec``: a DataSpec with ``source == "tokens"`` (paths, eval_paths, dtype, vocab_size, eval_fraction)."""
        need = block_size + 1
        stream = TokenStream(spec.paths, spec.dtype, spec.vocab_size, f"{field}.paths")
        if spec.eval_paths:
            train = stream
            held = TokenStream(spec.eval_paths, spec.dtype, spec.vocab_size, f"{field}.eval_paths")
        else:
            n_eval = max(need, int(round(stream.size * spec.eval_fraction)))
            if stream.size - n_eval < need:
                raise TopologyError(f"{field}.paths: {stream.size} tokens in all; need at least {2 * need} "
                                    f"(block_size + 1 = {need} for train and again for the held-out tail)")
            train, held = stream.part(0, stream.size - n_eval), stream.part(stream.size - n_eval, stream.size)
        for part, s, key in (("train", train, "paths"), ("eval", held, "eval_paths" if spec.eval_paths else "paths")):
            if s.size < need:
                raise TopologyError(f"{field}.{key}: the {part} part holds {s.size} tokens; need at least "
                                    f"block_size + 1 = {need}")
        where = "the token files " + ", ".join(spec.paths)
        return cls(train, held, where)

    def fingerprint(self) -> str:
        return hashlib.sha256((self.train.fingerprint() + self.eval.fingerprint()).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TokenCorpus({self.description}: train {self.train.size:,} tokens, eval {self.eval.size:,})"
