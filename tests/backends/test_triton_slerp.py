"""Triton slerp against the reference.

Lerp rows (|dot| > 0.9995) are bit-identical. Slerp rows: the fp64 row sums are added
in another order than torch's, so a coefficient may be one fp32 ulp off; the output is
then within 2^-22 (|ca x| + |cb y|) plus one ulp of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.backends.triton.slerp import _coefficients  # noqa: E402
from pymerge.ops import reference  # noqa: E402
from pymerge.ops.reference.slerp import _rows, slerp_coefficients  # noqa: E402

from .cases import DTYPES, TRITON, assert_same_bits as assert_bits_equal, ulp_distance  # noqa: E402

pytestmark = TRITON.marks

DEVICE = TRITON.device


def kernels():
    from pymerge.backends.triton._lib import kernels

    return kernels()


def check(a, b, t, out_dtype=None):
    ref = reference.slerp(a, b, t, out_dtype=out_dtype)
    got = tb.slerp(a.to(DEVICE), b.to(DEVICE), t, out_dtype=out_dtype).cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.numel() == 0:
        return
    rows, cols = _rows(a.shape)
    x = a.float().reshape(rows, cols)
    y = b.float().reshape(rows, cols)
    ca_ref, cb_ref = slerp_coefficients(a, b, t)
    ca, cb = _coefficients(*kernels().slerp.row_sums(x.to(DEVICE), y.to(DEVICE)), t)
    assert int(ulp_distance(ca.cpu(), ca_ref).max()) <= 1 and int(ulp_distance(cb.cpu(), cb_ref).max()) <= 1
    same = torch.equal(ca.cpu(), ca_ref) and torch.equal(cb.cpu(), cb_ref)
    if same:
        assert_bits_equal(got, ref)  # (ca, cb) fix the output bit for bit
    else:
        bound = 2.0**-22 * (ca_ref[:, None] * x).abs() + 2.0**-22 * (cb_ref[:, None] * y).abs()
        one_ulp = torch.finfo(ref.dtype).eps * ref.float().abs().reshape(rows, cols)
        err = (got.float() - ref.float()).abs().reshape(rows, cols)
        assert bool((err <= bound + one_ulp + torch.finfo(ref.dtype).tiny).all())
    return same


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1000,), (3, 2125), (33, 70), (4, 5, 6), (0, 4), (4, 0)])
def test_matches_reference(shape):
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    for k, t in enumerate((0.0, 0.3, 1.0)):
        a = torch.randn(shape, generator=gen).to(DTYPES[k])
        b = torch.randn(shape, generator=gen).to(DTYPES[(k + 1) % 3])
        check(a, b, t, out_dtype=DTYPES[(k + 2) % 3])


def test_lerp_rows_bit_identical_and_zero_rows():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 300, generator=gen)
    b = a * 1.5 + 1e-4 * torch.randn(6, 300, generator=gen)  # nearly parallel rows: the lerp branch
    b[1] = -a[1]  # antiparallel: lerp too (|dot| = 1)
    a[2] = 0.0  # a zero row: norm 1, dot 0, theta = pi / 2
    b[3] = 0.0
    for t in (0.25, 0.5, 0.75):
        for out_dtype in DTYPES:
            check(a, b, t, out_dtype=out_dtype)
    lerp = torch.tensor([0, 1, 4, 5])
    for out_dtype in DTYPES:
        ref = reference.slerp(a[lerp], b[lerp], 0.4, out_dtype=out_dtype)
        assert_bits_equal(tb.slerp(a[lerp].to(DEVICE), b[lerp].to(DEVICE), 0.4, out_dtype=out_dtype).cpu(), ref)


def test_errors():
    x = torch.ones(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="shapes"):
        tb.slerp(x, torch.ones(4, 3, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match="dtype"):
        tb.slerp(x, x.double(), 0.5)
    with pytest.raises(ValueError, match="finite"):
        tb.slerp(x, x, float("inf"))
