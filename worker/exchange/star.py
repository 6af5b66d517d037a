"""The star exchange: every site leader sends its update to the coordinator and waits for the commit.

The leader's whole conversation with the coordinator goes through :class:`StarExchange`: joining
(:meth:`join`), fetching a version (:meth:`fetch`), the merge of one round (:meth:`exchange`) and
the DDP baseline's gradient merge (:meth:`merge_gradients`). A failed Merge is handled by the pure
policy of geotrain.worker.retry, from the outcome the coordinator named (geotrain.wire.outcomes):

- ROUND_FAILED (too few sites reported in time; the round reopens): a ``round_retry`` event, send again;
- UNAVAILABLE / FENCED (no coordinator, or a new one taking over): one ``failure`` event, then the
  same update again with backoff until ``recovery.retry_deadline_s``; a ``recovery`` event once answered;
- DUPLICATE (the coordinator has this update, its answer was lost): fetch the commit;
- STALE / FUTURE / NOT_MEMBER / INVALID_UPDATE (the update cannot count; INVALID_UPDATE: the
  coordinator refused its values, this site failed the round): a ``merge_discarded`` event, rejoin and
  fetch the current model. The local progress of the round is discarded, never applied late;
- anything else: raised.

Updates are compressed with the site's codec and per-fragment error feedback
(geotrain.wire.compress.UpdateEncoder); what error feedback held for a discarded update is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from geotrain.errors import GeotrainError
from geotrain.events import EventLog
from geotrain.wire.compress import UpdateEncoder
from geotrain.wire.outcomes import Outcome, outcome_of
from geotrain.wire.transport import Payload
from geotrain.worker.exchange.base import Exchanged
from geotrain.worker.retry import FetchCommitted, GiveUp, Rejoin, Retry, next_action

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joined:
    """What a leader learns when its site joins: the global model to start from and where the run is."""

    version: int
    """The global version of ``flat``."""
    site_merges: int
    """This site's merges so far (async-diloco: the coordinator counts each site's own)."""
    fragment_rounds: tuple[int, ...]
    """streaming-diloco: each fragment's round (empty otherwise)."""
    flat: torch.Tensor
    """The global parameters."""


