"""The site leader's client of the coordinator (users never import the generated stubs).

Every call has a deadline. gRPC errors are converted here, at the boundary, into geotrain
errors that carry the site, the round and the address. Only idempotent calls (Join, GetModel,
Status) are retried; a Merge is never retried blindly: the coordinator refuses a duplicate or
stale update, so the caller decides.
"""

from __future__ import annotations

import logging
import os
import time

import grpc
import numpy as np
import torch

from geotrain.wire import transport
from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import CoordinatorUnavailable, GeotrainError, QuorumLost, StaleRound, TransferCorrupt
from geotrain.wire.channel import CLIENT_OPTIONS, GRPC_OPTIONS

log = logging.getLogger(__name__)



class CoordinatorClient:
    def __init__(self, address: str, site: str, timeout_s: float = 120.0, connect_timeout_s: float = 30.0,
                 retry_deadline_s: float = 120.0):
        self.address = address
        self.site = site
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS + CLIENT_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise CoordinatorUnavailable(f"site {site}: coordinator at {address} not reachable within {connect_timeout_s:.0f}s") from None
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    # ---- calls ----
    def join(self, workers: int) -> pb.JoinResponse:
        return self._retry("Join", lambda: self._stub.Join(
            pb.JoinRequest(site=self.site, workers=workers, pid=os.getpid()), timeout=30.0))

    def init_model(self, flat: torch.Tensor) -> bool:
        msgs = self._counted(transport.encode(flat, site=self.site, kind="params"))
        resp = self._call("InitModel", lambda: self._stub.InitModel(msgs, timeout=self.timeout_s))
        return resp.accepted

    def get_model(self, min_version: int = 0, what: str = "params") -> transport.Payload:
        """The global parameters (or, ``what="momentum"``, the outer momentum) once ``min_version`` is committed."""
        def once():
            stream = self._stub.GetModel(pb.GetModelRequest(site=self.site, min_version=min_version, what=what),
                                         timeout=self.timeout_s)
            return self._decode(stream, "GetModel")
        return self._retry("GetModel", once)

    def merge(self, flat: torch.Tensor | np.ndarray | None, round: int, kind: str, version: int = 0, *,
              encoded=None, fragment: int = 0, claimed_crc32: int = 0) -> transport.Payload:
        """Send this site's update for ``round`` (``encoded``: compressed) and block until the merged result comes back."""
        msgs = self._counted(transport.encode(flat, site=self.site, round=round, kind=kind, version=version,
                                              encoded=encoded, fragment=fragment, claimed_crc32=claimed_crc32))
        return self._call("Merge", lambda: self._decode(self._stub.Merge(msgs, timeout=self.timeout_s), "Merge"),
                          round=round)

    def status(self) -> pb.StatusResponse:
        return self._retry("Status", lambda: self._stub.Status(pb.StatusRequest(), timeout=10.0))

    # ---- internals ----
    def _counted(self, msgs):
        for m in msgs:
            self.bytes_sent += len(m.data)
            yield m

    def _decode(self, stream, what: str) -> transport.Payload:
        payload = transport.decode(stream, where=f"site {self.site}: {what} from {self.address}")
        self.bytes_received += payload.data.nbytes
        return payload

    def _call(self, what: str, fn, round: int | None = None):
        try:
            return fn()
        except grpc.RpcError as exc:
            raise _convert(exc, what, self.site, self.address, round) from exc

    def _retry(self, what: str, fn):
        """Retry an idempotent call with exponential backoff until ``retry_deadline_s`` has passed."""
        deadline = time.monotonic() + self.retry_deadline_s
        delay = 0.2
        while True:
            try:
                return self._call(what, fn)
            except (CoordinatorUnavailable, TransferCorrupt):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def _convert(exc: grpc.RpcError, what: str, site: str, address: str, round: int | None) -> GeotrainError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    where = f"site {site}" + (f", round {round}" if round is not None else "") + f": {what} to coordinator at {address}"
    if (code == grpc.StatusCode.FAILED_PRECONDITION and detail.startswith(("stale", "future", "duplicate"))) or \
            (code == grpc.StatusCode.PERMISSION_DENIED and detail.startswith("unknown_site")):
        return StaleRound(f"{where}: {detail}")
    if code == grpc.StatusCode.ABORTED and detail.startswith("round_failed"):
        return QuorumLost(f"{where}: {detail}")
    if code == grpc.StatusCode.DATA_LOSS:
        return TransferCorrupt(f"{where}: {detail}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CoordinatorUnavailable(f"{where}: {code.name}: {detail}")
    return GeotrainError(f"{where}: {code.name if code else 'error'}: {detail}")
