"""The coordinator's recovery state, written at every commit before anyone sees the result.

A restarted coordinator takes up from here, so a commit is never lost and never applied twice:
sites that retry a Merge for a round that was committed find the round stale and fetch the
committed version instead. The state (global parameters, outer momentum, round, epoch; for
async-diloco also each site's merge count and delayed Nesterov's not yet absorbed updates) is
written, then named by ``state.json`` (written to a temporary file and renamed into place, atomically);
``fsync`` is optional (a process crash cannot lose what was written; a machine crash needs fsync and
costs a disk flush per round).

The tensors go to one of two files, ``state-a.safetensors`` and ``state-b.safetensors``, always the one
``state.json`` does not name, overwritten in place (``os.pwritev`` straight from the tensors' memory,
in the safetensors format, read back by safetensors itself). This write is on every commit's critical
path, before any site gets its answer: a new file per round (safetensors' ``save_file``, a rename, the
old one unlinked) cost ~35 ms for a 10.7M-parameter model's params + momentum in an idle process and
40-200 ms in a launch on 2 cores; writing over the pages of the file of two rounds ago costs ~13 ms
(benchmarks/launch_merge.py reports the commit's ``persist_s``). A crash mid-write damages only the file
that ``state.json`` does not name. States written before (``state-<round>.safetensors``) still load.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from geotrain.errors import GeotrainError


@dataclass
class CoordinatorState:
    round: int
    params: torch.Tensor | None
    momentum: torch.Tensor | None
    epoch: int = 0
    members: tuple[str, ...] = ()
    lane_rounds: tuple[int, ...] = ()  # streaming-diloco: each fragment's round
    version: int = 0  # commits so far (== round unless streaming or async)
    site_merges: dict[str, int] | None = None  # async-diloco: each site's merges applied
    pending: torch.Tensor | None = None  # async-diloco, delayed Nesterov: updates not yet in the momentum (sum)
    pending_count: int = 0  # how many updates `pending` sums


FILES = ("state-a.safetensors", "state-b.safetensors")
"""The two tensor files, written in turn (the module docstring)."""
_LEGACY = re.compile(r"state-\d+\.safetensors")
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


class StateStore:
    def __init__(self, directory: Path, fsync: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._named = _named_file(self._meta())
        """The tensor file state.json names now (never written over)."""

    def save(self, st: CoordinatorState) -> None:
        tensors = {}
        if st.params is not None:
            tensors["params"] = st.params
        if st.momentum is not None:
            tensors["momentum"] = st.momentum
        if st.pending is not None:
            tensors["pending"] = st.pending
        target = FILES[1] if self._named == FILES[0] else FILES[0]
        write_safetensors(self.dir / target, tensors, fsync=self.fsync)
        meta = {"round": st.round, "epoch": st.epoch, "members": list(st.members), "lane_rounds": list(st.lane_rounds),
                "version": st.version, "site_merges": dict(st.site_merges or {}),
                "pending_count": st.pending_count if st.pending is not None else 0, "file": target}
        mtmp = self.dir / f".state-{os.getpid()}.json"
        mtmp.write_text(json.dumps(meta))
        os.replace(mtmp, self.dir / "state.json")
        self._named = target
        for old in self.dir.glob("state-*.safetensors"):  # states written before FILES
            if _LEGACY.fullmatch(old.name):
                old.unlink(missing_ok=True)

    def _meta(self) -> dict | None:
        try:
            meta = json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def load(self) -> CoordinatorState | None:
        meta = self._meta()
        if meta is None:
            return None
        named = _named_file(meta, self.dir)
        path = self.dir / named if named else None
        tensors = load_file(str(path)) if path is not None and path.exists() else {}
        return CoordinatorState(round=meta["round"], params=tensors.get("params"), momentum=tensors.get("momentum"),
                                epoch=meta.get("epoch", 0), members=tuple(meta.get("members", ())),
                                lane_rounds=tuple(meta.get("lane_rounds", ())), version=meta.get("version", meta["round"]),
                                site_merges=dict(meta.get("site_merges") or {}), pending=tensors.get("pending"),
                                pending_count=meta.get("pending_count", 0) if "pending" in tensors else 0)


def _named_file(meta: dict | None, where: Path | None = None) -> str | None:
    """The tensor file a state.json names: one of FILES, or (written before them) ``state-<round>.safetensors``.
    Anything else (a path elsewhere) is never read: with ``where`` (loading) it is an error, else None."""
    if meta is None:
        return None
    name = meta.get("file")
    if name is None and isinstance(meta.get("round"), int):
        return f"state-{meta['round']}.safetensors"
    if name in FILES:
        return name
    if where is not None:
        raise GeotrainError(f"{where / 'state.json'}: 'file' is {name!r}, not one of {list(FILES)}: this is not a "
                            f"state geotrain wrote; nothing was read")
    return None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], fsync: bool = False) -> int:
    """Write ``tensors`` to ``path`` in the safetensors format (an 8-byte little-endian header size, the JSON
    header with each tensor's dtype, shape and byte range, then the bytes), over the file's old contents
    in place, straight from the tensors' memory (``os.pwritev``: no copy, the GIL released). Returns the
    file's size. Readable by ``safetensors.torch.load_file``."""
    header, views, offset = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"write_safetensors: {name!r} has dtype {t.dtype}, not one of {sorted(map(str, _DTYPES))}")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        views.append(memoryview(t.reshape(-1).numpy()).cast("B") if nbytes else b"")
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    buffers = [struct.pack("<Q", len(text)) + text, *views]
    total = len(buffers[0]) + offset
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pos = 0
        for buf in buffers:
            mv = memoryview(buf)
            while mv:
                n = os.pwritev(fd, [mv], pos)
                pos += n
                mv = mv[n:]
        os.ftruncate(fd, total)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total
