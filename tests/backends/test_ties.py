"""TIES kernels (ties_merge, ties_sign_sum, ties_merge_model) of every backend, bit for bit against
the torch reference: the tests whose bodies are the same for each backend. The backend-specific
ones (thread counts, tile borders, streams, bindings) are in test_<backend>_ties.py."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import reference

from .cases import (DTYPES, TIES_MODEL_SCOPE_ERRORS, models, on, over, shaped_models, special_pairs,
                    thresholds_for)

# Sizes: cpu blocks of 1024 elements and chunks of >= 64K (one per thread); cuda selection
# histograms in tiles of 57344 elements and merge tiles of 8192; triton blocks of 1024, kept
# small for the interpreter. Each backend's ODD is a multiple of none of its own sizes.
CPU_ODD = 3 * (1 << 16) + 1024 // 2 + 7
CUDA_ODD = 3 * 57344 + 2 * 8192 + 5
TRITON_ODD = 2 * 1024 + 37
CPU_SIZES = [0, 1, 7, 1000, 65537, CPU_ODD]
CUDA_SIZES = [0, 1, 7, 8, 1000, 8192 + 1, 57344 + 3, CUDA_ODD]
TRITON_SIZES = [0, 1, 7, 1000, TRITON_ODD]


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("bk,size,dtype", over(
    cpu=[(s, dt) for s in CPU_SIZES[:-1] for dt in DTYPES] + [(CPU_ODD, torch.bfloat16)],
    triton=list(zip(TRITON_SIZES, DTYPES + DTYPES)) + [(TRITON_ODD, dt) for dt in DTYPES[:2]],
    cuda=[(s, dt) for dt in DTYPES for s in CUDA_SIZES],
))
def test_ties_merge_matches_reference(bk, size, dtype):
    gen = torch.Generator().manual_seed(size + 17 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    args = ([1.0, -0.5, 0.7], [0.3, 0.55, 1.0])
    ref = reference.ties_merge(base, ts, *args, lam=0.9)
    for got in bk.runs(lambda: bk.mod.ties_merge(*bk.put(base, ts), *args, lam=0.9)):
        bk.check(got, ref)


@pytest.mark.parametrize("bk,n_models", over(cpu=range(1, 9), cuda=range(1, 9)))
def test_model_counts_and_mixed_dtypes(bk, n_models):
    gen = torch.Generator().manual_seed(100 + n_models)
    dts = [DTYPES[(i + 1) % 3] for i in range(n_models)]
    base, ts = models(5003, dts, gen, base_dtype=torch.float16)
    weights = [(-1) ** i * (0.4 + i / 5) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, consensus="count" if n_models % 2 else "sum")
        ref = reference.ties_merge(base, ts, weights, densities, **kw)
        bk.check(bk.mod.ties_merge(*bk.put(base, ts), weights, densities, **kw), ref)


DENSITY_EDGES = [0.0, 1.0, 1e-12, 0.9999999, 2.0, -0.5, [0.0, 1.0, 0.5], [1.0, 0.0, 1e-3]]


@pytest.mark.parametrize("bk,densities,tiny", over(
    cpu=[(d, tiny) for tiny in (False, True) for d in DENSITY_EDGES],
    cuda=[(d, tiny) for tiny in (False, True) for d in DENSITY_EDGES],
))
def test_density_edges(bk, densities, tiny):
    gen = torch.Generator().manual_seed(7 + tiny)
    base, ts = models(3001, [torch.bfloat16] * 3, gen, tiny=tiny)
    ref = reference.ties_merge(base, ts, [1.0, 2.0, -1.0], densities)
    bk.check(bk.mod.ties_merge(*bk.put(base, ts), [1.0, 2.0, -1.0], densities), ref)


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_weights_that_cancel_and_zero_weights(bk):
    # normalize: the divisor sum_i m_i w_i can be 0 (-> 1); weights 0 and -0.0 give signed zeros.
    gen = torch.Generator().manual_seed(8)
    base, ts = models(4000, [torch.float32] * 4, gen, tiny=True)
    for weights in ([1.0, -1.0, 1.0, -1.0], [0.0, -0.0, 1.0, 0.0], [-2.0, -0.5, -1.0, -3.0]):
        for normalize in (True, False):
            ref = reference.ties_merge(base, ts, weights, 0.6, normalize=normalize)
            bk.check(bk.mod.ties_merge(*bk.put(base, ts), weights, 0.6, normalize=normalize), ref)


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_special_values(bk):
    base, a, b = special_pairs()
    for trim_ties in ("exact", "inclusive"):
        for consensus in ("sum", "count"):
            for density in (0.3, 0.9, 1.0):
                kw = dict(trim_ties=trim_ties, consensus=consensus)
                ref = reference.ties_merge(base, [a, b], [1.0, 0.5], density, **kw)
                bk.check(bk.mod.ties_merge(*bk.put(base, [a, b]), [1.0, 0.5], density, **kw), ref)


# ---------------------------------------------------------------- model scope

SIGN_SUM_SIZES = [0, 1, 7, 1000]


@pytest.mark.parametrize("bk,size,tiny", over(
    cpu=[(s, tiny) for tiny in (False, True) for s in SIGN_SUM_SIZES + [CPU_ODD]],
    triton=[(0, False), (1, True), (7, False), (TRITON_ODD, False), (TRITON_ODD, True)],
    cuda=[(s, tiny) for tiny in (False, True) for s in SIGN_SUM_SIZES + [CUDA_ODD]],
))
def test_ties_sign_sum_matches_reference(bk, size, tiny):
    gen = torch.Generator().manual_seed(size + tiny)
    base, ts = models(size, [torch.bfloat16, torch.float32, torch.float16], gen, tiny=tiny)
    for th in ([0.0, 0.0, 0.0], thresholds_for(base, ts, 0.6) if size else [0.1] * 3, [1e30, 0.0, 0.25]):
        got = bk.mod.ties_sign_sum(*bk.put(base, ts), th)
        assert isinstance(got, int) and got == reference.ties_sign_sum(base, ts, th)


@pytest.mark.parametrize("bk,size,merge", over(
    cpu=[(s, m) for m in ("dis-mean", "dis-sum") for s in SIGN_SUM_SIZES + [CPU_ODD]],
    cuda=[(s, m) for m in ("dis-mean", "dis-sum") for s in SIGN_SUM_SIZES + [CUDA_ODD]],
))
def test_ties_merge_model_matches_reference(bk, size, merge):
    gen = torch.Generator().manual_seed(size + len(merge))
    for tiny in (False, True):
        base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32], gen, tiny=tiny)
        th = thresholds_for(base, ts, 0.5) if size else [0.0] * 4
        for fallback, out_dtype in ((-3, None), (0, torch.float32), (1, torch.float16)):
            kw = dict(lam=0.7, merge=merge, out_dtype=out_dtype)
            ref = reference.ties_merge_model(base, ts, th, fallback, **kw)
            for got in bk.runs(lambda: bk.mod.ties_merge_model(*bk.put(base, ts), th, fallback, **kw)):
                bk.check(got, ref)


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_ties_merge_model_special_values(bk):
    base, a, b = special_pairs()
    for dtype in DTYPES:  # one dtype throughout, and mixed (float32 base and models, bfloat16 out)
        args = (base.to(dtype), [a.to(dtype), b.to(dtype)])
        for fallback in (-1, 0, 1):
            for kw in (dict(merge="dis-mean"), dict(merge="dis-sum", lam=0.5), dict(out_dtype=torch.bfloat16)):
                for th in ([0.0, 0.0], [1.0, 1e-40]):
                    ref = reference.ties_merge_model(*args, th, fallback, **kw)
                    bk.check(bk.mod.ties_merge_model(*bk.put(*args), th, fallback, **kw), ref)


@pytest.mark.parametrize("bk", on("cpu", "triton", "cuda"))
def test_model_scope_errors_match_reference(bk):
    x = torch.ones(4)
    for call in TIES_MODEL_SCOPE_ERRORS:
        with pytest.raises(ValueError):
            call(reference, x)
        with pytest.raises(ValueError):
            call(bk.mod, bk.put(x))


# ---------------------------------------------------------------- properties

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    @pytest.mark.parametrize("bk", on("cpu", "cuda"))
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
    def test_property_ties_merge(bk, shape, in_dtypes, base_dtype, out_dtype, weights, densities, lam, normalize,
                                 consensus, trim_ties, tiny, seed):
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed)
        n = len(ts)
        kw = dict(lam=lam, normalize=normalize, consensus=consensus, trim_ties=trim_ties, out_dtype=out_dtype)
        ref = reference.ties_merge(base, ts, weights[:n], densities[:n], **kw)
        bk.check(bk.mod.ties_merge(*bk.put(base, ts), weights[:n], densities[:n], **kw), ref)

    @pytest.mark.parametrize("bk,max_size", over(cpu=[300], cuda=[20_000]))
    @_settings
    @given(
        data=st.data(),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_sign_sum(bk, max_size, data, in_dtypes, thresholds, tiny, seed):
        size = data.draw(st.integers(0, max_size), label="size")
        base, ts = shaped_models([size], in_dtypes, torch.float32, tiny, seed)
        th = thresholds[: len(ts)]
        assert bk.mod.ties_sign_sum(*bk.put(base, ts), th) == reference.ties_sign_sum(base, ts, th)

    @pytest.mark.parametrize("bk", on("cpu", "cuda"))
    @_settings
    @given(
        shape=st.lists(st.integers(0, 30), min_size=0, max_size=2),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        one_dtype=st.booleans(),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        fallback=st.integers(-2, 2),
        lam=st.floats(-2, 2, allow_nan=False),
        merge=st.sampled_from(["dis-mean", "dis-sum"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_merge_model(bk, shape, in_dtypes, base_dtype, one_dtype, thresholds, fallback, lam, merge,
                                       tiny, seed):
        if one_dtype:  # base, models and output of one dtype (the cpu backend's fused path)
            in_dtypes = [base_dtype] * len(in_dtypes)
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed)
        th = thresholds[: len(ts)]
        ref = reference.ties_merge_model(base, ts, th, fallback, lam=lam, merge=merge)
        bk.check(bk.mod.ties_merge_model(*bk.put(base, ts), th, fallback, lam=lam, merge=merge), ref)
