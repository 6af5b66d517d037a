"""Metrics where people already look: TensorBoard event files and a Prometheus endpoint.

Both exporters read the same events every process appends to ``<run_dir>/metrics.jsonl``
(docs/events.md), so they need no hook inside training:

- :class:`TensorBoardExporter` writes TensorBoard scalars (and a few text markers) under
  ``<run_dir>/tensorboard/``, one writer per run; :func:`export_tensorboard` converts a finished
  run's metrics.jsonl in one go. ``tensorboard --logdir <run_dir>/tensorboard`` shows them.
- :class:`PrometheusExporter` serves ``/metrics`` for the coordinator: rounds, round wait,
  merge seconds, WAN bytes per site and per link, live sites, staleness, failures and
  recoveries. Feed it events with :meth:`PrometheusExporter.observe`, or let it tail a
  metrics.jsonl with :meth:`PrometheusExporter.follow`.

TensorBoard files are written with ``tensorboardX`` (small, pure Python; it does not need the
``tensorboard`` package, which is only wanted to *view* them). :func:`read_scalars` and
:func:`read_texts` read event files back without either package's reader (record framing and
CRC32C are checked), for tests and reports.

TensorBoard tags (x axis in brackets):

========================================  ==============================================
``eval/loss``                             ``eval`` loss [inner step]
``train/loss/<site>``                     ``inner_step`` loss [step]
``train/compute_s/<site>``                ``inner_step`` compute seconds [step]
``train/wan_s/<site>``                    ``inner_step`` WAN seconds [step]
``wan/merge_seconds/<site>``              ``merge`` seconds [round]
``wan/bytes/<site>``                      ``merge`` bytes sent + received [round]
``wan/bytes_sent/<site>``                 ``merge`` bytes_sent [round]
``wan/bytes_received/<site>``             ``merge`` bytes_received [round]
``wan/staleness/<site>``                  ``merge`` staleness, when the event has it [round]
``coordinator/wait_s``                    ``commit`` wait_s [round]
``coordinator/apply_s``                   ``commit`` apply_s [round]
``coordinator/sites``                     sites that contributed to the commit [round]
``coordinator/staleness/<site>``          ``commit`` staleness, when the event has it [round]
``coordinator/rounds_failed``             running count of ``round_failed`` [current round]
``coordinator/merges_refused/<action>``   running count of ``merge_refused`` [current round]
``failures/<what>``                       running count of ``failure`` events [current round]
``recoveries/<what>``                     running count of ``recovery`` events [current round]
``recovery_seconds/<what>``               ``recovery`` seconds [current round]
``faults/injected``                       running count of ``fault_injected`` [current round]
``faults/active``                         faults injected and not yet healed [current round]
``faults`` (text)                         one line per ``fault_injected`` / ``fault_healed``
========================================  ==============================================

"Current round" is the highest ``round`` seen in any event so far (0 before the first).
Wall time of every point is the event's ``t``.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import struct
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from geotrain.events import EventTail, read_events

__all__ = [
    "PrometheusExporter",
    "TensorBoardExporter",
    "export_tensorboard",
    "read_scalars",
    "read_texts",
]

log = logging.getLogger(__name__)

TB_SUBDIR = "tensorboard"
_EVENT_FILE_GLOB = "events.out.tfevents.*"


def _number(value: Any) -> float | None:
    """``value`` as a float, or None where it is missing or not a number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    v = _number(value)
    if v is None or not math.isfinite(v):
        return None
    return int(v)


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------


def _summary_writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("TensorBoard export needs the 'tensorboardX' package: pip install tensorboardX") from exc
    return SummaryWriter


