"""The coordinator's recovery state, written at every commit before anyone sees the result.

A restarted coordinator takes up from here, so a commit is never lost and never applied twice:
sites that retry a Merge for a round that was committed find the round stale and fetch the
committed version instead. The state (global parameters, outer momentum, round, epoch; for
async-diloco also each site's merge count and delayed Nesterov's not yet absorbed updates) is
written, then named by its metadata file (written to a temporary file and renamed into place,
atomically); ``fsync`` is optional (a process crash cannot lose what was written; a machine crash
needs fsync and costs a disk flush per round).

Files, per coordinator epoch E (the fencing token of the incarnation that wrote them):

    state-eE.json                  round, version, members, ...; "file": the tensor file it names
    state-eE-a.safetensors         the tensors, written in turn: always the one state-eE.json does not name
    state-eE-b.safetensors

- **Two files in place.** Every commit waits for this write before any site has its answer (the
  answer streams meanwhile, its last message held back: orchestrator/engine.py, stage 8), and the next
  commit waits for it. A new file per round (safetensors' ``save_file``, a rename, the old one unlinked) cost ~35 ms
  for a 10.7M-parameter model's params + momentum in an idle process and 40-200 ms in a launch on 2
  cores; writing over the pages of the file of two rounds ago (``os.pwritev`` straight from the
  tensors' memory, in the safetensors format, read back by safetensors itself) costs ~13 ms
  (benchmarks/launch_merge.py reports the commit's ``persist_s``). A crash mid-write damages only the
  file the metadata does not name.
- **Per epoch.** A coordinator that was paused and comes back after a newer one took over (it is
  fenced at its next publish, *after* it persisted) must not damage the newer one's state: it writes
  only its own epoch's files, :meth:`StateStore.load` takes the highest epoch's, and each save removes
  the files of lower epochs (a paused one's, written again later, are ignored and removed at the next).
- **The commit's event with it.** The round's ``commit`` event is written after the state (and the run state in
  etcd): a coordinator killed between the two left a durable round without its event, and the history then
  counted a round too few (a completed run reported failed: seen under load in the recovery tests). The metadata
  keeps the event; a restarted coordinator writes it (``replayed: true``) when the history lacks it
  (orchestrator.main.replay_lost_commit).
- States written before (``state.json`` + ``state-<round>.safetensors``, epoch from the metadata) still
  load, below any state of the same or a higher epoch; they are removed at the first save.
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
    commit: dict | None = None  # the commit event of the round this state is the result of (replayed if lost)


_META = re.compile(r"state-e(\d+)\.json")
_OURS = re.compile(r"state-e(\d+)(?:\.json|-[ab]\.safetensors)")
_LEGACY = re.compile(r"state-\d+\.safetensors")
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def tensor_files(epoch: int) -> tuple[str, str]:
    """Epoch ``epoch``'s two tensor files, written in turn (the module docstring)."""
    return f"state-e{epoch}-a.safetensors", f"state-e{epoch}-b.safetensors"


class StateStore:
    def __init__(self, directory: Path, fsync: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._named: dict[int, str | None] = {}
        """Per epoch, the tensor file its metadata names now (never written over)."""

    def save(self, st: CoordinatorState) -> None:
        epoch = int(st.epoch)
        tensors = {}
        if st.params is not None:
            tensors["params"] = st.params
        if st.momentum is not None:
            tensors["momentum"] = st.momentum
        if st.pending is not None:
            tensors["pending"] = st.pending
        if epoch not in self._named:  # a store made anew (a restart with the same epoch: no etcd)
            meta = _read_json(self.dir / f"state-e{epoch}.json")
            self._named[epoch] = meta.get("file") if meta else None
        files = tensor_files(epoch)
        target = files[1] if self._named[epoch] == files[0] else files[0]
        write_safetensors(self.dir / target, tensors, fsync=self.fsync)
        meta = {"round": st.round, "epoch": epoch, "members": list(st.members), "lane_rounds": list(st.lane_rounds),
                "version": st.version, "site_merges": dict(st.site_merges or {}),
                "pending_count": st.pending_count if st.pending is not None else 0, "file": target,
                **({"commit": st.commit} if st.commit is not None else {})}
        mtmp = self.dir / f".state-{os.getpid()}.json"
        mtmp.write_text(json.dumps(meta))
        os.replace(mtmp, self.dir / f"state-e{epoch}.json")
        self._named[epoch] = target
        for old in self.dir.iterdir():  # lower epochs' files, and those written before epochs were in the names
            m = _OURS.fullmatch(old.name)
            if (m and int(m.group(1)) < epoch) or _LEGACY.fullmatch(old.name) or old.name == "state.json":
                old.unlink(missing_ok=True)

    def load(self) -> CoordinatorState | None:
        """The state of the highest epoch here (None: nothing was persisted)."""
        found = []
        for path in self.dir.glob("state-e*.json"):
            m = _META.fullmatch(path.name)
            meta = _read_json(path) if m else None
            if meta is not None:
                if meta.get("epoch") != int(m.group(1)) or meta.get("file") not in tensor_files(int(m.group(1))):
                    raise GeotrainError(f"{path}: its epoch {meta.get('epoch')!r} or 'file' {meta.get('file')!r} is "
                                        f"not the one its name says: this is not a state geotrain wrote; nothing was read")
                found.append((int(m.group(1)), 1, meta, self.dir / meta["file"]))
        legacy = _read_json(self.dir / "state.json")
        if legacy is not None and isinstance(legacy.get("round"), int):
            found.append((int(legacy.get("epoch", 0)), 0, legacy, self.dir / f"state-{legacy['round']}.safetensors"))
        if not found:
            return None
        _, _, meta, path = max(found, key=lambda f: f[:2])
        tensors = load_file(str(path)) if path.exists() else {}
        return CoordinatorState(round=meta["round"], params=tensors.get("params"), momentum=tensors.get("momentum"),
                                epoch=meta.get("epoch", 0), members=tuple(meta.get("members", ())),
                                lane_rounds=tuple(meta.get("lane_rounds", ())), version=meta.get("version", meta["round"]),
                                site_merges=dict(meta.get("site_merges") or {}), pending=tensors.get("pending"),
                                pending_count=meta.get("pending_count", 0) if "pending" in tensors else 0,
                                commit=meta.get("commit") if isinstance(meta.get("commit"), dict) else None)


def _read_json(path: Path) -> dict | None:
    """A metadata file's object; None when there is none. One that is there but is not a JSON object cannot
    have been written by :meth:`StateStore.save` (it renames a complete file into place): an error, never
    "nothing persisted", which would restart the run from scratch over a damaged state."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GeotrainError(f"{path}: not readable as the coordinator's state ({exc}); nothing was read") from None
    if not isinstance(meta, dict):
        raise GeotrainError(f"{path}: holds a JSON {type(meta).__name__}, not the coordinator's state; nothing was read")
    return meta


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
