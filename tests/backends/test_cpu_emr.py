"""pymerge._C EMR kernels (elect, reconstruct, bit packing) against the torch reference."""

from __future__ import annotations

import math

import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference
from pymerge.ops.reference.emr import EmrElect

from .cases import CPU, DTYPES, each_isa

pytestmark = [*CPU.marks, pytest.mark.usefixtures("torch_one_thread")]

# Kernel layout: blocks of 1024 elements, at least 64 blocks per thread.
BLOCK = 1024
GRAIN = 64 * BLOCK
SIZES = [0, 1, 31, 32, 33, 1000, 65537, 3 * GRAIN + BLOCK // 2 + 7]
# fp64 sums: same terms as torch, another (fixed) summation order.
SUM_RTOL = 1e-13


def assert_elect_equal(got: EmrElect, ref: EmrElect):
    assert isinstance(got, EmrElect)
    assert_bits_equal(got.u, ref.u)
    assert got.masks.dtype == torch.int32 and torch.equal(got.masks, ref.masks)
    for g, r in ((got.abs_tau_sum, ref.abs_tau_sum), (got.abs_masked_u_sum, ref.abs_masked_u_sum)):
        assert g.dtype == torch.float64 and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=SUM_RTOL, atol=0, equal_nan=True)
    assert got.numel == ref.numel


def assert_sums_identical(a: EmrElect, b: EmrElect):
    for x, y in ((a.abs_tau_sum, b.abs_tau_sum), (a.abs_masked_u_sum, b.abs_masked_u_sum)):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def check_elect(base, tensors, **kw):
    ref = reference.emr_elect(base, tensors, **kw)
    results = each_isa(lambda: cpu.emr_elect(base, tensors, **kw))
    for got in results:
        assert_elect_equal(got, ref)
    # The sums do not depend on the instruction set either.
    for got in results[1:]:
        assert_sums_identical(got, results[0])
    return results[0]


def fine_tunes(size, n, dtypes, gen, base_dtype=torch.bfloat16, scale=0.01):
    base = torch.randn(size, generator=gen).to(base_dtype)
    tensors = [(base.float() + scale * torch.randn(size, generator=gen)).to(dtypes[i % len(dtypes)]) for i in range(n)]
    return base, tensors


def tie_heavy(size, n, gen, dtype=torch.float32):
    """Values on a coarse grid: exact ties of |tau| between models, zeros, s == 0."""
    base = (torch.randint(-4, 5, (size,), generator=gen) * 0.25).to(dtype)
    tensors = [(base.float() + torch.randint(-2, 3, (size,), generator=gen) * 0.125).to(dtype) for _ in range(n)]
    return base, tensors


# ---------------------------------------------------------------- emr_elect


@pytest.mark.parametrize("size", SIZES[:-1])
@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_elect_matches_reference(size, zero_sign, dtype):
    gen = torch.Generator().manual_seed(size * 3 + DTYPES.index(dtype))
    base, tensors = fine_tunes(size, 3, [dtype], gen, base_dtype=dtype)
    check_elect(base, tensors, zero_sign=zero_sign)


@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
def test_elect_large_unaligned(zero_sign):
    # Several threads' ranges, the last block partial and its last word padded.
    gen = torch.Generator().manual_seed(99)
    base, tensors = fine_tunes(SIZES[-1], 3, DTYPES, gen)
    check_elect(base, tensors, zero_sign=zero_sign, out_dtype=torch.float16 if zero_sign == "neg" else None)


@pytest.mark.parametrize("n_models", range(1, 9))
@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
def test_elect_models_and_mixed_dtypes(n_models, zero_sign):
    gen = torch.Generator().manual_seed(10 + n_models)
    base, tensors = fine_tunes(3 * BLOCK + 77, n_models, [DTYPES[(n_models + k) % 3] for k in range(3)], gen)
    for out_dtype in DTYPES:
        check_elect(base, tensors, zero_sign=zero_sign, out_dtype=out_dtype)