class TensorBoardExporter:
    """Turns geotrain events into TensorBoard scalars under <run_dir>/tensorboard/ (one writer per run).

    Call :meth:`add` with each event (in the order of metrics.jsonl), then :meth:`close`.
    Events of other kinds, and fields that are missing or not numbers, are skipped.
    """

    def __init__(self, run_dir: str | os.PathLike, *, flush_secs: int = 5):
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / TB_SUBDIR
        self.log_dir.mkdir(parents=True, exist_ok=True)
        SummaryWriter = _summary_writer_class()
        # File names carry the second they were opened: a unique suffix keeps two writers opened in
        # the same second (an export right after another) from truncating each other's file.
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=flush_secs, max_queue=100,
                                     filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._lock = threading.Lock()
        self._closed = False
        self._round = 0  # highest round seen: the x of markers that carry no round of their own
        self._failures: Counter[str] = Counter()
        self._recoveries: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._rounds_failed = 0
        self._faults_injected = 0
        self._faults_active: set[tuple[str, str]] = set()
        self._handlers = {
            "eval": self._eval,
            "inner_step": self._inner_step,
            "merge": self._merge,
            "commit": self._commit,
            "round_failed": self._round_failed,
            "merge_refused": self._merge_refused,
            "failure": self._failure,
            "recovery": self._recovery,
            "fault_injected": self._fault_injected,
            "fault_healed": self._fault_healed,
        }

    # -- public -------------------------------------------------------------------------------

    def add(self, event: dict) -> None:
        """Write the scalars of one event (a dict as in metrics.jsonl)."""
        if not isinstance(event, dict):
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("TensorBoardExporter is closed")
            rnd = _int(event.get("round"))
            if rnd is not None and rnd > self._round:
                self._round = rnd
            handler = self._handlers.get(event.get("event"))
            if handler is not None:
                handler(event, _number(event.get("t")))

    def add_all(self, events: Iterable[dict]) -> None:
        for event in events:
            self.add(event)

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()

    def __enter__(self) -> TensorBoardExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------

    def _scalar(self, tag: str, value: Any, step: int | None, walltime: float | None) -> None:
        v = _number(value)
        if v is None or step is None:
            return
        self._writer.add_scalar(tag, v, global_step=step, walltime=walltime)

    @staticmethod
    def _site(event: dict) -> str:
        return str(event.get("site") or event.get("proc", "unknown").split("/")[0])

    # -- one handler per event kind -----------------------------------------------------------

    def _eval(self, e: dict, t: float | None) -> None:
        self._scalar("eval/loss", e.get("loss"), _int(e.get("step")), t)

    def _inner_step(self, e: dict, t: float | None) -> None:
        site, step = self._site(e), _int(e.get("step"))
        self._scalar(f"train/loss/{site}", e.get("loss"), step, t)
        self._scalar(f"train/compute_s/{site}", e.get("compute_s"), step, t)
        self._scalar(f"train/wan_s/{site}", e.get("wan_s"), step, t)

    def _merge(self, e: dict, t: float | None) -> None:
        site, rnd = self._site(e), _int(e.get("round"))
        sent, received = _number(e.get("bytes_sent")), _number(e.get("bytes_received"))
        self._scalar(f"wan/merge_seconds/{site}", e.get("seconds"), rnd, t)
        if sent is not None or received is not None:
            self._scalar(f"wan/bytes/{site}", (sent or 0.0) + (received or 0.0), rnd, t)
        self._scalar(f"wan/bytes_sent/{site}", sent, rnd, t)
        self._scalar(f"wan/bytes_received/{site}", received, rnd, t)
        self._scalar(f"wan/staleness/{site}", e.get("staleness"), rnd, t)

    def _commit(self, e: dict, t: float | None) -> None:
        rnd = _int(e.get("round"))
        self._scalar("coordinator/wait_s", e.get("wait_s"), rnd, t)
        self._scalar("coordinator/apply_s", e.get("apply_s"), rnd, t)
        if isinstance(e.get("sites"), list):
            self._scalar("coordinator/sites", len(e["sites"]), rnd, t)
            staleness = e.get("staleness")  # async-diloco: how many versions behind the contribution was
            for site in e["sites"]:
                value = staleness.get(site) if isinstance(staleness, dict) else staleness
                self._scalar(f"coordinator/staleness/{site}", value, rnd, t)

    def _round_failed(self, e: dict, t: float | None) -> None:
        self._rounds_failed += 1
        self._scalar("coordinator/rounds_failed", self._rounds_failed, self._round, t)

    def _merge_refused(self, e: dict, t: float | None) -> None:
        action = str(e.get("action") or "unknown")
        self._refused[action] += 1
        self._scalar(f"coordinator/merges_refused/{action}", self._refused[action], self._round, t)

    def _failure(self, e: dict, t: float | None) -> None:
        what = str(e.get("what") or "unknown")
        self._failures[what] += 1
        self._scalar(f"failures/{what}", self._failures[what], self._round, t)

    def _recovery(self, e: dict, t: float | None) -> None:
        what = str(e.get("what") or "unknown")
        self._recoveries[what] += 1
        self._scalar(f"recoveries/{what}", self._recoveries[what], self._round, t)
        self._scalar(f"recovery_seconds/{what}", e.get("seconds"), self._round, t)

    def _fault_injected(self, e: dict, t: float | None) -> None:
        fault, target = str(e.get("fault") or "unknown"), str(e.get("target") or "")
        self._faults_injected += 1
        self._faults_active.add((fault, target))
        self._scalar("faults/injected", self._faults_injected, self._round, t)
        self._scalar("faults/active", len(self._faults_active), self._round, t)
        line = f"round {self._round}: injected **{fault}** on `{target}`"
        if e.get("params"):
            line += f" params `{e['params']}`"
        if _number(e.get("duration_s")):
            line += f" for {e['duration_s']} s"
        self._writer.add_text("faults", line, global_step=self._round, walltime=t)

    def _fault_healed(self, e: dict, t: float | None) -> None:
        fault, target = str(e.get("fault") or "unknown"), str(e.get("target") or "")
        self._faults_active.discard((fault, target))
        self._scalar("faults/active", len(self._faults_active), self._round, t)
        self._writer.add_text("faults", f"round {self._round}: healed **{fault}** on `{target}`",
                              global_step=self._round, walltime=t)


