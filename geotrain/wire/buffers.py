"""Large CPU tensors whose first touch is cheap: reused when nothing holds them (:class:`BufferPool`),
else backed by transparent huge pages where the kernel offers them (:func:`empty`).

A tensor of a model's size (tens of MB and up) is bigger than glibc's largest mmap threshold
(32 MiB), so every such allocation is a fresh mapping whose pages fault in on first touch, one
4 KiB page at a time: on the shared VMs here that is ~20 ms for 40 MB, more than the arithmetic
on it. :func:`empty` asks the kernel (``madvise(MADV_HUGEPAGE)``, before anything touches the
pages) to back the tensor with 2 MiB pages where transparent huge pages are enabled in
``madvise`` or ``always`` mode: 512 times fewer faults. Anywhere that is not possible (another OS,
THP ``never``, a small tensor) it is a plain ``torch.empty``. Nothing else changes: the values are
uninitialised either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

import torch

log = logging.getLogger(__name__)

MIN_BYTES = 4 << 20
"""Below this a tensor is allocated as usual (a huge page would be most of it)."""

_MADV_HUGEPAGE = 14
_PAGE = 4096
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def advise_huge(t: torch.Tensor) -> bool:
    """Ask for huge pages under ``t``'s (untouched) storage; True if the kernel took the advice."""
    nbytes = t.numel() * t.element_size()
    fn = _libc_madvise()
    if not fn or nbytes < MIN_BYTES or t.device.type != "cpu":
        return False
    start = (t.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_PAGE - 1)
    return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0


def empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor, on huge pages where possible."""
    t = torch.empty(numel, dtype=dtype)
    advise_huge(t)
    return t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`empty` of ``t``'s shape and dtype."""
    return empty(t.numel(), t.dtype).view(t.shape)


def _storage_uses(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s storage (views, numpy arrays of it), plus the one this call makes."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _refs(items: list, i: int) -> tuple[int, int]:
    t = items[i]
    return sys.getrefcount(t), _storage_uses(t)


def _calibrate() -> tuple[int, int] | None:
    """What :func:`_refs` says of a tensor only a list holds (None: this torch cannot tell)."""
    try:
        return _refs([torch.empty(1)], 0)
    except (AttributeError, RuntimeError, TypeError):
        return None


_IDLE = _calibrate()


class BufferPool:
    """Large float32 tensors handed back (:meth:`retire`) and handed out again (:meth:`take`) once
    nothing else holds them, so that the coordinator's per-round buffers (a received update, the
    running sum, the new parameters) land on pages that are already resident: no page faults, the
    cost :func:`empty` only softens.

    Reuse is safe by construction, not by convention: a retired tensor is taken again only when its
    Python object is referenced by the pool alone and no other tensor or numpy array shares its
    storage (a view, a ``.numpy()`` being streamed, a record that keeps the last answer): otherwise
    :meth:`take` allocates a new one. At most ``keep`` retired tensors of each size are kept (the
    oldest is let go); where torch cannot tell who holds a storage, nothing is ever reused.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._retired: dict[int, list[torch.Tensor]] = {}
        self.reused = 0
        self.allocated = 0

    def take(self, numel: int) -> torch.Tensor:
        """An uninitialised 1-D float32 tensor of ``numel`` values that nothing else holds."""
        with self._lock:
            items = self._retired.get(numel)
            if items and _IDLE is not None:
                for i in range(len(items)):
                    if _refs(items, i) == _IDLE:
                        self.reused += 1
                        return items.pop(i)
            self.allocated += 1
        return empty(numel)

    def retire(self, t: torch.Tensor | None) -> None:
        """``t`` is no longer needed by the caller (others may still hold it: it waits until they let go).
        Only whole 1-D float32 CPU tensors of at least MIN_BYTES are kept; anything else is ignored."""
        if (t is None or t._base is not None or t.dtype != torch.float32 or t.dim() != 1 or t.device.type != "cpu"
                or not t.is_contiguous() or t.numel() * 4 < MIN_BYTES):
            return
        with self._lock:
            items = self._retired.setdefault(t.numel(), [])
            if any(x is t for x in items):
                return
            items.append(t)
            del items[:-self.keep]

    def held(self) -> int:
        """Retired tensors kept now."""
        with self._lock:
            return sum(len(v) for v in self._retired.values())


MALLOC_ARENAS = 2
"""glibc malloc arenas the coordinator keeps (:func:`limit_malloc_arenas`)."""


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Let glibc's malloc keep at most ``arenas`` arenas in this process (``mallopt(M_ARENA_MAX)``), for arenas
    made from now on: call it before the server's threads start. glibc gives each thread that allocates
    concurrently an arena of its own (up to 8 per core) and keeps what was freed in it; the coordinator's gRPC
    threads each take the 4 MiB chunks of one stream, so with 8 sites of a 100 MB model the arenas held ~360 MB
    that nothing used (benchmarks/coordinator_memory.py: 1952 MB above idle with the default, 1594 MB with 2).
    The large buffers are torch's own mappings and are not affected. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_ARENA_MAX = -8
    return bool(mallopt(M_ARENA_MAX, int(arenas)))

