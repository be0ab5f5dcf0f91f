"""pymerge._C TIES kernels (ties_merge, ties_sign_sum, ties_merge_model), bit for bit against torch."""

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
# Kernel layout: blocks of 1024 elements, chunks of >= 64K elements (one per thread).
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
    """(base, tensors): fine-tunes near a base. tiny: every value from a small exact set,
    so |tau| takes a handful of values and the index tie-break decides most of the trim."""
    base_dtype = base_dtype or dtypes[0]
    if tiny:
        base = torch.randint(-8, 9, (size,), generator=gen).float() / 4
        ts = [base + torch.randint(-2, 3, (size,), generator=gen).float() / 4 for _ in dtypes]
    else:
        base = torch.randn(size, generator=gen)
        ts = [base + scale * torch.randn(size, generator=gen) for _ in dtypes]
    return base.to(base_dtype), [t.to(dt) for t, dt in zip(ts, dtypes)]


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("size,dtype", [(s, dt) for s in SIZES[:-1] for dt in DTYPES] + [(ODD, torch.bfloat16)])
def test_ties_merge_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 17 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    kw = dict(lam=0.9)
    args = (base, ts, [1.0, -0.5, 0.7], [0.3, 0.55, 1.0])
    ref = reference.ties_merge(*args, **kw)
    for got in each_isa(lambda: cpu.ties_merge(*args, **kw)):
        assert_bits_equal(got, ref)


@pytest.mark.parametrize("size", [1000, ODD])
@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_at_the_threshold(size, trim_ties, consensus, normalize):
    gen = torch.Generator().manual_seed(size + len(trim_ties) + len(consensus) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.77, 0.05])
    kw = dict(normalize=normalize, consensus=consensus, trim_ties=trim_ties, lam=1.3)
    ref = reference.ties_merge(*args, **kw)
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        assert_bits_equal(cpu.ties_merge(*args, **kw), ref)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_ties_merge_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(100 + n_models)
    dts = [DTYPES[(i + 1) % 3] for i in range(n_models)]
    base, ts = models(5003, dts, gen, base_dtype=torch.float16)
    weights = [(-1) ** i * (0.4 + i / 5) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, consensus="count" if n_models % 2 else "sum")
        ref = reference.ties_merge(base, ts, weights, densities, **kw)
        assert_bits_equal(cpu.ties_merge(base, ts, weights, densities, **kw), ref)


@pytest.mark.parametrize("densities", [0.0, 1.0, 1e-12, 0.9999999, 2.0, -0.5, [0.0, 1.0, 0.5], [1.0, 0.0, 1e-3]])
@pytest.mark.parametrize("tiny", [False, True])
def test_density_edges(densities, tiny):
    gen = torch.Generator().manual_seed(7 + tiny)
    base, ts = models(3001, [torch.bfloat16] * 3, gen, tiny=tiny)
    ref = reference.ties_merge(base, ts, [1.0, 2.0, -1.0], densities)
    assert_bits_equal(cpu.ties_merge(base, ts, [1.0, 2.0, -1.0], densities), ref)


def test_weights_that_cancel_and_zero_weights():
    # normalize: the divisor sum_i m_i w_i can be 0 (-> 1); weights 0 and -0.0 give signed zeros.
    gen = torch.Generator().manual_seed(8)
    base, ts = models(4000, [torch.float32] * 4, gen, tiny=True)
    for weights in ([1.0, -1.0, 1.0, -1.0], [0.0, -0.0, 1.0, 0.0], [-2.0, -0.5, -1.0, -3.0]):
        for normalize in (True, False):
            ref = reference.ties_merge(base, ts, weights, 0.6, normalize=normalize)
            assert_bits_equal(cpu.ties_merge(base, ts, weights, 0.6, normalize=normalize), ref)


@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
def test_thread_counts_identical(trim_ties):
    # Chunk borders fall inside runs of threshold-equal keys.
    gen = torch.Generator().manual_seed(11)
    size = 4 * CHUNK + 12345
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = (base, ts, [0.25, -0.5, 1.0], [0.3, 0.41, 0.62])
    ref = reference.ties_merge(*args, trim_ties=trim_ties)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        for got in each_isa(lambda: cpu.ties_merge(*args, trim_ties=trim_ties)):
            assert_bits_equal(got, ref)


def test_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 3e38, -3e38, 1.0]
    vals = torch.tensor(specials, dtype=torch.float32)
    base = vals.repeat(len(specials) * 2)
    a = vals.repeat_interleave(len(specials)).repeat(2)
    b = torch.cat([vals.flip(0).repeat(len(specials)), vals.repeat(len(specials))])
    for trim_ties in ("exact", "inclusive"):
        for consensus in ("sum", "count"):
            for density in (0.3, 0.9, 1.0):
                kw = dict(trim_ties=trim_ties, consensus=consensus)
                ref = reference.ties_merge(base, [a, b], [1.0, 0.5], density, **kw)
                assert_bits_equal(cpu.ties_merge(base, [a, b], [1.0, 0.5], density, **kw), ref)


