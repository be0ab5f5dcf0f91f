"""pymerge._C breadcrumbs kernel (breadcrumbs, breadcrumbs_ties), bit for bit against torch: the cpu-only
tests. The tests shared with the other backends are in test_breadcrumbs.py."""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference

from .cases import CPU, breadcrumbs_error_cases, each_isa, special_grid
from .cases import models as _models

pytestmark = CPU.marks

BLOCK = 1024
CHUNK = 1 << 16
ODD = 3 * CHUNK + BLOCK // 2 + 7  # not a multiple of any block or chunk size


def models(size, dtypes, gen, **kw):
    """(base, tensors); tiny: values from a small exact set, so |tau| ties everywhere."""
    return _models(size, dtypes, gen, steps=3, **kw)


@pytest.mark.parametrize("size", [1000, 65537, ODD])
@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_at_both_ends(size, combine, normalize):
    # Values from a tiny set: both selections cut through runs of equal |tau|.
    gen = torch.Generator().manual_seed(size + len(combine) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.33, 0.05], [0.1, 0.013, 0.3, 0.0])
    for consensus in ("sum", "count") if combine == "ties" else ("sum",):
        kw = dict(combine=combine, consensus=consensus, normalize=normalize, lam=1.1)
        ref = reference.breadcrumbs_merge(*args, **kw)
        for threads in (1, 2):
            cpu.set_num_threads(threads)
            assert_bits_equal(cpu.breadcrumbs_merge(*args, **kw), ref)


def test_thread_counts_identical():
    gen = torch.Generator().manual_seed(14)
    size = 4 * CHUNK + 12345
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.25, -0.5, 1.0], [0.3, 0.41, 0.2], [0.05, 0.2, 0.0])
    for combine in ("linear", "ties"):
        ref = reference.breadcrumbs_merge(*args, combine=combine)
        for threads in (1, 2, 3):
            cpu.set_num_threads(threads)
            for got in each_isa(lambda: cpu.breadcrumbs_merge(*args, combine=combine)):
                assert_bits_equal(got, ref)


def test_special_values_shapes_and_dispatch():
    base, a, b = special_grid()
    for combine in ("linear", "ties"):
        for densities, gammas in ((0.5, 0.1), (0.9, 0.05), (1.0, 0.0)):
            ref = reference.breadcrumbs_merge(base, [a, b], [1.0, 0.5], densities, gammas, combine=combine)
            assert_bits_equal(cpu.breadcrumbs_merge(base, [a, b], [1.0, 0.5], densities, gammas, combine=combine), ref)
    gen = torch.Generator().manual_seed(4)
    base2 = torch.randn(40, 24, generator=gen).bfloat16()
    m = (base2.float().t() + 0.02 * torch.randn(24, 40, generator=gen)).bfloat16().t()
    got = pymerge.ops.breadcrumbs_merge(base2, [m, m * 1.01], densities=0.4, gammas=None)
    assert pymerge.ops.last_backend() == "cpu" and got.shape == (40, 24) and got.dtype == torch.bfloat16
    assert_bits_equal(got, reference.breadcrumbs_merge(base2, [m, m * 1.01], densities=0.4, gammas=None))


def test_errors_match_reference():
    x = torch.ones(4)
    for case in breadcrumbs_error_cases(x):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.breadcrumbs_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cpu.breadcrumbs_merge(base, tensors, **case)
    from pymerge import _C

    with pytest.raises(ValueError, match="n_top"):
        _C.breadcrumbs_merge(x.data_ptr(), 0, [x.data_ptr()], [0], x.data_ptr(), 0, 4, [3], [2], [1.0], False, 1.0,
                             False, False)
