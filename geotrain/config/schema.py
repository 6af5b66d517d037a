"""The topology's typed tree: sites, WAN links, coordinator, model, data, recipe and faults.

Frozen pydantic models, unknown keys rejected, a docstring per field (docs/topology.md is generated
from them by scripts/gen_topology_doc.py). Human units are accepted in the file (``latency: 50ms``,
``bandwidth: 100mbit``) and stored with the unit in the field name (``latency_ms``,
``bandwidth_mbps``). Reading a file, ``--set`` overrides, cross-field checks and the error
messages are in :mod:`geotrain.config.topology`, which also re-exports every name defined here.

Places: every site is a place, and so is the coordinator's location (``coordinator.at``,
by default its own place ``hub``; it may also name a site, which puts the coordinator inside
that site's datacenter). A WAN link joins two places; pairs not listed use ``links.default``.

Adding a setting: a field here (with its docstring), the line in :mod:`geotrain.config.derive`
that hands it to the component that uses it, and its use there.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from geotrain.units import parse_bandwidth_mbps, parse_duration_ms

Duration = Annotated[float, BeforeValidator(parse_duration_ms)]
Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth_mbps)]
NAME_RE = r"^[a-z][a-z0-9-]{0,31}$"

# Upper bounds of counts and durations (issue #11): far beyond any real run, small enough that no
# later arithmetic, sleep or allocation overflows. A value past them is refused while loading, with
# its field, instead of crashing the run later.
MAX_ROUNDS = 10_000_000
MAX_STEPS = 1_000_000
"""Most inner steps per merge (H), and the longest overlap τ."""
MAX_SITES = 256
MAX_SITE_NODES = 256
MAX_SITE_PROCS = 1024
"""Most processes in one site's group (``nodes`` × ``workers``)."""
MAX_DAYS_S = 30 * 86_400.0
"""The longest timeout or deadline: 30 days, in seconds."""
MAX_LINK_DELAY_MS = 60_000.0
"""The longest one-way latency or jitter of an emulated link: a minute (a geostationary hop is 270 ms)."""
MAX_LINK_STREAMS = 64
"""At most this many TCP connections per link transfer (`links.*.streams`)."""
MAX_PATH = 4096
MAX_TEXT = 256
SEED_LIMIT = 2**64
"""Seeds are in [0, 2^64): what torch.manual_seed takes (the built-in model's initialisation)."""
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)  # no field means .inf or .nan: a null says "off"


class SiteConfig(_Node):
    name: str = Field(pattern=NAME_RE)
    """Site name: lowercase letters, digits and '-', starting with a letter."""
    workers: int = Field(ge=1, le=64)
    """Worker processes per node of this site; they train data-parallel and only rank 0 (the leader) talks across the WAN."""
    nodes: int = Field(default=1, ge=1, le=MAX_SITE_NODES)
    """Machines (nodes) this site spans: the site has `nodes` × `workers` processes in one process group, met through a TCP rendezvous (torch.distributed's, MASTER_ADDR/MASTER_PORT) on node 0; node K's workers have site ranks K×workers … K×workers+workers−1, and rank 0 is the leader. Run a node with `geotrain site NAME TOPOLOGY --node-rank K --master-addr HOST --master-port P`, or with torchrun (docs/deploy.md); `geotrain launch` starts every node on this machine."""

    @property
    def world_size(self) -> int:
        """Processes in the site's group: ``nodes`` × ``workers``."""
        return self.nodes * self.workers
    device: Literal["cpu", "cuda"] = "cpu"
    """Where the site's workers compute. `cuda` uses NCCL inside the site (one GPU per worker: `geotrain launch` refuses a site with more workers than the machine has GPUs); gloo otherwise."""
    slowdown: float = Field(default=1.0, ge=1.0, le=100.0)
    """Emulate a slower site: its inner step, collectives included, takes this many times as long (the site's rank 0 sleeps and the others wait for it; built-in trainer only). 1 = full speed."""
    region: str | None = Field(default=None, max_length=64)
    """Region of the site, for `training.merge: hierarchical` (sites of a region reduce among themselves first)."""
    data: DataConfig | None = None
    """This site's own corpus (same keys as the top-level `data`, which it replaces for this site): each campus
    trains on its own data, the non-IID case. Absent: the top-level `data`. The first site's leader evaluates on
    its own data's held-out part."""