def test_shapes_non_contiguous_and_defaults():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(48, 64, generator=gen).bfloat16()
    a = (base.float().t() + 0.01 * torch.randn(64, 48, generator=gen)).bfloat16().t()  # non-contiguous
    b = (base.float() + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.float16)
    got = cpu.ties_merge(base, [a, b], densities=0.4)
    assert got.shape == (48, 64) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_bits_equal(got, reference.ties_merge(base, [a, b], densities=0.4))
    scalar = torch.tensor(1.5)
    assert_bits_equal(cpu.ties_merge(scalar, [scalar + 1]), reference.ties_merge(scalar, [scalar + 1]))


def test_dispatch_runs_the_cpu_backend():
    gen = torch.Generator().manual_seed(6)
    base, ts = models(100, [torch.float32] * 2, gen)
    got = pymerge.ops.ties_merge(base, ts, densities=0.5)
    assert pymerge.ops.last_backend() == "cpu"
    assert_bits_equal(got, reference.ties_merge(base, ts, densities=0.5))


def test_errors_match_reference():
    x = torch.ones(4)
    cases = [
        dict(base=None, tensors=[x]),
        dict(base=x, tensors=[]),
        dict(base=x, tensors=[torch.ones(5)]),
        dict(base=x, tensors=[x], consensus="median"),
        dict(base=x, tensors=[x], trim_ties="loose"),
        dict(base=x, tensors=[x, x], weights=[1.0]),
        dict(base=x, tensors=[x], densities=float("nan")),
        dict(base=x, tensors=[x], weights=[float("inf")]),
        dict(base=x, tensors=[x], lam=float("nan")),
        dict(base=x, tensors=[x], out_dtype=torch.int32),
        dict(base=x, tensors=[x.double()]),
    ]
    for case in cases:
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.ties_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cpu.ties_merge(base, tensors, **case)
    with pytest.raises(ValueError, match="meta"):
        cpu.ties_merge(torch.ones(4, device="meta"), [torch.ones(4, device="meta")])


# ---------------------------------------------------------------- model scope


