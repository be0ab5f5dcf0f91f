"""PCB kernels (pcb_scores, pcb_merge_with_stats, pcb_merge) of every backend against the torch
reference: the tests whose bodies are the same for each backend. The backend-specific ones
(exp / tanh, thread counts, streams, bindings, the interpreted Triton cases) are in
test_<backend>_pcb.py, which also say how exact each backend's exp / tanh is.

Against the reference run with correctly rounded exp/tanh (`exact_math`) every result is
checked bit for bit; against the plain reference, within the measured tolerances below.
"""

from __future__ import annotations

import pytest
import torch

from pymerge.ops.reference import pcb as ref
from pymerge.testing import assert_bits_equal

from .cases import DTYPES, exact_math, on, over, pcb_error_cases, pcb_models as make, pcb_property_inputs
from .cases import pcb_ref_stats as ref_stats
from .cases import pcb_stats_length_errors, ulp_distance

# cpu: blocks of 1024, radix histograms above 65536 keys (chunks of 32768);
# cuda: selection histogram tiles of 57344 elements.
CPU_SIZES = [0, 1, 7, 1000, 65537, 100_003]
CUDA_SIZES = [0, 1, 7, 1000, 57345, 130_003]
TRITON_ODD = 2 * 1024 + 37  # triton_kernels.pcb.BLOCK_SIZE
TRITON_SIZES = [0, 1, 7, 1000, TRITON_ODD]


# ---------------------------------------------------------------- bit for bit with exact math


@pytest.mark.parametrize("bk,size,dtype", over(
    cpu=[(size, dtype) for size in CPU_SIZES[:4] for dtype in DTYPES] + [(65537, torch.float32),
                                                                        (100_003, torch.bfloat16)],
    triton=list(zip(TRITON_SIZES, DTYPES + DTYPES)),
    cuda=[(size, dtype) for size in CUDA_SIZES for dtype in DTYPES],
))
def test_scores(bk, size, dtype):
    gen = torch.Generator().manual_seed(size + 7 * DTYPES.index(dtype))
    base, ts = make(size, 3, [dtype], gen)
    lo, hi, _, _ = ref_stats(base, ts, 0.1, 0.01)
    got = bk.mod.pcb_scores(*bk.put(base, ts), lo, hi)
    assert got.shape == (3, size)
    with exact_math():
        bk.check(got, ref.pcb_scores(base, ts, lo, hi))


def _merge_cases(sizes):
    """Every small size with three model counts and three (density, clip_ratio) pairs."""
    return [(size, n, density, clip_ratio) for size in sizes[:4] for n in (1, 2, 8)
            for density, clip_ratio in [(0.1, 0.01), (0.0, 0.2), (1.0, 0.0)]]


# Above 65536 (cpu) / 57344 (cuda) elements the quantiles go through the radix histograms.
@pytest.mark.parametrize("bk,size,n_models,density,clip_ratio", over(
    cpu=_merge_cases(CPU_SIZES) + [(65537, 2, 0.1, 0.01), (100_003, 1, 1.0, 0.2), (100_003, 3, 0.0, 0.0)],
    cuda=_merge_cases(CUDA_SIZES) + [(57345, 2, 0.1, 0.01), (130_003, 1, 1.0, 0.2), (130_003, 3, 0.0, 0.0),
                                     (130_003, 2, 0.3, 0.05)],
))
def test_pcb_merge(bk, size, n_models, density, clip_ratio):
    gen = torch.Generator().manual_seed(100 * size + n_models)
    base, ts = make(size, n_models, [torch.bfloat16], gen)
    with exact_math():
        want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio)
        lo, hi, q, m = ref_stats(base, ts, density, clip_ratio)
    got, (glo, ghi, gq, gm) = bk.mod.pcb._pcb_merge(*bk.put(base, ts), density, clip_ratio, 1.0, None, None)
    bk.check(got, want)
    # The statistics are exact order statistics (zeros come back as +0; torch.sort may give -0).
    assert_bits_equal(torch.tensor(glo), lo)
    assert_bits_equal(torch.tensor(ghi), hi)
    assert torch.tensor(gq).tolist() == q.tolist() and torch.tensor(gm).tolist() == m.tolist()


PARAMETERS = [(density, clip_ratio, out_dtype) for out_dtype in DTYPES for clip_ratio in [0.0, 0.01, 0.2]
              for density in [0.0, 0.1, 1.0]]


