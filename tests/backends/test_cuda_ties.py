"""pymerge._C_cuda TIES kernels (ties_merge, ties_sign_sum, ties_merge_model), bit for bit against torch.

Needs a GPU. Kernel geometry (csrc/cuda/sparse_common.cuh): selection histograms in
tiles of 57344 elements, merge tiles of 8192 (256 threads x 8 elements x 4 steps);
the sizes below straddle both, and the tiny-valued inputs make the exact-k
tie-break cut through long runs of equal |tau| that span many merge tiles.
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
    """(base, tensors) on the CPU: fine-tunes near a base. tiny: every value from a small exact
    set, so |tau| takes a handful of values and the index tie-break decides most of the trim."""
    base_dtype = base_dtype or dtypes[0]
    if tiny:
        base = torch.randint(-8, 9, (size,), generator=gen).float() / 4
        ts = [base + torch.randint(-2, 3, (size,), generator=gen).float() / 4 for _ in dtypes]
    else:
        base = torch.randn(size, generator=gen)
        ts = [base + scale * torch.randn(size, generator=gen) for _ in dtypes]
    return base.to(base_dtype), [t.to(dt) for t, dt in zip(ts, dtypes)]


def gpu(base, ts):
    return base.cuda(), [t.cuda() for t in ts]


def check_merge(base, ts, *args, **kw):
    ref = reference.ties_merge(base, ts, *args, **kw)
    got = cuda.ties_merge(*gpu(base, ts), *args, **kw)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), ref)
    return got


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_merge_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 17 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    check_merge(base, ts, [1.0, -0.5, 0.7], [0.3, 0.55, 1.0], lam=0.9)


@pytest.mark.parametrize("size", [1000, MERGE_TILE * 3 + 17, ODD])
@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_at_the_threshold(size, trim_ties, consensus, normalize):
    gen = torch.Generator().manual_seed(size + len(trim_ties) + len(consensus) + normalize)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    kw = dict(normalize=normalize, consensus=consensus, trim_ties=trim_ties, lam=1.3)
    check_merge(base, ts, [0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.77, 0.05], **kw)


@pytest.mark.parametrize("k", [1, 2, 3, 4000, 4096, 8191, 8192, 8193, 20000, 3 * MERGE_TILE - 1])
def test_one_run_of_equal_keys(k):
    # Every |tau| equal (and some exact zeros): the cut falls inside one long run, at and
    # around merge-tile borders.
    size = 3 * MERGE_TILE + 77
    base = torch.zeros(size, dtype=torch.bfloat16)
    t = torch.full((size,), 0.5, dtype=torch.bfloat16)
    t[::5] = -0.5
    t[size - 100 :] = 0.0
    density = k / size
    for trim_ties in ("exact", "inclusive"):
        check_merge(base, [t, -t], [1.0, 0.25], [density, 0.5], trim_ties=trim_ties)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(100 + n_models)
    dts = [DTYPES[(i + 1) % 3] for i in range(n_models)]
    base, ts = models(5003, dts, gen, base_dtype=torch.float16)
    weights = [(-1) ** i * (0.4 + i / 5) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    for out_dtype in DTYPES:
        kw = dict(out_dtype=out_dtype, consensus="count" if n_models % 2 else "sum")
        check_merge(base, ts, weights, densities, **kw)


@pytest.mark.parametrize("densities", [0.0, 1.0, 1e-12, 0.9999999, 2.0, -0.5, [0.0, 1.0, 0.5], [1.0, 0.0, 1e-3]])
@pytest.mark.parametrize("tiny", [False, True])
def test_density_edges(densities, tiny):
    gen = torch.Generator().manual_seed(7 + tiny)
    base, ts = models(3001, [torch.bfloat16] * 3, gen, tiny=tiny)
    check_merge(base, ts, [1.0, 2.0, -1.0], densities)


def test_weights_that_cancel_and_zero_weights():
    gen = torch.Generator().manual_seed(8)
    base, ts = models(4000, [torch.float32] * 4, gen, tiny=True)
    for weights in ([1.0, -1.0, 1.0, -1.0], [0.0, -0.0, 1.0, 0.0], [-2.0, -0.5, -1.0, -3.0]):
        for normalize in (True, False):
            check_merge(base, ts, weights, 0.6, normalize=normalize)


def test_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 3e38, -3e38, 1.0]
    vals = torch.tensor(specials, dtype=torch.float32)
    base = vals.repeat(len(specials) * 2)
    a = vals.repeat_interleave(len(specials)).repeat(2)
    b = torch.cat([vals.flip(0).repeat(len(specials)), vals.repeat(len(specials))])
    for trim_ties in ("exact", "inclusive"):
        for consensus in ("sum", "count"):
            for density in (0.3, 0.9, 1.0):
                check_merge(base, [a, b], [1.0, 0.5], density, trim_ties=trim_ties, consensus=consensus)


def test_shapes_views_and_defaults():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(48, 64, generator=gen).bfloat16()
    a = (base.float().t() + 0.01 * torch.randn(64, 48, generator=gen)).bfloat16().t()  # non-contiguous
    b = (base.float() + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.float16)
    got = cuda.ties_merge(base.cuda(), [a.cuda(), b.cuda()], densities=0.4)
    assert got.shape == (48, 64) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert_bits_equal(got.cpu(), reference.ties_merge(base, [a, b], densities=0.4))
    scalar = torch.tensor(1.5)
    assert_bits_equal(cuda.ties_merge(scalar.cuda(), [scalar.cuda() + 1]).cpu(), reference.ties_merge(scalar, [scalar + 1]))
    # Storage offsets that break 16-byte alignment: the element-wise load path.
    big = [torch.randn(20_003, generator=gen).to(torch.bfloat16) for _ in range(3)]
    views = [t[3:] for t in big]
    dev = [t.cuda()[3:] for t in big]
    ref = reference.ties_merge(views[0], views[1:], [1.0, -2.0], 0.3)
    assert_bits_equal(cuda.ties_merge(dev[0], dev[1:], [1.0, -2.0], 0.3).cpu(), ref)


def test_deterministic_and_matches_cpu_backend():
    from pymerge.backends import cpu

    gen = torch.Generator().manual_seed(9)
    base, ts = models(2 * HIST_TILE + 1234, [torch.bfloat16, torch.float16, torch.bfloat16], gen, tiny=True)
    args = ([0.25, -0.5, 1.0], [0.3, 0.41, 0.62])
    first = cuda.ties_merge(*gpu(base, ts), *args).cpu()
    for _ in range(3):
        assert_bits_equal(cuda.ties_merge(*gpu(base, ts), *args).cpu(), first)
    if cpu.available():
        assert_bits_equal(first, cpu.ties_merge(base, ts, *args))


def test_dispatch_and_stream():
    gen = torch.Generator().manual_seed(6)
    base, ts = models(100, [torch.float32] * 2, gen)
    got = pymerge.ops.ties_merge(*gpu(base, ts), densities=0.5)
    assert pymerge.ops.last_backend() == "cuda"
    assert_bits_equal(got.cpu(), reference.ties_merge(base, ts, densities=0.5))
    # On a side stream: ordered with torch's work on that stream.
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        b, t = gpu(base, ts)
        got = cuda.ties_merge(b, t, densities=0.5)
    s.synchronize()
    assert_bits_equal(got.cpu(), reference.ties_merge(base, ts, densities=0.5))


def test_errors():
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
            cuda.ties_merge(None if base is None else base.cuda(), [t.cuda() for t in tensors], **case)
    with pytest.raises(ValueError, match="cuda"):
        cuda.ties_merge(x, [x])
    with pytest.raises(ValueError, match="at most"):
        cuda.ties_merge(x.cuda(), [x.cuda()] * 65)
    from pymerge import _C_cuda

    out = torch.empty(8, device="cuda")
    y = torch.ones(8, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="ks"):
        _C_cuda.ties_merge(out.data_ptr(), 0, [y.data_ptr()], [0], y.data_ptr(), 0, 8, [1, 2], [1.0], 1.0, True, False, False, s)
    with pytest.raises(ValueError, match="overlaps"):
        _C_cuda.ties_merge(y.data_ptr() + 4, 0, [y.data_ptr()], [0], out.data_ptr(), 0, 4, [1], [1.0], 1.0, True, False, False, s)


# ---------------------------------------------------------------- model scope


def thresholds_for(base, ts, quantile):
    tau = [(t.float() - base.float()).abs().reshape(-1) for t in ts]
    return [float(x[:: max(1, x.numel() // 2000)].quantile(quantile)) if x.numel() else 0.0 for x in tau]


@pytest.mark.parametrize("size", [0, 1, 7, 1000, ODD])
@pytest.mark.parametrize("tiny", [False, True])
def test_ties_sign_sum_matches_reference(size, tiny):
    gen = torch.Generator().manual_seed(size + tiny)
    base, ts = models(size, [torch.bfloat16, torch.float32, torch.float16], gen, tiny=tiny)
    for th in ([0.0, 0.0, 0.0], thresholds_for(base, ts, 0.6) if size else [0.1] * 3, [1e30, 0.0, 0.25]):
        got = cuda.ties_sign_sum(*gpu(base, ts), th)
        assert isinstance(got, int) and got == reference.ties_sign_sum(base, ts, th)


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
            assert_bits_equal(cuda.ties_merge_model(*gpu(base, ts), th, fallback, **kw).cpu(), ref)


def test_worked_example():
    tau = torch.tensor([
        [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30],
        [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20],
        [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10],
    ])
    zero = torch.zeros(10)
    th = [reference.ties.ties_model_threshold(t.abs(), 0.4) for t in tau]
    fb = cuda.ties_sign_sum(zero.cuda(), list(tau.cuda()), th)
    assert fb == reference.ties_sign_sum(zero, list(tau), th)
    got = cuda.ties_merge_model(zero.cuda(), list(tau.cuda()), th, fb).cpu()
    torch.testing.assert_close(got, torch.tensor([0.2, -0.3, -0.6, 0, -0.25, 0.25, 0, 0, 0.8 / 3, -0.2]))
    assert_bits_equal(got, reference.ties_merge_model(zero, list(tau), th, fb))


def test_model_scope_errors():
    x = torch.ones(4)
    for call in (
        lambda m, x: m.ties_sign_sum(None, [x], [0.0]),
        lambda m, x: m.ties_sign_sum(x, [x], [-1.0]),
        lambda m, x: m.ties_sign_sum(x, [x, x], [0.0]),
        lambda m, x: m.ties_merge_model(x, [x], [0.0], 1, merge="mean"),
        lambda m, x: m.ties_merge_model(x, [x], [0.0], True),
        lambda m, x: m.ties_merge_model(x, [x], [float("nan")], 1),
        lambda m, x: m.ties_merge_model(x, [x], [0.0], 1, lam=float("inf")),
    ):
        with pytest.raises(ValueError):
            call(reference, x)
        with pytest.raises(ValueError):
            call(cuda, x.cuda())


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
        check_merge(base, ts, weights[:n], densities[:n], **kw)

    @_settings
    @given(
        size=st.integers(0, 20_000),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_sign_sum(size, in_dtypes, thresholds, tiny, seed):
        base, ts = _draw_models([size], in_dtypes, torch.float32, tiny, seed)
        th = thresholds[: len(ts)]
        assert cuda.ties_sign_sum(*gpu(base, ts), th) == reference.ties_sign_sum(base, ts, th)

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
        assert_bits_equal(cuda.ties_merge_model(*gpu(base, ts), th, fallback, lam=lam, merge=merge).cpu(), ref)
