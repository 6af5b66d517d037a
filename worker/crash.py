"""What a worker that dies of an exception leaves behind: a ``worker_crashed`` event.

:func:`install` (called by ``geotrain.init()``) chains a ``sys.excepthook`` that, before Python prints
the traceback to the worker's log as usual, appends one event to the run's metrics.jsonl::

    {"event": "worker_crashed", "site", "rank", "error": "ZeroDivisionError", "message", "location":
     "train.py:41 in loss_fn", "traceback": "<the last 4000 characters>", "ours": false, "outcome": null,
     "round", "step"}

``ours`` is true for geotrain's own errors (a coordinator out of reach, a corrupt transfer: faults of the
infrastructure, which a restart may cure); false for anything the script raised. ``outcome``: the coordinator's
refusal the error carries (geotrain.wire.outcomes), if any: a PERMANENT one is not restarted either. ``round``/``step`` are
where the SDK last was (:func:`note_position`). The launcher decides with it (geotrain.run.supervise.crash_loop):
the same script error twice in a row at one site is the user's bug, and fails the run at once with this
traceback instead of restarting the site until the restart budget is spent.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from geotrain.errors import GeotrainError
from geotrain.wire.outcomes import outcome_of

_position: dict[str, int | None] = {"round": None, "step": None}
_installed = False
MAX_TRACEBACK = 4000
MAX_MESSAGE = 500


def note_position(round: int, step: int) -> None:
    """Where the SDK is (DiLoCo.step calls it): recorded with a crash."""
    _position["round"], _position["step"] = round, step


def _location(tb) -> str:
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def crash_record(exc: BaseException, site: str, rank: int) -> dict:
    """The fields of a ``worker_crashed`` event for ``exc`` (pure: no I/O)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    outcome = outcome_of(exc)
    message = re.sub(r"0x[0-9a-fA-F]+", "0x…", str(exc))[:MAX_MESSAGE]
    return {"site": site, "rank": rank, "error": type(exc).__name__, "message": message,
            "location": _location(exc.__traceback__), "traceback": text[-MAX_TRACEBACK:],
            "ours": isinstance(exc, GeotrainError), "outcome": outcome.name if outcome is not None else None,
            **_position}


def install(ctx) -> None:
    """Record this worker's uncaught exception as an event (once per process; a no-op without a run dir)."""
    global _installed
    if _installed or ctx.run_dir is None:
        return
    _installed = True
    previous = sys.excepthook

    def hook(etype, exc, tb):
        if not issubclass(etype, (KeyboardInterrupt, SystemExit)):
            try:
                from geotrain.events import EventLog

                log = EventLog(ctx.run_dir / "metrics.jsonl", ctx.proc)
                log.emit("worker_crashed", **crash_record(exc.with_traceback(tb), ctx.site, ctx.rank))
                log.close()
            except Exception:  # noqa: BLE001 - never hide the original error behind the recorder's
                pass
        previous(etype, exc, tb)

    sys.excepthook = hook
