"""Reading a topology file: ``--set`` overrides, cross-field checks and one clear error message.

A topology is YAML data. :func:`load_topology` reads it, applies ``--set path=value``
overrides, and validates it into the frozen models of :mod:`geotrain.config.schema` (re-exported
here: ``from geotrain.config.topology import Topology`` works). Any problem becomes one
:class:`~geotrain.errors.TopologyError` whose message names the file, the YAML path and the
offending value, e.g.::

    topologies/bad.yaml: links.pairs[1].latency: expected a duration like "80ms" or "1.5s", got 'fast'

Whatever arrives, loading is bounded (issue #11): the YAML is read by :mod:`geotrain.config.safeyaml`
(at most 1 MiB, 64 levels, 50,000 nodes, no aliases), every number has a range in the schema, a
relative path may not climb out of its base (:func:`_confined`), and a message quotes at most about
80 characters of a value (:func:`~geotrain.config.safeyaml.quote`).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from geotrain.config.schema import (
    FAULT_KINDS, MAX_SITE_PROCS, MODEL_PRESETS, NAME_RE, AsyncConfig, Bandwidth, CheckpointConfig, CompressionConfig, CoordinatorConfig, DataConfig,
    Duration, EtcdConfig, FaultSpec, InnerOptimizerConfig, LinkPair, LinksConfig, LinkSpec, ModelConfig,
    OuterOptimizerConfig, RecoveryConfig, ScheduleConfig, SecurityConfig, SiteConfig, StreamingConfig, Topology,
    TrainingConfig)
from geotrain.config.safeyaml import QUOTE_CHARS, check_depth, fmt_loc, load_yaml, quote, read_bounded
from geotrain.errors import TopologyError

__all__ = [  # the loader's names and, re-exported, the schema's
    "load_topology", "load_any", "parse_topology", "apply_override", "fault_problem",
    "data_sections", "data_problem", "data_vocab", "model_vocab", "schedule_problem",
    "FAULT_KINDS", "MODEL_PRESETS", "NAME_RE", "AsyncConfig", "Bandwidth", "CheckpointConfig", "CompressionConfig", "CoordinatorConfig",
    "DataConfig", "Duration", "EtcdConfig", "FaultSpec", "InnerOptimizerConfig", "LinkPair", "LinksConfig", "LinkSpec",
    "ModelConfig", "OuterOptimizerConfig", "RecoveryConfig", "ScheduleConfig", "SecurityConfig", "SiteConfig", "StreamingConfig", "Topology",
    "TrainingConfig",
]


def load_topology(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Topology:
    """Read, override and validate a topology file. Raises TopologyError naming file and field."""
    path = Path(path)
    raw = load_yaml(read_bounded(path), str(path))
    if not isinstance(raw, dict):
        raise TopologyError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        raw = apply_override(raw, item, source=str(path))
    topo = parse_topology(raw, source=str(path))
    topo = _resolve_data_paths(topo, path.parent)
    if topo.security.certs is not None and not Path(topo.security.certs).is_absolute():
        certs = os.path.abspath(path.parent / topo.security.certs)
        topo = topo.model_copy(update={"security": topo.security.model_copy(update={"certs": certs})})
    etcd_files = {k: os.path.abspath(path.parent / v) for k in ("ca_file", "cert_file", "key_file")
                  if (v := getattr(topo.etcd, k)) is not None and not Path(v).is_absolute()}
    if etcd_files:  # an external etcd's files, relative to the topology file like every other path
        topo = topo.model_copy(update={"etcd": topo.etcd.model_copy(update=etcd_files)})
    return topo


def _resolve_data_paths(topo: Topology, base: Path) -> Topology:
    """Every data section's relative paths (top-level `data` and each `sites[].data`) made absolute against the
    topology file's folder."""
    def resolved(data: DataConfig) -> DataConfig:
        fix = lambda ps: tuple(p if Path(p).is_absolute() else os.path.abspath(base / p) for p in ps)  # noqa: E731
        return data.model_copy(update={"paths": fix(data.paths), "eval_paths": fix(data.eval_paths)})

    sites = tuple(s.model_copy(update={"data": resolved(s.data)}) if s.data is not None else s for s in topo.sites)
    return topo.model_copy(update={"data": resolved(topo.data), "sites": sites})


def data_sections(topo: Topology) -> list[tuple[str, DataConfig]]:
    """(field, data) of the top-level `data` and of every site's own `sites[i].data`."""
    return [("data", topo.data)] + [(f"sites[{i}].data", s.data) for i, s in enumerate(topo.sites) if s.data is not None]