class LinkSpec(_Node):
    bandwidth_mbps: Bandwidth = Field(alias="bandwidth", le=10_000_000.0)
    """Bandwidth in each direction, e.g. "100mbit", "1gbit" (a bare number is Mbit/s); at most 10 Tbit/s."""
    latency_ms: Duration = Field(default=0.0, alias="latency", le=MAX_LINK_DELAY_MS)
    """One-way latency, e.g. "40ms" (the round-trip time is twice this); at most a minute."""
    jitter_ms: Duration = Field(default=0.0, alias="jitter", le=MAX_LINK_DELAY_MS)
    """Standard deviation of extra per-packet delay, e.g. "2ms"."""
    loss: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Packet (TCP segment) loss probability in [0, 1), felt as TCP feels it: retransmission delay and a lower throughput."""
    streams: int = Field(default=1, ge=1, le=MAX_LINK_STREAMS)
    """TCP connections a transfer on this link is striped over (PCCL's parallel streams): with loss, one TCP flow is
    capped at MSS·1.22/(RTT·√loss) (Mathis) however wide the link, and `streams` flows get up to `streams` times that,
    never more than the bandwidth. The link emulator opens and joins the stripes at its two ends (geotrain.wan.stripe),
    so the emulated WAN carries that many flows. 1 = one connection."""


class LinkPair(LinkSpec):
    between: tuple[Text, Text]
    """The two places this link joins: site names, or the coordinator's place (`coordinator.at`)."""


class LinksConfig(_Node):
    default: LinkSpec = LinkSpec(bandwidth_mbps=1000.0, latency_ms=10.0)
    """The link used for every pair of places not listed in `pairs`."""
    pairs: tuple[LinkPair, ...] = Field(default=(), max_length=MAX_SITES * (MAX_SITES + 1) // 2)
    """Links for specific pairs of places."""


class CoordinatorConfig(_Node):
    at: str = Field(default="hub", pattern=NAME_RE)
    """Where the coordinator sits: a site's name, or a place of its own (default "hub")."""
    host: str = Field(default="127.0.0.1", max_length=253)
    """Address the coordinator binds to."""
    prometheus_port: int | None = Field(default=0, ge=0, le=65535)
    """Port of the coordinator's Prometheus /metrics endpoint (0 = any free port, shown in the
    `coordinator_started` event and etcd; null = off)."""


MODEL_PRESETS: dict[str, dict[str, int]] = {
    "demo": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64},  # ~0.1 M parameters: a CPU demo
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},  # ~0.8 M
    "35m": {"n_layer": 6, "n_head": 8, "n_embd": 512, "block_size": 1024},  # arXiv 2503.09799's 35M shape
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},  # GPT-2 small, 124 M at 50257 tokens
}
"""Shapes of the built-in GPT by name (`model.preset`); fields written beside a preset override it."""


