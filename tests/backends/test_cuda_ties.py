"""pymerge._C_cuda TIES kernels (ties_merge, ties_sign_sum, ties_merge_model), bit for bit against torch:
the cuda-only tests. The tests shared with the other backends are in test_ties.py.

Needs a GPU. Kernel geometry (csrc/cuda/sparse_common.cuh): selection histograms in
tiles of 57344 elements, merge tiles of 8192 (256 threads x 8 elements x 4 steps);
the sizes below straddle both, and the tiny-valued inputs make the exact-k
tie-break cut through long runs of equal |tau| that span many merge tiles.
"""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

from .cases import CUDA, WORKED_MERGED, models, ties_error_cases, worked_example

pytestmark = CUDA.marks

HIST_TILE = 57344
MERGE_TILE = 8192
ODD = 3 * HIST_TILE + 2 * MERGE_TILE + 5


def gpu(base, ts):
    return base.cuda(), [t.cuda() for t in ts]


def check_merge(base, ts, *args, **kw):
    ref = reference.ties_merge(base, ts, *args, **kw)
    got = cuda.ties_merge(*gpu(base, ts), *args, **kw)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), ref)
    return got


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("size", [1000, MERGE_TILE * 3 + 17, ODD])
@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_at_the_threshold(size, trim_ties, consensus, normalize):
    gen = torch.Generator().manual_seed(size + len(trim_ties) + len(consensus) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    kw = dict(normalize=normalize, consensus=consensus, trim_ties=trim_ties, lam=1.3)
    check_merge(base, ts, [0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.77, 0.05], **kw)


@pytest.mark.parametrize("k", [1, 2, 3, 4000, 4096, 8191, 8192, 8193, 20000, 3 * MERGE_TILE - 1])
def test_one_run_of_equal_keys(k):
    # Every |tau| equal (and some exact zeros): the cut falls inside one long run, at and
    # around merge-tile borders.
    size = 3 * MERGE_TILE + 77
    base = torch.zeros(size, dtype=torch.bfloat16)
    t = torch.full((size,), 0.5, dtype=torch.bfloat16)
    t[::5] = -0.5
    t[size - 100 :] = 0.0
    density = k / size
    for trim_ties in ("exact", "inclusive"):
        check_merge(base, [t, -t], [1.0, 0.25], [density, 0.5], trim_ties=trim_ties)


def test_shapes_views_and_defaults():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(48, 64, generator=gen).bfloat16()
    a = (base.float().t() + 0.01 * torch.randn(64, 48, generator=gen)).bfloat16().t()  # non-contiguous
    b = (base.float() + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.float16)
    got = cuda.ties_merge(base.cuda(), [a.cuda(), b.cuda()], densities=0.4)
    assert got.shape == (48, 64) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_bits_equal(got.cpu(), reference.ties_merge(base, [a, b], densities=0.4))
    scalar = torch.tensor(1.5)
    assert_bits_equal(cuda.ties_merge(scalar.cuda(), [scalar.cuda() + 1]).cpu(), reference.ties_merge(scalar, [scalar + 1]))
    # Storage offsets that break 16-byte alignment: the element-wise load path.
    big = [torch.randn(20_003, generator=gen).to(torch.bfloat16) for _ in range(3)]
    views = [t[3:] for t in big]
    dev = [t.cuda()[3:] for t in big]
    ref = reference.ties_merge(views[0], views[1:], [1.0, -2.0], 0.3)
    assert_bits_equal(cuda.ties_merge(dev[0], dev[1:], [1.0, -2.0], 0.3).cpu(), ref)


def test_deterministic_and_matches_cpu_backend():
    from pymerge.backends import cpu

    gen = torch.Generator().manual_seed(9)
    base, ts = models(2 * HIST_TILE + 1234, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = ([0.25, -0.5, 1.0], [0.3, 0.41, 0.62])
    first = cuda.ties_merge(*gpu(base, ts), *args).cpu()
    for _ in range(3):
        assert_bits_equal(cuda.ties_merge(*gpu(base, ts), *args).cpu(), first)
    if cpu.available():
        assert_bits_equal(first, cpu.ties_merge(base, ts, *args))


def test_dispatch_and_stream():
    gen = torch.Generator().manual_seed(6)
    base, ts = models(100, [torch.float32] * 2, gen)
    got = pymerge.ops.ties_merge(*gpu(base, ts), densities=0.5)
    assert pymerge.ops.last_backend() == "cuda"
    assert_bits_equal(got.cpu(), reference.ties_merge(base, ts, densities=0.5))
    # On a side stream: ordered with torch's work on that stream.
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        b, t = gpu(base, ts)
        got = cuda.ties_merge(b, t, densities=0.5)
    s.synchronize()
    assert_bits_equal(got.cpu(), reference.ties_merge(base, ts, densities=0.5))


def test_errors():
    x = torch.ones(4)
    for case in ties_error_cases(x, torch.ones(5)):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.ties_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cuda.ties_merge(None if base is None else base.cuda(), [t.cuda() for t in tensors], **case)
    with pytest.raises(ValueError, match="cuda"):
        cuda.ties_merge(x, [x])
    with pytest.raises(ValueError, match="at most"):
        cuda.ties_merge(x.cuda(), [x.cuda()] * 65)
    from pymerge import _C_cuda

    out = torch.empty(8, device="cuda")
    y = torch.ones(8, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="ks"):
        _C_cuda.ties_merge(out.data_ptr(), 0, [y.data_ptr()], [0], y.data_ptr(), 0, 8, [1, 2], [1.0], 1.0, True, False, False, s)
    with pytest.raises(ValueError, match="overlaps"):
        _C_cuda.ties_merge(y.data_ptr() + 4, 0, [y.data_ptr()], [0], out.data_ptr(), 0, 4, [1], [1.0], 1.0, True, False, False, s)


# ---------------------------------------------------------------- model scope


def test_worked_example():
    zero, tau, th = worked_example()
    fb = cuda.ties_sign_sum(*gpu(zero, tau), th)
    assert fb == reference.ties_sign_sum(zero, tau, th)
    got = cuda.ties_merge_model(*gpu(zero, tau), th, fb).cpu()
    torch.testing.assert_close(got, torch.tensor(WORKED_MERGED))
    assert_bits_equal(got, reference.ties_merge_model(zero, tau, th, fb))
