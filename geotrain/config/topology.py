"""Reading a topology file: ``--set`` overrides, cross-field checks and one clear error message.

A topology is YAML data. :func:`load_topology` reads it, applies ``--set path=value``
overrides, and validates it into the frozen models of :mod:`geotrain.config.schema` (re-exported
here: ``from geotrain.config.topology import Topology`` works). Any problem becomes one
:class:`~geotrain.errors.TopologyError` whose message names the file, the YAML path and the
offending value, e.g.::

    topologies/bad.yaml: links.pairs[1].latency: expected a duration like "80ms" or "1.5s", got 'fast'
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from geotrain.config.schema import (
    FAULT_KINDS, NAME_RE, AsyncConfig, Bandwidth, CheckpointConfig, CompressionConfig, CoordinatorConfig, DataConfig,
    Duration, EtcdConfig, FaultSpec, InnerOptimizerConfig, LinkPair, LinksConfig, LinkSpec, ModelConfig,
    OuterOptimizerConfig, RecoveryConfig, SiteConfig, StreamingConfig, Topology, TrainingConfig)
from geotrain.errors import TopologyError

__all__ = [  # the loader's names and, re-exported, the schema's
    "load_topology", "load_any", "parse_topology", "apply_override", "fault_problem",
    "FAULT_KINDS", "NAME_RE", "AsyncConfig", "Bandwidth", "CheckpointConfig", "CompressionConfig", "CoordinatorConfig",
    "DataConfig", "Duration", "EtcdConfig", "FaultSpec", "InnerOptimizerConfig", "LinkPair", "LinksConfig", "LinkSpec",
    "ModelConfig", "OuterOptimizerConfig", "RecoveryConfig", "SiteConfig", "StreamingConfig", "Topology",
    "TrainingConfig",
]


def load_topology(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Topology:
    """Read, override and validate a topology file. Raises TopologyError naming file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TopologyError(f"{path}: no such topology file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path}: cannot read the topology file: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        raw = apply_override(raw, item, source=str(path))
    topo = parse_topology(raw, source=str(path))
    if topo.data.source == "files":
        base = path.parent
        resolved = tuple(str(p if Path(p).is_absolute() else (base / p)) for p in topo.data.paths)
        topo = topo.model_copy(update={"data": topo.data.model_copy(update={"paths": resolved})})
    return topo


def load_any(path: str | Path) -> Topology:
    """A topology file (YAML), or the validated JSON a launcher writes into a run directory."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            return parse_topology(json.loads(path.read_text()), source=str(path))
        except FileNotFoundError:
            raise TopologyError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise TopologyError(f"{path}: not valid JSON: {exc}") from None
    return load_topology(path)


def parse_topology(raw: dict[str, Any], source: str = "<topology>") -> Topology:
    """Validate a plain dict into a Topology (cross-checks included)."""
    try:
        topo = Topology.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TopologyError(f"{source}: {_describe(first)}") from None
    _cross_check(topo, raw, source)
    return topo


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> dict[str, Any]:
    """Apply one ``path=value`` override (value parsed as YAML) to a copy of the raw tree."""
    if "=" not in item:
        raise TopologyError(f"--set {item!r}: expected path=value, e.g. training.inner_steps=50")
    path, _, value_text = item.partition("=")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    tokens = _split_path(path.strip())
    if not tokens:
        raise TopologyError(f"--set {item!r}: empty path")
    out = copy.deepcopy(raw)
    node: Any = out
    for i, tok in enumerate(tokens[:-1]):
        nxt = tokens[i + 1]
        if isinstance(tok, int):
            if not isinstance(node, list) or not -len(node) <= tok < len(node):
                raise TopologyError(f"--set {item!r}: {_fmt_loc(tokens[:i + 1])} does not exist in {source}")
            node = node[tok]
        else:
            if not isinstance(node, dict):
                raise TopologyError(f"--set {item!r}: {_fmt_loc(tokens[:i])} is not a mapping")
            node = node.setdefault(tok, [] if isinstance(nxt, int) else {})
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise TopologyError(f"--set {item!r}: {_fmt_loc(tokens)} does not exist in {source}")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise TopologyError(f"--set {item!r}: {_fmt_loc(tokens[:-1])} is not a mapping")
        node[last] = value
    return out


def _split_path(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[-?\d+\])*)", part)
        if not m:
            raise TopologyError(f"--set: cannot read the path {path!r}")
        if m.group(1):
            tokens.append(m.group(1))
        tokens.extend(int(i) for i in re.findall(r"\[(-?\d+)\]", m.group(2)))
    return tokens


def _fmt_loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict) -> str:
    """Turn one pydantic error into 'path: message'."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    kind = err["type"]
    where = _fmt_loc(loc)
    value = err.get("input")
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggest = f" (did you mean {hint[0]!r}?)" if hint else (f" (known keys: {', '.join(known)})" if known else "")
        return f"{where}: unknown key{suggest}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}: {msg}"
    if kind == "string_pattern_mismatch":
        return f"{where}: expected a name of lowercase letters, digits and '-' starting with a letter, got {value!r}"
    return f"{where}: {err['msg'].rstrip('.').lower()}, got {value!r}"


def _known_fields(loc) -> list[str]:
    """Field names (as written in YAML) of the model found at ``loc`` in the Topology tree."""
    model: Any = Topology
    for part in loc:
        if isinstance(part, int):
            continue
        field = None
        for name, info in model.model_fields.items():
            if part in (name, info.alias):
                field = info
                break
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(info.alias or name for name, info in model.model_fields.items())


def _cross_check(topo: Topology, raw: dict, source: str) -> None:
    seen: dict[str, int] = {}
    for i, site in enumerate(topo.sites):
        if site.name in seen:
            raise TopologyError(f"{source}: sites[{i}].name: site {site.name!r} is already defined at sites[{seen[site.name]}]")
        seen[site.name] = i
    places = topo.places()
    pairs_seen: dict[frozenset, int] = {}
    for i, pair in enumerate(topo.links.pairs):
        for j, end in enumerate(pair.between):
            if end not in places:
                raise TopologyError(
                    f"{source}: links.pairs[{i}].between[{j}]: unknown place {end!r}; "
                    f"known places are {', '.join(places)} (the sites and coordinator.at)")
        if pair.between[0] == pair.between[1]:
            raise TopologyError(f"{source}: links.pairs[{i}].between: a link joins two different places, got {list(pair.between)}")
        key = frozenset(pair.between)
        if key in pairs_seen:
            raise TopologyError(f"{source}: links.pairs[{i}].between: the pair {list(pair.between)} is already defined at links.pairs[{pairs_seen[key]}]")
        pairs_seen[key] = i
    m = topo.model
    if m.n_embd % m.n_head:
        raise TopologyError(f"{source}: model.n_embd: must be a multiple of model.n_head ({m.n_head}), got {m.n_embd}")
    if topo.data.source == "files" and not topo.data.paths:
        raise TopologyError(f"{source}: data.paths: `source: files` needs at least one path")
    st = topo.training.streaming
    if topo.training.algorithm == "streaming-diloco" and st.overlap_steps >= topo.training.inner_steps:
        raise TopologyError(f"{source}: training.streaming.overlap_steps: must be less than training.inner_steps "
                            f"({topo.training.inner_steps}), got {st.overlap_steps}")
    at = topo.training.asynchronous
    if topo.training.algorithm == "async-diloco" and at.overlap_steps >= topo.training.inner_steps:
        raise TopologyError(f"{source}: training.async.overlap_steps: must be less than training.inner_steps "
                            f"({topo.training.inner_steps}), got {at.overlap_steps}")
    if topo.training.merge != "star" and topo.training.algorithm != "diloco":
        raise TopologyError(f"{source}: training.merge: {topo.training.merge!r} merges work with algorithm `diloco` "
                            f"(got {topo.training.algorithm!r}); use `star`")
    if topo.training.algorithm == "ddp" and topo.training.compression.codec != "fp32":
        raise TopologyError(f"{source}: training.compression.codec: compression applies to DiLoCo merges; "
                            f"`ddp` sends fp32 gradients, got {topo.training.compression.codec!r}")
    if topo.recovery.min_sites > len(topo.sites):
        raise TopologyError(f"{source}: recovery.min_sites: {topo.recovery.min_sites} is more than the "
                            f"{len(topo.sites)} sites of this topology")
    for i, fault in enumerate(topo.faults):
        problem = fault_problem(topo, fault)
        if problem:
            raise TopologyError(f"{source}: faults[{i}]{problem}")
    if topo.etcd.endpoint is not None and not re.fullmatch(r"(https?://)?[\w.\-]+:\d+", topo.etcd.endpoint):
        raise TopologyError(f"{source}: etcd.endpoint: expected host:port, got {topo.etcd.endpoint!r}")


_FAULT_TARGETS = {
    "kill": ("worker", "site", "coordinator", "etcd"),
    "freeze": ("worker", "site", "coordinator", "etcd"),
    "partition": ("link",), "degrade": ("link",), "flap": ("link",),
    "slow": ("site",), "disk_full": ("checkpoints",), "corrupt_checkpoint": ("checkpoints",),
}


def fault_problem(topo: Topology, fault: FaultSpec) -> str | None:
    """Why a fault cannot apply to this topology (as ``.field: message``), or None."""
    triggers = [t for t in ("at_round", "at_step", "at_s") if getattr(fault, t) is not None]
    if len(triggers) != 1:
        return f": give exactly one of at_round, at_step, at (got {len(triggers)})"
    target = fault.target or ("checkpoints" if fault.kind in ("disk_full", "corrupt_checkpoint") else "")
    kind, _, name = target.partition(" ")
    allowed = _FAULT_TARGETS[fault.kind]
    if kind not in allowed:
        return f".target: a {fault.kind} fault targets {' or '.join(repr(a) for a in allowed)}, got {fault.target!r}"
    if kind in ("site", "link") and name not in topo.site_names:
        return f".target: unknown site {name!r} (sites: {', '.join(topo.site_names)})"
    if kind == "link" and topo.link(name, topo.coordinator.at) is None:
        return f".target: site {name!r} shares the coordinator's datacenter: it has no WAN link"
    if kind == "worker":
        site, _, rank = name.partition("/")
        if site not in topo.site_names or not rank.isdigit() or int(rank) >= topo.site(site).workers:
            return f".target: no worker {name!r} (give SITE/RANK of an existing worker)"
    if fault.kind in ("freeze", "partition", "degrade", "flap", "slow", "disk_full") and fault.duration_ms is None:
        return f".duration: a {fault.kind} fault needs a duration, e.g. \"10s\""
    if fault.kind == "degrade" and all(getattr(fault, f) is None for f in ("bandwidth_mbps", "latency_ms", "jitter_ms", "loss")):
        return ": a degrade fault needs at least one of bandwidth, latency, jitter, loss"
    return None
