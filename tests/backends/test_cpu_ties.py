"""pymerge._C TIES kernels: the cpu-only tests (thread counts, kernel clones, bindings).
The tests shared with the other backends are in test_ties.py."""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference

from .cases import CPU, WORKED_MERGED, each_isa, models, thresholds_for, ties_error_cases, worked_example

pytestmark = CPU.marks

# Kernel layout: blocks of 1024 elements, chunks of >= 64K elements (one per thread).
BLOCK = 1024
CHUNK = 1 << 16
ODD = 3 * CHUNK + BLOCK // 2 + 7  # not a multiple of any block or chunk size


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("size", [1000, ODD])
@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_at_the_threshold(size, trim_ties, consensus, normalize):
    gen = torch.Generator().manual_seed(size + len(trim_ties) + len(consensus) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.77, 0.05])
    kw = dict(normalize=normalize, consensus=consensus, trim_ties=trim_ties, lam=1.3)
    ref = reference.ties_merge(*args, **kw)
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        assert_bits_equal(cpu.ties_merge(*args, **kw), ref)


@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
def test_thread_counts_identical(trim_ties):
    # Chunk borders fall inside runs of threshold-equal keys.
    gen = torch.Generator().manual_seed(11)
    size = 4 * CHUNK + 12345
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.25, -0.5, 1.0], [0.3, 0.41, 0.62])
    ref = reference.ties_merge(*args, trim_ties=trim_ties)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        for got in each_isa(lambda: cpu.ties_merge(*args, trim_ties=trim_ties)):
            assert_bits_equal(got, ref)


@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
def test_radix_sweeps_match_the_sampled_selection(trim_ties):
    # The trim thresholds come from a sampled key window, or from radix sweeps when the
    # window misses; both must give the reference's bits. Mode 1 forces the sweeps.
    from pymerge import _C

    gen = torch.Generator().manual_seed(5)
    base, ts = models(ODD, [torch.bfloat16, torch.float32, torch.float16], gen, tiny=True)
    args = (base, ts, [0.5, 1.0, -0.75], [0.1, 0.5, 0.93])
    ref = reference.ties_merge(*args, trim_ties=trim_ties)
    before = _C._sparse_select_mode(-1)
    try:
        for mode in (0, 1):
            _C._sparse_select_mode(mode)
            for threads in (1, 2):
                cpu.set_num_threads(threads)
                assert_bits_equal(cpu.ties_merge(*args, trim_ties=trim_ties), ref)
    finally:
        _C._sparse_select_mode(before)


def test_window_overflow_falls_back_to_the_radix_sweeps():
    # Magnitudes that rise steadily along the tensor: every key near the threshold sits
    # in one stretch, which overflows the per-chunk candidate store of that chunk.
    from pymerge import _C

    n = 4 * CHUNK + 333
    base = torch.zeros(n)
    ramp = torch.linspace(0.0, 1.0, n)
    ts = [ramp.clone(), ramp.flip(0).clone(), ramp * 0.5]
    before = _C._sparse_select_fallbacks()
    ref = reference.ties_merge(base, ts, [1.0, 1.0, 1.0], [0.5, 0.3, 0.7])
    cpu.set_num_threads(4)
    assert_bits_equal(cpu.ties_merge(base, ts, [1.0, 1.0, 1.0], [0.5, 0.3, 0.7]), ref)
    assert _C._sparse_select_fallbacks() > before


def test_shapes_non_contiguous_and_defaults():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(48, 64, generator=gen).bfloat16()
    a = (base.float().t() + 0.01 * torch.randn(64, 48, generator=gen)).bfloat16().t()  # non-contiguous
    b = (base.float() + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.float16)
    got = cpu.ties_merge(base, [a, b], densities=0.4)
    assert got.shape == (48, 64) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_bits_equal(got, reference.ties_merge(base, [a, b], densities=0.4))
    scalar = torch.tensor(1.5)
    assert_bits_equal(cpu.ties_merge(scalar, [scalar + 1]), reference.ties_merge(scalar, [scalar + 1]))