class ModelConfig(_Node):
    name: Literal["gpt"] = "gpt"
    """The built-in model: a GPT-style language model (nanoGPT's)."""
    preset: Literal["demo", "tiny", "35m", "gpt2-small"] | None = None
    """A named shape: `demo` (2 layers, width 64, context 64), `tiny` (4, 128, 128), `35m` (6 layers, width 512,
    8 heads, context 1024: the 35M shape of arXiv 2503.09799 with a 32k vocabulary), `gpt2-small` (12 layers, 768,
    12 heads, context 1024: 124M parameters with GPT-2's 50257 tokens). `n_layer`, `n_head`, `n_embd`, `block_size`
    written beside it override it. Absent: the fields below (their defaults are `demo`)."""
    n_layer: int = Field(default=2, ge=1, le=48)
    """Transformer blocks."""
    n_head: int = Field(default=4, ge=1, le=64)
    """Attention heads per block (must divide n_embd)."""
    n_embd: int = Field(default=64, ge=8, le=4096)
    """Embedding width."""
    block_size: int = Field(default=64, ge=8, le=4096)
    """Context length in tokens (bytes for text data)."""
    vocab_size: int | None = Field(default=None, ge=2, le=1 << 20)
    """Rows of the embedding table. Absent: the data's (256 for text, which is read as bytes; `data.vocab_size`
    for `source: tokens`). It must be at least every corpus's vocabulary."""
    bf16: bool = True
    """On a CUDA site, run forward and loss under bf16 autocast (weights and optimizer stay float32). CPU sites
    always compute in float32."""
    compile: bool = False
    """Compile the built-in trainer's forward and loss with `torch.compile` in every worker. On a CUDA site the
    steps are faster (benchmarks/cuda_mfu.py on an H200, the 35m preset: 17.6 ms eager, 12.2 ms compiled); the first
    step pays the compile (tens of seconds; again after a restart, faster from torch's on-disk cache), and a CPU
    site needs a C++ compiler. The parameters, their names, checkpoints and the model's fingerprint are the
    module's own, compiled or not; the values differ from eager ones in the last bits (fused kernels)."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        """A preset fills the shape fields that are not written (unknown presets are refused by the field)."""
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in MODEL_PRESETS:
            data = {**MODEL_PRESETS[data["preset"]], **data}
        return data


PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]


class DataConfig(_Node):
    source: Literal["stdlib", "files", "tokens"] = "stdlib"
    """`stdlib`: the Python standard library's sources (present on every machine); `files`: text files and folders
    at `paths` (read as bytes); `tokens`: pre-tokenized flat token files at `paths` (nanoGPT's `train.bin`: the token
    ids back to back as `dtype`, no header), memory-mapped, never loaded whole."""
    paths: tuple[PathText, ...] = Field(default=(), max_length=1000)
    """Files or folders of text (`source: files`), or token files (`source: tokens`, read as one stream in the
    order given). Relative paths are relative to the topology file, and may not climb out of its folder with `..`;
    an absolute path is taken as written."""
    eval_paths: tuple[PathText, ...] = Field(default=(), max_length=1000)
    """`source: tokens`: held-out token files (nanoGPT's `val.bin`). Absent: the last `eval_fraction` of the
    tokens of `paths` is held out."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """`source: tokens`: the type of one token id in the files (`uint16` holds vocabularies up to 65536)."""
    vocab_size: int | None = Field(default=None, ge=2, le=1 << 20)
    """`source: tokens`: the tokenizer's vocabulary (e.g. 50257 for GPT-2); every token id must be below it
    (checked on every batch drawn)."""
    max_bytes: int = Field(default=4_000_000, ge=1_000, le=1 << 36)
    """Text sources: at most this many bytes of text are loaded (deterministically: the first of the sorted corpus); at most 64 GiB."""
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share held out for evaluation: of the documents (text), or the tail of the token stream (tokens without `eval_paths`)."""


SiteConfig.model_rebuild()  # its `data` is a DataConfig, defined after it


class ScheduleConfig(_Node):
    """A learning rate that follows the step: lr × factor(step), a pure function of the step
    (geotrain/schedule.py), so a resumed run continues on it exactly. Linear warmup from lr/warmup_steps to lr,
    then `constant`, or a `cosine` (or `linear`) decay to `min_lr_ratio` × lr at `total_steps`, and that floor after."""

    kind: Literal["constant", "cosine", "linear"] = "constant"
    """The shape after the warmup."""
    warmup_steps: int = Field(default=0, ge=0, le=MAX_ROUNDS * MAX_STEPS)
    """Steps of linear warmup (inner steps for the inner optimizer, rounds for the outer one); 0 = none."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """The floor of a decay, as a fraction of lr (the papers: 0.1)."""
    total_steps: int | None = Field(default=None, ge=1, le=MAX_ROUNDS * MAX_STEPS)
    """Where the decay reaches its floor. Absent: the run's length (training.rounds × training.inner_steps inner
    steps; training.rounds rounds for the outer optimizer)."""


class InnerOptimizerConfig(_Node):
    """The optimizer every worker steps between merges (its state stays local to the site). `ddp` and every
    DiLoCo variant use the same one: one recipe."""

    name: Literal["adamw", "sgd", "muon"] = "adamw"
    """`muon`: MuLoCo's inner optimizer (arXiv 2505.23725): torch.optim.Muon on the hidden 2-D weight matrices
    (learning rate scaled to match AdamW's update RMS), AdamW with `betas` on embeddings, head, norms and biases."""
    lr: float = Field(default=3e-3, gt=0.0, le=100.0)
    """Peak learning rate (the schedule scales it)."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0)
    """Decoupled weight decay (AdamW), or L2 (SGD)."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.95)
    """AdamW betas (ignored for SGD)."""
    clip_grad_norm: float | None = Field(default=None, gt=0.0, le=1e6)
    """Clip the site's averaged gradient to this global L2 norm before each inner step (the papers: 1.0); null = no clipping."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The inner learning rate over inner steps (built-in trainer; a script applies geotrain.schedule itself)."""


class OuterOptimizerConfig(_Node):
    """DiLoCo's outer optimizer. Defaults are the paper's: SGD, lr 0.7, Nesterov momentum 0.9."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(default=0.7, gt=0.0)
    """Outer learning rate (DiLoCo: 0.7)."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """Outer momentum (DiLoCo: 0.9)."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo: yes)."""
    schedule: ScheduleConfig = ScheduleConfig()
    """The outer learning rate over rounds (applied by the coordinator and mirrored by ring leaders); default constant."""


class CompressionConfig(_Node):
    """What crosses the WAN in a merge (docs/algorithms.md). The sum is always accumulated in float32."""

    codec: Literal["fp32", "fp16", "bf16", "int8", "int4", "topk"] = "fp32"
    """How an update is encoded. `topk` is SparseLoCo's (arXiv 2508.15706): in each chunk of `block` elements
    only the `density` largest by magnitude, their values in `bits` bits (geotrain/wire/compress.py)."""
    block: int = Field(default=256, ge=1, le=1 << 20)
    """Elements per scale block for int8/int4; per top-k chunk for topk (SparseLoCo uses 4096)."""
    error_feedback: bool = True
    """Keep what quantisation lost and add it to the next update (per site, and on the way back)."""
    density: float = Field(default=0.02, gt=0.0, le=1.0)
    """topk: the fraction of each chunk's elements sent (SparseLoCo: 1-3 %)."""
    bits: Literal[1, 2, 4, 8] = 2
    """topk: bits per sent value (SparseLoCo: 2)."""
    error_feedback_decay: float = Field(default=1.0, gt=0.0, le=1.0)
    """The residual kept by error feedback is multiplied by this before the next update is added
    (SparseLoCo's error-feedback accumulation, beta about 0.95; 1 = plain error feedback)."""


class AsyncConfig(_Node):
    """Asynchronous Local-SGD (arXiv 2401.09135)."""

    staleness_weight: Literal["inverse", "excess", "none"] = "inverse"
    """Scale an update based on a version `s` behind the current one by 1/(1+s) (`inverse`); by 1/(1+max(0, s-(N-1))) with N sites (`excess`: only the staleness beyond the N-1 updates the other sites make meanwhile in steady state); or not at all."""
    delayed_nesterov: bool = True
    """The paper's delayed Nesterov: momentum is updated once every N updates (N = sites) with their mean;
    in between each update is applied as a plain step of lr/N."""
    dynamic_local_steps: bool = False
    """The paper's dynamic local updates: a site with `slowdown` f does H/f inner steps per merge."""
    overlap_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    """τ > 0: a site's merge runs in the background while it does τ more inner steps; their progress is then put on top of the new global model and sent with the next update (0 = the paper's protocol: wait for the answer). Must be < H."""


class StreamingConfig(_Node):
    """Streaming DiLoCo (arXiv 2501.18512)."""

    fragments: int = Field(default=4, ge=1, le=64)
    """P: the model's parameter tensors are split into P fragments synced in turn, H/P steps apart."""
    overlap_steps: int = Field(default=1, ge=0, le=MAX_STEPS)
    """τ: inner steps that run while a fragment's exchange is in flight (must be < H)."""
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Mixing: θ_local ← α·θ_local + (1−α)·θ_global for the fragment when its result arrives."""


class QuorumConfig(_Node):
    """Commit a round without waiting for the slowest sites (after Decoupled DiLoCo, arXiv 2604.21428)."""

    min_sites: int = Field(ge=1, le=MAX_SITES)
    """A round commits once this many sites have reported and `grace_s` has passed since the last of them
    (or once every site has). The late sites stay members: their late update is refused as stale, they
    take the new global model and train on from there."""
    grace_s: float = Field(default=0.0, ge=0.0, le=MAX_DAYS_S)
    """Seconds to wait for more sites after the quorum is reached."""


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
    inner_steps: int = Field(default=10, ge=1, le=MAX_STEPS)
    """H: inner steps per site between merges. For `ddp` it only sets how often eval runs."""
    rounds: int = Field(default=10, ge=1, le=MAX_ROUNDS)
    """Number of outer rounds; the run does rounds * inner_steps inner steps per site."""
    batch_size: int = Field(default=16, ge=1, le=65_536)
    """Sequences per worker per inner step."""
    eval_batches: int = Field(default=8, ge=1, le=100_000)
    """Held-out batches evaluated after every round."""
    quorum: QuorumConfig | None = None
    """Quorum with a grace window (synchronous and streaming DiLoCo, star merges); null = wait for every site
    until `round_timeout_s`."""
    round_timeout_s: float = Field(default=120.0, gt=0.0, le=MAX_DAYS_S)
    """How long the coordinator waits for all sites' updates before the round fails (at most 30 days)."""
    aggregation: Literal["mean", "trimmed-mean", "median"] = "mean"
    """How the coordinator combines the sites' updates, coordinate-wise: `mean`; `trimmed-mean` (drop the
    `trim_fraction` largest and smallest values of each coordinate, average the rest); `median`. The last two
    tolerate byzantine sites (docs/algorithms.md states how many); they need `merge: star` (rings average in the ring)."""
    trim_fraction: float = Field(default=0.25, ge=0.0, lt=0.5)
    """`trimmed-mean`: fraction of the sites' values dropped at each end of every coordinate, in [0, 0.5)."""


class CheckpointConfig(_Node):
    every_rounds: int = Field(default=1, ge=0, le=MAX_ROUNDS)
    """Checkpoint every N rounds (0 = never). Written in the background; training does not wait."""
    keep: int = Field(default=2, ge=1, le=10_000)
    """How many checkpoints each writer keeps."""
    path: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)
    """Where checkpoints go (default: <run_dir>/checkpoints). A relative path is inside the run directory and may not climb out of it with `..`; an absolute path is taken as written."""


