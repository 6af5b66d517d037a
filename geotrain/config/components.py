"""What each component is told, typed and frozen: a worker's settings and a WAN link emulator's.

:mod:`geotrain.config.derive` builds them from the Topology, once; components never read the
Topology for settings. (The coordinator's own config class lives with its engine in
``geotrain.orchestrator``; ``derive.coordinator_config`` builds it the same way.)

A worker gets its :class:`WorkerConfig` as one JSON document, ``RUN_DIR/worker-config.<site>.json``,
named by ``GEOTRAIN_WORKER_CONFIG``; its environment carries only who it is
(:mod:`geotrain.worker.context`). A file rather than the JSON itself in the variable: it stays in the
run directory beside ``topology.json`` as a record of what the workers were told, and a bad one is
reported with its path. The document is validated on read: an unknown key or a value of the wrong
type is a :class:`~geotrain.errors.GeotrainError` naming the file and the key.

A link emulator is started with the command-line arguments of its :class:`LinkConfig`
(``geotrain link``, :mod:`geotrain.wan.link`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from geotrain.config.safeyaml import MAX_BYTES, quote
from geotrain.config.schema import OuterOptimizerConfig
from geotrain.errors import GeotrainError


class WorkerConfig(BaseModel):
    """Everything a worker is told that is not who it is. The defaults are those of a worker built by
    hand (a SiteContext in a test, a script run without a document): one plain DiLoCo round, no checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    algorithm: Literal["diloco", "ddp", "async-diloco", "streaming-diloco"] = "diloco"
    """training.algorithm."""
    inner_steps: int = 10
    """H, training.inner_steps."""
    rounds: int = 1
    """training.rounds."""
    checkpoint_dir: Path | None = None
    """Where this worker writes its checkpoint parts; None = no worker checkpoints."""
    checkpoint_every: int = 0
    """checkpoint.every_rounds (0 = never)."""
    checkpoint_keep: int = 2
    """checkpoint.keep: the parts each worker keeps."""
    topology_sha256: str = ""
    """The topology's digest, written into checkpoint manifests."""
    retry_deadline_s: float = 120.0
    """recovery.retry_deadline_s: how long the leader retries an unreachable coordinator."""
    rpc_timeout_s: float = 300.0
    """Deadline of one Merge/GetModel call (derive.rpc_timeout_s)."""
    codec: Literal["fp32", "fp16", "bf16", "int8", "int4", "topk"] = "fp32"
    """training.compression.codec: what a merge sends."""
    density: float = 0.02
    """training.compression.density (topk)."""
    bits: int = 2
    """training.compression.bits (topk)."""
    error_feedback_decay: float = 1.0
    """training.compression.error_feedback_decay."""
    block: int = 256
    """training.compression.block: elements per scale block (int8/int4)."""
    error_feedback: bool = True
    """training.compression.error_feedback."""
    fragments: int = 1
    """Streaming DiLoCo's P, training.streaming.fragments."""
    overlap_steps: int = 0
    """τ, the inner steps that overlap a merge's exchange (derive.overlap_steps)."""
    alpha: float = 0.5
    """Streaming DiLoCo's mixing weight of the local fragment, training.streaming.alpha."""
    num_sites: int = 1
    """Sites in the run (the world of a ring all-reduce)."""
    ring_uploader: str = ""
    """The site that uploads a ring's mean to the coordinator (geotrain.wan.merge_plan.uploader)."""
    outer_optimizer: dict[str, Any] | None = None
    """training.outer_optimizer as a mapping, mirrored by ring leaders; None = its defaults."""
    certs_dir: Path | None = None
    """The run's certificate directory (geotrain.security.pki); a site's processes use ``site.<name>`` from it.
    None = plaintext (security.tls: false)."""
    stream_window_bytes: int = Field(default=64 << 20, ge=1 << 16, le=1 << 30)
    """The coordinator channel's HTTP/2 stream window (derive.stream_window_bytes: from the topology's links)."""

    @field_validator("outer_optimizer")
    @classmethod
    def _an_outer_optimizer(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            OuterOptimizerConfig.model_validate(value)  # unknown keys, wrong types: refused here, not mid-run
        return value

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> "WorkerConfig":
        """The document at ``path``, validated strictly (no "10" for 10). GeotrainError names the file and key."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                text = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise GeotrainError(f"{path}: cannot read the worker config: {exc.strerror or exc}") from None
        if len(text) > MAX_BYTES:
            raise GeotrainError(f"{path}: the worker config is larger than {MAX_BYTES // 1024} KiB")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GeotrainError(f"{path}: the worker config is not valid JSON: {exc}") from None
        except (RecursionError, ValueError) as exc:  # nested too deeply, not UTF-8, an integer of over 4,300 digits
            raise GeotrainError(f"{path}: the worker config is not valid JSON: {str(exc)[:80]}") from None
        if not isinstance(raw, dict):
            raise GeotrainError(f"{path}: the worker config must be a JSON object, got {type(raw).__name__}")
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top level)"
            if first["type"] == "extra_forbidden":
                raise GeotrainError(f"{path}: {key}: unknown key (known keys: {', '.join(cls.model_fields)})") from None
            raise GeotrainError(f"{path}: {key}: {first['msg'].rstrip('.').lower()}, got {quote(first.get('input'))}") from None


@dataclass(frozen=True)
class LinkConfig:
    """What one WAN link emulator process is started with (``geotrain link``); its addresses, stats
    and control files are the launcher's to choose, given to :meth:`args`."""

    name: str
    """The link's label in its stats and logs, e.g. "us-east<->hub" or "all:a->b" (ring "all", edge a to b)."""
    bandwidth_mbps: float
    latency_ms: float
    jitter_ms: float
    loss: float
    seed: int
    """The topology's seed: jitter and loss draws are reproducible."""
    streams: int = 1
    """TCP connections a transfer is striped over inside the emulated WAN (``links.*.streams``)."""

    def args(self, *, listen: str, target: str, stats_file: str, control_file: str | None = None) -> list[str]:
        """The arguments after ``geotrain link``."""
        out = ["--name", self.name, "--listen", listen, "--target", target,
               "--bandwidth", f"{_exact(self.bandwidth_mbps)}mbit", "--latency", f"{_exact(self.latency_ms)}ms",
               "--jitter", f"{_exact(self.jitter_ms)}ms", "--loss", _exact(self.loss), "--seed", str(self.seed),
               "--stats-file", stats_file]
        if control_file is not None:
            out += ["--control-file", control_file]
        if self.streams > 1:
            out += ["--streams", str(self.streams)]
        return out


def _exact(x: float) -> str:
    """The shortest text that reads back as exactly ``x``: "100" for 100.0, full precision otherwise."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)