def data_problem(data: DataConfig) -> str | None:
    """Why a data section cannot be read (as ``.field: message``), or None."""
    if data.source in ("files", "tokens") and not data.paths:
        return f".paths: `source: {data.source}` needs at least one path"
    if data.source == "stdlib" and data.paths:
        return ".paths: `source: stdlib` takes no paths; set source to `files` (text) or `tokens` to use them"
    if data.source != "tokens":
        if data.vocab_size is not None:
            return f".vocab_size: only for `source: tokens` (text is read as bytes: 256), got {data.vocab_size}"
        if data.eval_paths:
            return ".eval_paths: only for `source: tokens`"
        return None
    if data.vocab_size is None:
        return ".vocab_size: `source: tokens` needs the tokenizer's vocabulary size (e.g. 50257 for GPT-2)"
    if data.dtype == "uint16" and data.vocab_size > 1 << 16:
        return (f".dtype: uint16 holds token ids below 65536, but vocab_size is {data.vocab_size}; "
                f"write the files as uint32 and set dtype: uint32")
    return None


def data_vocab(data: DataConfig) -> int:
    """The vocabulary of a corpus: the tokenizer's for token files, 256 (bytes) for text."""
    return data.vocab_size if data.source == "tokens" and data.vocab_size else 256


def model_vocab(topo: Topology) -> int:
    """The built-in model's embedding rows: model.vocab_size, else the largest corpus vocabulary."""
    return topo.model.vocab_size or max(data_vocab(d) for _, d in data_sections(topo))


def schedule_problem(schedule, run_length: int, unit: str) -> str | None:
    """Why a learning-rate schedule is contradictory, or None: a decay whose own ``total_steps`` ends before its
    warmup does. A run shorter than the warmup (``--set training.rounds=1`` on a shipped topology) is not
    refused: its learning rate is still ramping when it ends (geotrain.schedule.lr_factor is defined for
    every step)."""
    total = schedule.total_steps
    if total is not None and schedule.kind != "constant" and schedule.warmup_steps > total:
        return (f".warmup_steps: {schedule.warmup_steps} {unit} of warmup is longer than the schedule "
                f"({total} {unit}: total_steps, else the run's length)")
    return None


def load_any(path: str | Path) -> Topology:
    """A topology file (YAML), or the validated JSON a launcher writes into a run directory."""
    path = Path(path)
    if path.suffix == ".json":
        text = read_bounded(path, "file")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TopologyError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        except RecursionError:
            raise TopologyError(f"{path}: nested too deeply to read") from None
        except ValueError as exc:  # an integer of over 4,300 digits
            raise TopologyError(f"{path}: a value JSON cannot construct: {exc}"[:200]) from None
        check_depth(raw, str(path))
        if not isinstance(raw, dict):
            raise TopologyError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        return parse_topology(raw, source=str(path))
    return load_topology(path)


def parse_topology(raw: dict[str, Any], source: str = "<topology>") -> Topology:
    """Validate a plain dict into a Topology (cross-checks included)."""
    try:
        topo = Topology.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TopologyError(f"{source}: {_describe(first, raw)}") from None
    _cross_check(topo, raw, source)
    return topo


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> dict[str, Any]:
    """Apply one ``path=value`` override (value parsed as YAML) to a copy of the raw tree."""
    if "=" not in item:
        raise TopologyError(f"--set {quote(item)}: expected path=value, e.g. training.inner_steps=50")
    path, _, value_text = item.partition("=")
    try:
        value = load_yaml(value_text, f"--set {path.strip()}") if value_text.strip() else ""
    except TopologyError:  # not YAML within the bounds: taken as the plain string it is (bounded: it is the text)
        value = value_text
    tokens = _split_path(path.strip())
    if not tokens:
        raise TopologyError(f"--set {quote(item)}: empty path")
    out = copy.deepcopy(raw)
    node: Any = out
    for i, tok in enumerate(tokens[:-1]):
        nxt = tokens[i + 1]
        if isinstance(tok, int):
            if not isinstance(node, list) or not -len(node) <= tok < len(node):
                raise TopologyError(f"--set {quote(item)}: {_fmt_loc(tokens[:i + 1])} does not exist in {source}")
            node = node[tok]
        else:
            if not isinstance(node, dict):
                raise TopologyError(f"--set {quote(item)}: {_fmt_loc(tokens[:i])} is not a mapping")
            node = node.setdefault(tok, [] if isinstance(nxt, int) else {})
    last = tokens[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise TopologyError(f"--set {quote(item)}: {_fmt_loc(tokens)} does not exist in {source}")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise TopologyError(f"--set {quote(item)}: {_fmt_loc(tokens[:-1])} is not a mapping")
        node[last] = value
    return out


def _split_path(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[-?\d+\])*)", part)
        if not m:
            raise TopologyError(f"--set: cannot read the path {quote(path)}")
        if m.group(1):
            tokens.append(m.group(1))
        tokens.extend(int(i) for i in re.findall(r"\[(-?\d+)\]", m.group(2)))
    return tokens


