"""pymerge._C_cuda EMR against the torch reference (needs a GPU).

u, the bit-planes and the reconstruction are bit-identical. The per-tensor fp64
sums use a fixed reduction order (per-thread slots, a fixed tree per block,
block partials added in order with compensation) instead of torch's, so they
agree to a few fp64 ulps: relative 1e-13 here, and bit-identical between runs.
"""

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


def inputs(numel, k, dtypes, gen):
    b32 = torch.randn(numel, generator=gen)
    ms = [(b32 + 0.1 * torch.randn(numel, generator=gen)).to(dtypes[(i + 1) % len(dtypes)]) for i in range(k)]
    return b32.to(dtypes[0]), ms


def check_elect(base, tensors, **kw):
    ref = reference.emr_elect(base, tensors, **kw)
    got = cuda.emr_elect(base.cuda(), [t.cuda() for t in tensors], **kw)
    assert_bits_equal(got.u.cpu(), ref.u)
    assert torch.equal(got.masks.cpu(), ref.masks)
    assert got.numel == ref.numel
    for g, r in ((got.abs_tau_sum.cpu(), ref.abs_tau_sum), (got.abs_masked_u_sum.cpu(), ref.abs_masked_u_sum)):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        finite = torch.isfinite(r)
        assert torch.equal(g[~finite & ~torch.isnan(r)], r[~finite & ~torch.isnan(r)])
        assert torch.allclose(g[finite], r[finite], rtol=1e-13, atol=0.0)
    again = cuda.emr_elect(base.cuda(), [t.cuda() for t in tensors], **kw)
    assert torch.equal(again.abs_tau_sum, got.abs_tau_sum) and torch.equal(again.abs_masked_u_sum, got.abs_masked_u_sum)
    return got


@pytest.mark.parametrize("numel", [1, 7, 31, 32, 33, 255, 257, 4097, 65536 + 9, 1_000_003])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 11])
def test_elect_matches_reference(numel, dtype, k):
    gen = torch.Generator().manual_seed(numel * 13 + k)
    b, ms = inputs(numel, k, [dtype], gen)
    check_elect(b, ms)
    check_elect(b, ms, zero_sign="zero", out_dtype=torch.float32)


def test_elect_worked_example_and_ties():
    t1 = torch.tensor([.30, -.10, .05, 0, -.40, .20, .01, -.02, .50, -.30])
    t2 = torch.tensor([-.20, -.30, .10, 0, .40, -.10, .02, .03, .10, .20])
    t3 = torch.tensor([.10, .20, -.60, 0, -.10, .30, 0, -.05, .20, -.10])
    base = torch.zeros(10)
    for zs in ("neg", "zero"):
        check_elect(base, [t1, t2, t3], zero_sign=zs)
    # exact cancellations (s == 0), mixed dtypes, special values
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, float("inf"), float("nan"), 2.0, -2.0] * 5)
    for zs in ("neg", "zero"):
        check_elect(torch.zeros(40, dtype=torch.bfloat16), [x.half(), (-x).float(), x.bfloat16()], zero_sign=zs)


def test_elect_empty_and_many_models():
    check_elect(torch.zeros(0), [torch.zeros(0)] * 3)
    gen = torch.Generator().manual_seed(3)
    b, ms = inputs(3001, 64, [torch.float16], gen)
    check_elect(b, ms)


@pytest.mark.parametrize("numel", [0, 1, 31, 33, 4099, 1_000_001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruct(numel, dtype):
    gen = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=gen).to(dtype)
    u = (0.1 * torch.randn(numel, generator=gen)).to(DTYPES[(DTYPES.index(dtype) + 1) % 3])
    words = reference.pack_bits(torch.rand(numel, generator=gen) < 0.5)
    for lam, out_dtype in ((1.37, None), (-0.5, torch.float32)):
        ref = reference.emr_reconstruct(base, u, words, lam, out_dtype=out_dtype)
        got = cuda.emr_reconstruct(base.cuda(), u.cuda(), words.cuda(), lam, out_dtype=out_dtype)
        assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (3, 64), (5, 70), (2, 3, 1000), (4, 0)], ids=str)
def test_pack_unpack(shape):
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    mask = torch.rand(shape, generator=gen) < 0.4
    words = cuda.pack_bits(mask.cuda())
    assert torch.equal(words.cpu(), reference.pack_bits(mask))
    assert torch.equal(cuda.unpack_bits(words, shape[-1]).cpu(), mask)


def test_errors():
    x = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        cuda.emr_elect(torch.ones(4), [x])
    with pytest.raises(ValueError, match="zero_sign"):
        cuda.emr_elect(x, [x], zero_sign="pos")
    with pytest.raises(ValueError, match="mask_words"):
        cuda.emr_reconstruct(x, x, torch.zeros(2, dtype=torch.int32, device="cuda"), 1.0)


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 3000), k=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
       zs=st.sampled_from(["neg", "zero"]), seed=st.integers(0, 2**31 - 1))
def test_property(numel, k, dtype, zs, seed):
    gen = torch.Generator().manual_seed(seed)
    b, ms = inputs(numel, k, [dtype], gen)
    check_elect(b, ms, zero_sign=zs)
