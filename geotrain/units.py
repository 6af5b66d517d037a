"""Parsing of human units used in topology files: durations, bandwidths, byte sizes.

Durations: "80ms", "1.5s", "250us", "2m" or a bare number of milliseconds.
Bandwidths: "100mbit", "1gbit", "10Gbps", "500kbit", "12.5MB/s" (bytes) or a bare number of Mbit/s.
All parsers raise ValueError with a message that shows the expected form.
"""

from __future__ import annotations

import re

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_DURATION_UNITS_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0, "h": 3_600_000.0}

# Factors to bits per second.
_BW_UNITS_BPS = {
    "bit": 1.0, "bps": 1.0, "b/s": 1.0,
    "kbit": 1e3, "kbps": 1e3, "kb/s": 1e3,
    "mbit": 1e6, "mbps": 1e6, "mb/s": 1e6,
    "gbit": 1e9, "gbps": 1e9, "gb/s": 1e9,
    "tbit": 1e12, "tbps": 1e12,
}
_BYTE_BW_UNITS_BPS = {"B/s": 8.0, "KB/s": 8e3, "MB/s": 8e6, "GB/s": 8e9}

_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration_ms(value: object) -> float:
    """Return a duration in milliseconds. Bare numbers are milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "80ms" or "1.5s", got {value!r}')
    if isinstance(value, (int, float)):
        ms = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(_NUM + r"\s*([a-zµ]*)", value.strip().lower())
        if not m or (m.group(2) and m.group(2) not in _DURATION_UNITS_MS):
            raise ValueError(f'expected a duration like "80ms" or "1.5s", got {value!r}')
        ms = float(m.group(1)) * _DURATION_UNITS_MS[m.group(2) or "ms"]
    else:
        raise ValueError(f'expected a duration like "80ms" or "1.5s", got {value!r}')
    if ms < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return ms


def parse_bandwidth_mbps(value: object) -> float:
    """Return a bandwidth in Mbit/s (10^6 bits per second). Bare numbers are Mbit/s."""
    if isinstance(value, bool):
        raise ValueError(f'expected a bandwidth like "100mbit" or "1gbit", got {value!r}')
    if isinstance(value, (int, float)):
        mbps = float(value)
    elif isinstance(value, str):
        s = value.strip()
        m = re.fullmatch(_NUM + r"\s*([A-Za-z/]*)", s)
        if not m:
            raise ValueError(f'expected a bandwidth like "100mbit" or "1gbit", got {value!r}')
        num, unit = float(m.group(1)), m.group(2)
        if unit in _BYTE_BW_UNITS_BPS:
            mbps = num * _BYTE_BW_UNITS_BPS[unit] / 1e6
        elif unit == "":
            mbps = num
        elif unit.lower() in _BW_UNITS_BPS:
            mbps = num * _BW_UNITS_BPS[unit.lower()] / 1e6
        else:
            raise ValueError(f'expected a bandwidth like "100mbit" or "1gbit", got {value!r}')
    else:
        raise ValueError(f'expected a bandwidth like "100mbit" or "1gbit", got {value!r}')
    if mbps <= 0:
        raise ValueError(f"a bandwidth must be positive, got {value!r}")
    return mbps


def parse_size_bytes(value: object) -> int:
    """Return a size in bytes: "64MiB", "1GB", or a bare integer of bytes."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "64MiB", got {value!r}')
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(_NUM + r"\s*([A-Za-z]*)", value.strip())
        if not m or m.group(2).lower() not in _SIZE_UNITS | {"": 1}:
            raise ValueError(f'expected a size like "64MiB", got {value!r}')
        n = int(float(m.group(1)) * (_SIZE_UNITS.get(m.group(2).lower(), 1)))
    else:
        raise ValueError(f'expected a size like "64MiB", got {value!r}')
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return n


def human_bytes(n: float) -> str:
    """A byte count in the unit that fits it (decimal: 1 kB = 1000 B), three significant digits:
    ``812 B``, ``24.6 kB``, ``1.34 MB``, ``2.05 GB``."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