class RecoveryConfig(_Node):
    """How a run reacts to failures (docs/assumptions.md relates the timeouts to each other)."""

    min_sites: int = Field(default=1, ge=1, le=MAX_SITES)
    """A round commits after its deadline with the sites that reported, if at least this many did."""
    worker_failure: Literal["restart_site", "fail"] = "restart_site"
    """A dead worker: restart its whole site (which rejoins at the next round), or fail the run."""
    coordinator_failure: Literal["restart", "fail"] = "restart"
    """A dead or frozen coordinator: restart it from its persisted state, or fail the run."""
    max_restarts: int = Field(default=10, ge=0, le=10_000)
    """Restarts allowed per process group before the run fails."""
    warm_standby: bool = True
    """`geotrain launch`: keep one idle worker process per worker, its imports done, that becomes the worker
    when its site restarts (a restart then skips the 3-4 s of imports); each costs its memory (torch imported)."""
    heartbeat_ttl_s: float = Field(default=3.0, gt=0.0, le=3600.0)
    """etcd lease TTL of every member; a frozen process disappears from membership after this (at most an hour)."""
    retry_deadline_s: float = Field(default=120.0, gt=0.0, le=MAX_DAYS_S)
    """How long a site keeps retrying an unreachable coordinator (with backoff) before it gives up (at most 30 days)."""


