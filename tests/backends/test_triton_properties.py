"""Property tests: the Triton ops equal the reference bit for bit on generated inputs (few examples: interpreted)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.available(), reason="needs a GPU or TRITON_INTERPRET=1")

DEVICE = "cpu" if tb.interpreted() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def same(actual, ref):
    actual = actual.cpu()
    return actual.dtype == ref.dtype and actual.shape == ref.shape and torch.equal(bits(actual), bits(ref))


@st.composite
def models(draw, max_models=8, max_size=2200):
    """(base, tensors, weights, out_dtype): fine-tunes near a base, mixed dtypes."""
    size = draw(st.integers(0, max_size))
    n = draw(st.integers(1, max_models))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    base32 = torch.randn(size, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    base = base32.to(draw(st.sampled_from(DTYPES)))
    tensors = [(base32 + 0.01 * torch.randn(size, generator=gen)).to(draw(st.sampled_from(DTYPES))) for _ in range(n)]
    weights = draw(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n))
    return base, tensors, weights, draw(st.sampled_from(DTYPES))


def on_device(base, tensors):
    return base.to(DEVICE), [t.to(DEVICE) for t in tensors]


@FEW
@given(models(), st.booleans(), st.floats(-2, 2, allow_nan=False))
def test_weighted_sum(case, with_base, lam):
    base, tensors, weights, out_dtype = case
    b = base if with_base else None
    ref = reference.weighted_sum(tensors, weights, base=b, lam=lam, out_dtype=out_dtype)
    db, dts = on_device(base, tensors)
    assert same(tb.weighted_sum(dts, weights, base=db if with_base else None, lam=lam, out_dtype=out_dtype), ref)


@FEW
@given(
    models(max_models=4, max_size=1500),
    st.sampled_from(["linear", "ties"]),
    st.sampled_from(["l1", "inverse_density", "none"]),
    st.text(max_size=12),
    st.integers(0, 2**64 - 1),
    st.floats(0, 1),
)
def test_dare_merge(case, combine, rescale, name, seed, density):
    base, tensors, weights, out_dtype = case
    kw = dict(name=name, seed=seed, combine=combine, rescale=rescale, normalize=combine == "ties", out_dtype=out_dtype)
    ref = reference.dare_merge(base, tensors, weights, density, **kw)
    db, dts = on_device(base, tensors)
    assert same(tb.dare_merge(db, dts, weights, density, **kw), ref)


@FEW
@given(models(max_models=6), st.sampled_from(["neg", "zero"]))
def test_emr_elect(case, zero_sign):
    base, tensors, _, out_dtype = case
    ref = reference.emr_elect(base, tensors, zero_sign=zero_sign, out_dtype=out_dtype)
    got = tb.emr_elect(*on_device(base, tensors), zero_sign=zero_sign, out_dtype=out_dtype)
    assert same(got.u, ref.u) and torch.equal(got.masks.cpu(), ref.masks)
    torch.testing.assert_close(got.abs_tau_sum.cpu(), ref.abs_tau_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.abs_masked_u_sum.cpu(), ref.abs_masked_u_sum, rtol=1e-12, atol=0)
