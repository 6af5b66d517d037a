"""Text for the built-in workload: a byte corpus, per-worker batch sampling, evaluation.

Where the text comes from (``DataSpec.source``):

* ``"stdlib"``: the ``.py`` sources of the running Python's standard library, the folder
  ``os.path.dirname(os.__file__)``. Every machine that runs geotrain has it, so a run needs
  no download. ``site-packages``/``dist-packages``, ``__pycache__`` and test folders
  (any folder named ``test`` or ``tests``, and ``idlelib/idle_test``) are left out, so the
  corpus is the standard library proper.
* ``"files"``: the user's own files and folders (``DataSpec.paths``). Folders are walked
  recursively and every regular file in them is taken, except entries whose name starts
  with a dot (``.git``, ``.venv``, ...) and binary files (a NUL byte in what is read).

How the corpus is built, identically in every process and every run on the same machine:

1. Every document gets a key, its relative path with ``/`` separators (for ``"files"``:
   the folder's own name, then the path inside it; a file given directly is keyed by its
   name). Documents are read in sorted key order, and reading stops once ``max_bytes``
   bytes are in (the last document is cut there), so loading costs about ``max_bytes`` of
   reading, not the size of the whole tree.
2. Each document read goes wholly to train or to eval, by a stable hash of its key:
   eval when ``sha1(key)`` read as a fraction of 2**64 is below ``eval_fraction``. Should
   that leave a side shorter than ``block_size + 1`` bytes (a small corpus, or a small
   ``max_bytes``), whole documents move over to it in hash order (the lowest hashes to
   eval, the highest to train) while the other side keeps at least one. A corpus of a
   single document is the one case where a document is cut in two: its last
   ``eval_fraction`` of bytes (at least ``block_size + 1``) is the eval part.
3. Train and eval are the concatenations of their documents' bytes, in key order, as
   ``np.uint8`` arrays. Both must hold at least ``block_size + 1`` bytes, or ``load``
   raises ``TopologyError``.

``BatchSampler`` draws random windows from the train part for one worker from a numpy
``Generator``; its ``state_dict`` holds the bit generator's state, so a resumed worker
sees exactly the batches it would have seen. ``eval_batches`` gives fixed, evenly spaced
windows of the eval part, and ``evaluate`` averages the model's loss over them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from geotrain.errors import CheckpointCorrupt, TopologyError

SOURCES = ("stdlib", "files", "tokens")

# Folders of the standard library tree that are not the standard library proper.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})
_STDLIB_SKIP_RELDIRS = frozenset({"idlelib/idle_test"})


@dataclass(frozen=True)
class DataSpec:
    """Which text to train on and how much of it."""

    source: str = "stdlib"  # "stdlib": the standard library's .py sources; "files": paths
    paths: tuple[str, ...] = ()  # for "files": files or folders (folders recursively)
    max_bytes: int = 4_000_000  # cap on text loaded: the first max_bytes of the ordered corpus
    eval_fraction: float = 0.1  # share of documents held out for eval
    # source "tokens" (geotrain.worker.tokens): flat token files, held-out files, their dtype and vocabulary
    eval_paths: tuple[str, ...] = ()
    dtype: str = "uint16"
    vocab_size: int | None = None

    @classmethod
    def of(cls, data) -> "DataSpec":
        """The spec of a topology's data section (``data`` or ``sites[].data``)."""
        return cls(source=data.source, paths=tuple(data.paths), max_bytes=data.max_bytes,
                   eval_fraction=data.eval_fraction, eval_paths=tuple(data.eval_paths), dtype=data.dtype,
                   vocab_size=data.vocab_size)

    @property
    def vocab(self) -> int:
        """Token ids are below this: the tokenizer's vocabulary, or 256 for text read as bytes."""
        return self.vocab_size if self.source == "tokens" and self.vocab_size else 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_paths", tuple(os.fspath(p) for p in self.eval_paths))
        if isinstance(self.paths, (str, os.PathLike)):
            object.__setattr__(self, "paths", (os.fspath(self.paths),))
        else:
            object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
        if self.source not in SOURCES:
            raise TopologyError(
                f"data.source: {self.source!r} is not a data source; use one of {', '.join(SOURCES)}"
            )
        if self.source in ("files", "tokens") and not self.paths:
            raise TopologyError(f"data.paths: source '{self.source}' needs at least one file or folder")
        if self.source == "tokens" and self.vocab_size is None:
            raise TopologyError("data.vocab_size: source 'tokens' needs the tokenizer's vocabulary size")
        if self.source == "stdlib" and self.paths:
            raise TopologyError(
                "data.paths: source 'stdlib' takes no paths; set data.source to 'files' to use them"
            )
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise TopologyError(f"data.max_bytes: must be a positive integer, got {self.max_bytes!r}")
        if not 0.0 < float(self.eval_fraction) < 1.0:
            raise TopologyError(
                f"data.eval_fraction: must lie strictly between 0 and 1, got {self.eval_fraction!r}"
            )