FAULT_KINDS = ("kill", "freeze", "partition", "degrade", "flap", "slow", "disk_full", "corrupt_checkpoint")


class FaultRateConfig(_Node):
    """Faults drawn at random for the whole run: a Poisson process of rate 1/`mtbf_s` (seeded, each one
    recorded as a `fault_injected` with `drawn: true`), beside the scheduled `faults` (docs/chaos.md)."""

    mtbf_s: float = Field(ge=1.0, le=MAX_DAYS_S)
    """Mean time between faults, in seconds (exponentially distributed gaps)."""
    kinds: tuple[Literal["kill_worker", "kill_site", "freeze_site", "partition_link", "kill_coordinator"], ...] = \
        Field(default=("kill_worker", "freeze_site", "partition_link"), min_length=1, max_length=16)
    """What may happen; each fault picks one kind and one target uniformly."""
    duration_s: float = Field(default=5.0, gt=0.0, le=MAX_DAYS_S)
    """How long a freeze or a partition lasts."""
    start_after_s: float = Field(default=5.0, ge=0.0, le=MAX_DAYS_S)
    """No fault before this many seconds of the run (start-up)."""
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    """Seed of the draws: the same seed and topology give the same faults at the same times."""


class FaultSpec(_Node):
    """One scheduled fault (docs/chaos.md). Exactly one of at_round, at_step, at (at_ms) says when."""

    kind: Literal["kill", "freeze", "partition", "degrade", "flap", "slow", "disk_full", "corrupt_checkpoint"]
    """What to do: kill (SIGKILL), freeze (SIGSTOP for `duration`), partition / degrade / flap a link,
    slow a site's compute by `factor`, make checkpoint writes fail as on a full disk, corrupt the newest checkpoint."""
    target: str = Field(default="", max_length=MAX_TEXT)
    """`worker SITE/RANK`, `site SITE`, `coordinator`, `etcd`, `link SITE` (the SITE<->coordinator link), or `checkpoints`."""
    at_round: int | None = Field(default=None, ge=0, le=MAX_ROUNDS)
    """Inject once this many rounds are committed."""
    at_step: int | None = Field(default=None, ge=0, le=MAX_ROUNDS * MAX_STEPS)
    """Inject once the first site reaches this inner step."""
    at_ms: Duration | None = Field(default=None, alias="at", le=MAX_DAYS_S * 1000)
    """Inject this long after the run started, e.g. "20s" (at most 30 days; the value is kept in milliseconds)."""
    duration_ms: Duration | None = Field(default=None, alias="duration", le=MAX_DAYS_S * 1000)
    """How long it lasts before it is undone (freeze, partition, degrade, flap, slow, disk_full)."""
    direction: Literal["both", "up", "down"] = "both"
    """Link faults: `up` = site to coordinator, `down` = coordinator to site."""
    bandwidth_mbps: Bandwidth | None = Field(default=None, alias="bandwidth", le=10_000_000.0)
    latency_ms: Duration | None = Field(default=None, alias="latency", le=MAX_LINK_DELAY_MS)
    jitter_ms: Duration | None = Field(default=None, alias="jitter", le=MAX_LINK_DELAY_MS)
    loss: float | None = Field(default=None, ge=0.0, lt=1.0)
    period_ms: Duration = Field(default=2000.0, alias="period", ge=1.0, le=MAX_DAYS_S * 1000)
    """Flap: the link goes down and up every `period`."""
    factor: float = Field(default=3.0, ge=1.0, le=100.0)
    """Slow: compute takes `factor` times as long."""


