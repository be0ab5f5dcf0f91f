"""pymerge._C_cuda permute_average against the torch reference, bit for bit (needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

from .cases import CUDA, DTYPES

pytestmark = CUDA.marks


def perm_with_holes(n, m, gen, holes=0.0):
    """A map of length n into [0, m) (a permutation prefix), with a fraction of -1 entries."""
    p = torch.randperm(max(n, m), generator=gen)[:n] % max(m, 1)
    if holes:
        p[torch.rand(n, generator=gen) < holes] = -1
    return p


def check(tensors, coeffs, rows=None, cols=None, **kw):
    ref = reference.permute_average(tensors, coeffs, rows, cols, **kw)
    dev = lambda maps: None if maps is None else [None if p is None else p.cuda() for p in maps]  # noqa: E731
    got = cuda.permute_average([t.cuda() for t in tensors], coeffs, dev(rows), dev(cols), **kw)
    assert_bits_equal(got.cpu(), ref)
    # maps may also stay on the CPU
    got = cuda.permute_average([t.cuda() for t in tensors], coeffs, rows, cols, **kw)
    assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 8), (64, 1000), (5, 2049), (300, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_matches_reference_2d(shape, dtype, k):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1] + k)
    ws = [torch.randn(shape, generator=gen).to(dtype) for _ in range(k)]
    rows = [None] + [torch.randperm(shape[0], generator=gen) for _ in range(k - 1)]
    cols = [None] + [torch.randperm(shape[1], generator=gen) for _ in range(k - 1)]
    c = torch.rand(k, generator=gen).tolist()
    check(ws, c, rows, cols)
    check(ws, c, rows, None, normalize_coverage=True, out_dtype=torch.float32)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4097])
def test_1d_and_holes(n):
    gen = torch.Generator().manual_seed(n)
    ws = [torch.randn(n + i, generator=gen).to(DTYPES[i % 3]) for i in range(3)]
    maps = [perm_with_holes(n, n + i, gen, holes=0.2) for i in range(3)]
    for norm in (False, True):
        check(ws, [0.5, 1.5, -1.0], maps, normalize_coverage=norm)


def test_different_model_sizes_and_uncovered():
    gen = torch.Generator().manual_seed(2)
    ws = [torch.randn(10, 12, generator=gen), torch.randn(14, 20, generator=gen).half(),
          torch.randn(10, 16, generator=gen).bfloat16()]
    rows = [None, perm_with_holes(10, 14, gen, 0.3), torch.full((10,), -1, dtype=torch.int32)]
    cols = [None, perm_with_holes(12, 20, gen, 0.3), perm_with_holes(12, 16, gen)]
    for norm in (False, True):
        check(ws, [1.0, 2.0, 3.0], rows, cols, normalize_coverage=norm)


def test_empty_and_errors():
    check([torch.randn(0, 5)], 1.0)
    check([torch.randn(5, 0)], 1.0)
    with pytest.raises(ValueError, match="CUDA"):
        cuda.permute_average([torch.ones(3)], 1.0)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        cuda.permute_average([torch.ones(2, 2, 2, device="cuda")], 1.0)


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 40), c=st.integers(1, 300), k=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       holes=st.floats(0.0, 0.5), seed=st.integers(0, 2**31 - 1), norm=st.booleans())
def test_property(r, c, k, dtype, holes, seed, norm):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r, c, generator=gen).to(dtype) for _ in range(k)]
    rows = [perm_with_holes(r, r, gen, holes) for _ in range(k)]
    cols = [perm_with_holes(c, c, gen, holes) for _ in range(k)]
    check(ws, torch.randn(k, generator=gen).tolist(), rows, cols, normalize_coverage=norm)
