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

The TensorBoard tags and their x axes are listed in geotrain.analysis.tensorboard_export; the
Prometheus metrics in geotrain.analysis.prometheus_export.
"""


from geotrain.analysis.prometheus_export import PrometheusExporter
from geotrain.analysis.tensorboard_export import (TB_SUBDIR, TensorBoardExporter, _summary_values, export_tensorboard,
                                                  read_scalars, read_texts)

__all__ = [
    "PrometheusExporter",
    "TensorBoardExporter",
    "export_tensorboard",
    "read_scalars",
    "read_texts",
]
__all__ += ["TB_SUBDIR", "_summary_values"]  # for tests and tools: importable from here, as before