class StarExchange:
    """A site leader's merges through the coordinator (``client``: a CoordinatorClient)."""

    def __init__(self, client, *, site: str, workers: int, codec: str, block: int, error_feedback: bool,
                 retry_deadline_s: float, events: EventLog, density: float = 0.02, bits: int = 2,
                 error_feedback_decay: float = 1.0):
        self.client = client
        self.site = site
        self.workers = workers
        self.retry_deadline_s = retry_deadline_s
        self.events = events
        self.encoder = UpdateEncoder(codec, block, error_feedback, density=density, bits=bits,
                                     decay=error_feedback_decay)
        self.ring_round = 0
        """The round at which the coordinator last told this site to (re)build its rings (0: none)."""
        self.model_spec = ""
        """This site's model fingerprint, sent at every Join (geotrain.orchestrator.fingerprint; "": unchecked)."""

    # ---- joining and fetching ----
    def join(self, initial: torch.Tensor) -> Joined:
        """Join the run and fetch the global model to start from (providing ``initial`` if there is none)."""
        t0 = time.perf_counter()
        resp = self.client.join(self.workers, model_spec=self.model_spec)
        t1 = time.perf_counter()
        if not resp.has_model:
            self.client.init_model(initial)
        payload = self.client.get_model(min_version=resp.start_version)
        self.ring_round = payload.ring_round  # a restarted leader: the others may be rebuilding rings now
        self.events.emit("site_ready", site=self.site, version=payload.version, round=resp.round, epoch=resp.epoch,
                         join_rpc_s=round(t1 - t0, 6), model_fetch_s=round(time.perf_counter() - t1, 6))
        return Joined(payload.version, resp.site_merges, tuple(resp.fragment_rounds), payload.tensor())

    def fetch(self, min_version: int, what: str = "params") -> Payload:
        """The global parameters (or the outer momentum) once ``min_version`` is committed."""
        return self.client.get_model(min_version=min_version, what=what)

    def traffic(self) -> tuple[int, int]:
        return self.client.bytes_sent, self.client.bytes_received

    def begin(self, round: int) -> None:
        """Nothing to prepare: the coordinator is the hub."""

    def close(self) -> None:
        self.client.close()

    # ---- merges ----
    def merge_gradients(self, flat: torch.Tensor, step: int) -> torch.Tensor:
        """The DDP baseline: this site's mean gradient of ``step`` out, every site's mean in (no retries:
        a lost step cannot be redone)."""
        return self.client.merge(flat, round=step, kind="grad").tensor()

    def exchange(self, update: torch.Tensor, base: torch.Tensor, *, round: int, base_version: int,
                 fragment: int = 0, part: slice = slice(None), fetch_after: int = 0) -> Exchanged:
        """Send the update and get the committed global parameters, surviving a coordinator restart
        (the module docstring has the policy)."""
        encoded = self.encoder.encode(update, fragment)
        deadline = time.monotonic() + self.retry_deadline_s
        attempt, failed_at = 0, None
        while True:
            try:
                p = self.client.merge(None if encoded is not None else update, round=round, kind="pseudo_grad",
                                      version=base_version, encoded=encoded, fragment=fragment)
                result = Exchanged(base + p.tensor() if p.kind == "delta" else p.tensor(), p.version,
                                   payload_bytes=len(encoded.payload) if encoded is not None else update.numel() * 4,
                                   wire_bytes=p.wire_bytes)
                self.ring_round = p.ring_round
                break
            except GeotrainError as exc:
                outcome = outcome_of(exc)
                if outcome == Outcome.ROUND_FAILED:
                    self.events.emit("round_retry", site=self.site, round=round, reason=str(exc))
                elif outcome in (Outcome.UNAVAILABLE, Outcome.FENCED) and failed_at is None:
                    failed_at = time.time()
                    self.events.emit("failure", what="coordinator", target="coordinator", happened_t=failed_at,
                                     detected_t=failed_at, reason=str(exc), site=self.site)
                action = next_action(outcome, attempt, time.monotonic(), deadline)
                if isinstance(action, Retry):
                    time.sleep(action.delay_s)
                    attempt += 1
                    continue
                if isinstance(action, GiveUp):
                    raise
                result = self._recover(action, exc, round=round, fragment=fragment, part=part, fetch_after=fetch_after)
                break
        if failed_at is not None:
            now = time.time()
            self.events.emit("recovery", what="coordinator", target="coordinator", failure_t=failed_at,
                             recovered_t=now, seconds=_seconds(now - failed_at), site=self.site, rounds_lost=0)
        return result

    def _recover(self, action: FetchCommitted | Rejoin, exc: GeotrainError, *, round: int, fragment: int,
                 part: slice, fetch_after: int) -> Exchanged:
        """The update was refused: take the committed model instead (see the module docstring)."""
        resumes_at = None
        if isinstance(action, FetchCommitted):
            p = self.client.get_model(min_version=fetch_after + 1)
        else:
            self.events.emit("merge_discarded", site=self.site, round=round, reason=str(exc))
            resp = self.client.join(self.workers, model_spec=self.model_spec)
            p = self.client.get_model(min_version=resp.start_version)
            if resp.fragment_rounds:  # streaming: the round this fragment goes on from
                resumes_at = int(resp.fragment_rounds[fragment])
        self.encoder.forget(fragment)  # what error feedback held belonged to the discarded update
        self.ring_round = p.ring_round
        return Exchanged(p.tensor()[part].clone(), p.version, resumes_at=resumes_at)


def _seconds(seconds: float) -> float:
    """Seconds as the recovery event records them (milliseconds; ``round`` is a parameter name above)."""
    return round(seconds, 3)
