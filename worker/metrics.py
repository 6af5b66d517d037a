"""What a user's script reports about its own training: scalars and evaluations (``DiLoCo.log``,
``DiLoCo.log_eval``), checked here and written as events that progress, summary.json, TensorBoard,
Prometheus and ``geotrain report`` all read.

Events (one line of RUN_DIR/metrics.jsonl each):

* ``metric``: ``{"site", "rank", "round", "step", <name>: value, ...}``, one per ``diloco.log(...)``
  call, from every rank that calls it. Every field that is not one of :data:`RESERVED` is a scalar.
* ``eval``: ``{"site", "round", "step", "loss": value, "metric": name, <name>: value ...}``, from the
  site leader only (every rank of a site holds the same model after a merge). ``metric`` is the
  evaluation's own name (``mse``, ``accuracy``); the built-in trainer's evals have none and mean
  cross-entropy in nats per byte.

Names are identifiers (letters, digits, ``_ . / -``, at most 64 characters, not a reserved field);
values are finite or non-finite numbers (a NaN eval fails the run: geotrain.run.summary), or 0-d
tensors. At most :data:`MAX_SCALARS` per call; what geotrain cannot know is never invented.
"""

from __future__ import annotations

import math
import re
from typing import Any

from geotrain.errors import GeotrainError

RESERVED = frozenset({"t", "event", "proc", "site", "rank", "round", "step", "metric", "loss", "seconds",
                      "version", "final", "rejoin"})
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,63}$")
MAX_SCALARS = 32


METRIC_FIELDS = frozenset({"t", "event", "proc", "site", "rank", "round", "step"})
"""The fields of a ``metric`` event that are not its scalars."""


def scalars_of(event: dict) -> dict[str, Any]:
    """The scalars of a ``metric`` event (every field that is not one of :data:`METRIC_FIELDS`)."""
    return {k: v for k, v in event.items() if k not in METRIC_FIELDS}


def scalar(where: str, name: str, value: Any) -> float:
    """``value`` as a float, or a clear error naming ``name``."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (RuntimeError, ValueError) as exc:  # a tensor of more than one element
            raise GeotrainError(f"{where}: {name}: expected a number or a one-element tensor ({exc})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GeotrainError(f"{where}: {name}: expected a number, got {type(value).__name__}")
    return float(value)


def check_scalars(where: str, scalars: dict[str, Any]) -> dict[str, float]:
    """The scalars of one call, checked: names, count, values."""
    if not scalars:
        raise GeotrainError(f"{where}: give at least one scalar, e.g. log(accuracy=0.93)")
    if len(scalars) > MAX_SCALARS:
        raise GeotrainError(f"{where}: at most {MAX_SCALARS} scalars per call, got {len(scalars)}")
    out = {}
    for name, value in scalars.items():
        if name in RESERVED or not NAME_RE.match(name):
            raise GeotrainError(f"{where}: {name[:80]!r} cannot be a scalar's name (letters, digits, _ . / -, at most "
                                f"64 characters, none of {', '.join(sorted(RESERVED))})")
        out[name] = scalar(where, name, value)
    return out


def eval_fields(name: str, value: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The fields of an ``eval`` event for an evaluation called ``name``."""
    if not NAME_RE.match(name):
        raise GeotrainError(f"log_eval: metric={name[:80]!r}: expected a name like 'mse'")
    fields: dict[str, Any] = {"loss": scalar("log_eval", name, value), "metric": name}
    if extra:
        fields.update(check_scalars("log_eval", extra))
    return fields


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