def thresholds_for(base, ts, quantile):
    """Per-model thresholds near the given quantile of |tau| (from a sample: any value will do)."""
    tau = [(t.float() - base.float()).abs().reshape(-1) for t in ts]
    return [float(x[:: max(1, x.numel() // 2000)].quantile(quantile)) if x.numel() else 0.0 for x in tau]


@pytest.mark.parametrize("size", [0, 1, 7, 1000, ODD])
@pytest.mark.parametrize("tiny", [False, True])
def test_ties_sign_sum_matches_reference(size, tiny):
    gen = torch.Generator().manual_seed(size + tiny)
    base, ts = models(size, [torch.bfloat16, torch.float32, torch.float16], gen, tiny=tiny)
    for th in ([0.0, 0.0, 0.0], thresholds_for(base, ts, 0.6) if size else [0.1] * 3, [1e30, 0.0, 0.25]):
        ref = reference.ties_sign_sum(base, ts, th)
        got = cpu.ties_sign_sum(base, ts, th)
        assert isinstance(got, int) and got == ref


@pytest.mark.parametrize("size", [0, 1, 7, 1000, ODD])
@pytest.mark.parametrize("merge", ["dis-mean", "dis-sum"])
def test_ties_merge_model_matches_reference(size, merge):
    gen = torch.Generator().manual_seed(size + len(merge))
    for tiny in (False, True):
        base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32], gen, tiny=tiny)
        th = thresholds_for(base, ts, 0.5) if size else [0.0] * 4
        for fallback, out_dtype in ((-3, None), (0, torch.float32), (1, torch.float16)):
            kw = dict(lam=0.7, merge=merge, out_dtype=out_dtype)
            ref = reference.ties_merge_model(base, ts, th, fallback, **kw)
            for got in each_isa(lambda: cpu.ties_merge_model(base, ts, th, fallback, **kw)):
                assert_bits_equal(got, ref)


def test_model_scope_threads_and_worked_example():
    gen = torch.Generator().manual_seed(12)
    base, ts = models(2 * CHUNK + 5, [torch.bfloat16] * 3, gen, tiny=True)
    th = [0.25, 0.5, 0.0]
    ref_sum = reference.ties_sign_sum(base, ts, th)
    ref = reference.ties_merge_model(base, ts, th, 1)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        assert cpu.ties_sign_sum(base, ts, th) == ref_sum
        assert_bits_equal(cpu.ties_merge_model(base, ts, th, 1), ref)
    # specs/methods.md worked example, through the whole-model oracle's thresholds.
    tau = torch.tensor([
        [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30],
        [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20],
        [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10],
    ])
    zero = torch.zeros(10)
    th = [reference.ties.ties_model_threshold(t.abs(), 0.4) for t in tau]
    fb = cpu.ties_sign_sum(zero, list(tau), th)
    got = cpu.ties_merge_model(zero, list(tau), th, fb)
    expected = torch.tensor([0.2, -0.3, -0.6, 0, -0.25, 0.25, 0, 0, 0.8 / 3, -0.2])
    torch.testing.assert_close(got, expected)
    assert_bits_equal(got, reference.ties_merge_model(zero, list(tau), th, fb))


def test_model_scope_errors_match_reference():
    x = torch.ones(4)
    for call in (
        lambda m: m.ties_sign_sum(None, [x], [0.0]),
        lambda m: m.ties_sign_sum(x, [x], [-1.0]),
        lambda m: m.ties_sign_sum(x, [x, x], [0.0]),
        lambda m: m.ties_merge_model(x, [x], [0.0], 1, merge="mean"),
        lambda m: m.ties_merge_model(x, [x], [0.0], True),
        lambda m: m.ties_merge_model(x, [x], [float("nan")], 1),
        lambda m: m.ties_merge_model(x, [x], [0.0], 1, lam=float("inf")),
    ):
        with pytest.raises(ValueError):
            call(reference)
        with pytest.raises(ValueError):
            call(cpu)


def test_binding_checks():
    from pymerge import _C

    x = torch.ones(8)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="ks"):
        _C.ties_merge(out.data_ptr(), 0, [x.data_ptr()], [0], x.data_ptr(), 0, 8, [1, 2], [1.0], 1.0, True, False, False)
    with pytest.raises(ValueError, match="dtype tag"):
        _C.ties_merge(out.data_ptr(), 5, [x.data_ptr()], [0], x.data_ptr(), 0, 8, [1], [1.0], 1.0, True, False, False)
    with pytest.raises(ValueError, match="overlaps"):
        _C.ties_merge(x.data_ptr() + 4, 0, [x.data_ptr()], [0], out.data_ptr(), 0, 4, [1], [1.0], 1.0, True, False, False)


# ---------------------------------------------------------------- properties

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    def _draw_models(shape, in_dtypes, base_dtype, tiny, seed):
        gen = torch.Generator().manual_seed(seed)
        size = 1
        for d in shape:
            size *= d
        base, ts = models(size, in_dtypes, gen, base_dtype=base_dtype, tiny=tiny, scale=0.3)
        return base.reshape(shape), [t.reshape(shape) for t in ts]

    @_settings
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
        densities=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=5, max_size=5),
        lam=st.floats(-2, 2, allow_nan=False),
        normalize=st.booleans(),
        consensus=st.sampled_from(["sum", "count"]),
        trim_ties=st.sampled_from(["exact", "inclusive"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_merge(shape, in_dtypes, base_dtype, out_dtype, weights, densities, lam, normalize, consensus,
                                 trim_ties, tiny, seed):
        base, ts = _draw_models(shape, in_dtypes, base_dtype, tiny, seed)
        n = len(ts)
        kw = dict(lam=lam, normalize=normalize, consensus=consensus, trim_ties=trim_ties, out_dtype=out_dtype)
        ref = reference.ties_merge(base, ts, weights[:n], densities[:n], **kw)
        assert_bits_equal(cpu.ties_merge(base, ts, weights[:n], densities[:n], **kw), ref)

    @_settings
    @given(
        size=st.integers(0, 300),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_sign_sum(size, in_dtypes, thresholds, tiny, seed):
        base, ts = _draw_models([size], in_dtypes, torch.float32, tiny, seed)
        th = thresholds[: len(ts)]
        assert cpu.ties_sign_sum(base, ts, th) == reference.ties_sign_sum(base, ts, th)

    @_settings
    @given(
        shape=st.lists(st.integers(0, 30), min_size=0, max_size=2),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        fallback=st.integers(-2, 2),
        lam=st.floats(-2, 2, allow_nan=False),
        merge=st.sampled_from(["dis-mean", "dis-sum"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_merge_model(shape, in_dtypes, base_dtype, thresholds, fallback, lam, merge, tiny, seed):
        base, ts = _draw_models(shape, in_dtypes, base_dtype, tiny, seed)
        th = thresholds[: len(ts)]
        ref = reference.ties_merge_model(base, ts, th, fallback, lam=lam, merge=merge)
        assert_bits_equal(cpu.ties_merge_model(base, ts, th, fallback, lam=lam, merge=merge), ref)
