"""The site leader's client of the coordinator (users never import the generated stubs).

Every call has a deadline. gRPC errors are converted here, in one place (:func:`_convert`), at
the boundary, into geotrain errors that carry the site, the round, the address and the typed
outcome (``exc.outcome``): the coordinator's ``Refusal`` from the trailing metadata when it refused
the call, else the gRPC status code alone (a dead server, the client's own deadline). Never the
message text. Only idempotent calls (Join, GetModel, Status) are retried, as the retry policy
(geotrain.worker.retry) says; a Merge is never retried blindly: the coordinator refuses a
duplicate or stale update, so the caller decides.

Tensor streams travel as bytes, not protobuf objects: the update's chunks are serialized straight
from the tensor (geotrain.wire.transport.encode_wire, one copy each) and the answer's are parsed
into views of what gRPC received (geotrain.wire.chunks.parse_chunk) and copied once, into a buffer
of the answer's size when it is no larger than the biggest payload this client has moved so far
(the model's, after the first call), else into one that grows with the data.
"""

from __future__ import annotations

import logging
import os
import time

import grpc
import numpy as np
import torch

from geotrain._proto import coordinator_pb2 as pb
from geotrain._proto import coordinator_pb2_grpc as pb_grpc
from geotrain.errors import GeotrainError, TransferCorrupt
from geotrain.wire import transport
from geotrain.wire.channel import CLIENT_OPTIONS, STREAM_WINDOW_BYTES, grpc_options
from geotrain.wire.chunks import parse_chunk
from geotrain.wire.outcomes import REFUSAL_KEY, Outcome, error_for, outcome_of
from geotrain.worker.retry import Retry, next_action

_BY_STATUS = {
    grpc.StatusCode.UNAVAILABLE: Outcome.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Outcome.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: Outcome.CORRUPT,
}
"""The outcome of an error that carries no Refusal (the coordinator did not answer), by status code."""

_PLAIN = frozenset({Outcome.STALE, Outcome.FUTURE, Outcome.DUPLICATE, Outcome.NOT_MEMBER, Outcome.ROUND_FAILED,
                    Outcome.CORRUPT})
"""Outcomes whose message is the coordinator's alone; the others also name the status code."""

log = logging.getLogger(__name__)