# The cpu and cuda backends with every combination (4000 elements); triton with three, interpreted (500).
@pytest.mark.parametrize("bk,density,clip_ratio,out_dtype,size", over(
    cpu=[p + (4000,) for p in PARAMETERS],
    triton=[(0.0, 0.2, torch.float32, 500), (0.1, 0.01, torch.float16, 500), (1.0, 0.0, torch.bfloat16, 500)],
    cuda=[p + (4000,) for p in PARAMETERS],
))
def test_pcb_merge_parameters(bk, density, clip_ratio, out_dtype, size):
    gen = torch.Generator().manual_seed(int(100 * density + 1000 * clip_ratio))
    base, ts = make(size, 3, [torch.bfloat16, torch.float16, torch.float32], gen, base_dtype=torch.bfloat16)
    lambdas = [0.3, -1.2, 2.0]
    with exact_math():
        want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio, lam=1.5, out_dtype=out_dtype)
        want_l = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio, lambdas=lambdas, out_dtype=out_dtype)
    b, t = bk.put(base, ts)
    bk.check(bk.mod.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, lam=1.5, out_dtype=out_dtype), want)
    got = bk.mod.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, lambdas=lambdas, out_dtype=out_dtype)
    bk.check(got, want_l)


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_guards_constant_task_vectors(bk):
    # Every |tau_i| equal: hi == lo (nrm = 0); every beta_i equal: M == q (s = 0, out = base).
    base = torch.linspace(-1, 1, 3001).to(torch.bfloat16)
    for ts in ([base.float() + 0.25, base.float() - 0.25], [base.float(), base.float()], [base.float() + 0.5]):
        ts = [t.to(torch.bfloat16) for t in ts]
        for density, clip_ratio in [(0.1, 0.01), (1.0, 0.0), (0.0, 0.2)]:
            with exact_math():
                want = ref.pcb_merge(base, ts, density=density, clip_ratio=clip_ratio)
            bk.check(bk.mod.pcb_merge(*bk.put(base, ts), density=density, clip_ratio=clip_ratio), want)
    # Given statistics with hi == lo and M == q directly.
    gen = torch.Generator().manual_seed(4)
    base, ts = make(777, 3, [torch.float32], gen)
    lo = hi = torch.full((3,), 0.01)
    q = m = torch.tensor([0.0, 0.5, -0.25])
    b, t = bk.put(base, ts)
    with exact_math():
        bk.check(bk.mod.pcb_scores(b, t, lo, hi), ref.pcb_scores(base, ts, lo, hi))
        bk.check(bk.mod.pcb_merge_with_stats(b, t, lo, hi, q, m), ref.pcb_merge_with_stats(base, ts, lo, hi, q, m))
    assert torch.equal(bk.mod.pcb_merge_with_stats(b, t, lo, hi, q, m).cpu(), base)


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_special_values(bk):
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
    b, t = bk.put(base, ts)
    bk.check(bk.mod.pcb_scores(b, t, *stats[:2]), want_b)
    bk.check(bk.mod.pcb_merge_with_stats(b, t, *stats), want)


# ---------------------------------------------------------------- against the plain reference


@pytest.mark.parametrize("bk", on("cpu", "cuda"))
def test_plain_reference_scores_within_4_ulp(bk):
    gen = torch.Generator().manual_seed(31)
    for n in (1, 3, 8):
        base, ts = make(20_000, n, [torch.float32], gen)
        lo, hi, _, _ = ref_stats(base, ts, 0.1, 0.01)
        d = ulp_distance(bk.mod.pcb_scores(*bk.put(base, ts), lo, hi), ref.pcb_scores(base, ts, lo, hi))
        assert int(d.max()) <= 4
        assert float((d > 0).float().mean()) < 0.05


@pytest.mark.parametrize("bk,out_dtype", over(cpu=DTYPES, cuda=DTYPES))
def test_plain_reference_outputs(bk, out_dtype):
    # Measured on the cpu backend over 4.8M elements (1-8 models, rho 0/0.01/0.2, r 0.1/0.5): bf16
    # outputs all identical, fp16 4e-7 differ (by 1 ulp), fp32 1.2e-4 differ, 2e-5 by more than 1 ulp.
    # A 1-ulp change of a score near q_i changes s_i relatively much, and where q_i itself
    # moves by an ulp every kept element can shift (0.24% of the fp32 outputs differed in one
    # such case).
    gen = torch.Generator().manual_seed(41)
    base, ts = make(60_000, 3, [out_dtype], gen)
    got = bk.mod.pcb_merge(*bk.put(base, ts), density=0.2, clip_ratio=0.01)
    d = ulp_distance(got, ref.pcb_merge(base, ts, density=0.2, clip_ratio=0.01))
    if out_dtype == torch.float32:
        assert float((d > 0).float().mean()) < 1e-2
    else:
        assert float((d > 0).float().mean()) < 1e-4 and int(d.max()) <= 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bk", on("cpu", "triton"))
def test_errors_match_reference(bk):
    x = bk.put(torch.zeros(4))
    for call, match in pcb_error_cases(x, torch.zeros(5, device=x.device)):
        with pytest.raises(ValueError, match=match):
            call(ref.pcb_merge)
        with pytest.raises(ValueError, match=match):
            call(bk.mod.pcb_merge)
    pcb_stats_length_errors(bk.mod, x)
    with pytest.raises(ValueError, match="meta"):
        bk.mod.pcb_merge(torch.zeros(4, device="meta"), [torch.zeros(4, device="meta")])


# ---------------------------------------------------------------- property test

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @pytest.mark.parametrize("bk", on("cpu", "cuda"))
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
    def test_property_matches_exact_reference(bk, shape, in_dtypes, base_dtype, out_dtype, density, clip_ratio,
                                              lambdas, lam, quantized, seed):
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
        b, t = bk.put(base, ts)
        bk.check(bk.mod.pcb_merge(b, t, density=density, clip_ratio=clip_ratio, **kw), want)
        bk.check(bk.mod.pcb_merge_with_stats(b, t, *stats, **kw), want_s)