@pytest.mark.parametrize("n_models", range(1, 10))
@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_elect_one_dtype_pass_equals_general_pass(n_models, zero_sign, dtype):
    # Base, models and u of one dtype with 1-8 models take the one-loop pass; the
    # same values with an fp32 base (a lossless upcast) take the general pass.
    # Every output, the fp64 sums included, has the same bits. 9 models: general.
    gen = torch.Generator().manual_seed(30 + n_models)
    base, tensors = fine_tunes(2 * GRAIN + BLOCK // 2 + 45, n_models, [dtype], gen, base_dtype=dtype)  # 2 threads' ranges
    base[:300], tensors[0][:300] = base[300:600], base[300:600]  # tau == 0 runs, s == 0 when one model
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        one = check_elect(base, tensors, zero_sign=zero_sign)
        general = check_elect(base.float(), tensors, zero_sign=zero_sign, out_dtype=dtype)
        assert_bits_equal(one.u, general.u)
        assert torch.equal(one.masks, general.masks)
        assert_sums_identical(one, general)


@pytest.mark.parametrize("n_models", [1, 2, 3, 8])
@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
def test_elect_exact_ties(n_models, zero_sign):
    gen = torch.Generator().manual_seed(20 + n_models)
    base, tensors = tie_heavy(5000, n_models, gen)
    got = check_elect(base, tensors, zero_sign=zero_sign)
    tau = torch.stack([t - base for t in tensors])
    if n_models > 1:  # the grid really produces equal |tau| on different models and s == 0
        assert ((tau[0].abs() == tau[1].abs()) & (tau[0] != 0)).any()
        assert (tau.sum(0) == 0).any()
    # Handwritten case: equal |tau| with equal and opposite signs.
    base = torch.zeros(4)
    ts = [torch.tensor([0.5, 0.5, -0.5, 0.0]), torch.tensor([0.5, -0.5, -0.5, 0.0])][: max(n_models, 1)]
    got = check_elect(base, ts, zero_sign=zero_sign)
    assert got.u.shape == (4,)


@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
@pytest.mark.parametrize("size", [1, 33, 65537])
def test_elect_all_zero_task_vectors(zero_sign, size):
    gen = torch.Generator().manual_seed(size)
    base = torch.randn(size, generator=gen).to(torch.bfloat16)
    got = check_elect(base, [base.clone(), base.clone()], zero_sign=zero_sign)
    sign = -1.0 if zero_sign == "neg" else 1.0  # u = g * 0: -0 under "neg"
    assert torch.equal(torch.copysign(torch.ones(size), got.u.float()), torch.full((size,), sign))
    assert not got.masks.any()
    assert got.abs_tau_sum.tolist() == [0.0, 0.0] and got.abs_masked_u_sum.tolist() == [0.0, 0.0]


def test_elect_worked_example():
    # specs/methods.md, EMR worked example.
    t1 = [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30]
    t2 = [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20]
    t3 = [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10]
    base = torch.zeros(10)
    ts = [torch.tensor(t) for t in (t1, t2, t3)]
    got = check_elect(base, ts)
    bits = cpu.unpack_bits(got.masks, 10).to(torch.int64).tolist()
    assert bits == [[1, 1, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 1, 0, 1, 1, 1]]


def test_elect_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 6e-8, 65504.0, 3e38, -3e38, 1.0]
    v = torch.tensor(specials, dtype=torch.float32)
    k = len(specials)
    base = v.repeat(k * k)
    a = v.repeat_interleave(k).repeat(k)
    b = v.repeat_interleave(k * k)
    for zero_sign in ("neg", "zero"):
        for out_dtype in DTYPES:
            check_elect(base, [a, b], zero_sign=zero_sign, out_dtype=out_dtype)
            check_elect(base.to(torch.float16), [a.to(torch.bfloat16), b], zero_sign=zero_sign, out_dtype=out_dtype)