class CoordinatorClient:
    def __init__(self, address: str, site: str, timeout_s: float = 120.0, connect_timeout_s: float = 30.0,
                 retry_deadline_s: float = 120.0, tls=None, window_bytes: int = STREAM_WINDOW_BYTES):
        """``tls``: this site's certificate files (geotrain.security.pki.TlsFiles): the channel is mutual TLS
        and the server must be the run's ``coordinator`` whatever address is dialled (a link emulator's).
        ``window_bytes``: each stream's HTTP/2 window (geotrain.wire.channel; the topology's: derive.stream_window_bytes)."""
        self.address = address
        self.site = site
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s
        self.bytes_sent = 0
        self.bytes_received = 0
        if tls is not None:
            from geotrain.security.tls import secure_channel

            self._channel = secure_channel(address, tls, options=grpc_options(window_bytes) + CLIENT_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=grpc_options(window_bytes) + CLIENT_OPTIONS)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise error_for(Outcome.UNAVAILABLE, f"site {site}: coordinator at {address} not reachable within "
                                                 f"{connect_timeout_s:.0f}s") from None
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        # the tensor streams: bytes both ways (the generated stub's protobuf objects copy every chunk)
        service = "/geotrain.v1.Coordinator/"
        self._merge = self._channel.stream_stream(service + "Merge", request_serializer=None,
                                                  response_deserializer=parse_chunk)
        self._init_model = self._channel.stream_unary(service + "InitModel", request_serializer=None,
                                                      response_deserializer=pb.InitModelResponse.FromString)
        self._get_model = self._channel.unary_stream(service + "GetModel",
                                                     request_serializer=pb.GetModelRequest.SerializeToString,
                                                     response_deserializer=parse_chunk)
        self._expect_bytes = 0  # the largest payload sent or received: answers up to it are received in place

    def close(self) -> None:
        self._channel.close()

    # ---- calls ----
    def join(self, workers: int, model_spec: str = "") -> pb.JoinResponse:
        """Join the run; ``model_spec`` is the site's model fingerprint (geotrain.orchestrator.fingerprint)."""
        return self._retry("Join", lambda: self._stub.Join(
            pb.JoinRequest(site=self.site, workers=workers, pid=os.getpid(), model_spec=model_spec), timeout=30.0))

    def init_model(self, flat: torch.Tensor) -> bool:
        msgs = self._counted(flat, transport.encode_wire(flat, site=self.site, kind="params"))
        resp = self._call("InitModel", lambda: self._init_model(msgs, timeout=self.timeout_s))
        return resp.accepted

    def get_model(self, min_version: int = 0, what: str = "params") -> transport.Payload:
        """The global parameters (or, ``what="momentum"``, the outer momentum) once ``min_version`` is committed."""
        def once():
            stream = self._get_model(pb.GetModelRequest(site=self.site, min_version=min_version, what=what),
                                     timeout=self.timeout_s)
            return self._decode(stream, "GetModel")
        return self._retry("GetModel", once)

    def merge(self, flat: torch.Tensor | np.ndarray | None, round: int, kind: str, version: int = 0, *,
              encoded=None, fragment: int = 0, claimed_crc32: int = 0) -> transport.Payload:
        """Send this site's update for ``round`` (``encoded``: compressed) and block until the merged result comes back."""
        msgs = self._counted(encoded.payload if encoded is not None and encoded.codec != "fp32" else flat,
                             transport.encode_wire(flat, site=self.site, round=round, kind=kind, version=version,
                                                   encoded=encoded, fragment=fragment, claimed_crc32=claimed_crc32))
        return self._call("Merge", lambda: self._decode(self._merge(msgs, timeout=self.timeout_s), "Merge"),
                          round=round)

    def status(self) -> pb.StatusResponse:
        return self._retry("Status", lambda: self._stub.Status(pb.StatusRequest(), timeout=10.0))

    # ---- internals ----
    def _counted(self, payload, msgs):
        """The messages of a stream whose payload is ``payload``; each chunk's bytes count as sent when
        gRPC takes its message (chunks of transport.CHUNK_BYTES, the last one shorter)."""
        if payload is None:
            left = 0
        elif isinstance(payload, torch.Tensor):
            left = payload.numel() * 4
        elif isinstance(payload, np.ndarray):
            left = payload.size * 4
        else:
            left = len(payload)
        self._expect_bytes = max(self._expect_bytes, left)
        for m in msgs:
            step = min(left, transport.CHUNK_BYTES)
            left -= step
            self.bytes_sent += step
            yield m

    def _decode(self, stream, what: str) -> transport.Payload:
        try:
            payload = transport.decode(stream, where=f"site {self.site}: {what} from {self.address}",
                                       expect_bytes=self._expect_bytes or None)
        except TransferCorrupt as exc:  # checked here, on receipt: the answer itself is corrupt
            raise error_for(Outcome.CORRUPT, str(exc)) from exc
        self.bytes_received += payload.data.nbytes
        self._expect_bytes = max(self._expect_bytes, payload.data.nbytes)
        return payload

    def _call(self, what: str, fn, round: int | None = None):
        try:
            return fn()
        except grpc.RpcError as exc:
            raise _convert(exc, what, self.site, self.address, round) from exc

    def _retry(self, what: str, fn):
        """Retry an idempotent call with backoff (geotrain.worker.retry) until ``retry_deadline_s`` has passed."""
        deadline = time.monotonic() + self.retry_deadline_s
        attempt = 0
        while True:
            try:
                return self._call(what, fn)
            except GeotrainError as exc:
                action = next_action(outcome_of(exc), attempt, time.monotonic(), deadline, idempotent=True)
                if not isinstance(action, Retry):
                    raise
                log.debug("site %s: %s: %s", self.site, what, action.reason)
                time.sleep(action.delay_s)
                attempt += 1


def _refusal(exc: grpc.RpcError) -> pb.Refusal | None:
    """The coordinator's Refusal in the trailing metadata, if it sent one."""
    for key, value in exc.trailing_metadata() or ():
        if key == REFUSAL_KEY:
            return pb.Refusal.FromString(value)
    return None


def _convert(exc: grpc.RpcError, what: str, site: str, address: str, round: int | None) -> GeotrainError:
    """The one place a gRPC error becomes a geotrain error: by the Refusal's outcome, else by status code."""
    code = exc.code()
    detail = exc.details() or ""
    where = f"site {site}" + (f", round {round}" if round is not None else "") + f": {what} to coordinator at {address}"
    refusal = _refusal(exc)
    outcome = Outcome(refusal.outcome) if refusal is not None else _BY_STATUS.get(code)
    if outcome is None:  # neither a refusal nor the coordinator out of reach: a bug, a message too large, ...
        return GeotrainError(f"{where}: {code.name}: {detail}")
    message = f"{where}: {detail}" if outcome in _PLAIN else f"{where}: {code.name}: {detail}"
    return error_for(outcome, message)
