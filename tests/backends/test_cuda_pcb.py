"""pymerge._C_cuda PCB kernels (csrc/cuda/pcb.cu) against the torch reference. Needs a GPU.

The kernels evaluate exp and tanh as correctly rounded fp32 values, with the same
double-precision operations as the cpu kernels; torch's fp32 exp/tanh (CPU: SLEEF,
GPU: CUDA's libdevice, both within 1-2 ulp) are not correctly rounded everywhere. So:
  * against the reference run on the CPU with correctly rounded exp/tanh
    (`exact_math`), every op is checked bit for bit: scores, statistics, outputs;
  * against the cpu backend, bit for bit as well (same math, same op order);
  * against the plain reference, scores are within 4 ulp (fp32) and outputs
    identical except for a small fraction, as the cpu backend's tests state.
"""

from __future__ import annotations

import pytest
import torch

from pymerge.backends import cuda
from pymerge.ops.reference import pcb as ref

from .cases import CUDA, DTYPES, exact_math, pcb_error_cases, pcb_stats_length_errors, ulp_distance
from .cases import assert_bits_equal_on_cpu as assert_bits_equal
from .cases import exact_exp, exact_tanh, pcb_models as make, pcb_property_inputs, pcb_ref_stats as ref_stats

pytestmark = CUDA.marks

# Selection histogram tiles of 57344 elements; 8 elements per thread, 256 threads per block.
SIZES = [0, 1, 7, 1000, 57345, 130_003]

def gpu(base, ts):
    return base.cuda(), [t.cuda() for t in ts]


def test_exp_tanh_are_correctly_rounded():
    from pymerge import _C_cuda

    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            -8 * torch.rand(30000, generator=gen),
            torch.randn(30000, generator=gen) * torch.exp(4 * torch.randn(30000, generator=gen)),
            torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 88.72, 88.73, -103.9, -104.0, -150.0, 9.0, 9.1, -9.1,
                          float("inf"), float("-inf"), 3e38, -3e38, float("nan")]),
        ]
    )
    xd = x.cuda()
    e, t = torch.empty_like(xd), torch.empty_like(xd)
    _C_cuda._pcb_exp_tanh(xd.data_ptr(), e.data_ptr(), t.data_ptr(), xd.numel(), torch.cuda.current_stream().cuda_stream)
    assert_bits_equal(e, exact_exp(x))
    assert_bits_equal(t, exact_tanh(x))


@pytest.mark.parametrize("size,dtype", [(size, dtype) for size in SIZES for dtype in DTYPES])
def test_scores(size, dtype):
    gen = torch.Generator().manual_seed(size + 7 * DTYPES.index(dtype))
    base, ts = make(size, 3, [dtype], gen)
    lo, hi, _, _ = ref_stats(base, ts, 0.1, 0.01)
    got = cuda.pcb_scores(*gpu(base, ts), lo, hi)
    assert got.device.type == "cuda" and got.shape == (3, size)
    with exact_math():
        assert_bits_equal(got, ref.pcb_scores(base, ts, lo, hi))


MERGE_CASES = [(size, dtype, n) for size in SIZES[:4] for dtype in DTYPES for n in (1, 4, 8)] + [
    (57345, torch.bfloat16, 2),
    (130_003, torch.float16, 3),
]


@pytest.mark.parametrize("size,dtype,n_models", MERGE_CASES)
def test_merge_with_stats(size, dtype, n_models):
    gen = torch.Generator().manual_seed(size + n_models)
    base, ts = make(size, n_models, [dtype], gen)
    lambdas = [0.5 + i / 3 for i in range(n_models)]
    with exact_math():
        stats = ref_stats(base, ts, 0.2, 0.01)
        want = ref.pcb_merge_with_stats(base, ts, *stats, lam=0.7)
        want_l = ref.pcb_merge_with_stats(base, ts, *stats, lambdas=lambdas, out_dtype=torch.float32)
    dev_stats = [s.cuda() for s in stats]  # device tensors are accepted too
    assert_bits_equal(cuda.pcb_merge_with_stats(*gpu(base, ts), *dev_stats, lam=0.7), want)
    got = cuda.pcb_merge_with_stats(*gpu(base, ts), *stats, lambdas=lambdas, out_dtype=torch.float32)
    assert_bits_equal(got, want_l)


PCB_CASES = [
    (size, n, density, clip_ratio)
    for size in SIZES[:4]
    for n in (1, 2, 8)
    for density, clip_ratio in [(0.1, 0.01), (0.0, 0.2), (1.0, 0.0)]
]
PCB_CASES += [(57345, 2, 0.1, 0.01), (130_003, 1, 1.0, 0.2), (130_003, 3, 0.0, 0.0), (130_003, 2, 0.3, 0.05)]


