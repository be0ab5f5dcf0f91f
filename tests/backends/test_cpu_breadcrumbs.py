"""pymerge._C breadcrumbs kernel (breadcrumbs, breadcrumbs_ties), bit for bit against torch."""

from __future__ import annotations

import os

import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference

# CI builds the extension, so there a missing build fails instead of skipping.
pytestmark = pytest.mark.skipif(
    not cpu.available() and not os.environ.get("CI"), reason="pymerge._C is not built (run `pip install -e .`)"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK = 1024
CHUNK = 1 << 16
ODD = 3 * CHUNK + BLOCK // 2 + 7  # not a multiple of any block or chunk size
SIZES = [0, 1, 7, 1000, 65537, ODD]


def each_isa(fn):
    """fn() under every kernel clone this machine runs (baseline, and AVX2 where present)."""
    from pymerge import _C

    try:
        _C._set_force_generic(False)
        isas = ["generic"] if _C._kernel_isa() == "generic" else ["generic", _C._kernel_isa()]
        out = []
        for isa in isas:
            _C._set_force_generic(isa == "generic")
            out.append(fn())
        return out
    finally:
        _C._set_force_generic(False)


def models(size, dtypes, gen, *, base_dtype=None, tiny=False, scale=0.01):
    """(base, tensors); tiny: values from a small exact set, so |tau| ties everywhere."""
    base_dtype = base_dtype or dtypes[0]
    if tiny:
        base = torch.randint(-8, 9, (size,), generator=gen).float() / 4
        ts = [base + torch.randint(-3, 4, (size,), generator=gen).float() / 4 for _ in dtypes]
    else:
        base = torch.randn(size, generator=gen)
        ts = [base + scale * torch.randn(size, generator=gen) for _ in dtypes]
    return base.to(base_dtype), [t.to(dt) for t, dt in zip(ts, dtypes)]


@pytest.mark.parametrize("size,dtype", [(s, dt) for s in SIZES[:-1] for dt in DTYPES] + [(ODD, torch.bfloat16)])
def test_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 41 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    args = (base, ts, [1.0, -0.6, 0.8], [0.3, 0.7, 0.9], [0.01, 0.05, 0.1])
    for combine in ("linear", "ties"):
        kw = dict(lam=0.8, combine=combine)
        ref = reference.breadcrumbs_merge(*args, **kw)
        for got in each_isa(lambda: cpu.breadcrumbs_merge(*args, **kw)):
            assert_bits_equal(got, ref)


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


@pytest.mark.parametrize(
    "densities,gammas",
    [(0.0, 0.01), (1.0, 0.01), (1.0, 0.5), (0.5, 0.0), (0.7, 0.5), (0.95, 0.2), (1e-9, 0.999), (0.3, 1.5),
     (0.3, -1.0), ([0.0, 1.0, 0.4], [0.5, 0.0, 0.6])],
)
@pytest.mark.parametrize("tiny", [False, True])
def test_count_edges(densities, gammas, tiny):
    gen = torch.Generator().manual_seed(3 + tiny)
    base, ts = models(2999, [torch.bfloat16] * 3, gen, tiny=tiny)
    for combine in ("linear", "ties"):
        ref = reference.breadcrumbs_merge(base, ts, [1.0, 2.0, -1.0], densities, gammas, combine=combine)
        got = cpu.breadcrumbs_merge(base, ts, [1.0, 2.0, -1.0], densities, gammas, combine=combine)
        assert_bits_equal(got, ref)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(300 + n_models)
    dts = [DTYPES[(i + 2) % 3] for i in range(n_models)]
    base, ts = models(6007, dts, gen, base_dtype=torch.float16, tiny=n_models % 2 == 1)
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, combine="ties" if n_models % 2 else "linear", normalize=n_models > 4)
        ref = reference.breadcrumbs_merge(base, ts, weights, densities, 0.05, **kw)
        assert_bits_equal(cpu.breadcrumbs_merge(base, ts, weights, densities, 0.05, **kw), ref)


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
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, -1.0, 0.5, 2.0])
    base = specials.repeat(10)
    a = specials.repeat_interleave(10)
    b = specials.flip(0).repeat(10)
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
    cases = [
        dict(base=None, tensors=[x]),
        dict(base=x, tensors=[x], combine="x"),
        dict(base=x, tensors=[x], consensus="x"),
        dict(base=x, tensors=[x], densities=float("nan")),
        dict(base=x, tensors=[x], gammas=float("nan")),
        dict(base=x, tensors=[x, x], gammas=[0.1]),
        dict(base=x, tensors=[x, x], weights=[1.0, -1.0], normalize=True),
        dict(base=x, tensors=[x], lam=float("nan"), combine="ties"),
        dict(base=x, tensors=[x], out_dtype=torch.float64),
    ]
    for case in cases:
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.breadcrumbs_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cpu.breadcrumbs_merge(base, tensors, **case)
    from pymerge import _C

    with pytest.raises(ValueError, match="n_top"):
        _C.breadcrumbs_merge(x.data_ptr(), 0, [x.data_ptr()], [0], x.data_ptr(), 0, 4, [3], [2], [1.0], False, 1.0,
                             False, False)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
        densities=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=5, max_size=5),
        gammas=st.lists(st.floats(-0.1, 0.6, allow_nan=False), min_size=5, max_size=5),
        lam=st.floats(-2, 2, allow_nan=False),
        normalize=st.booleans(),
        combine=st.sampled_from(["linear", "ties"]),
        consensus=st.sampled_from(["sum", "count"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_breadcrumbs_merge(shape, in_dtypes, base_dtype, out_dtype, weights, densities, gammas, lam,
                                        normalize, combine, consensus, tiny, seed):
        gen = torch.Generator().manual_seed(seed)
        size = 1
        for d in shape:
            size *= d
        base, ts = models(size, in_dtypes, gen, base_dtype=base_dtype, tiny=tiny, scale=0.3)
        base, ts = base.reshape(shape), [t.reshape(shape) for t in ts]
        n = len(ts)
        w = weights[:n]
        kw = dict(lam=lam, normalize=normalize, combine=combine, consensus=consensus, out_dtype=out_dtype)
        if combine == "linear" and normalize and sum(w) == 0:
            with pytest.raises(ValueError):
                cpu.breadcrumbs_merge(base, ts, w, densities[:n], gammas[:n], **kw)
            return
        ref = reference.breadcrumbs_merge(base, ts, w, densities[:n], gammas[:n], **kw)
        assert_bits_equal(cpu.breadcrumbs_merge(base, ts, w, densities[:n], gammas[:n], **kw), ref)
