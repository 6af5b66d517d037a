"""The coordinator's recovery state, written at every commit before anyone sees the result.

A restarted coordinator takes up from here, so a commit is never lost and never applied twice:
sites that retry a Merge for a round that was committed find the round stale and fetch the
committed version instead. The state (global parameters, outer momentum, round, epoch; for
async-diloco also each site's merge count and delayed Nesterov's not yet absorbed updates) is
written to a temporary file and renamed into place; ``fsync`` is optional (a process crash
cannot lose a renamed file; a machine crash needs fsync and costs a disk flush per round).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


class StateStore:
    def __init__(self, directory: Path, fsync: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    def save(self, st: CoordinatorState) -> None:
        tensors = {}
        if st.params is not None:
            tensors["params"] = st.params.contiguous()
        if st.momentum is not None:
            tensors["momentum"] = st.momentum.contiguous()
        if st.pending is not None:
            tensors["pending"] = st.pending.contiguous()
        tmp = self.dir / f".state-{os.getpid()}.safetensors"
        save_file(tensors, str(tmp))
        meta = {"round": st.round, "epoch": st.epoch, "members": list(st.members), "lane_rounds": list(st.lane_rounds),
                "version": st.version, "site_merges": dict(st.site_merges or {}),
                "pending_count": st.pending_count if st.pending is not None else 0}
        # The metadata names the tensor file of the same round; both are renamed in order.
        if self.fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"state-{st.round}.safetensors")
        mtmp = self.dir / f".state-{os.getpid()}.json"
        mtmp.write_text(json.dumps(meta))
        os.replace(mtmp, self.dir / "state.json")
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != f"state-{st.round}.safetensors":
                old.unlink(missing_ok=True)

    def load(self) -> CoordinatorState | None:
        try:
            meta = json.loads((self.dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        path = self.dir / f"state-{meta['round']}.safetensors"
        tensors = load_file(str(path)) if path.exists() else {}
        return CoordinatorState(round=meta["round"], params=tensors.get("params"), momentum=tensors.get("momentum"),
                                epoch=meta.get("epoch", 0), members=tuple(meta.get("members", ())),
                                lane_rounds=tuple(meta.get("lane_rounds", ())), version=meta.get("version", meta["round"]),
                                site_merges=dict(meta.get("site_merges") or {}), pending=tensors.get("pending"),
                                pending_count=meta.get("pending_count", 0) if "pending" in tensors else 0)
