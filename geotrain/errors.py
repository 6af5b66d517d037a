"""One exception tree for everything geotrain raises on purpose.

    GeotrainError
    ├── TopologyError          a topology file or --set override is wrong (file, YAML path, value)
    ├── ControlPlaneError      etcd unreachable or a control-plane operation failed
    ├── CoordinatorUnavailable the coordinator could not be reached within the deadline
    ├── QuorumLost             too few sites reported within the round deadline
    ├── StaleRound             an update the round cannot take (stale, future, duplicate, not a member)
    ├── RingAbandoned          a ring round is merged through the star instead
    ├── UpdateRefused          an update's values cannot count (wrong length, non-finite, norm bound)
    ├── ModelMismatch          a site's model is not the run's (its fingerprint differs, at Join)
    ├── Forbidden              the caller's certificate does not allow the call (mTLS identity)
    ├── TransferCorrupt        a tensor stream failed its checksum or was incomplete
    ├── CheckpointCorrupt      a checkpoint failed verification
    ├── LinkError              the WAN link emulator could not start or forward
    └── RunFailed              a process of the run died; names the process and its exit status
        └── RunInterrupted     Ctrl-C or SIGTERM stopped the run (exit code 130)

gRPC and etcd errors are converted at the boundary with ``raise X(...) from exc`` and carry
the site, round and address they concern. The CLI turns a GeotrainError into one line on
stderr and a non-zero exit code; it never shows a traceback for one.
"""

from __future__ import annotations


class GeotrainError(Exception):
    """Base class of every error geotrain raises on purpose.

    ``outcome`` is the typed reason (geotrain.wire.outcomes.Outcome) when the coordinator refused
    a call; code decides on it, never on the message text.
    """

    exit_code = 1
    outcome = None


class TopologyError(GeotrainError):
    """A topology file or override is invalid. The message names the file, the YAML path and the value."""

    exit_code = 2


class ControlPlaneError(GeotrainError):
    """etcd could not be reached or an etcd operation failed."""


class CoordinatorUnavailable(GeotrainError):
    """The coordinator did not answer within the deadline."""


class QuorumLost(GeotrainError):
    """Fewer than the required number of sites reported within the round deadline."""


class StaleRound(GeotrainError):
    """An update the round being collected cannot take: for a committed round (never applied twice),
    a future round, a second copy, or from a site that is not a member of the round."""


class RingAbandoned(GeotrainError):
    """A ring (or hierarchical) round could not be merged in the ring: it goes through the star."""


class UpdateRefused(GeotrainError):
    """The coordinator refused an update's values (wrong length, a non-finite value, a norm far above
    the recent updates'): the site failed this round, rejoins and starts from the current model."""


class ModelMismatch(GeotrainError):
    """A site trains another model than the run's: names the first differing tensor on both sides."""


class Forbidden(GeotrainError):
    """The coordinator refused a call for who made it (its certificate), not for what it carried."""


class TransferCorrupt(GeotrainError):
    """A streamed tensor failed its checksum, or chunks were missing."""


class CheckpointCorrupt(GeotrainError):
    """A checkpoint failed verification (size or sha256 mismatch, missing file)."""


class LinkError(GeotrainError):
    """The WAN link emulator could not start or forward traffic."""


class RunFailed(GeotrainError):
    """A process of the run died or the run was interrupted; the message names it."""


class RunInterrupted(RunFailed):
    """The run was stopped by Ctrl-C or SIGTERM; every process of it was stopped."""

    exit_code = 130

