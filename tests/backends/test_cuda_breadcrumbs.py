"""pymerge._C_cuda breadcrumbs kernel (breadcrumbs, breadcrumbs_ties), bit for bit against torch.

Needs a GPU. Both trims of a model (the kept end and the dropped outliers) cut
through runs of equal |tau| in the tiny-valued cases, at both ends.
"""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.available(), reason="needs pymerge._C_cuda and a GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIST_TILE = 57344
MERGE_TILE = 8192
ODD = 3 * HIST_TILE + 2 * MERGE_TILE + 5
SIZES = [0, 1, 7, 8, 1000, MERGE_TILE + 1, HIST_TILE + 3, ODD]


def models(size, dtypes, gen, *, base_dtype=None, tiny=False, scale=0.01):
    """(base, tensors) on the CPU; tiny: values from a small exact set, so |tau| ties everywhere."""
    base_dtype = base_dtype or dtypes[0]
    if tiny:
        base = torch.randint(-8, 9, (size,), generator=gen).float() / 4
        ts = [base + torch.randint(-3, 4, (size,), generator=gen).float() / 4 for _ in dtypes]
    else:
        base = torch.randn(size, generator=gen)
        ts = [base + scale * torch.randn(size, generator=gen) for _ in dtypes]
    return base.to(base_dtype), [t.to(dt) for t, dt in zip(ts, dtypes)]


def check(base, ts, *args, **kw):
    ref = reference.breadcrumbs_merge(base, ts, *args, **kw)
    got = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, **kw)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 41 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    for combine in ("linear", "ties"):
        check(base, ts, [1.0, -0.6, 0.8], [0.3, 0.7, 0.9], [0.01, 0.05, 0.1], lam=0.8, combine=combine)


@pytest.mark.parametrize("size", [1000, 3 * MERGE_TILE + 17, ODD])
@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_at_both_ends(size, combine, normalize):
    gen = torch.Generator().manual_seed(size + len(combine) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = ([0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.33, 0.05], [0.1, 0.013, 0.3, 0.0])
    for consensus in ("sum", "count") if combine == "ties" else ("sum",):
        check(base, ts, *args, combine=combine, consensus=consensus, normalize=normalize, lam=1.1)


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
        check(base, ts, [1.0, 2.0, -1.0], densities, gammas, combine=combine)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(300 + n_models)
    dts = [DTYPES[(i + 2) % 3] for i in range(n_models)]
    base, ts = models(6007, dts, gen, base_dtype=torch.float16, tiny=n_models % 2 == 1)
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, combine="ties" if n_models % 2 else "linear", normalize=n_models > 4)
        check(base, ts, weights, densities, 0.05, **kw)


def test_one_run_of_equal_keys():
    # Both cuts inside one run of equal |tau| that spans many merge tiles.
    size = 5 * MERGE_TILE + 333
    base = torch.zeros(size, dtype=torch.float16)
    t = torch.full((size,), 0.25, dtype=torch.float16)
    t[1::3] = -0.25
    t[:50] = 1.0
    for densities, gammas in ((0.5, 0.3), (0.2, 0.0005), (0.9, 0.05), (0.01, 0.99)):
        for combine in ("linear", "ties"):
            check(base, [t, -t, t], [1.0, 0.5, 2.0], densities, gammas, combine=combine)


def test_special_values_shapes_views_and_dispatch():
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, -1.0, 0.5, 2.0])
    base = specials.repeat(10)
    a = specials.repeat_interleave(10)
    b = specials.flip(0).repeat(10)
    for combine in ("linear", "ties"):
        for densities, gammas in ((0.5, 0.1), (0.9, 0.05), (1.0, 0.0)):
            check(base, [a, b], [1.0, 0.5], densities, gammas, combine=combine)
    gen = torch.Generator().manual_seed(4)
    base2 = torch.randn(40, 24, generator=gen).bfloat16()
    m = (base2.float().t() + 0.02 * torch.randn(24, 40, generator=gen)).bfloat16().t()
    got = pymerge.ops.breadcrumbs_merge(base2.cuda(), [m.cuda(), m.cuda() * 1.01], densities=0.4, gammas=None)
    assert pymerge.ops.last_backend() == "cuda" and got.shape == (40, 24) and got.dtype == torch.bfloat16
    assert_bits_equal(got.cpu(), reference.breadcrumbs_merge(base2, [m, m * 1.01], densities=0.4, gammas=None))
    big = [torch.randn(9_001, generator=gen).to(torch.float16) for _ in range(3)]
    views = [t[1:] for t in big]
    dev = [t.cuda()[1:] for t in big]
    ref = reference.breadcrumbs_merge(views[0], views[1:], [1.0, -2.0], 0.3, 0.05, combine="ties")
    assert_bits_equal(cuda.breadcrumbs_merge(dev[0], dev[1:], [1.0, -2.0], 0.3, 0.05, combine="ties").cpu(), ref)


def test_deterministic_and_matches_cpu_backend():
    from pymerge.backends import cpu

    gen = torch.Generator().manual_seed(14)
    base, ts = models(2 * HIST_TILE + 12345, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = ([0.25, -0.5, 1.0], [0.3, 0.41, 0.2], [0.05, 0.2, 0.0])
    for combine in ("linear", "ties"):
        first = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, combine=combine).cpu()
        again = cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], *args, combine=combine).cpu()
        assert_bits_equal(again, first)
        assert_bits_equal(first, reference.breadcrumbs_merge(base, ts, *args, combine=combine))
        if cpu.available():
            assert_bits_equal(first, cpu.breadcrumbs_merge(base, ts, *args, combine=combine))


def test_errors():
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
            cuda.breadcrumbs_merge(None if base is None else base.cuda(), [t.cuda() for t in tensors], **case)
    with pytest.raises(ValueError, match="cuda"):
        cuda.breadcrumbs_merge(x, [x])
    from pymerge import _C_cuda

    y = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="n_top"):
        _C_cuda.breadcrumbs_merge(y.data_ptr(), 0, [y.data_ptr()], [0], y.data_ptr(), 0, 4, [3], [2], [1.0], False, 1.0,
                                  False, False, torch.cuda.current_stream().cuda_stream)


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
                cuda.breadcrumbs_merge(base.cuda(), [t.cuda() for t in ts], w, densities[:n], gammas[:n], **kw)
            return
        check(base, ts, w, densities[:n], gammas[:n], **kw)