_fmt_loc = fmt_loc


def _describe(err: dict, raw: Any = None) -> str:
    """Turn one pydantic error into 'path: message'."""
    loc = _yaml_loc(err["loc"], raw)
    kind = err["type"]
    where = _fmt_loc(loc)
    value = err.get("input")
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1])[:64], known, n=1)
        suggest = f" (did you mean {hint[0]!r}?)" if hint else (f" (known keys: {', '.join(known)})" if known else "")
        return f"{where}: unknown key{suggest}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}: {_bounded(msg, value)}"
    if kind == "string_pattern_mismatch":
        return f"{where}: expected a name of lowercase letters, digits and '-' starting with a letter, got {quote(value)}"
    return f"{where}: {_bounded(err['msg'].rstrip('.').lower(), value)}, got {quote(value)}"


def _bounded(msg: str, value: Any) -> str:
    """A validator's message with the value it quotes (whole, as ``repr``) cut to ``quote(value)``; one line."""
    if len(msg) > 2 * QUOTE_CHARS:
        whole = repr(value) if isinstance(value, (str, int, float)) else None  # bounded: the file is at most 1 MiB
        msg = msg.replace(whole, quote(value)) if whole and whole in msg else msg[:2 * QUOTE_CHARS] + "..."
    return " ".join(msg.split())


def _yaml_loc(loc, raw: Any) -> list:
    """Pydantic's error location as a YAML path: its own labels (``function-after[...]``, a union
    member's ``list[...]``) dropped, the keys of the input kept, even one that looks like a label."""
    out: list = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            if not isinstance(part, str):  # a key YAML read as a number, a bool, null: a key, not an index
                out.append(quote(part))
                continue
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue  # a label of pydantic's, not a place in the file
        else:
            node = None  # a missing field, or below a value that is not a container
        out.append(part)
    return out


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
        if site.world_size > MAX_SITE_PROCS:
            raise TopologyError(f"{source}: sites[{i}].nodes: {site.nodes} nodes x {site.workers} workers = "
                                f"{site.world_size} processes in site {site.name!r}; at most {MAX_SITE_PROCS}")
    places = topo.places()
    pairs_seen: dict[frozenset, int] = {}
    for i, pair in enumerate(topo.links.pairs):
        for j, end in enumerate(pair.between):
            if end not in places:
                raise TopologyError(
                    f"{source}: links.pairs[{i}].between[{j}]: unknown place {quote(end)}; "
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
    for field, data in data_sections(topo):
        problem = data_problem(data)
        if problem:
            raise TopologyError(f"{source}: {field}{problem}")
        for key in ("paths", "eval_paths"):
            for i, data_path in enumerate(getattr(data, key)):
                _confined(data_path, f"{field}.{key}[{i}]", "the topology file's folder", source)
        if m.vocab_size is not None and m.vocab_size < data_vocab(data):
            raise TopologyError(f"{source}: model.vocab_size: {m.vocab_size} is smaller than the vocabulary of "
                                f"{field} ({data_vocab(data)}); raise it or leave it out (then it is the data's)")
    tr = topo.training
    for field, sched, length, unit in (
            ("training.inner_optimizer.schedule", tr.inner_optimizer.schedule, tr.rounds * tr.inner_steps, "inner steps"),
            ("training.outer_optimizer.schedule", tr.outer_optimizer.schedule, tr.rounds, "rounds")):
        problem = schedule_problem(sched, length, unit)
        if problem:
            raise TopologyError(f"{source}: {field}{problem}")
    if topo.checkpoint.path is not None:
        _confined(topo.checkpoint.path, "checkpoint.path", "the run directory", source)
    if topo.security.certs is not None:
        _confined(topo.security.certs, "security.certs", "the topology file's folder", source)
    etcd_tls = {f: getattr(topo.etcd, f) for f in ("ca_file", "cert_file", "key_file")}
    if any(etcd_tls.values()):
        if topo.etcd.endpoint is None:
            raise TopologyError(f"{source}: etcd.ca_file: TLS files are for an existing etcd (etcd.endpoint); the etcd "
                                f"the launcher starts uses the run's certificates")
        if not all(etcd_tls.values()):
            missing = [f for f, v in etcd_tls.items() if not v]
            raise TopologyError(f"{source}: etcd.{missing[0]}: TLS to an existing etcd needs ca_file, cert_file "
                                f"and key_file together")
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
    if topo.training.aggregation != "mean" and topo.training.algorithm == "async-diloco":
        raise TopologyError(f"{source}: training.aggregation: `async-diloco` applies each update as it arrives, "
                            f"so there is nothing to aggregate; use `mean`, got {topo.training.aggregation!r}")
    if topo.training.aggregation != "mean" and topo.training.merge != "star":
        raise TopologyError(f"{source}: training.aggregation: {topo.training.aggregation!r} needs `merge: star` "
                            f"(a {topo.training.merge} merge averages inside the ring), got merge {topo.training.merge!r}")
    q = topo.training.quorum
    if q is not None:
        if q.min_sites > len(topo.sites):
            raise TopologyError(f"{source}: training.quorum.min_sites: {q.min_sites} is more than the "
                                f"{len(topo.sites)} sites of this topology")
        if topo.training.algorithm not in ("diloco", "streaming-diloco"):
            raise TopologyError(f"{source}: training.quorum: a quorum decides when a synchronous round commits; "
                                f"{topo.training.algorithm!r} has no such rounds (use diloco or streaming-diloco)")
        if topo.training.merge != "star":
            raise TopologyError(f"{source}: training.quorum: ring merges need every site's part; use `merge: star` "
                                f"(got {topo.training.merge!r})")
    if topo.training.compression.codec == "topk" and topo.training.merge != "star":
        raise TopologyError(f"{source}: training.compression.codec: `topk` updates are sparse per site and are merged "
                            f"by the coordinator; a ring sums dense partial sums at every hop, so use `merge: star` "
                            f"(got merge {topo.training.merge!r})")
    if topo.training.compression.codec == "topk" and not topo.training.compression.error_feedback:
        raise TopologyError(f"{source}: training.compression.error_feedback: `topk` drops 1 - density of every update; "
                            f"without error feedback that part is lost for good (SparseLoCo keeps it): set it true")
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
        raise TopologyError(f"{source}: etcd.endpoint: expected host:port, got {quote(topo.etcd.endpoint)}")


def _confined(path: str, field: str, base: str, source: str) -> None:
    """Refuse a relative path that climbs out of its base with ``..`` (an absolute path is explicit: allowed).

    Lexical, on purpose: the base may not exist yet (a run directory), and a symlink placed inside
    it by whoever controls that folder is that person's explicit choice, like an absolute path."""
    if "\0" in path:
        raise TopologyError(f"{source}: {field}: a path cannot contain a NUL character, got {quote(path)}")
    if posixpath.isabs(path) or Path(path).is_absolute():
        return
    parts: list[str] = []
    for part in path.replace("\\", "/").split("/"):
        if part == "..":
            if not parts:
                raise TopologyError(f"{source}: {field}: a relative path must stay inside {base} (write an absolute "
                                    f"path to go elsewhere), got {quote(path)}")
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)


