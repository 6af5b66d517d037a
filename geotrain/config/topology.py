"""The topology file: sites, WAN links, coordinator, model, data and recipe, as a typed tree.

A topology is YAML data. :func:`load_topology` reads it, applies ``--set path=value``
overrides, and validates it into frozen pydantic models (unknown keys rejected, every field
documented). Any problem becomes one :class:`~geotrain.errors.TopologyError` whose message
names the file, the YAML path and the offending value, e.g.::

    topologies/bad.yaml: links.pairs[1].latency: expected a duration like "80ms" or "1.5s", got 'fast'

Human units are accepted in the file (``latency: 50ms``, ``bandwidth: 100mbit``) and stored
with the unit in the field name (``latency_ms``, ``bandwidth_mbps``).

Places: every site is a place, and so is the coordinator's location (``coordinator.at``,
by default its own place ``hub``; it may also name a site, which puts the coordinator inside
that site's datacenter). A WAN link joins two places; pairs not listed use ``links.default``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from geotrain.errors import TopologyError
from geotrain.units import parse_bandwidth_mbps, parse_duration_ms

Duration = Annotated[float, BeforeValidator(parse_duration_ms)]
Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth_mbps)]
NAME_RE = r"^[a-z][a-z0-9-]{0,31}$"


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)


class SiteConfig(_Node):
    name: str = Field(pattern=NAME_RE)
    """Site name: lowercase letters, digits and '-', starting with a letter."""
    workers: int = Field(ge=1, le=64)
    """Worker processes at this site; they train data-parallel and only rank 0 (the leader) talks across the WAN."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the site's workers compute. `cuda` uses NCCL inside the site; gloo otherwise."""
    slowdown: float = Field(default=1.0, ge=1.0, le=100.0)
    """Emulate a slower site: its inner step, collectives included, takes this many times as long (the site's rank 0 sleeps and the others wait for it; built-in trainer only). 1 = full speed."""
    region: str | None = None
    """Region of the site, for `training.merge: hierarchical` (sites of a region reduce among themselves first)."""


class LinkSpec(_Node):
    bandwidth_mbps: Bandwidth = Field(alias="bandwidth")
    """Bandwidth in each direction, e.g. "100mbit", "1gbit" (a bare number is Mbit/s)."""
    latency_ms: Duration = Field(default=0.0, alias="latency")
    """One-way latency, e.g. "40ms" (the round-trip time is twice this)."""
    jitter_ms: Duration = Field(default=0.0, alias="jitter")
    """Standard deviation of extra per-packet delay, e.g. "2ms"."""
    loss: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Packet (TCP segment) loss probability in [0, 1), felt as TCP feels it: retransmission delay and a lower throughput."""


class LinkPair(LinkSpec):
    between: tuple[str, str]
    """The two places this link joins: site names, or the coordinator's place (`coordinator.at`)."""


class LinksConfig(_Node):
    default: LinkSpec = LinkSpec(bandwidth_mbps=1000.0, latency_ms=10.0)
    """The link used for every pair of places not listed in `pairs`."""
    pairs: tuple[LinkPair, ...] = ()
    """Links for specific pairs of places."""


class CoordinatorConfig(_Node):
    at: str = Field(default="hub", pattern=NAME_RE)
    """Where the coordinator sits: a site's name, or a place of its own (default "hub")."""
    host: str = "127.0.0.1"
    """Address the coordinator binds to."""
    prometheus_port: int | None = Field(default=0, ge=0, le=65535)
    """Port of the coordinator's Prometheus /metrics endpoint (0 = any free port, shown in the
    `coordinator_started` event and etcd; null = off)."""


class ModelConfig(_Node):
    name: Literal["gpt"] = "gpt"
    """The built-in model: a GPT-style byte-level language model."""
    n_layer: int = Field(default=2, ge=1, le=48)
    """Transformer blocks."""
    n_head: int = Field(default=4, ge=1, le=64)
    """Attention heads per block (must divide n_embd)."""
    n_embd: int = Field(default=64, ge=8, le=4096)
    """Embedding width."""
    block_size: int = Field(default=64, ge=8, le=4096)
    """Context length in bytes."""


class DataConfig(_Node):
    source: Literal["stdlib", "files"] = "stdlib"
    """`stdlib`: the Python standard library's sources (present on every machine); `files`: `paths`."""
    paths: tuple[str, ...] = ()
    """Files or folders of text, for `source: files` (relative paths are relative to the topology file)."""
    max_bytes: int = Field(default=4_000_000, ge=1_000)
    """At most this many bytes of text are loaded (deterministically: the first of the sorted corpus)."""
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of documents held out for evaluation."""


class InnerOptimizerConfig(_Node):
    """The optimizer every worker steps between merges (its state stays local to the site)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=3e-3, gt=0.0)
    """Learning rate."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (ignored for SGD)."""


class OuterOptimizerConfig(_Node):
    """DiLoCo's outer optimizer. Defaults are the paper's: SGD, lr 0.7, Nesterov momentum 0.9."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(default=0.7, gt=0.0)
    """Outer learning rate (DiLoCo: 0.7)."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """Outer momentum (DiLoCo: 0.9)."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo: yes)."""


