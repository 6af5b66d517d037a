"""MuLoCo's inner optimizer (arXiv 2505.23725): Muon on the 2-D weight matrices, AdamW on the rest.

:class:`MuonAdamW` is one ``torch.optim.Optimizer`` over both (torch's own ``torch.optim.Muon`` and
``torch.optim.AdamW`` do the arithmetic), so that everything that takes one optimizer takes it: the
SDK's step hook (gradients are averaged inside the site before either steps), learning-rate
schedules (``param_groups`` are the two optimizers' own groups: a change there reaches them), and
checkpoints (``state_dict`` has torch's standard layout, the Muon groups first, parameter indices in
that order), so a resumed run continues exactly.

Which parameters get Muon (:func:`muon_eligible`): 2-D, and not an embedding or the output head
(the paper, after Jordan et al.'s Muon: the hidden matrices; embeddings and the classifier stay on AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EXCLUDED_NAMES = ("emb", "wte", "wpe", "lm_head", "head")


def muon_eligible(name: str, p: torch.Tensor) -> bool:
    """Does parameter ``name`` train with Muon (a hidden 2-D matrix), or with AdamW?"""
    leaf = name.lower()
    return p.ndim == 2 and not any(part in leaf for part in EXCLUDED_NAMES)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else, as one optimizer."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], *, lr: float, muon_lr: float | None = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        matrices = [p for n, p in named if muon_eligible(n, p)]
        rest = [p for n, p in named if not muon_eligible(n, p)]
        if not named:
            raise ValueError("MuonAdamW: no parameters that require gradients")
        self.muon = torch.optim.Muon(matrices, lr=muon_lr if muon_lr is not None else lr, weight_decay=weight_decay,
                                     momentum=momentum, adjust_lr_fn="match_rms_adamw") if matrices else None
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay) if rest else None
        self._parts = [o for o in (self.muon, self.adamw) if o is not None]
        # the base class keeps its own view: the parts' groups (the same dicts) and their state
        super().__init__([{"params": []}], {})
        self.param_groups = [g for o in self._parts for g in o.param_groups]

    @property
    def state(self):  # the base class reads and writes self.state; the parts own theirs
        merged = {}
        for o in getattr(self, "_parts", ()):
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # only the base class's __init__ sets it (empty)
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self._parts:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """torch's layout: every part's groups in order, parameter indices counted across the parts."""
        out_state, groups, offset = {}, [], 0
        for o in self._parts:
            sd = o.state_dict()
            for i, s in sd["state"].items():
                out_state[i + offset] = s
            for g in sd["param_groups"]:
                groups.append({**g, "params": [i + offset for i in g["params"]]})
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": out_state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, state, offset = list(state_dict["param_groups"]), state_dict["state"], 0
        for o in self._parts:
            mine = groups[:len(o.param_groups)]
            groups = groups[len(o.param_groups):]
            count = sum(len(g["params"]) for g in mine)
            o.load_state_dict({"state": {int(i) - offset: s for i, s in state.items() if offset <= int(i) < offset + count},
                               "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += count
        self.param_groups = [g for o in self._parts for g in o.param_groups]
