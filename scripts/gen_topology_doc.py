"""Writes docs/topology.md from the typed topology (geotrain/config/schema.py), so the reference never drifts.

    .venv/bin/python scripts/gen_topology_doc.py          # write
    .venv/bin/python scripts/gen_topology_doc.py --check  # fail if docs/topology.md is stale
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from geotrain.config.topology import Topology

OUT = Path(__file__).resolve().parents[1] / "docs" / "topology.md"

HEADER = """# Topology reference

A topology is a YAML file: `geotrain validate FILE` checks it, `geotrain launch FILE` runs it, and
`--set path=value` overrides any field (e.g. `--set training.inner_steps=50`,
`--set sites[0].workers=4`, `--set links.default.bandwidth=1gbit`). Unknown keys are errors.
Durations take units (`80ms`, `1.5s`; a bare number is milliseconds) and bandwidths too
(`100mbit`, `1gbit`, `12.5MB/s`; a bare number is Mbit/s). Examples: `topologies/`.

Loading is bounded, because a topology may come from anyone (`geotrain/config/safeyaml.py`): a
file of at most 1 MiB, nesting at most 64 levels, at most 50,000 YAML nodes, and no YAML aliases
(`*name`; an anchor alone is fine): an alias makes two places one shared object, and a "billion
laughs" needs only a few of them. Every number has a range (seed in [0, 2^64), rounds up to 10^7,
every duration finite and bounded; `.inf` and `.nan` are refused everywhere), a relative path may
not climb out of its base with `..` (write an absolute path to go elsewhere), and an error quotes
at most about 80 characters of a value. Each refusal is one line naming the file and the field.

This page is generated from `geotrain/config/schema.py` by `scripts/gen_topology_doc.py`.
"""


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(ann) if a is not type(None)) + " (optional)"
    if origin is tuple:
        args = typing.get_args(ann)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "mapping"
    return getattr(ann, "__name__", str(ann))


def _models(model, path: str, out: list):
    out.append((path, model))
    for name, info in model.model_fields.items():
        key = info.alias or name
        ann = info.annotation
        for cand in [ann, *typing.get_args(ann)]:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                sub = f"{path}.{key}" if path else key
                if typing.get_origin(ann) is tuple:
                    sub += "[]"
                _models(cand, sub, out)


def render() -> str:
    models: list = []
    _models(Topology, "", models)
    lines = [HEADER]
    for path, model in models:
        title = path or "(top level)"
        lines.append(f"\n## `{title}`\n")
        if model.__doc__ and not model.__doc__.startswith(("Usage docs", "!!!")) and model is not Topology:
            lines.append(model.__doc__.strip().replace("\n    ", "\n") + "\n")
        lines.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, info in model.model_fields.items():
            key = info.alias or name
            default = "required" if info.is_required() else repr(info.default) if not isinstance(info.default, BaseModel) else "(see below)"
            desc = (info.description or "").replace("\n", " ").replace("|", "\\|")
            lines.append(f"| `{key}` | {_type_name(info.annotation)} | {default.replace('|', '/')} | {desc} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/gen_topology_doc.py", file=sys.stderr)
            return 1
        print("docs/topology.md is fresh")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
