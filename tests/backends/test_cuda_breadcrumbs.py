"""pymerge._C_cuda breadcrumbs kernel (breadcrumbs, breadcrumbs_ties), bit for bit against torch: the
cuda-only tests. The tests shared with the other backends are in test_breadcrumbs.py.

Needs a GPU. Both trims of a model (the kept end and the dropped outliers) cut
through runs of equal |tau| in the tiny-valued cases, at both ends.
"""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

from .cases import CUDA, breadcrumbs_error_cases, special_grid
from .cases import models as _models

pytestmark = CUDA.marks

HIST_TILE = 57344
MERGE_TILE = 8192
ODD = 3 * HIST_TILE + 2 * MERGE_TILE + 5


def models(size, dtypes, gen, **kw):
    """(base, tensors) on the CPU; tiny: values from a small exact set, so |tau| ties everywhere."""
    return _models(size, dtypes, gen, steps=3, **kw)


def check(base, ts, *args, **kw):
    ref = reference.breadcrumbs_merge(base, ts, *args, **kw)
    got = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, **kw)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("size", [1000, 3 * MERGE_TILE + 17, ODD])
@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_at_both_ends(size, combine, normalize):
    gen = torch.Generator().manual_seed(size + len(combine) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = ([0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.33, 0.05], [0.1, 0.013, 0.3, 0.0])
    for consensus in ("sum", "count") if combine == "ties" else ("sum",):
        check(base, ts, *args, combine=combine, consensus=consensus, normalize=normalize, lam=1.1)


def test_one_run_of_equal_keys():
    # Both cuts inside one run of equal |tau| that spans many merge tiles.
    size = 5 * MERGE_TILE + 333
    base = torch.zeros(size, dtype=torch.float16)
    t = torch.full((size,), 0.25, dtype=torch.float16)
    t[1::3] = -0.25
    t[:50] = 1.0
    for densities, gammas in ((0.5, 0.3), (0.2, 0.0005), (0.9, 0.05), (0.01, 0.99)):
        for combine in ("linear", "ties"):
            check(base, [t, -t, t], [1.0, 0.5, 2.0], densities, gammas, combine=combine)


def test_special_values_shapes_views_and_dispatch():
    base, a, b = special_grid()
    for combine in ("linear", "ties"):
        for densities, gammas in ((0.5, 0.1), (0.9, 0.05), (1.0, 0.0)):
            check(base, [a, b], [1.0, 0.5], densities, gammas, combine=combine)
    gen = torch.Generator().manual_seed(4)
    base2 = torch.randn(40, 24, generator=gen).bfloat16()
    m = (base2.float().t() + 0.02 * torch.randn(24, 40, generator=gen)).bfloat16().t()
    got = pymerge.ops.breadcrumbs_merge(base2.cuda(), [m.cuda(), m.cuda() * 1.01], densities=0.4, gammas=None)
    assert pymerge.ops.last_backend() == "cuda" and got.shape == (40, 24) and got.dtype == torch.bfloat16
    assert_bits_equal(got.cpu(), reference.breadcrumbs_merge(base2, [m, m * 1.01], densities=0.4, gammas=None))
    big = [torch.randn(9_001, generator=gen).to(torch.float16) for _ in range(3)]
    views = [t[1:] for t in big]
    dev = [t.cuda()[1:] for t in big]
    ref = reference.breadcrumbs_merge(views[0], views[1:], [1.0, -2.0], 0.3, 0.05, combine="ties")
    assert_bits_equal(cuda.breadcrumbs_merge(dev[0], dev[1:], [1.0, -2.0], 0.3, 0.05, combine="ties").cpu(), ref)


def test_deterministic_and_matches_cpu_backend():
    from pymerge.backends import cpu

    gen = torch.Generator().manual_seed(14)
    base, ts = models(2 * HIST_TILE + 12345, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = ([0.25, -0.5, 1.0], [0.3, 0.41, 0.2], [0.05, 0.2, 0.0])
    for combine in ("linear", "ties"):
        first = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, combine=combine).cpu()
        again = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, combine=combine).cpu()
        assert_bits_equal(again, first)
        assert_bits_equal(first, reference.breadcrumbs_merge(base, ts, *args, combine=combine))
        if cpu.available():
            assert_bits_equal(first, cpu.breadcrumbs_merge(base, ts, *args, combine=combine))


def test_errors():
    x = torch.ones(4)
    for case in breadcrumbs_error_cases(x):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.breadcrumbs_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cuda.breadcrumbs_merge(None if base is None else base.cuda(), [t.cuda() for t in tensors], **case)
    with pytest.raises(ValueError, match="cuda"):
        cuda.breadcrumbs_merge(x, [x])
    from pymerge import _C_cuda

    y = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="n_top"):
        _C_cuda.breadcrumbs_merge(y.data_ptr(), 0, [y.data_ptr()], [0], y.data_ptr(), 0, 4, [3], [2], [1.0], False, 1.0,
                                  False, False, torch.cuda.current_stream().cuda_stream)