def export_tensorboard(run_dir: str | os.PathLike, *, replace: bool = True) -> Path:
    """Convert a finished run's metrics.jsonl into TensorBoard event files; returns the log dir.

    With ``replace`` (the default) event files already in ``<run_dir>/tensorboard/`` are
    removed first, so exporting twice does not show every point twice.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no such file (is {run_dir} a geotrain run directory?)")
    log_dir = run_dir / TB_SUBDIR
    if replace and log_dir.is_dir():
        for old in glob.glob(str(log_dir / _EVENT_FILE_GLOB)):
            os.remove(old)
    exporter = TensorBoardExporter(run_dir)
    try:
        exporter.add_all(read_events(metrics))
    finally:
        exporter.close()
    return log_dir


# -- reading event files back (no tensorboard package needed) ---------------------------------


def _masked_crc32c(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str) -> Iterator[bytes]:
    """The records of one TFRecord file; a torn record at the end (a live writer) is ignored."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,), (header_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if header_crc != _masked_crc32c(header[:8]):
                raise ValueError(f"{path}: corrupt record header at offset {f.tell() - 12}")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if struct.unpack("<I", footer)[0] != _masked_crc32c(data):
                raise ValueError(f"{path}: corrupt record at offset {f.tell() - length - 4}")
            yield data


def _summary_values(log_dir: str | os.PathLike) -> Iterator[tuple[int, float, Any]]:
    from tensorboardX.proto import event_pb2

    for path in sorted(glob.glob(os.path.join(os.fspath(log_dir), _EVENT_FILE_GLOB))):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("summary"):
                for value in event.summary.value:
                    yield event.step, event.wall_time, value


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files of ``log_dir``, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, _, value in _summary_values(log_dir):
        if value.WhichOneof("value") == "simple_value":
            out.setdefault(value.tag, []).append((step, value.simple_value))
    return out


