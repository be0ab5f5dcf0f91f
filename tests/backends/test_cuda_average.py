"""pymerge._C_cuda weighted_sum against the torch reference, bit for bit (needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pymerge.ops
from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

from .cases import CUDA, DTYPES

pytestmark = CUDA.marks

# 8 elements per thread, 256 threads per block: sizes around those, and odd ones.
SIZES = [0, 1, 7, 8, 9, 255, 2048, 2049, 65536 + 3, 1_000_003]


def models(numel, k, dtypes, gen, base=True):
    b32 = torch.randn(numel, generator=gen)
    b = b32.to(dtypes[0]) if base else None
    ms = [(b32 + 0.1 * torch.randn(numel, generator=gen)).to(dtypes[(i + 1) % len(dtypes)]) for i in range(k)]
    return b, ms


def check(tensors, weights=None, **kw):
    ref = reference.weighted_sum(tensors, weights, **kw)
    dev_kw = dict(kw)
    if kw.get("base") is not None:
        dev_kw["base"] = kw["base"].cuda()
    got = cuda.weighted_sum([t.cuda() for t in tensors], weights, **dev_kw)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_matches_reference(numel, dtype, k):
    gen = torch.Generator().manual_seed(numel * 31 + k)
    b, ms = models(numel, k, [dtype], gen)
    w = torch.rand(k, generator=gen).tolist()
    check(ms, w, base=b, lam=0.7)
    check(ms, w, normalize=True)
    check(ms, None, base=b, lam=1.3, normalize=True, out_dtype=torch.float32)


def test_mixed_dtypes_and_misaligned_views():
    gen = torch.Generator().manual_seed(1)
    b, ms = models(5000, 4, DTYPES, gen)
    for out_dtype in DTYPES:
        check(ms, [0.5, -1.0, 2.0, 0.25], base=b, out_dtype=out_dtype)
    # storage offsets that break 16-byte alignment: the scalar path
    big = [torch.randn(4099, generator=gen).to(torch.bfloat16) for _ in range(3)]
    views = [t[3:] for t in big]
    ref = reference.weighted_sum(views, [1.0, 2.0, 3.0], base=views[0])
    dev = [t.cuda()[3:] for t in big]
    assert_bits_equal(cuda.weighted_sum(dev, [1.0, 2.0, 3.0], base=dev[0]).cpu(), ref)


def test_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 65504.0, 3e38, -3e38])
    ms = [x, x.flip(0), -x]
    for dtype in DTYPES:
        check([m.to(dtype) for m in ms], [1.0, 1.0, 1.0])
        check([m.to(dtype) for m in ms], [0.5, 2.0, -1.0], base=x.to(dtype))


def test_many_models_and_limits():
    gen = torch.Generator().manual_seed(2)
    b, ms = models(3001, 64, [torch.bfloat16], gen)
    check(ms, torch.rand(64, generator=gen).tolist(), base=b)
    with pytest.raises(ValueError, match="at most"):
        cuda.weighted_sum([m.cuda() for m in ms] + [ms[0].cuda()])


def test_ops_dispatch_and_stream():
    gen = torch.Generator().manual_seed(3)
    b, ms = models(10_000, 3, [torch.float16], gen)
    ref = reference.weighted_sum(ms, [1.0, 2.0, 3.0], base=b)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = pymerge.ops.weighted_sum([m.cuda() for m in ms], [1.0, 2.0, 3.0], base=b.cuda(), backend="cuda")
    s.synchronize()
    assert pymerge.ops.last_backend() == "cuda"
    assert_bits_equal(got.cpu(), ref)
    auto = pymerge.ops.weighted_sum([m.cuda() for m in ms], [1.0, 2.0, 3.0], base=b.cuda())
    assert pymerge.ops.last_backend() == "cuda"
    assert_bits_equal(auto.cpu(), ref)


def test_errors():
    x = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        cuda.weighted_sum([torch.ones(4)])
    with pytest.raises(ValueError, match="shape"):
        cuda.weighted_sum([x, torch.ones(5, device="cuda")])
    with pytest.raises(ValueError, match="dtype"):
        cuda.weighted_sum([x.double()])
    with pytest.raises(ValueError, match="nonzero"):
        cuda.weighted_sum([x, x], [1.0, -1.0], normalize=True)


@settings(max_examples=30, deadline=None)
@given(
    numel=st.integers(0, 5000),
    k=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from(DTYPES),
    with_base=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(numel, k, dtype, out_dtype, with_base, seed):
    gen = torch.Generator().manual_seed(seed)
    b, ms = models(numel, k, [dtype], gen, base=with_base)
    w = (torch.randn(k, generator=gen) * 2).tolist()
    check(ms, w, base=b, lam=0.5, out_dtype=out_dtype)
