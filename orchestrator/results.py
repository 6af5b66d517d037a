"""What the coordinator engine takes in and gives back, as values.

An update comes in as an :class:`Update` (the servicer decoded it from the stream). A call the
engine answers gives a value (:class:`CommitResult` for a Merge, :class:`ModelAnswer`,
:class:`JoinAnswer`, :class:`StatusAnswer`); a call it refuses raises :class:`Refused`, which
names the typed outcome (geotrain.wire.outcomes.Outcome) and a message for people. The servicer
turns a Refused into a gRPC status and a ``Refusal`` in the trailing metadata; nothing decides on
the message text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geotrain.wire.compress import Encoded
from geotrain.wire.outcomes import Outcome

RING_KINDS = ("ring_mean", "ring_ack")
"""Update kinds of a ring round: the uploader's mean, and the other leaders' acknowledgement."""


class Refused(Exception):
    """The engine refuses a call. ``message`` is for people (events, error messages); code decides on
    ``outcome``. ``round`` -1: the refusal concerns no round."""

    def __init__(self, outcome: Outcome, message: str, *, round: int = -1, site: str = "") -> None:
        super().__init__(message)
        self.outcome = Outcome(outcome)
        self.message = message
        self.round = round
        self.site = site


@dataclass(frozen=True)
class Update:
    """One site's update, decoded from its Merge stream."""

    site: str
    round: int
    """The round it is for (async-diloco: the site's own merge count)."""
    kind: str
    """pseudo_grad | grad | ring_mean | ring_ack"""
    version: int
    """The global version it is based on."""
    values: torch.Tensor | None
    """float32 values (decoded if it travelled compressed); None for a ring_ack."""
    fragment: int = 0
    claimed_crc32: int = 0
    """Ring rounds: the CRC32 of the mean this site computed in the ring."""
    declared_numel: int = -1
    """How many values the stream's header declared (-1: not from a stream; the values' own count)."""

    @property
    def ring(self) -> bool:
        return self.kind in RING_KINDS


@dataclass(frozen=True)
class CommitResult:
    """What every Merge of a committed round gets back (async: what one update gets back).

    ``kind`` says which of the payload fields is set:
    - ``params``: ``values`` holds the new global parameters (streaming: of the fragment);
    - ``delta``: ``encoded`` holds their change, compressed (the coordinator applied exactly its decoding);
    - ``grad``: ``values`` holds the mean gradient (ddp);
    - ``ring_commit``: nothing travels but ``params_crc32``, the fingerprint of the weights every
      leader computed itself (``values`` is empty).
    """

    kind: str
    round: int
    version: int
    """The global version after the commit (streaming: the fragment's next round)."""
    crc32: int
    """Fingerprint of the weights every site now holds (ddp: of the mean gradient), as in the commit event."""
    values: torch.Tensor | None = None
    encoded: Encoded | None = None
    params_crc32: int = 0
    fragment: int = 0
    staleness: int = 0
    """async-diloco: how many versions behind the update was."""
    ring_round: int = 0
    """Ring runs, a round merged through the star: the round at which the leaders rebuild their rings (0: none)."""

    @property
    def wire_bytes(self) -> int:
        """The payload bytes the answer carries on the wire."""
        if self.encoded is not None:
            return len(self.encoded.payload)
        return self.values.numel() * 4 if self.values is not None else 0


@dataclass(frozen=True)
class ModelAnswer:
    """GetModel's answer: the global parameters (or the outer momentum) at ``version``."""

    kind: str
    values: torch.Tensor
    version: int
    ring_round: int = 0


@dataclass(frozen=True)
class JoinAnswer:
    round: int
    version: int
    start_version: int
    has_model: bool
    algorithm: str
    epoch: int
    fragment_rounds: tuple[int, ...]
    site_merges: int


@dataclass(frozen=True)
class StatusAnswer:
    round: int
    version: int
    sites: tuple[str, ...]
    pending: tuple[str, ...]
    bytes_in: int
    bytes_out: int