class SecurityConfig(_Node):
    """What the coordinator refuses from a site, and the history checker's bounds (docs/security.md)."""

    max_update_norm_ratio: float | None = Field(default=10.0, gt=1.0)
    """An update whose L2 norm exceeds this multiple of the median norm of the recent accepted updates is
    refused (`merge_refused`); null = no norm bound (shape, dtype, length and finiteness are always checked)."""
    max_gradient_norm_ratio: float | None = Field(default=100.0, gt=1.0)
    """The same bound for `algorithm: ddp`, whose updates are one step's raw gradients: they spike far more than
    pseudo-gradients do (on the demo workload a 14× spike over the median at step 18 is ordinary training), so
    their bound is wider; a poisoned 1000× gradient is still refused. null = no bound."""
    norm_history: int = Field(default=8, ge=2, le=10_000)
    """How many recent accepted updates' norms the median of `max_update_norm_ratio` is taken over."""
    max_eval_loss_jump: float = Field(default=4.0, gt=1.0)
    """`geotrain check`: the eval loss may grow at most this many times between evaluated rounds without a recorded cause."""
    tls: bool = True
    """Mutual TLS on every channel (coordinator, rings, etcd the launcher starts), each part identified by its
    certificate. false = plaintext: only for a network you trust; the run says so in its progress and summary.json."""
    certs: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)
    """A certificate directory written by `geotrain certs init` (relative to the topology file's folder);
    absent: the launcher makes a fresh CA and certificates per run in RUN_DIR/certs."""


