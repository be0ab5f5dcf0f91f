import pytest
import torch

from pymerge import hostmem
from pymerge.testing import run_in_threads

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _empty_pool():
    hostmem.release()
    yield
    hostmem.release()


def test_small_and_empty_tensors_are_plain():
    for shape in [(0,), (3, 0), (), 5, (1000,)]:
        t = hostmem.empty(shape, dtype=torch.float32)
        assert t.shape == torch.empty(shape).shape
    assert hostmem.pool_stats()["buffers"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.bool])
def test_large_tensor_shape_dtype_and_memory(dtype):
    t = hostmem.empty((1023, 1027), dtype=dtype)
    assert t.shape == (1023, 1027) and t.dtype == dtype and t.is_contiguous()
    t.fill_(1)
    assert bool((t == 1).all())
    assert hostmem.pool_stats()["used_bytes"] >= t.numel() * t.element_size()


def test_buffer_is_reused_only_once_freed():
    a = hostmem.empty((2 * MiB,), dtype=torch.float32)
    a.fill_(3.0)
    b = hostmem.empty((2 * MiB,), dtype=torch.float32)
    assert b.data_ptr() != a.data_ptr()  # a is alive: not handed out twice
    ptr = a.data_ptr()
    del a
    c = hostmem.empty((2 * MiB,), dtype=torch.float32)
    assert c.data_ptr() == ptr
    assert hostmem.pool_stats()["buffers"] == 2


def test_a_view_keeps_its_buffer():
    a = hostmem.empty((4, MiB), dtype=torch.float32)
    ptr = a.data_ptr()
    row = a[1]
    del a
    b = hostmem.empty((4, MiB), dtype=torch.float32)
    assert b.data_ptr() != ptr
    row.fill_(5.0)
    b.fill_(0.0)
    assert bool((row == 5.0).all())
    del row, b
    assert hostmem.empty((4, MiB), dtype=torch.float32).data_ptr() in _pool_pointers()


def _pool_pointers():
    return {b.tensor(1).data_ptr() for b in hostmem._pool._buffers}


def test_no_buffer_is_shared_between_live_tensors():
    g = torch.Generator().manual_seed(0)
    live = []
    for step in range(60):
        n = int(torch.randint(MiB // 4, 3 * MiB, (1,), generator=g))
        t = hostmem.empty((n,), dtype=torch.float32)
        t.fill_(float(step))
        live.append((step, t))
        if torch.rand((), generator=g) < 0.5:
            live.pop(int(torch.randint(0, len(live), (1,), generator=g)))
        for s, x in live:
            assert bool((x == float(s)).all())


def test_idle_bytes_stay_below_peak_use_and_release_frees_them():
    held = [hostmem.empty((MiB,), dtype=torch.float32) for _ in range(4)]  # 4 x 4 MiB in use
    peak = hostmem.pool_stats()["peak_used_bytes"]
    del held
    # Other sizes: the 4 MiB buffers are idle and must not pile up beyond the peak.
    for n in (3 * MiB, 5 * MiB, 7 * MiB, 9 * MiB):
        t = hostmem.empty((n,), dtype=torch.float32)
        s = hostmem.pool_stats()
        assert s["used_bytes"] == t.numel() * 4
        assert s["bytes"] - s["used_bytes"] <= s["peak_used_bytes"]
        assert s["peak_used_bytes"] == max(peak, t.numel() * 4)
        del t
    keep = hostmem.empty((MiB,), dtype=torch.float32)
    hostmem.release()
    s = hostmem.pool_stats()
    assert s["buffers"] == 1 and s["used_bytes"] == s["bytes"]  # only the buffer in use survives
    keep.fill_(1.0)


def test_concurrent_use():
    def worker(k):
        for i in range(50):
            t = hostmem.empty((MiB + k,), dtype=torch.float32)
            t.fill_(float(k * 1000 + i))
            assert bool((t == float(k * 1000 + i)).all())

    run_in_threads(worker, 4)
