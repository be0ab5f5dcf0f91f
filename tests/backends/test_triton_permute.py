"""Triton permute_average against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402

from .cases import DTYPES, TRITON, assert_same_bits as assert_bits_equal  # noqa: E402

pytestmark = TRITON.marks

DEVICE = TRITON.device


def dev(maps):
    return None if maps is None else [None if m is None else m.to(DEVICE) for m in maps]


def check(tensors, coeffs, rows=None, cols=None, **kw):
    ref = reference.permute_average(tensors, coeffs, rows, cols, **kw)
    got = tb.permute_average([t.to(DEVICE) for t in tensors], coeffs, dev(rows), dev(cols), **kw)
    assert_bits_equal(got.cpu(), ref)


def perm(n, gen, holes=0, dtype=torch.int64):
    """A random map of length n into range(n + extra): a permutation with `holes` entries -1."""
    p = torch.randperm(n, generator=gen)
    if holes:
        p[torch.randperm(n, generator=gen)[:holes]] = -1
    return p.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 200), (0, 5), (5, 0)])
@pytest.mark.parametrize("normalize_coverage", [False, True])
def test_2d_matches_reference(shape, normalize_coverage):
    gen = torch.Generator().manual_seed(sum(shape) + normalize_coverage)
    r, c = shape
    for k in range(3):
        tensors = [torch.randn(shape, generator=gen).to(DTYPES[(k + i) % 3]) for i in range(3)]
        rows = [None, perm(r, gen), perm(r, gen, holes=min(r, 2), dtype=torch.int32)]
        cols = [None, perm(c, gen, dtype=torch.int32), perm(c, gen, holes=min(c, 3))]
        check(tensors, [0.2, -0.3, 0.45], rows, cols, normalize_coverage=normalize_coverage, out_dtype=DTYPES[k])


@pytest.mark.parametrize("size", [0, 1, 7, 1000, 2 * 1024 + 77])  # 1024: LINE_BLOCK_COLS
def test_1d_matches_reference(size):
    gen = torch.Generator().manual_seed(size)
    for k, dtype in enumerate(DTYPES):
        tensors = [torch.randn(size, generator=gen).to(dtype) for _ in range(3)]
        rows = [perm(size, gen), None, perm(size, gen, holes=min(size, 4), dtype=torch.int32)]
        check(tensors, [0.5, 0.25, 0.25], rows, normalize_coverage=k == 1)


@pytest.mark.parametrize("n_models", [1, 2, 5, 8])
def test_model_counts_sizes_and_mixed_dtypes(n_models):
    # models of other sizes than the output: maps select (and skip) their rows and columns
    gen = torch.Generator().manual_seed(n_models)
    out_r, out_c = 24, 70
    tensors, rows, cols = [], [], []
    for i in range(n_models):
        r, c = out_r + 3 * i, out_c + 5 * i
        tensors.append(torch.randn(r, c, generator=gen).to(DTYPES[i % 3]))
        rows.append(None if i == 0 else torch.randperm(r, generator=gen)[:out_r])
        cols.append(None if i == 0 else torch.randperm(c, generator=gen)[:out_c].to(torch.int32))
    coeffs = [1.0 / (i + 1) for i in range(n_models)]
    check(tensors, coeffs, rows, cols, normalize_coverage=True)
    check(tensors, coeffs, rows, cols, out_dtype=torch.bfloat16)


def test_uncovered_elements_and_empty_models():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, generator=gen)
    b = torch.randn(0, 6, generator=gen)  # contributes nowhere
    rows = [torch.tensor([0, -1, 2, 3]), torch.tensor([-1, -1, -1, -1])]
    cols = [torch.tensor([5, 4, -1, 2, 1, 0]), None]
    for nc in (False, True):
        check([a, b], [0.7, 0.3], rows, cols, normalize_coverage=nc)


def test_errors():
    x = torch.ones(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        tb.permute_average([x, x], 1.0, [None, torch.tensor([0, 1, 2, 4], device=DEVICE)])
    with pytest.raises(ValueError, match="col_maps given for 1-D"):
        tb.permute_average([x[0]], 1.0, None, [torch.arange(5)])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        tb.permute_average([torch.ones(2, 2, 2, device=DEVICE)], 1.0)
    with pytest.raises(ValueError, match="coeffs"):
        tb.permute_average([x, x], [1.0])
    with pytest.raises(ValueError, match="identity"):
        tb.permute_average([x, torch.ones(5, 5, device=DEVICE)], 1.0)
