"""TensorBoard event files from a run's events (geotrain.analysis.exporters).

:class:`TensorBoardExporter` writes scalars (and a few text markers) under
``<run_dir>/tensorboard/``, one writer per run; :func:`export_tensorboard` converts a finished
run's metrics.jsonl in one go. ``tensorboard --logdir <run_dir>/tensorboard`` shows them.
Files are written with ``tensorboardX`` (small, pure Python); :func:`read_scalars` and
:func:`read_texts` read them back without either package's reader (record framing and CRC32C
are checked), for tests and reports.

TensorBoard tags (x axis in brackets):

========================================  ==============================================
``eval/loss``                             ``eval`` loss [inner step]
``eval/<metric>/<site>``                  a script's named ``eval`` (DiLoCo.log_eval) [inner step]
``metric/<name>/<site>[/<rank>]``         a script's ``metric`` scalars (DiLoCo.log) [step]
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
import math
import os
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from geotrain.events import number, read_events

TB_SUBDIR = "tensorboard"
_EVENT_FILE_GLOB = "events.out.tfevents.*"


def _int(value: Any) -> int | None:
    v = number(value)
    if v is None or not math.isfinite(v):
        return None
    return int(v)


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
            "metric": self._metric,
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
                handler(event, number(event.get("t")))

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
        v = number(value)
        if v is None or step is None:
            return
        self._writer.add_scalar(tag, v, global_step=step, walltime=walltime)

    @staticmethod
    def _site(event: dict) -> str:
        return str(event.get("site") or event.get("proc", "unknown").split("/")[0])

    # -- one handler per event kind -----------------------------------------------------------

    def _eval(self, e: dict, t: float | None) -> None:
        if e.get("metric"):  # a script's named evaluation (DiLoCo.log_eval), per site
            self._scalar(f"eval/{e['metric']}/{self._site(e)}", e.get("loss"), _int(e.get("step")), t)
        else:
            self._scalar("eval/loss", e.get("loss"), _int(e.get("step")), t)

    def _metric(self, e: dict, t: float | None) -> None:
        from geotrain.worker.metrics import scalars_of

        site, step = self._site(e), _int(e.get("step"))
        rank = f"/{e['rank']}" if e.get("rank") else ""
        for name, value in scalars_of(e).items():
            self._scalar(f"metric/{name}/{site}{rank}", value, step, t)

    def _inner_step(self, e: dict, t: float | None) -> None:
        site, step = self._site(e), _int(e.get("step"))
        self._scalar(f"train/loss/{site}", e.get("loss"), step, t)
        self._scalar(f"train/compute_s/{site}", e.get("compute_s"), step, t)
        self._scalar(f"train/wan_s/{site}", e.get("wan_s"), step, t)

    def _merge(self, e: dict, t: float | None) -> None:
        site, rnd = self._site(e), _int(e.get("round"))
        sent, received = number(e.get("bytes_sent")), number(e.get("bytes_received"))
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
        if number(e.get("duration_s")):
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
