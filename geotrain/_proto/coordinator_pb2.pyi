from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_STALE: _ClassVar[Outcome]
    OUTCOME_FUTURE: _ClassVar[Outcome]
    OUTCOME_DUPLICATE: _ClassVar[Outcome]
    OUTCOME_NOT_MEMBER: _ClassVar[Outcome]
    OUTCOME_ROUND_FAILED: _ClassVar[Outcome]
    OUTCOME_RING_ABANDONED: _ClassVar[Outcome]
    OUTCOME_FENCED: _ClassVar[Outcome]
    OUTCOME_UNAVAILABLE: _ClassVar[Outcome]
    OUTCOME_CORRUPT: _ClassVar[Outcome]
    OUTCOME_INVALID: _ClassVar[Outcome]
    OUTCOME_NOT_IN_TOPOLOGY: _ClassVar[Outcome]
    OUTCOME_INVALID_UPDATE: _ClassVar[Outcome]
    OUTCOME_MODEL_MISMATCH: _ClassVar[Outcome]
    OUTCOME_FORBIDDEN: _ClassVar[Outcome]
OUTCOME_OK: Outcome
OUTCOME_STALE: Outcome
OUTCOME_FUTURE: Outcome
OUTCOME_DUPLICATE: Outcome
OUTCOME_NOT_MEMBER: Outcome
OUTCOME_ROUND_FAILED: Outcome
OUTCOME_RING_ABANDONED: Outcome
OUTCOME_FENCED: Outcome
OUTCOME_UNAVAILABLE: Outcome
OUTCOME_CORRUPT: Outcome
OUTCOME_INVALID: Outcome
OUTCOME_NOT_IN_TOPOLOGY: Outcome
OUTCOME_INVALID_UPDATE: Outcome
OUTCOME_MODEL_MISMATCH: Outcome
OUTCOME_FORBIDDEN: Outcome

class TensorHeader(_message.Message):
    __slots__ = ("site", "round", "kind", "total_bytes", "dtype", "crc32", "version", "codec", "block", "numel", "fragment", "staleness", "claimed_crc32", "params_crc32", "ring_round")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_CRC32_FIELD_NUMBER: _ClassVar[int]
    PARAMS_CRC32_FIELD_NUMBER: _ClassVar[int]
    RING_ROUND_FIELD_NUMBER: _ClassVar[int]
    site: str
    round: int
    kind: str
    total_bytes: int
    dtype: str
    crc32: int
    version: int
    codec: str
    block: int
    numel: int
    fragment: int
    staleness: int
    claimed_crc32: int
    params_crc32: int
    ring_round: int
    def __init__(self, site: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[str] = ..., total_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., crc32: _Optional[int] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., block: _Optional[int] = ..., numel: _Optional[int] = ..., fragment: _Optional[int] = ..., staleness: _Optional[int] = ..., claimed_crc32: _Optional[int] = ..., params_crc32: _Optional[int] = ..., ring_round: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "offset", "data", "crc32")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    offset: int
    data: bytes
    crc32: int
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("site", "workers", "pid", "model_spec")
    SITE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    site: str
    workers: int
    pid: int
    model_spec: str
    def __init__(self, site: _Optional[str] = ..., workers: _Optional[int] = ..., pid: _Optional[int] = ..., model_spec: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("round", "version", "has_model", "algorithm", "start_version", "epoch", "fragment_rounds", "site_merges")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_MODEL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    START_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SITE_MERGES_FIELD_NUMBER: _ClassVar[int]
    round: int
    version: int
    has_model: bool
    algorithm: str
    start_version: int
    epoch: int
    fragment_rounds: _containers.RepeatedScalarFieldContainer[int]
    site_merges: int
    def __init__(self, round: _Optional[int] = ..., version: _Optional[int] = ..., has_model: _Optional[bool] = ..., algorithm: _Optional[str] = ..., start_version: _Optional[int] = ..., epoch: _Optional[int] = ..., fragment_rounds: _Optional[_Iterable[int]] = ..., site_merges: _Optional[int] = ...) -> None: ...

class InitModelResponse(_message.Message):
    __slots__ = ("accepted", "version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    version: int
    def __init__(self, accepted: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("site", "min_version", "what")
    SITE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    site: str
    min_version: int
    what: str
    def __init__(self, site: _Optional[str] = ..., min_version: _Optional[int] = ..., what: _Optional[str] = ...) -> None: ...

class LostRequest(_message.Message):
    __slots__ = ("site", "pid", "reason")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    site: str
    pid: int
    reason: str
    def __init__(self, site: _Optional[str] = ..., pid: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LostResponse(_message.Message):
    __slots__ = ("action", "reason")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action: str
    reason: str
    def __init__(self, action: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("round", "version", "sites", "pending", "bytes_in", "bytes_out")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    round: int
    version: int
    sites: _containers.RepeatedScalarFieldContainer[str]
    pending: _containers.RepeatedScalarFieldContainer[str]
    bytes_in: int
    bytes_out: int
    def __init__(self, round: _Optional[int] = ..., version: _Optional[int] = ..., sites: _Optional[_Iterable[str]] = ..., pending: _Optional[_Iterable[str]] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("outcome", "reason", "round", "site")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    reason: str
    round: int
    site: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ...) -> None: ...