def read_texts(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """{tag: [(step, text), ...]} of every text summary (tags as written, without '/text_summary')."""
    out: dict[str, list[tuple[int, str]]] = {}
    for step, _, value in _summary_values(log_dir):
        if value.metadata.plugin_data.plugin_name == "text" and value.tensor.string_val:
            tag = value.tag.removesuffix("/text_summary")
            out.setdefault(tag, []).append((step, value.tensor.string_val[0].decode("utf-8")))
    return out


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def _prometheus():
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the Prometheus endpoint needs the 'prometheus-client' package: "
                          "pip install prometheus-client") from exc
    return prometheus_client


class _LinkBytesCollector:
    """geotrain_link_bytes_total{link,direction}: totals the link proxies report (set, not added)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], float] = {}

    def set(self, link: str, forward: float, backward: float) -> None:
        with self._lock:
            self._bytes[(link, "forward")] = float(forward)
            self._bytes[(link, "backward")] = float(backward)

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        with self._lock:
            for (link, direction), value in sorted(self._bytes.items()):
                family.add_metric([link, direction], value)
        yield family

    @staticmethod
    def _family():
        from prometheus_client.core import CounterMetricFamily

        return CounterMetricFamily("geotrain_link_bytes",
                                   "Bytes carried by each emulated WAN link; forward is site -> coordinator.",
                                   labels=["link", "direction"])


# Round waits span a LAN round (tens of ms) to a slow WAN round with a straggler (minutes).
ROUND_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class PrometheusExporter:
    """Serves /metrics on a port (0 = ephemeral) for the coordinator.

    Every exporter has its own ``CollectorRegistry`` (``self.registry``), so several can live in
    one process. Metrics (label names in braces):

    - ``geotrain_rounds_committed_total``: ``commit`` events (one per fragment in streaming-diloco);
    - ``geotrain_round``, ``geotrain_global_version``: round and version of the latest commit;
    - ``geotrain_round_wait_seconds``: histogram of ``commit`` ``wait_s``;
    - ``geotrain_live_sites``: sites taking part: those of the latest commit (diloco,
      streaming-diloco, ddp); with asynchronous commits (one site each, marked by a ``weight``
      field) the distinct sites of the last N commits, N = the run's sites. A ``failure`` of
      ``what=site`` removes its target until it contributes or recovers again; ``site_joined``
      and a ``recovery`` of a site add it;
    - ``geotrain_merge_seconds{site}``: seconds of the site's latest ``merge``;
    - ``geotrain_wan_bytes_total{site,direction}``: merge bytes, ``direction`` = sent | received;
    - ``geotrain_link_bytes_total{link,direction}``: set by :meth:`set_link_bytes`;
    - ``geotrain_staleness{site}``: the ``staleness`` of the latest commit/merge naming the site
      that carries one (a number, or on a commit a {site: n} mapping); 0 until one does (an event
      without the field never overwrites a value: async-diloco puts it on the commit only);
    - ``geotrain_eval_loss``: loss of the latest ``eval``;
    - ``geotrain_failures_total{what}``, ``geotrain_recoveries_total{what}``: events, as in summary.json
      (one death may be reported by several processes: the launcher and each site leader),
      ``geotrain_recovery_seconds{what}`` (the latest recovery's seconds);
    - ``geotrain_rounds_failed_total``, ``geotrain_merges_refused_total{action}``,
      ``geotrain_faults_injected_total{fault}``.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        pc = _prometheus()
        self.host = host
        self.port = int(port)
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.rounds_committed = pc.Counter("geotrain_rounds_committed", "Rounds committed by the coordinator.",
                                           registry=r)
        self.round = pc.Gauge("geotrain_round", "Round of the latest commit.", registry=r)
        self.global_version = pc.Gauge("geotrain_global_version", "Global model version after the latest commit.",
                                       registry=r)
        self.round_wait = pc.Histogram("geotrain_round_wait_seconds",
                                       "Seconds the coordinator waited from the first contribution to the commit.",
                                       buckets=ROUND_WAIT_BUCKETS, registry=r)
        self.live_sites = pc.Gauge("geotrain_live_sites", "Sites taking part in the latest rounds.", registry=r)
        self.merge_seconds = pc.Gauge("geotrain_merge_seconds", "Seconds of the site's latest merge (WAN exchange).",
                                      ["site"], registry=r)
        self.wan_bytes = pc.Counter("geotrain_wan_bytes", "Bytes a site exchanged with the coordinator in merges.",
                                    ["site", "direction"], registry=r)
        self.staleness = pc.Gauge("geotrain_staleness", "Global versions the site's latest contribution was behind.",
                                  ["site"], registry=r)
        self.eval_loss = pc.Gauge("geotrain_eval_loss", "Loss of the latest evaluation.", registry=r)
        self.failures = pc.Counter("geotrain_failures", "Failures detected, by what failed.", ["what"], registry=r)
        self.recoveries = pc.Counter("geotrain_recoveries", "Recoveries completed, by what recovered.", ["what"],
                                     registry=r)
        self.recovery_seconds = pc.Gauge("geotrain_recovery_seconds", "Seconds the latest recovery took.", ["what"],
                                         registry=r)
        self.rounds_failed = pc.Counter("geotrain_rounds_failed", "Rounds the coordinator gave up on.", registry=r)
        self.merges_refused = pc.Counter("geotrain_merges_refused", "Contributions the coordinator refused.",
                                         ["action"], registry=r)
        self.faults_injected = pc.Counter("geotrain_faults_injected", "Faults injected by geotrain chaos.", ["fault"],
                                          registry=r)
        self._links = _LinkBytesCollector()
        r.register(self._links)
        self._state = threading.Lock()  # observe() may run in the follower and in the caller at once
        self._run_sites: set[str] = set()  # every site of the run we heard of
        self._live: set[str] = set()
        self._async_recent: deque[str] = deque()  # contributors of the latest asynchronous commits
        self._stale_sites: set[str] = set()  # sites whose staleness series exists
        self._server = None
        self._thread: threading.Thread | None = None
        self._follow_stop = threading.Event()
        self._follow_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- serving ------------------------------------------------------------------------------

    def start(self) -> int:
        """Serve /metrics in a daemon thread; returns the port (the real one where port was 0)."""
        with self._lock:
            if self._server is None:
                pc = _prometheus()
                self._server, self._thread = pc.start_http_server(self.port, addr=self.host, registry=self.registry)
                self.port = self._server.server_port
            return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop following and serving, and free the port; idempotent."""
        self._follow_stop.set()
        if self._follow_thread is not None:
            self._follow_thread.join(timeout=10)
            self._follow_thread = None
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> PrometheusExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- feeding ------------------------------------------------------------------------------

    def observe(self, event: dict) -> None:
        """Update the metrics from one event (a dict as in metrics.jsonl); other kinds are ignored."""
        if not isinstance(event, dict):
            return
        with self._state:
            self._observe(event)

    def _observe(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "commit":
            self._commit(event)
        elif kind == "merge":
            self._merge(event)
        elif kind in ("run_started", "coordinator_started"):
            if isinstance(event.get("sites"), list):
                self._run_sites.update(str(s) for s in event["sites"])
        elif kind == "site_joined" and event.get("site"):
            self._run_sites.add(str(event["site"]))
            self._set_live(self._live | {str(event["site"])})
        elif kind == "eval":
            loss = _number(event.get("loss"))
            if loss is not None:
                self.eval_loss.set(loss)
        elif kind == "failure":
            what = str(event.get("what") or "unknown")
            self.failures.labels(what=what).inc()
            if what == "site" and event.get("target"):
                target = str(event["target"])
                self._async_recent = deque(s for s in self._async_recent if s != target)
                self._set_live(self._live - {target})
        elif kind == "recovery":
            what = str(event.get("what") or "unknown")
            self.recoveries.labels(what=what).inc()
            if what == "site" and event.get("target"):
                self._set_live(self._live | {str(event["target"])})
            seconds = _number(event.get("seconds"))
            if seconds is not None:
                self.recovery_seconds.labels(what=what).set(seconds)
        elif kind == "round_failed":
            self.rounds_failed.inc()
        elif kind == "merge_refused":
            self.merges_refused.labels(action=str(event.get("action") or "unknown")).inc()
        elif kind == "fault_injected":
            self.faults_injected.labels(fault=str(event.get("fault") or "unknown")).inc()

    def observe_all(self, events: Iterable[dict]) -> None:
        for event in events:
            self.observe(event)

    def set_link_bytes(self, link: str, forward: int, backward: int) -> None:
        """Record the byte totals a WAN link proxy reports (LinkProxy.stats(), links/*.json)."""
        self._links.set(str(link), forward, backward)

    def follow(self, metrics_path: str | os.PathLike, interval_s: float = 1.0) -> None:
        """Observe the events appended to ``metrics_path`` (from its start) in a daemon thread until stop()."""
        if self._follow_thread is not None:
            raise RuntimeError("already following a metrics file")
        tail = EventTail(metrics_path)
        self._follow_stop.clear()

        def loop() -> None:
            while True:
                stopping = self._follow_stop.is_set()  # one more read after stop(): what came before it
                for event in tail.read():
                    try:
                        self.observe(event)
                    except Exception:  # a metrics endpoint must not die of one odd event
                        log.exception("prometheus exporter: cannot observe %r", event)
                if stopping:
                    return
                self._follow_stop.wait(interval_s)

        self._follow_thread = threading.Thread(target=loop, name="geotrain-prometheus-follow", daemon=True)
        self._follow_thread.start()

    # -- per kind -----------------------------------------------------------------------------

    def _commit(self, e: dict) -> None:
        self.rounds_committed.inc()
        rnd, version, wait_s = _number(e.get("round")), _number(e.get("version")), _number(e.get("wait_s"))
        if rnd is not None:
            self.round.set(rnd)
        if version is not None:
            self.global_version.set(version)
        if wait_s is not None:
            self.round_wait.observe(wait_s)
        sites = e.get("sites")
        if isinstance(sites, list):
            sites = [str(s) for s in sites]
            self._run_sites.update(sites)
            if "weight" in e:  # asynchronous: one contribution per commit
                self._async_recent.extend(sites)
                while len(self._async_recent) > max(1, len(self._run_sites)):
                    self._async_recent.popleft()
                self._set_live(set(self._async_recent))
            else:
                self._async_recent.clear()
                self._set_live(set(sites))
            staleness = e.get("staleness")
            for site in sites:
                self._set_staleness(site, staleness.get(site) if isinstance(staleness, dict) else staleness)

    def _merge(self, e: dict) -> None:
        site = str(e.get("site") or str(e.get("proc", "unknown")).split("/")[0])
        seconds = _number(e.get("seconds"))
        if seconds is not None:
            self.merge_seconds.labels(site=site).set(seconds)
        for key, direction in (("bytes_sent", "sent"), ("bytes_received", "received")):
            n = _number(e.get(key))
            if n is not None and n >= 0:
                self.wan_bytes.labels(site=site, direction=direction).inc(n)
        self._set_staleness(site, e.get("staleness"))

    def _set_staleness(self, site: str, value: Any) -> None:
        v = _number(value)
        if v is not None:
            self.staleness.labels(site=site).set(v)
            self._stale_sites.add(site)
        elif site not in self._stale_sites:  # absent: 0, but never over a value an event gave
            self.staleness.labels(site=site).set(0.0)
            self._stale_sites.add(site)

    def _set_live(self, live: set[str]) -> None:
        self._live = live
        self.live_sites.set(len(live))