def load_corpus(spec: DataSpec, block_size: int = 64, field: str = "data"):
    """The corpus ``spec`` names: a :class:`TextCorpus` (text as bytes) or, for ``source: tokens``, a
    :class:`geotrain.worker.tokens.TokenCorpus`. Both have ``train`` and ``eval`` parts that
    :class:`BatchSampler` and :func:`eval_batches` cut windows from, and a ``fingerprint()``."""
    if spec.source == "tokens":
        from geotrain.worker.tokens import TokenCorpus

        return TokenCorpus.load(spec, block_size, field=field)
    return TextCorpus.load(spec, block_size)


def check_data_files(topo, sites: Sequence[str] | None = None) -> list[str]:
    """Before a launch: every data file the built-in trainer will read exists and, for token files, holds a
    whole number of tokens; raises TopologyError naming the field (``sites[1].data.paths: ...``). Checks the
    top-level ``data`` where a site in ``sites`` (default: all) uses it, and those sites' own ``sites[].data``.
    Returns one line per section checked (``data: 2 token files, 1.2 G tokens``) for ``geotrain validate``."""
    from geotrain.worker.tokens import TokenStream

    chosen = [s for s in topo.sites if sites is None or s.name in sites]
    sections = []
    if any(s.data is None for s in chosen):
        sections.append(("data", topo.data))
    sections += [(f"sites[{i}].data", s.data) for i, s in enumerate(topo.sites) if s in chosen and s.data is not None]
    lines = []
    for field, data in sections:
        if data.source == "stdlib":
            lines.append(f"{field}: the Python standard library (up to {data.max_bytes:,} bytes)")
        elif data.source == "files":
            for i, p in enumerate(data.paths):
                if not os.path.exists(p):
                    raise TopologyError(f"{field}.paths[{i}]: {p} does not exist")
            lines.append(f"{field}: {len(data.paths)} text path(s) (up to {data.max_bytes:,} bytes)")
        else:
            n = TokenStream(data.paths, data.dtype, data.vocab_size, f"{field}.paths").size
            if data.eval_paths:
                TokenStream(data.eval_paths, data.dtype, data.vocab_size, f"{field}.eval_paths")
            lines.append(f"{field}: {len(data.paths)} token file(s), {n:,} {data.dtype} tokens, vocab {data.vocab_size}")
    return lines


def stdlib_root() -> str:
    """The folder of the running Python's standard library."""
    return os.path.dirname(os.__file__)


def _describe(spec: DataSpec) -> str:
    if spec.source == "stdlib":
        return f"the Python standard library at {stdlib_root()}"
    return "the files at " + ", ".join(spec.paths)


def _stdlib_documents(root: str) -> list[tuple[str, str]]:
    """(key, path) of the standard library's .py files, sorted by key."""
    docs: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _STDLIB_SKIP_DIRS and (rel_dir + d) not in _STDLIB_SKIP_RELDIRS
        ]
        for name in filenames:
            if name.endswith(".py"):
                docs.append((rel_dir + name, os.path.join(dirpath, name)))
    docs.sort()
    return docs