class CompressionConfig(_Node):
    """What crosses the WAN in a merge (docs/algorithms.md). The sum is always accumulated in float32."""

    codec: Literal["fp32", "fp16", "bf16", "int8", "int4"] = "fp32"
    block: int = Field(default=256, ge=1, le=1 << 20)
    """Elements per scale block for int8/int4."""
    error_feedback: bool = True
    """Keep what quantisation lost and add it to the next update (per site, and on the way back)."""


class AsyncConfig(_Node):
    """Asynchronous Local-SGD (arXiv 2401.09135)."""

    staleness_weight: Literal["inverse", "excess", "none"] = "inverse"
    """Scale an update based on a version `s` behind the current one by 1/(1+s) (`inverse`); by 1/(1+max(0, s-(N-1))) with N sites (`excess`: only the staleness beyond the N-1 updates the other sites make meanwhile in steady state); or not at all."""
    delayed_nesterov: bool = True
    """The paper's delayed Nesterov: momentum is updated once every N updates (N = sites) with their mean;
    in between each update is applied as a plain step of lr/N."""
    dynamic_local_steps: bool = False
    """The paper's dynamic local updates: a site with `slowdown` f does H/f inner steps per merge."""
    overlap_steps: int = Field(default=0, ge=0)
    """τ > 0: a site's merge runs in the background while it does τ more inner steps; their progress is then put on top of the new global model and sent with the next update (0 = the paper's protocol: wait for the answer). Must be < H."""


class StreamingConfig(_Node):
    """Streaming DiLoCo (arXiv 2501.18512)."""

    fragments: int = Field(default=4, ge=1, le=64)
    """P: the model's parameter tensors are split into P fragments synced in turn, H/P steps apart."""
    overlap_steps: int = Field(default=1, ge=0)
    """τ: inner steps that run while a fragment's exchange is in flight (must be < H)."""
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Mixing: θ_local ← α·θ_local + (1−α)·θ_global for the fragment when its result arrives."""


class TrainingConfig(_Node):
    algorithm: Literal["diloco", "ddp", "async-diloco", "streaming-diloco"] = "diloco"
    """`diloco`: sites merge every `inner_steps`; `ddp`: gradients are averaged across the WAN every step (the
    baseline); `async-diloco`: each site merges as soon as it is done, the coordinator applies updates as they
    arrive; `streaming-diloco`: fragments of the model are merged in turn, overlapped with compute."""
    merge: Literal["star", "ring", "hierarchical"] = "star"
    """How a synchronous DiLoCo merge moves bytes: `star` through the coordinator; `ring`: a ring all-reduce
    among site leaders over the site-to-site links; `hierarchical`: rings inside regions, then across regions.
    The coordinator still decides rounds and membership. With `compression.codec` every ring hop carries encoded pieces (partial sums re-encoded at each hop; no error feedback). After a failure a ring run merges through the star until the coordinator has the leaders rebuild their rings (docs/algorithms.md)."""
    compression: CompressionConfig = CompressionConfig()
    asynchronous: AsyncConfig = Field(default=AsyncConfig(), alias="async")
    streaming: StreamingConfig = StreamingConfig()
    inner_optimizer: InnerOptimizerConfig = InnerOptimizerConfig()
    """The optimizer of inner steps."""
    outer_optimizer: OuterOptimizerConfig = OuterOptimizerConfig()
    """The optimizer applied to the mean pseudo-gradient at every merge."""
    inner_steps: int = Field(default=10, ge=1)
    """H: inner steps per site between merges. For `ddp` it only sets how often eval runs."""
    rounds: int = Field(default=10, ge=1)
    """Number of outer rounds; the run does rounds * inner_steps inner steps per site."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per worker per inner step."""
    eval_batches: int = Field(default=8, ge=1)
    """Held-out batches evaluated after every round."""
    round_timeout_s: float = Field(default=120.0, gt=0.0)
    """How long the coordinator waits for all sites' updates before the round fails."""


class CheckpointConfig(_Node):
    every_rounds: int = Field(default=1, ge=0)
    """Checkpoint every N rounds (0 = never). Written in the background; training does not wait."""
    keep: int = Field(default=2, ge=1)
    """How many checkpoints each writer keeps."""
    path: str | None = None
    """Where checkpoints go (default: <run_dir>/checkpoints)."""


class RecoveryConfig(_Node):
    """How a run reacts to failures (docs/assumptions.md relates the timeouts to each other)."""

    min_sites: int = Field(default=1, ge=1)
    """A round commits after its deadline with the sites that reported, if at least this many did."""
    worker_failure: Literal["restart_site", "fail"] = "restart_site"
    """A dead worker: restart its whole site (which rejoins at the next round), or fail the run."""
    coordinator_failure: Literal["restart", "fail"] = "restart"
    """A dead or frozen coordinator: restart it from its persisted state, or fail the run."""
    max_restarts: int = Field(default=10, ge=0)
    """Restarts allowed per process group before the run fails."""
    heartbeat_ttl_s: float = Field(default=3.0, gt=0.0)
    """etcd lease TTL of every member; a frozen process disappears from membership after this."""
    retry_deadline_s: float = Field(default=120.0, gt=0.0)
    """How long a site keeps retrying an unreachable coordinator (with backoff) before it gives up."""