def test_elect_shapes_and_stacked_input():
    gen = torch.Generator().manual_seed(4)
    base, tensors = fine_tunes(7 * 45, 3, [torch.float16], gen)
    base = base.reshape(7, 5, 9)
    stacked = torch.stack([t.reshape(7, 5, 9) for t in tensors])
    got = check_elect(base, stacked)
    assert got.u.shape == (7, 5, 9) and got.masks.shape == (3, (315 + 31) // 32)
    # 0-d tensors: one element.
    check_elect(torch.tensor(1.5), [torch.tensor(2.0), torch.tensor(0.5)])
    # Non-contiguous inputs.
    b2 = torch.randn(40, 64, generator=gen).t()
    check_elect(b2, [torch.randn(40, 64, generator=gen).t(), torch.randn(64, 80, generator=gen)[:, ::2]])


def test_elect_sums_accuracy():
    # Both the kernel's and torch's fp64 sums sit within a few ulps of the exact sum.
    gen = torch.Generator().manual_seed(8)
    size = 200_003
    base = torch.randn(size, generator=gen) * 10
    tensors = [base + torch.randn(size, generator=gen) * torch.logspace(-8, 2, size) for _ in range(3)]
    got = cpu.emr_elect(base, tensors)
    tau = torch.stack([t - base for t in tensors]).abs().double()
    for i in range(3):
        exact = math.fsum(tau[i].tolist())
        assert abs(got.abs_tau_sum[i].item() - exact) <= 4 * math.ulp(exact)


@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
def test_elect_thread_counts_identical(zero_sign):
    gen = torch.Generator().manual_seed(12)
    size = 3 * GRAIN + 12345  # three chunks with 3 threads; the last block partial
    base, tensors = fine_tunes(size, 3, [torch.bfloat16, torch.float16, torch.float32], gen)
    results = []
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        results.append(cpu.emr_elect(base, tensors, zero_sign=zero_sign))
    for r in results[1:]:
        assert_bits_equal(r.u, results[0].u)
        assert torch.equal(r.masks, results[0].masks)
        assert_sums_identical(r, results[0])
    assert_elect_equal(results[0], reference.emr_elect(base, tensors, zero_sign=zero_sign))


def test_elect_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="at least one"):
        cpu.emr_elect(x, [])
    with pytest.raises(ValueError, match="shape"):
        cpu.emr_elect(x, [torch.ones(5)])
    with pytest.raises(ValueError, match="dtype"):
        cpu.emr_elect(x, [torch.ones(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="zero_sign"):
        cpu.emr_elect(x, [x], zero_sign="pos")
    with pytest.raises(ValueError, match="out_dtype"):
        cpu.emr_elect(x, [x], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="meta"):
        cpu.emr_elect(torch.ones(4, device="meta"), [x])


# ---------------------------------------------------------------- emr_reconstruct


def check_reconstruct(base, u, words, lam, **kw):
    ref = reference.emr_reconstruct(base, u, words, lam, **kw)
    for got in each_isa(lambda: cpu.emr_reconstruct(base, u, words, lam, **kw)):
        assert_bits_equal(got, ref)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruct_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 7 * DTYPES.index(dtype))
    base, tensors = fine_tunes(size, 2, [dtype], gen, base_dtype=dtype)
    e = cpu.emr_elect(base, tensors)
    for task, lam in enumerate([0.8, 1 / 3]):
        check_reconstruct(base, e.u, e.masks[task], lam)


@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("u_dtype", DTYPES)
def test_reconstruct_dtypes_and_random_words(base_dtype, u_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(base_dtype) * 3 + DTYPES.index(u_dtype))
    size = 2 * BLOCK + 45
    base = torch.randn(size, generator=gen).to(base_dtype)
    u = (0.02 * torch.randn(size, generator=gen)).to(u_dtype)
    u[::7] = -0.0
    # Random words, padding bits of the last word set too (they must be ignored).
    words = torch.randint(-(2**31), 2**31, ((size + 31) // 32,), generator=gen, dtype=torch.int64).to(torch.int32)
    for out_dtype in DTYPES:
        for lam in (1.3, -0.7, 0.0, 1e30):
            check_reconstruct(base, u, words, lam, out_dtype=out_dtype)


def test_reconstruct_signed_zeros_and_specials():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 65504.0, 3e38, -1.0]
    v = torch.tensor(specials)
    k = len(specials)
    base, u = v.repeat(k), v.repeat_interleave(k)
    for words in (torch.full(((k * k + 31) // 32,), -1, dtype=torch.int32), torch.zeros((k * k + 31) // 32, dtype=torch.int32)):
        for out_dtype in DTYPES:
            check_reconstruct(base, u, words, 2.0, out_dtype=out_dtype)
            check_reconstruct(base.bfloat16(), u.half(), words, -0.5, out_dtype=out_dtype)


def test_reconstruct_thread_counts_identical():
    gen = torch.Generator().manual_seed(13)
    size = 3 * GRAIN + 999
    base, tensors = fine_tunes(size, 2, [torch.bfloat16], gen)
    e = cpu.emr_elect(base, tensors)
    outs = []
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        outs.append(cpu.emr_reconstruct(base, e.u, e.masks[1], 0.9))
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])
    assert_bits_equal(outs[0], reference.emr_reconstruct(base, e.u, e.masks[1], 0.9))


def test_reconstruct_errors():
    x = torch.ones(40)
    w = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="mask_words"):
        cpu.emr_reconstruct(x, x, torch.zeros(3, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="mask_words"):
        cpu.emr_reconstruct(x, x, torch.zeros(2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="shape"):
        cpu.emr_reconstruct(x, torch.ones(41), w, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        cpu.emr_reconstruct(x.double(), x, w, 1.0)
    with pytest.raises(ValueError, match="out_dtype"):
        cpu.emr_reconstruct(x, x, w, 1.0, out_dtype=torch.float64)


# ---------------------------------------------------------------- pack_bits / unpack_bits


# (700, 1000) and (3, 200001): more words than one thread's share (16K), split inside a row.
@pytest.mark.parametrize("shape", [(0,), (1,), (31,), (32,), (33,), (1000,), (65537,), (3, 0), (0, 5), (4, 45),
                                   (2, 3, 64), (700, 1000), (3, 200001)])
def test_pack_unpack_roundtrip(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    mask = torch.rand(shape, generator=gen) < 0.4
    n = shape[-1]
    ref = reference.pack_bits(mask)
    # Any word pattern, padding bits included.
    rnd = torch.randint(-(2**31), 2**31, ref.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    ref_rnd = reference.unpack_bits(rnd, n)
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        for words, back, back_rnd in each_isa(
                lambda: (cpu.pack_bits(mask), cpu.unpack_bits(ref, n), cpu.unpack_bits(rnd, n))):
            assert words.dtype == torch.int32
            assert torch.equal(words, ref)
            assert torch.equal(back, mask)
            assert torch.equal(back_rnd, ref_rnd)
    # Non-contiguous mask.
    if len(shape) == 2:
        t = mask.t().contiguous().t()
        assert torch.equal(cpu.pack_bits(t), reference.pack_bits(t))


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match="bool"):
        cpu.pack_bits(torch.ones(4))
    with pytest.raises(ValueError, match="axis"):
        cpu.pack_bits(torch.tensor(True))
    with pytest.raises(ValueError, match="int32"):
        cpu.unpack_bits(torch.zeros(1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="words"):
        cpu.unpack_bits(torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="< 0"):
        cpu.unpack_bits(torch.zeros(0, dtype=torch.int32), -1)


# ---------------------------------------------------------------- dispatch


def test_ops_pick_cpu_backend():
    gen = torch.Generator().manual_seed(1)
    base, tensors = fine_tunes(100, 2, [torch.bfloat16], gen)
    e = pymerge.ops.emr_elect(base, tensors)
    assert pymerge.ops.last_backend() == "cpu"
    assert_elect_equal(e, reference.emr_elect(base, tensors))
    pymerge.ops.emr_reconstruct(base, e.u, e.masks[0], 1.2)
    assert pymerge.ops.last_backend() == "cpu"
    pymerge.ops.pack_bits(torch.ones(5, dtype=torch.bool))
    assert pymerge.ops.last_backend() == "cpu"
    pymerge.ops.unpack_bits(e.masks, 100)
    assert pymerge.ops.last_backend() == "cpu"


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=8),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        zero_sign=st.sampled_from(["neg", "zero"]),
        grid=st.booleans(),
        one_dtype=st.booleans(),
        lam=st.floats(-3, 3, allow_nan=False),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_elect_and_reconstruct(shape, in_dtypes, base_dtype, out_dtype, zero_sign, grid, one_dtype, lam,
                                            seed):
        if one_dtype:  # the one-loop pass (up to 8 models)
            in_dtypes = [base_dtype] * len(in_dtypes)
            out_dtype = base_dtype
        gen = torch.Generator().manual_seed(seed)
        size = math.prod(shape)
        if grid:  # coarse values: ties, zeros and s == 0 everywhere
            base = (torch.randint(-2, 3, (size,), generator=gen) * 0.5).reshape(shape).to(base_dtype)
            tensors = [(base.float() + torch.randint(-2, 3, shape, generator=gen) * 0.25).to(dt) for dt in in_dtypes]
        else:
            base = torch.randn(shape, generator=gen).to(base_dtype)
            tensors = [(base.float() + 0.1 * torch.randn(shape, generator=gen)).to(dt) for dt in in_dtypes]
        ref = reference.emr_elect(base, tensors, zero_sign=zero_sign, out_dtype=out_dtype)
        got = cpu.emr_elect(base, tensors, zero_sign=zero_sign, out_dtype=out_dtype)
        assert_elect_equal(got, ref)
        for i in range(len(tensors)):
            assert_bits_equal(cpu.emr_reconstruct(base, got.u, got.masks[i], lam),
                              reference.emr_reconstruct(base, ref.u, ref.masks[i], lam))
        assert torch.equal(cpu.unpack_bits(got.masks, size), reference.unpack_bits(ref.masks, size))
