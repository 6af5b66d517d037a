"""A model's fingerprint, and whether two sites train the same model.

Averaging the parameters of two different models is silent garbage when their element counts
happen to match (other layers, or the same layers registered in another order), and a crash deep in
the unflattening when they do not. So a site says at Join which parameters it trains — a list of
``[name, [shape...], dtype]`` in the order they are flattened (``model.named_parameters()``, those
that require gradients) — and the coordinator compares it with the run's, the first site's to join
(:func:`first_difference`). A mismatch is refused ``MODEL_MISMATCH`` naming the first differing
tensor on both sides, and is not retried.
"""

from __future__ import annotations

import json
import math

MAX_SPEC_BYTES = 4 << 20
MAX_TENSORS = 100_000

Spec = list[tuple[str, tuple[int, ...], str]]


def model_spec(model) -> Spec:
    """The fingerprint of the parameters a DiLoCo wrapper trains (those that require gradients), in order."""
    return [(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
            for name, p in model.named_parameters() if p.requires_grad]


def encode_spec(spec: Spec) -> str:
    return json.dumps([[n, list(s), d] for n, s, d in spec], separators=(",", ":"))


def decode_spec(text: str) -> Spec:
    """The fingerprint a site sent; ValueError saying what is wrong with it (the caller refuses INVALID)."""
    if len(text) > MAX_SPEC_BYTES:
        raise ValueError(f"model fingerprint of {len(text)} bytes (at most {MAX_SPEC_BYTES})")
    raw = json.loads(text)
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ValueError("model fingerprint: expected a list of at most 100000 [name, shape, dtype]")
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in item[1])
                and isinstance(item[2], str) and len(item[0]) <= 1024 and len(item[2]) <= 32):
            raise ValueError(f"model fingerprint: entry {i} is not [name, [dims...], dtype]")
        out.append((item[0], tuple(item[1]), item[2]))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _show(entry) -> str:
    name, shape, dtype = entry
    return f"{name!r} {list(shape)} {dtype}"


def first_difference(run: Spec, site: Spec, site_name: str, run_site: str) -> str | None:
    """Why ``site``'s model is not ``run``'s (set by ``run_site``), naming the first differing tensor on
    both sides and the element counts; None when they are the same model."""
    if run == site:
        return None
    total_run = sum(_numel(s) for _, s, _ in run)
    total_site = sum(_numel(s) for _, s, _ in site)
    counts = (f"site {site_name} has {total_site:,} parameters in {len(site)} tensors, the run's model "
              f"(from {run_site}) {total_run:,} in {len(run)}")
    for i, (a, b) in enumerate(zip(run, site)):
        if a != b:
            return f"{counts}; tensor {i} is {_show(b)} at {site_name}, {_show(a)} in the run's model"
    i = min(len(run), len(site))
    extra = f"{_show(site[i])} at {site_name}, nothing in the run's model" if len(site) > len(run) \
        else f"{_show(run[i])} in the run's model, nothing at {site_name}"
    return f"{counts}; tensor {i} is {extra}"