FAULT_KINDS = ("kill", "freeze", "partition", "degrade", "flap", "slow", "disk_full", "corrupt_checkpoint")


class FaultSpec(_Node):
    """One scheduled fault (docs/chaos.md). Exactly one of at_round, at_step, at_s says when."""

    kind: Literal["kill", "freeze", "partition", "degrade", "flap", "slow", "disk_full", "corrupt_checkpoint"]
    """What to do: kill (SIGKILL), freeze (SIGSTOP for `duration`), partition / degrade / flap a link,
    slow a site's compute by `factor`, make checkpoint writes fail as on a full disk, corrupt the newest checkpoint."""
    target: str = ""
    """`worker SITE/RANK`, `site SITE`, `coordinator`, `etcd`, `link SITE` (the SITE<->coordinator link), or `checkpoints`."""
    at_round: int | None = Field(default=None, ge=0)
    """Inject once this many rounds are committed."""
    at_step: int | None = Field(default=None, ge=0)
    """Inject once the first site reaches this inner step."""
    at_s: Duration | None = Field(default=None, alias="at")
    """Inject this long after the run started, e.g. "20s"."""
    duration_ms: Duration | None = Field(default=None, alias="duration")
    """How long it lasts before it is undone (freeze, partition, degrade, flap, slow, disk_full)."""
    direction: Literal["both", "up", "down"] = "both"
    """Link faults: `up` = site to coordinator, `down` = coordinator to site."""
    bandwidth_mbps: Bandwidth | None = Field(default=None, alias="bandwidth")
    latency_ms: Duration | None = Field(default=None, alias="latency")
    jitter_ms: Duration | None = Field(default=None, alias="jitter")
    loss: float | None = Field(default=None, ge=0.0, lt=1.0)
    period_ms: Duration = Field(default=2000.0, alias="period")
    """Flap: the link goes down and up every `period`."""
    factor: float = Field(default=3.0, ge=1.0, le=100.0)
    """Slow: compute takes `factor` times as long."""


class EtcdConfig(_Node):
    endpoint: str | None = None
    """An existing etcd cluster, "host:port". Absent: the launcher starts a local etcd server and stops it at the end."""


class Topology(_Node):
    name: str = Field(pattern=NAME_RE)
    """Run name; also the etcd key prefix /geotrain/<name>/."""
    seed: int = 0
    """Seed for model initialisation and data order."""
    sites: tuple[SiteConfig, ...] = Field(min_length=1)
    """The datacenters: each a group of worker processes."""
    links: LinksConfig = LinksConfig()
    """The emulated WAN links between places (sites and the coordinator's place)."""
    coordinator: CoordinatorConfig = CoordinatorConfig()
    """Where the coordinator runs."""
    model: ModelConfig = ModelConfig()
    """The built-in model (ignored by a user's own script)."""
    data: DataConfig = DataConfig()
    """The built-in workload's text."""
    training: TrainingConfig = TrainingConfig()
    """The recipe: algorithm, optimizers, H, rounds, batch size."""
    etcd: EtcdConfig = EtcdConfig()
    """The control plane."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint cadence and retention."""
    recovery: RecoveryConfig = RecoveryConfig()
    """Reactions to failures."""
    faults: tuple[FaultSpec, ...] = ()
    """Faults injected on a schedule while the run goes on (docs/chaos.md)."""

    # ---- derived views (no state of their own) ----
    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> SiteConfig:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def places(self) -> list[str]:
        names = self.site_names
        return names if self.coordinator.at in names else names + [self.coordinator.at]

    def link(self, a: str, b: str) -> LinkSpec | None:
        """The WAN link between two places; None when they are the same place (no WAN)."""
        if a == b:
            return None
        for pair in self.links.pairs:
            if set(pair.between) == {a, b}:
                return LinkSpec(bandwidth_mbps=pair.bandwidth_mbps, latency_ms=pair.latency_ms,
                                jitter_ms=pair.jitter_ms, loss=pair.loss)
        return self.links.default

    def digest(self) -> str:
        """sha256 of the canonical JSON of the validated topology (for manifests and resume checks)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------
# Loading, overrides and error messages


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
        raise TopologyError(f"{source}: {_describe(first, raw)}") from None
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


def _lookup(raw: Any, loc) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _describe(err: dict, raw: dict) -> str:
    """Turn one pydantic error into 'path: message'."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    kind = err["type"]
    where = _fmt_loc(loc)
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _lookup(raw, loc[:-1])
        known = _known_fields(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggest = f" (did you mean {hint[0]!r}?)" if hint else (f" (known keys: {', '.join(known)})" if known else "")
        del parent
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
