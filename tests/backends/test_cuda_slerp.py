"""pymerge._C_cuda slerp against the torch reference (needs a GPU).

Lerp rows (|dot| > 0.9995) are bit-identical. Slerp rows: the kernel's fp64 row
sums use a fixed order, torch's another, so a coefficient may be one fp32 ulp
off (rarely); the output is then within 2^-22 (|ca x| + |cb y|) plus one ulp of
the output dtype. With equal coefficients the output is bit-identical.
The reference runs on the same CUDA tensors, so acos/sin are the same.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.ops.reference.slerp import _rows, slerp_coefficients
from pymerge.testing import assert_bits_equal

from .cases import CUDA, DTYPES, ulp_distance as ulps

pytestmark = CUDA.marks


def check(a, b, t, out_dtype=None):
    a, b = a.cuda(), b.cuda()
    ref = reference.slerp(a, b, t, out_dtype=out_dtype).cpu()
    got = cuda.slerp(a, b, t, out_dtype=out_dtype).cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.numel() == 0:
        return
    rows, cols = _rows(a.shape)
    ca_ref, cb_ref = (c.cpu() for c in slerp_coefficients(a, b, t))
    from pymerge.backends.cuda.slerp import _coefficients, row_stats

    ca, cb = (c.cpu() for c in _coefficients(row_stats(a.contiguous(), b.contiguous()), t))
    assert int(ulps(ca, ca_ref).max()) <= 1 and int(ulps(cb, cb_ref).max()) <= 1
    if torch.equal(ca, ca_ref) and torch.equal(cb, cb_ref):
        assert_bits_equal(got, ref)
    else:
        x = a.float().cpu().reshape(rows, cols)
        y = b.float().cpu().reshape(rows, cols)
        bound = 2.0**-22 * ((ca_ref[:, None] * x).abs() + (cb_ref[:, None] * y).abs())
        one_ulp = torch.finfo(ref.dtype).eps * ref.float().abs().reshape(rows, cols)
        err = (got.float() - ref.float()).abs().reshape(rows, cols)
        assert bool((err <= bound + one_ulp + torch.finfo(ref.dtype).tiny).all())


def pair(shape, dtypes, gen, mix=0.7):
    x = torch.randn(shape, generator=gen)
    y = mix * x + (1 - mix) * torch.randn(shape, generator=gen)
    return x.to(dtypes[0]), y.to(dtypes[1])


SHAPES = [(0,), (3, 0), (0, 5), (), (1,), (7,), (8,), (9,), (1000,), (65537,), (33, 1000), (7, 3 * 8192 + 5),
          (300, 333), (4, 5, 6), (2, 16384)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    a, b = pair(shape, (dtype, dtype), gen)
    for t in (0.0, 0.3, 1.0):
        check(a, b, t)


@pytest.mark.parametrize("a_dtype", DTYPES)
@pytest.mark.parametrize("b_dtype", DTYPES)
def test_mixed_dtypes(a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(a_dtype) * 3 + DTYPES.index(b_dtype))
    a, b = pair((17, 129), (a_dtype, b_dtype), gen)
    for out_dtype in DTYPES:
        check(a, b, 0.45, out_dtype=out_dtype)


def test_lerp_rows_bit_identical_and_degenerate_rows():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(10, 300, generator=gen)
    b = a * 1.5 + 1e-4 * torch.randn(10, 300, generator=gen)
    b[1] = -a[1]
    a[3] = 0.0
    a[4] = 1e-10
    a[5], b[5] = 0.0, 0.0
    b[7, ::2] = float("inf")
    b[8, 3] = float("nan")
    lerp = torch.tensor([0, 1, 2, 6, 9])
    for t in (0.0, 0.25, 0.9, 1.0, -0.5, 1.5):
        for dtype in DTYPES:
            check(a.to(dtype), b.to(dtype), t)
            ref = reference.slerp(a[lerp].to(dtype).cuda(), b[lerp].to(dtype).cuda(), t).cpu()
            assert_bits_equal(cuda.slerp(a[lerp].to(dtype).cuda(), b[lerp].to(dtype).cuda(), t).cpu(), ref)


def test_row_sums_reproducible():
    gen = torch.Generator().manual_seed(5)
    a, b = pair((64, 20000), (torch.bfloat16, torch.bfloat16), gen)
    from pymerge.backends.cuda.slerp import row_stats

    s1 = row_stats(a.cuda(), b.cuda())
    s2 = row_stats(a.cuda(), b.cuda())
    assert torch.equal(s1, s2)
    x = a.double().reshape(64, -1)
    y = b.double().reshape(64, -1)
    want = torch.stack([(x * x).sum(1), (y * y).sum(1), (x * y).sum(1)])
    assert torch.allclose(s1.cpu(), want, rtol=1e-12, atol=0)


def test_errors():
    x = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="differ"):
        cuda.slerp(x, torch.ones(5, device="cuda"), 0.5)
    with pytest.raises(ValueError, match="finite"):
        cuda.slerp(x, x, float("nan"))
    with pytest.raises(ValueError, match="CUDA"):
        cuda.slerp(torch.ones(4), torch.ones(4), 0.5)


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 50), c=st.integers(1, 3000), dtype=st.sampled_from(DTYPES), t=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_property(r, c, dtype, t, seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = pair((r, c), (dtype, dtype), gen)
    check(a, b, t)