_FAULT_TARGETS = {
    "kill": ("worker", "site", "coordinator", "etcd"),
    "freeze": ("worker", "site", "coordinator", "etcd"),
    "partition": ("link",), "degrade": ("link",), "flap": ("link",),
    "slow": ("site",), "disk_full": ("checkpoints",), "corrupt_checkpoint": ("checkpoints",),
}


def fault_problem(topo: Topology, fault: FaultSpec) -> str | None:
    """Why a fault cannot apply to this topology (as ``.field: message``), or None."""
    triggers = [t for t in ("at_round", "at_step", "at_ms") if getattr(fault, t) is not None]
    if len(triggers) != 1:
        return f": give exactly one of at_round, at_step, at (got {len(triggers)})"
    target = fault.target or ("checkpoints" if fault.kind in ("disk_full", "corrupt_checkpoint") else "")
    kind, _, name = target.partition(" ")
    allowed = _FAULT_TARGETS[fault.kind]
    if kind not in allowed:
        return f".target: a {fault.kind} fault targets {' or '.join(repr(a) for a in allowed)}, got {quote(fault.target)}"
    if kind in ("site", "link") and name not in topo.site_names:
        return f".target: unknown site {quote(name)} (sites: {', '.join(topo.site_names)})"
    if kind == "link" and topo.link(name, topo.coordinator.at) is None:
        return f".target: site {name!r} shares the coordinator's datacenter: it has no WAN link"
    if kind == "worker":
        site, _, rank = name.partition("/")
        if site not in topo.site_names or not rank.isdigit() or int(rank) >= topo.site(site).world_size:
            return f".target: no worker {quote(name)} (give SITE/RANK of an existing worker)"
    if fault.kind in ("freeze", "partition", "degrade", "flap", "slow", "disk_full") and fault.duration_ms is None:
        return f".duration: a {fault.kind} fault needs a duration, e.g. \"10s\""
    if fault.kind == "degrade" and all(getattr(fault, f) is None for f in ("bandwidth_mbps", "latency_ms", "jitter_ms", "loss")):
        return ": a degrade fault needs at least one of bandwidth, latency, jitter, loss"
    return None
