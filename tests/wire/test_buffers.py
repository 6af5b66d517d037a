"""The buffer pool hands a tensor out again only once nothing else holds it."""

import numpy as np
import torch

from geotrain.wire import buffers
from geotrain.wire.buffers import BufferPool

N = buffers.MIN_BYTES // 4  # the smallest size the pool keeps


def test_an_idle_retired_tensor_is_reused():
    pool = BufferPool()
    t = pool.take(N)
    ptr = t.data_ptr()
    pool.retire(t)
    del t
    again = pool.take(N)
    assert again.data_ptr() == ptr and pool.reused == 1 and pool.allocated == 1


def test_a_tensor_something_still_holds_is_never_handed_out():
    """The bad cases: the same object held elsewhere, a view, a numpy array, a memoryview of it."""
    pool = BufferPool()
    for hold in (lambda t: t, lambda t: t[1:], lambda t: t.numpy(), lambda t: memoryview(t.numpy()).cast("B"),
                 lambda t: np.asarray(t)):
        t = pool.take(N)
        kept = hold(t)
        pool.retire(t)
        del t
        other = pool.take(N)
        assert other.data_ptr() != _ptr(kept)
        del kept
        assert pool.take(N).data_ptr() != other.data_ptr()  # the one let go now comes back, not `other`


def _ptr(obj):
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().data_ptr()
    if isinstance(obj, memoryview):
        return np.frombuffer(obj, dtype=np.uint8).ctypes.data
    return obj.ctypes.data


def test_only_whole_large_float32_tensors_are_kept_and_at_most_keep_of_a_size():
    pool = BufferPool(keep=2)
    for t in (torch.empty(10), torch.empty(N, dtype=torch.float64), torch.empty(2 * N)[:N], torch.empty(N, 2)[:, 0]):
        pool.retire(t)
    assert pool.held() == 0
    kept = [torch.empty(N) for _ in range(3)]
    for t in kept:
        pool.retire(t)
    pool.retire(kept[-1])  # retiring twice keeps it once
    assert pool.held() == 2


def test_empty_gives_a_tensor_of_the_size_asked():
    t = buffers.empty(N + 3)
    assert t.numel() == N + 3 and t.dtype == torch.float32
    assert buffers.empty_like(torch.zeros(3, 4)).shape == (3, 4)


def test_the_coordinator_limits_glibcs_malloc_arenas():
    """mallopt(M_ARENA_MAX) is accepted by this machine's glibc (it answers 1; 0 would mean a wrong call)."""
    import subprocess
    import sys

    code = "from geotrain.wire.buffers import limit_malloc_arenas; import sys; sys.exit(0 if limit_malloc_arenas(2) else 3)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
