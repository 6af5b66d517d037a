"""A received tensor stream (geotrain.wire.transport, geotrain.wire.receive)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Payload:
    """A received tensor stream: its header fields and the data (float32, or encoded bytes)."""

    site: str
    round: int
    kind: str
    version: int
    data: np.ndarray  # float32 1-D when codec is fp32, else the encoded bytes (uint8)
    crc32: int = 0  # CRC32 of the payload bytes (verified on receipt): a cheap fingerprint of the weights
    codec: str = "fp32"
    block: int = 0
    numel: int = 0
    fragment: int = 0
    staleness: int = 0
    claimed_crc32: int = 0
    params_crc32: int = 0
    ring_round: int = 0
    values: torch.Tensor | None = field(default=None, repr=False)
    """The float32 tensor ``data`` is a view of, when the payload was received into one (the buffer itself)."""

    def tensor(self) -> torch.Tensor:
        """The payload as float32 (decoded if it travelled compressed)."""
        if self.values is not None:
            return self.values
        if self.codec == "fp32":
            return torch.from_numpy(self.data)
        from geotrain.wire.compress import Encoded, decode

        return decode(Encoded(codec=self.codec, numel=self.numel, block=self.block, payload=self.data.tobytes()))

    @property
    def wire_bytes(self) -> int:
        return int(self.data.nbytes)