def test_dispatch_runs_the_cpu_backend():
    gen = torch.Generator().manual_seed(6)
    base, ts = models(100, [torch.float32] * 2, gen)
    got = pymerge.ops.ties_merge(base, ts, densities=0.5)
    assert pymerge.ops.last_backend() == "cpu"
    assert_bits_equal(got, reference.ties_merge(base, ts, densities=0.5))


def test_errors_match_reference():
    for case in ties_error_cases(torch.ones(4), torch.ones(5)):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.ties_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cpu.ties_merge(base, tensors, **case)
    with pytest.raises(ValueError, match="meta"):
        cpu.ties_merge(torch.ones(4, device="meta"), [torch.ones(4, device="meta")])


# ---------------------------------------------------------------- model scope


def test_model_scope_threads_and_worked_example():
    gen = torch.Generator().manual_seed(12)
    base, ts = models(2 * CHUNK + 5, [torch.bfloat16] * 3, gen, tiny=True)
    th = [0.25, 0.5, 0.0]
    ref_sum = reference.ties_sign_sum(base, ts, th)
    ref = reference.ties_merge_model(base, ts, th, 1)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        assert cpu.ties_sign_sum(base, ts, th) == ref_sum
        assert_bits_equal(cpu.ties_merge_model(base, ts, th, 1), ref)
    # specs/methods.md worked example, through the whole-model oracle's thresholds.
    zero, tau, th = worked_example()
    fb = cpu.ties_sign_sum(zero, tau, th)
    got = cpu.ties_merge_model(zero, tau, th, fb)
    torch.testing.assert_close(got, torch.tensor(WORKED_MERGED))
    assert_bits_equal(got, reference.ties_merge_model(zero, tau, th, fb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("merge", ["dis-mean", "dis-sum"])
def test_model_scope_one_dtype(dtype, merge):
    # Base, models and output of one dtype and up to 8 models take a fused per-element
    # loop (ties_sign_sum too); 9 models, or another output dtype, the general pass.
    # Both with plain and streamed stores, every clone and 1 or 2 threads.
    from pymerge import _C

    gen = torch.Generator().manual_seed(len(merge) + dtype.itemsize)
    for size in (1, 7, 1000, ODD):
        base, ts = models(size, [dtype] * 9, gen, tiny=size > 7)
        th = thresholds_for(base, ts, 0.4)
        for n in (1, 2, 3, 4, 5, 8, 9):
            # ties_sign_sum: the same integer from the fused loop, the general pass
            # (an fp32 base, a lossless upcast) and the reference.
            ref_sum = reference.ties_sign_sum(base, ts[:n], th[:n])
            for threads in (1, 2):
                cpu.set_num_threads(threads)
                for b in (base, base.float()):
                    assert set(each_isa(lambda: cpu.ties_sign_sum(b, ts[:n], th[:n]))) == {ref_sum}
            for fallback, out_dtype in ((1, None), (-1, None), (0, torch.float32)):
                kw = dict(lam=0.7, merge=merge, out_dtype=out_dtype)
                ref = reference.ties_merge_model(base, ts[:n], th[:n], fallback, **kw)
                before = _C._set_stream_min_bytes(0)
                try:
                    for stream_min_bytes in (before, 0):
                        _C._set_stream_min_bytes(stream_min_bytes)
                        for threads in (1, 2):
                            cpu.set_num_threads(threads)
                            for got in each_isa(lambda: cpu.ties_merge_model(base, ts[:n], th[:n], fallback, **kw)):
                                assert_bits_equal(got, ref)
                finally:
                    _C._set_stream_min_bytes(before)


def test_binding_checks():
    from pymerge import _C

    x = torch.ones(8)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="ks"):
        _C.ties_merge(out.data_ptr(), 0, [x.data_ptr()], [0], x.data_ptr(), 0, 8, [1, 2], [1.0], 1.0, True, False, False)
    with pytest.raises(ValueError, match="dtype tag"):
        _C.ties_merge(out.data_ptr(), 5, [x.data_ptr()], [0], x.data_ptr(), 0, 8, [1], [1.0], 1.0, True, False, False)
    with pytest.raises(ValueError, match="overlaps"):
        _C.ties_merge(x.data_ptr() + 4, 0, [x.data_ptr()], [0], out.data_ptr(), 0, 4, [1], [1.0], 1.0, True, False, False)