class EtcdConfig(_Node):
    endpoint: str | None = Field(default=None, max_length=MAX_TEXT)
    """An existing etcd cluster, "host:port". Absent: the launcher starts a local etcd server and stops it at the end."""
    ca_file: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)
    """TLS to an existing etcd: the CA that signed its server certificate (with cert_file and key_file, the
    client certificate geotrain presents). Absent with an endpoint: plaintext to that etcd (a warning)."""
    cert_file: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)
    """TLS to an existing etcd: geotrain's client certificate (PEM)."""
    key_file: str | None = Field(default=None, min_length=1, max_length=MAX_PATH)
    """TLS to an existing etcd: the key of cert_file (PEM)."""


class Topology(_Node):
    name: str = Field(pattern=NAME_RE)
    """Run name; also the etcd key prefix /geotrain/<name>/."""
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT)
    """Seed for model initialisation and data order, in [0, 2^64) (what torch.manual_seed takes)."""
    sites: tuple[SiteConfig, ...] = Field(min_length=1, max_length=MAX_SITES)
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
    security: SecurityConfig = SecurityConfig()
    """Bounds on what the coordinator accepts from sites, and on what `geotrain check` lets pass."""
    faults: tuple[FaultSpec, ...] = Field(default=(), max_length=1000)
    """Faults injected on a schedule while the run goes on (docs/chaos.md)."""
    fault_rate: FaultRateConfig | None = None
    """Faults drawn at random at a given rate for the whole run (goodput under failures); null = none."""

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
                                jitter_ms=pair.jitter_ms, loss=pair.loss, streams=pair.streams)
        return self.links.default

    def digest(self) -> str:
        """sha256 of the canonical JSON of the validated topology (for manifests and resume checks)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