def _user_documents(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(key, path) of every regular file under the user's paths, sorted by key, no repeats."""
    docs: list[tuple[str, str]] = []
    for given in paths:
        path = os.path.abspath(os.path.expanduser(given))
        if not os.path.exists(path):
            raise TopologyError(f"data.paths: {given} does not exist")
        if os.path.isfile(path):
            docs.append((os.path.basename(path), path))
            continue
        if not os.path.isdir(path):
            raise TopologyError(f"data.paths: {given} is neither a regular file nor a folder")
        top = os.path.basename(os.path.normpath(path)) or "root"
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, path).replace(os.sep, "/")
            prefix = top + "/" if rel_dir == "." else f"{top}/{rel_dir}/"
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not name.startswith(".") and os.path.isfile(full):
                    docs.append((prefix + name, full))
    docs.sort()
    seen: set[str] = set()
    unique: list[tuple[str, str]] = []
    for key, full in docs:
        real = os.path.realpath(full)
        if real not in seen:
            seen.add(real)
            unique.append((key, full))
    return unique


def _read_prefix(docs: Iterable[tuple[str, str]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Read documents in order until max_bytes are in; skip binary and empty ones."""
    out: list[tuple[str, bytes]] = []
    remaining = max_bytes
    for key, path in docs:
        if remaining <= 0:
            break
        try:
            with open(path, "rb") as f:
                text = f.read(remaining)
        except OSError as exc:
            raise TopologyError(f"data: cannot read {path}: {exc.strerror or exc}") from exc
        if not text or b"\x00" in text:
            continue
        out.append((key, text))
        remaining -= len(text)
    return out


def _split_hash(key: str) -> float:
    """A stable number in [0, 1) for a document key (same in every process and run)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


class TextCorpus:
    """A byte corpus split into a train part and an eval part (both ``np.uint8`` arrays)."""

    train: np.ndarray
    eval: np.ndarray

    def __init__(
        self,
        train: np.ndarray,
        eval: np.ndarray,
        *,
        train_docs: tuple[str, ...] = (),
        eval_docs: tuple[str, ...] = (),
        description: str = "",
    ) -> None:
        self.train = np.ascontiguousarray(train, dtype=np.uint8)
        self.eval = np.ascontiguousarray(eval, dtype=np.uint8)
        self.train_docs = tuple(train_docs)  # keys of the documents in train, in order
        self.eval_docs = tuple(eval_docs)  # keys of the documents in eval, in order
        self.description = description
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, spec: DataSpec, block_size: int = 64) -> "TextCorpus":
        """Read and split the corpus that ``spec`` names.

        ``block_size`` is the model's context length: each part must hold at least
        ``block_size + 1`` bytes (one window and its shifted target), else TopologyError.
        """
        where = _describe(spec)
        if spec.source == "stdlib":
            docs = _stdlib_documents(stdlib_root())
        else:
            docs = _user_documents(spec.paths)
        read = _read_prefix(docs, spec.max_bytes)
        need = block_size + 1
        total = sum(len(text) for _, text in read)
        if total < 2 * need:
            raise TopologyError(
                f"data: the corpus at {where} holds only {total} bytes of text "
                f"(in {len(read)} non-empty, non-binary files); need at least {2 * need} "
                f"(block_size + 1 = {need} for train and again for eval)"
            )

        if len(read) == 1:
            # One document: the only case where a document is cut, tail to eval.
            key, text = read[0]
            n_eval = max(need, int(round(len(text) * spec.eval_fraction)))
            n_eval = min(n_eval, len(text) - need)
            train_parts, eval_parts = [text[:-n_eval]], [text[-n_eval:]]
            train_docs, eval_docs = (key,), (key,)
        else:
            hashed = sorted((_split_hash(key), key, len(text)) for key, text in read)
            is_eval = {key: h < spec.eval_fraction for h, key, _ in hashed}

            def size(to_eval: bool) -> int:
                return sum(n for _, key, n in hashed if is_eval[key] == to_eval)

            # Top up a side that is too short with whole documents, in hash order.
            for _, key, _ in hashed:  # lowest hash first: train -> eval
                if size(True) >= need or sum(not e for e in is_eval.values()) <= 1:
                    break
                is_eval[key] = True
            for _, key, _ in reversed(hashed):  # highest hash first: eval -> train
                if size(False) >= need or sum(is_eval.values()) <= 1:
                    break
                is_eval[key] = False
            train_parts = [text for key, text in read if not is_eval[key]]
            eval_parts = [text for key, text in read if is_eval[key]]
            train_docs = tuple(key for key, _ in read if not is_eval[key])
            eval_docs = tuple(key for key, _ in read if is_eval[key])

        train = np.frombuffer(bytearray(b"".join(train_parts)), dtype=np.uint8)
        eval_ = np.frombuffer(bytearray(b"".join(eval_parts)), dtype=np.uint8)
        for part, arr, n_docs in (("train", train, len(train_docs)), ("eval", eval_, len(eval_docs))):
            if arr.size < need:
                raise TopologyError(
                    f"data: the {part} part of the corpus at {where} holds only {arr.size} bytes "
                    f"({n_docs} files); need at least block_size + 1 = {need}. Add text, raise "
                    f"data.max_bytes, or change data.eval_fraction"
                )
        return cls(train, eval_, train_docs=train_docs, eval_docs=eval_docs, description=where)

    def fingerprint(self) -> str:
        """First 16 hex digits of sha256 over the train and eval bytes (for manifests)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(len(self.train).to_bytes(8, "big"))
            h.update(self.train.tobytes())
            h.update(len(self.eval).to_bytes(8, "big"))
            h.update(self.eval.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"TextCorpus({self.description or 'in memory'}: train {self.train.size} bytes in "
            f"{len(self.train_docs)} files, eval {self.eval.size} bytes in {len(self.eval_docs)} files)"
        )


def _check_windows(data: np.ndarray, batch_size: int, block_size: int, what: str) -> None:
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"{what}: batch_size and block_size must be positive, got {batch_size}, {block_size}")
    if data.ndim != 1 or data.size < block_size + 1:
        raise TopologyError(
            f"data: {what} needs at least block_size + 1 = {block_size + 1} bytes, got {data.size}"
        )


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = data[s : s+T], y = data[s+1 : s+T+1] for every start s, as int64 tensors [B, T]."""
    idx = starts[:, None] + np.arange(block_size + 1, dtype=np.int64)[None, :]
    w = torch.from_numpy(np.asarray(data[idx]).astype(np.int64, copy=False))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """Random (x, y) windows from corpus.train for one worker; its position is resumable."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, seed: int) -> None:
        _check_windows(data, batch_size, block_size, "BatchSampler")
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.batches_drawn = 0
        self._rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T] and y [B, T] (x shifted by one byte), LongTensors on the CPU."""
        starts = self._rng.integers(0, self.data.size - self.block_size, size=self.batch_size, dtype=np.int64)
        self.batches_drawn += 1
        return _windows(self.data, starts, self.block_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON- and torch.save-friendly); load it to continue exactly here."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "data_len": int(self.data.size),
            "batches_drawn": self.batches_drawn,
            "bit_generator": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for field, mine in (
            ("batch_size", self.batch_size),
            ("block_size", self.block_size),
            ("data_len", int(self.data.size)),
        ):
            if d.get(field) != mine:
                raise CheckpointCorrupt(
                    f"sampler state: {field} is {d.get(field)!r} in the saved state but {mine} here "
                    f"(was it saved with another corpus or config?)"
                )
        try:
            self._rng.bit_generator.state = copy.deepcopy(d["bit_generator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorrupt(f"sampler state: bad bit generator state: {exc}") from exc
        self.seed = d.get("seed", self.seed)
        self.batches_drawn = int(d.get("batches_drawn", 0))


def eval_batches(
    data: np.ndarray, batch_size: int, block_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` fixed batches of windows spread evenly from the start to the end of data."""
    _check_windows(data, batch_size, block_size, "eval_batches")
    if n_batches < 1:
        raise ValueError(f"eval_batches: n_batches must be positive, got {n_batches}")
    total = n_batches * batch_size
    last = data.size - block_size - 1  # the last valid window start
    starts = (np.arange(total, dtype=np.int64) * last) // max(total - 1, 1)
    return [
        _windows(data, starts[i * batch_size : (i + 1) * batch_size], block_size)
        for i in range(n_batches)
    ]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> float:
    """Mean loss of ``model`` over ``batches`` in eval mode; the train/eval mode is restored after."""
    if len(batches) == 0:
        raise ValueError("evaluate: no batches")
    was_training = model.training
    model.eval()
    try:
        losses = []
        for x, y in batches:
            _, loss = model(x.to(device), y.to(device))
            losses.append(loss.detach().float())
        return float(torch.stack(losses).mean().item())
    finally:
        model.train(was_training)
