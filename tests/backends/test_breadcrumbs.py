"""Breadcrumbs kernels (breadcrumbs, breadcrumbs_ties) of every backend, bit for bit against the torch
reference: the tests whose bodies are the same for each backend. The backend-specific ones are in
test_<backend>_breadcrumbs.py."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import reference

from .cases import DTYPES, models, on, over, shaped_models

CPU_ODD = 3 * (1 << 16) + 1024 // 2 + 7  # blocks of 1024, chunks of 64K
CUDA_ODD = 3 * 57344 + 2 * 8192 + 5  # histogram tiles of 57344, merge tiles of 8192
TRITON_ODD = 2 * 1024 + 37  # blocks of 1024
CPU_SIZES = [0, 1, 7, 1000, 65537]
CUDA_SIZES = [0, 1, 7, 8, 1000, 8192 + 1, 57344 + 3, CUDA_ODD]


@pytest.mark.parametrize("bk,size,dtype", over(
    cpu=[(s, dt) for s in CPU_SIZES for dt in DTYPES] + [(CPU_ODD, torch.bfloat16)],
    triton=[(0, torch.float32), (1, torch.float16), (7, torch.bfloat16), (1000, torch.float32)]
    + [(TRITON_ODD, dt) for dt in DTYPES],
    cuda=[(s, dt) for dt in DTYPES for s in CUDA_SIZES],
))
def test_matches_reference(bk, size, dtype):
    gen = torch.Generator().manual_seed(size + 41 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen, steps=3)
    args = ([1.0, -0.6, 0.8], [0.3, 0.7, 0.9], [0.01, 0.05, 0.1])
    for combine in ("linear", "ties"):
        kw = dict(lam=0.8, combine=combine)
        ref = reference.breadcrumbs_merge(base, ts, *args, **kw)
        for got in bk.runs(lambda: bk.mod.breadcrumbs_merge(*bk.put(base, ts), *args, **kw)):
            bk.check(got, ref)


COUNT_EDGES = [(0.0, 0.01), (1.0, 0.01), (1.0, 0.5), (0.5, 0.0), (0.7, 0.5), (0.95, 0.2), (1e-9, 0.999), (0.3, 1.5),
               (0.3, -1.0), ([0.0, 1.0, 0.4], [0.5, 0.0, 0.6])]


@pytest.mark.parametrize("bk,densities,gammas,tiny", over(
    cpu=[(d, g, tiny) for tiny in (False, True) for d, g in COUNT_EDGES],
    cuda=[(d, g, tiny) for tiny in (False, True) for d, g in COUNT_EDGES],
))
def test_count_edges(bk, densities, gammas, tiny):
    gen = torch.Generator().manual_seed(3 + tiny)
    base, ts = models(2999, [torch.bfloat16] * 3, gen, tiny=tiny, steps=3)
    for combine in ("linear", "ties"):
        ref = reference.breadcrumbs_merge(base, ts, [1.0, 2.0, -1.0], densities, gammas, combine=combine)
        bk.check(bk.mod.breadcrumbs_merge(*bk.put(base, ts), [1.0, 2.0, -1.0], densities, gammas, combine=combine), ref)


@pytest.mark.parametrize("bk,n_models", over(cpu=range(1, 9), cuda=range(1, 9)))
def test_model_counts_and_mixed_dtypes(bk, n_models):
    gen = torch.Generator().manual_seed(300 + n_models)
    dts = [DTYPES[(i + 2) % 3] for i in range(n_models)]
    base, ts = models(6007, dts, gen, base_dtype=torch.float16, tiny=n_models % 2 == 1, steps=3)
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, combine="ties" if n_models % 2 else "linear", normalize=n_models > 4)
        ref = reference.breadcrumbs_merge(base, ts, weights, densities, 0.05, **kw)
        bk.check(bk.mod.breadcrumbs_merge(*bk.put(base, ts), weights, densities, 0.05, **kw), ref)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @pytest.mark.parametrize("bk", on("cpu", "cuda"))
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
    def test_property_breadcrumbs_merge(bk, shape, in_dtypes, base_dtype, out_dtype, weights, densities, gammas, lam,
                                        normalize, combine, consensus, tiny, seed):
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed, steps=3)
        n = len(ts)
        w = weights[:n]
        kw = dict(lam=lam, normalize=normalize, combine=combine, consensus=consensus, out_dtype=out_dtype)
        if combine == "linear" and normalize and sum(w) == 0:
            with pytest.raises(ValueError):
                bk.mod.breadcrumbs_merge(*bk.put(base, ts), w, densities[:n], gammas[:n], **kw)
            return
        ref = reference.breadcrumbs_merge(base, ts, w, densities[:n], gammas[:n], **kw)
        bk.check(bk.mod.breadcrumbs_merge(*bk.put(base, ts), w, densities[:n], gammas[:n], **kw), ref)