@pytest.mark.parametrize("size,n_models,density,clip_ratio", PCB_CASES)
def test_pcb_merge(size, n_models, density, clip_ratio):
    from pymerge.backends.cuda.pcb import _pcb_merge

    gen = torch.Generator().manual_seed(100 * size + n_models)
    base, ts = make(size, n_models, [torch.bfloat16], gen)
    with exact_math():
        want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio)
        lo, hi, q, m = ref_stats(base, ts, density, clip_ratio)
    got, (glo, ghi, gq, gm) = _pcb_merge(*gpu(base, ts), density, clip_ratio, 1.0, None, None)
    assert_bits_equal(got, want)
    # Exact order statistics (zeros come back as +0; torch.sort may give -0).
    assert_bits_equal(torch.tensor(glo), lo)
    assert_bits_equal(torch.tensor(ghi), hi)
    assert torch.tensor(gq).tolist() == q.tolist() and torch.tensor(gm).tolist() == m.tolist()


@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("clip_ratio", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_pcb_merge_parameters(density, clip_ratio, out_dtype):
    gen = torch.Generator().manual_seed(int(100 * density + 1000 * clip_ratio))
    base, ts = make(4000, 3, [torch.bfloat16, torch.float16, torch.float32], gen, base_dtype=torch.bfloat16)
    lambdas = [0.3, -1.2, 2.0]
    with exact_math():
        want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio, lam=1.5, out_dtype=out_dtype)
        want_l = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio, lambdas=lambdas, out_dtype=out_dtype)
    b, t = gpu(base, ts)
    assert_bits_equal(cuda.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, lam=1.5, out_dtype=out_dtype), want)
    got = cuda.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, lambdas=lambdas, out_dtype=out_dtype)
    assert_bits_equal(got, want_l)


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_mixed_input_dtypes_and_cpu_backend(base_dtype):
    from pymerge.backends import cpu

    gen = torch.Generator().manual_seed(9)
    base, ts = make(5000, 5, [torch.float16, torch.bfloat16, torch.float32], gen, base_dtype=base_dtype)
    b, t = gpu(base, ts)
    for out_dtype in DTYPES + [torch.float64]:
        with exact_math():
            want = ref.pcb_merge(base, ts, density=0.3, clip_ratio=0.05, out_dtype=out_dtype)
            stats = ref_stats(base, ts, 0.3, 0.05)
            want_s = ref.pcb_merge_with_stats(base, ts, *stats, out_dtype=out_dtype)
            want_b = ref.pcb_scores(base, ts, *stats[:2])
        got = cuda.pcb_merge(b, t, density=0.3, clip_ratio=0.05, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.device.type == "cuda"
        assert_bits_equal(got, want)
        assert_bits_equal(cuda.pcb_merge_with_stats(b, t, *stats, out_dtype=out_dtype), want_s)
        assert_bits_equal(cuda.pcb_scores(b, t, *stats[:2]), want_b)
        if cpu.available():
            assert_bits_equal(got, cpu.pcb_merge(base, ts, density=0.3, clip_ratio=0.05, out_dtype=out_dtype))


def test_guards_constant_task_vectors():
    # Every |tau_i| equal: hi == lo (nrm = 0); every beta_i equal: M == q (s = 0, out = base).
    base = torch.linspace(-1, 1, 3001).to(torch.bfloat16)
    for ts in ([base.float() + 0.25, base.float() - 0.25], [base.float(), base.float()], [base.float() + 0.5]):
        ts = [t.to(torch.bfloat16) for t in ts]
        for density, clip_ratio in [(0.1, 0.01), (1.0, 0.0), (0.0, 0.2)]:
            with exact_math():
                want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio)
            assert_bits_equal(cuda.pcb_merge(*gpu(base, ts), density=density, clip_ratio=clip_ratio), want)
    gen = torch.Generator().manual_seed(4)
    base, ts = make(777, 3, [torch.float32], gen)
    lo = hi = torch.full((3,), 0.01)
    q = m = torch.tensor([0.0, 0.5, -0.25])
    b, t = gpu(base, ts)
    with exact_math():
        assert_bits_equal(cuda.pcb_scores(b, t, lo, hi), ref.pcb_scores(base, ts, lo, hi))
        assert_bits_equal(cuda.pcb_merge_with_stats(b, t, lo, hi, q, m), ref.pcb_merge_with_stats(base, ts, lo, hi, q, m))
    assert torch.equal(cuda.pcb_merge_with_stats(b, t, lo, hi, q, m).cpu(), base)


def test_special_values():
    gen = torch.Generator().manual_seed(12)
    base, ts = make(2000, 3, [torch.float32], gen)
    ts[0][5] = float("inf")
    ts[1][6] = float("-inf")
    ts[2][7] = float("nan")
    ts[0][8] = -0.0
    base[8] = 0.0
    with exact_math():
        stats = ref_stats(base, ts, 0.1, 0.01)
        want = ref.pcb_merge_with_stats(base, ts, *stats)
        want_b = ref.pcb_scores(base, ts, *stats[:2])
    b, t = gpu(base, ts)
    assert_bits_equal(cuda.pcb_scores(b, t, *stats[:2]), want_b)
    assert_bits_equal(cuda.pcb_merge_with_stats(b, t, *stats), want)


def test_views_streams_and_repeatability():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=gen).t()
    ts = [(base + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.bfloat16), (base + 0.02).t().contiguous().t()]
    with exact_math():
        want = ref.pcb_merge(base, ts, density=0.3)
    got = cuda.pcb_merge(*gpu(base, ts), density=0.3)
    assert got.is_contiguous() and got.shape == (48, 64)
    assert_bits_equal(got, want)
    big = [torch.randn(10_001, generator=gen) for _ in range(3)]
    views = [x[1:] for x in big]
    dev = [x.cuda()[1:] for x in big]  # 4-byte offsets: the element-wise path
    with exact_math():
        want = ref.pcb_merge(views[0], views[1:], density=0.2)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        runs = [cuda.pcb_merge(dev[0], dev[1:], density=0.2) for _ in range(3)]
    s.synchronize()
    for r in runs:
        assert_bits_equal(r, want)


def test_plain_reference_scores_within_4_ulp():
    gen = torch.Generator().manual_seed(31)
    for n in (1, 3, 8):
        base, ts = make(20_000, n, [torch.float32], gen)
        lo, hi, _, _ = ref_stats(base, ts, 0.1, 0.01)
        d = ulp_distance(cuda.pcb_scores(*gpu(base, ts), lo, hi), ref.pcb_scores(base, ts, lo, hi))
        assert int(d.max()) <= 4
        assert float((d > 0).float().mean()) < 0.05


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_plain_reference_outputs(out_dtype):
    # The cpu backend's measured tolerance (tests/backends/test_cpu_pcb.py): a 1-ulp change of a
    # score near q_i changes s_i relatively much, and where q_i itself moves by an ulp every kept
    # element can shift.
    gen = torch.Generator().manual_seed(41)
    base, ts = make(60_000, 3, [out_dtype], gen)
    got = cuda.pcb_merge(*gpu(base, ts), density=0.2, clip_ratio=0.01)
    d = ulp_distance(got, ref.pcb_merge(base, ts, density=0.2, clip_ratio=0.01))
    if out_dtype == torch.float32:
        assert float((d > 0).float().mean()) < 1e-2
    else:
        assert float((d > 0).float().mean()) < 1e-4 and int(d.max()) <= 1


def test_errors():
    x = torch.zeros(4, device="cuda")
    cases = pcb_error_cases(x, torch.zeros(5, device=x.device)) + [
        (lambda f: f(x, [x] * 65), "at most"),
        (lambda f: f(x.cpu(), [x.cpu()]), "cuda"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call(cuda.pcb_merge)
    pcb_stats_length_errors(cuda, x)
    from pymerge import _C_cuda

    y = torch.ones(8, device="cuda")
    out = torch.empty(8, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="rank"):
        _C_cuda.pcb_merge(out.data_ptr(), 0, [y.data_ptr()], [0], y.data_ptr(), 0, 8, 0, 8, 0, 1.0, [], s)
    with pytest.raises(ValueError, match="overlaps"):
        _C_cuda.pcb_merge_with_stats(y.data_ptr() + 4, 0, [y.data_ptr()], [0], out.data_ptr(), 0, 4, [0.0], [1.0],
                                     [0.0], [1.0], 1.0, [], s)
    with pytest.raises(ValueError, match="overlaps"):
        _C_cuda.pcb_scores(y.data_ptr(), [out.data_ptr()], [0], y.data_ptr() + 8, 0, 4, [0.0], [1.0], s)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 30), min_size=0, max_size=3),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=6),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        density=st.floats(0, 1),
        clip_ratio=st.floats(0, 1),
        lambdas=st.none() | st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=6, max_size=6),
        lam=st.floats(-3, 3, allow_nan=False),
        quantized=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_matches_exact_reference(shape, in_dtypes, base_dtype, out_dtype, density, clip_ratio, lambdas,
                                              lam, quantized, seed):
        base, ts = pcb_property_inputs(shape, in_dtypes, base_dtype, quantized, seed)
        kw = dict(density=density, clip_ratio=clip_ratio, out_dtype=out_dtype)
        if lambdas is not None:
            kw["lambdas"] = lambdas[: len(ts)]
        else:
            kw["lam"] = lam
        with exact_math():
            want = ref.pcb_merge(base, ts, **kw)
            stats = ref_stats(base, ts, density, clip_ratio)
            kw.pop("density"), kw.pop("clip_ratio")
            want_s = ref.pcb_merge_with_stats(base, ts, *stats, **kw)
        b, t = gpu(base, ts)
        assert_bits_equal(cuda.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, **kw), want)
        assert_bits_equal(cuda.pcb_merge_with_stats(b, t, *stats, **kw), want_s)
