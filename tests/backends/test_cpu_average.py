"""pymerge._C weighted_sum and dtype conversions, bit for bit against torch."""

from __future__ import annotations

import itertools

import pytest
import torch

from pymerge.backends import cpu
from pymerge.ops import reference

from .cases import CPU, DTYPES, ISAS, each_isa, isas, kernel_isa

pytestmark = CPU.marks

TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Kernel layout: blocks of 2048 elements, at least 32 blocks per thread.
BLOCK = 2048
GRAIN = 32 * BLOCK


def expected(tensors, weights=None, base=None, lam=1.0, normalize=False, out_dtype=None):
    return reference.weighted_sum(tensors, weights, base=base, lam=lam, normalize=normalize, out_dtype=out_dtype)


def assert_bits_equal(actual, ref):
    """Same dtype, shape and bits (signed zeros included); any NaN matches any NaN."""
    assert actual.dtype == ref.dtype and actual.shape == ref.shape
    torch.testing.assert_close(actual, ref, rtol=0, atol=0, equal_nan=True)
    assert_same_values(actual.reshape(-1), ref.reshape(-1))


def rand(shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


def test_kernel_isa_levels():
    # Levels in order, the widest one by default, the limit restored after each block.
    from pymerge import _C

    levels = isas()
    assert levels == list(ISAS[: len(levels)]) and _C._kernel_isa() == levels[-1]
    for isa in levels:
        with kernel_isa(isa):
            assert _C._kernel_isa() == isa
    assert _C._kernel_isa() == levels[-1]
    with pytest.raises(ValueError, match="generic, avx2 or avx512"):
        _C._set_max_isa("sse")


def check_all_isas(ref, *args, **kwargs):
    """cpu.weighted_sum(*args, **kwargs) equals ref bit for bit with every kernel clone."""
    for got in each_isa(lambda: cpu.weighted_sum(*args, **kwargs)):
        assert_bits_equal(got, ref)


# ---------------------------------------------------------------- weighted_sum

SIZES = [0, 1, 7, 1000, 65537, 3 * GRAIN + BLOCK // 2 + 3]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("in_dtype,out_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_matches_reference(size, with_base, in_dtype, out_dtype):
    gen = torch.Generator().manual_seed(size * 7 + TAG[in_dtype] * 3 + TAG[out_dtype])
    base = rand(size, in_dtype, gen, offset=0.5) if with_base else None
    # Fine-tunes close to the base, as in practice (cancellation in x_i - base).
    ref = base if with_base else rand(size, in_dtype, gen)
    tensors = [(ref.float() + 0.01 * torch.randn(size, generator=gen)).to(in_dtype) for _ in range(3)]
    weights = [0.3, -0.7, 1.25]
    ref_out = expected(tensors, weights, base, 0.8, False, out_dtype)
    check_all_isas(ref_out, tensors, weights, base=base, lam=0.8, out_dtype=out_dtype)


# Outputs of 16 MiB and more are written with streaming stores (csrc/common/stream.h;
# test_cpu_stream.py runs the other kernels that way): here at the default threshold.
STREAM_BYTES = 16 << 20


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_streamed_output_matches_reference(out_dtype):
    threads = 3
    gen = torch.Generator().manual_seed(TAG[out_dtype])
    size = STREAM_BYTES // out_dtype.itemsize + 777  # the last block is partial
    base = rand(size, torch.bfloat16, gen)
    tensors = [rand(size, dt, gen) for dt in (torch.float16, torch.bfloat16)]
    ref_out = expected(tensors, [0.5, -1.5], base, 0.7, False, out_dtype)
    cpu.set_num_threads(threads)  # the autouse fixture restores it
    check_all_isas(ref_out, tensors, [0.5, -1.5], base=base, lam=0.7, out_dtype=out_dtype)
    check_all_isas(expected(tensors[:1], out_dtype=out_dtype), tensors[:1], out_dtype=out_dtype)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_mixed_input_dtypes(n_models, with_base, normalize):
    gen = torch.Generator().manual_seed(100 + n_models)
    size = 5000
    tensors = [rand(size, DTYPES[(i + 1) % 3], gen) for i in range(n_models)]
    base = rand(size, torch.bfloat16, gen) if with_base else None
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    if normalize and sum(weights) == 0:
        weights[0] += 1
    for out_dtype in DTYPES:
        ref_out = expected(tensors, weights, base, 1.5, normalize, out_dtype)
        check_all_isas(ref_out, tensors, weights, base=base, lam=1.5, normalize=normalize, out_dtype=out_dtype)


def test_default_weights_and_out_dtype():
    gen = torch.Generator().manual_seed(3)
    tensors = [rand((4, 33), torch.bfloat16, gen), rand((4, 33), torch.float16, gen)]
    got = cpu.weighted_sum(tensors)
    assert got.dtype == torch.bfloat16 and got.shape == (4, 33)
    assert_bits_equal(got, expected(tensors))
    got = cpu.weighted_sum(tensors, normalize=True)
    assert_bits_equal(got, expected(tensors, normalize=True))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("run_lengths", [(5, 3, 2, 1), (4, 4), (1, 2, 7), (9,)])
def test_same_dtype_runs(with_base, run_lengths):
    # The kernel takes runs of one input dtype 4, 2 or 1 models at a time.
    gen = torch.Generator().manual_seed(sum(run_lengths) + with_base)
    dtypes = [DTYPES[k % 3] for k, r in enumerate(run_lengths) for _ in range(r)]
    size = 3 * BLOCK + 77
    tensors = [rand(size, dt, gen) for dt in dtypes]
    base = rand(size, torch.float16, gen) if with_base else None
    weights = torch.randn(len(tensors), generator=gen).tolist()
    for out_dtype in DTYPES:
        ref_out = expected(tensors, weights, base, 0.7, False, out_dtype)
        check_all_isas(ref_out, tensors, weights, base=base, lam=0.7, out_dtype=out_dtype)


@pytest.mark.parametrize("n_models", [16, 64, 65])
def test_many_models(n_models):
    gen = torch.Generator().manual_seed(n_models)
    tensors = [rand(3000, DTYPES[i % 3], gen) for i in range(n_models)]
    base = rand(3000, torch.float32, gen)
    weights = torch.randn(n_models, generator=gen).tolist()
    ref_out = expected(tensors, weights, base, 1.0, True, torch.float32)
    check_all_isas(ref_out, tensors, weights, base=base, normalize=True, out_dtype=torch.float32)


@pytest.mark.parametrize("with_base", [False, True])
def test_thread_counts_identical(with_base):
    gen = torch.Generator().manual_seed(11)
    size = 4 * GRAIN + 12345  # chunk borders fall inside blocks
    tensors = [rand(size, dt, gen) for dt in (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)]
    base = rand(size, torch.bfloat16, gen) if with_base else None
    weights = [0.25, -0.5, 1.0, 0.75]
    ref_out = expected(tensors, weights, base, 0.9, False, torch.bfloat16)
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        assert cpu.get_num_threads() == k
        check_all_isas(ref_out, tensors, weights, base=base, lam=0.9, out_dtype=torch.bfloat16)


def test_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 6e-8, 65504.0, 3e38]
    vals = torch.tensor(specials, dtype=torch.float32)
    a = vals.repeat(len(specials))
    b = vals.repeat_interleave(len(specials))
    for weights, base in [([1.0, 1.0], None), ([0.0, -1.0], None), ([1.0, -0.0], a), ([2.0, 0.5], b)]:
        for out_dtype in DTYPES:
            for pair in ([a, b], [a.to(torch.float16), b.to(torch.bfloat16)]):
                ref_out = expected(pair, weights, base, 1.0, False, out_dtype)
                check_all_isas(ref_out, pair, weights, base=base, out_dtype=out_dtype)


def test_scalars_rounded_once_to_fp32():
    # 1/3 and 0.1 are not fp32 values: the kernel must use their nearest fp32.
    x = torch.tensor([3.0, 1.0, 1e8, 7.0], dtype=torch.float32)
    got = cpu.weighted_sum([x, x, x], [0.1, 0.1, 0.1], normalize=True, lam=1.0)
    assert_bits_equal(got, expected([x, x, x], [0.1, 0.1, 0.1], None, 1.0, True, torch.float32))
    got = cpu.weighted_sum([x], [1.0], lam=1 / 3)
    assert_bits_equal(got, x * torch.tensor(1 / 3, dtype=torch.float32))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    a = rand((64, 48), torch.bfloat16, gen).t()
    b = rand((64, 96), torch.float16, gen)[:, ::2].t()
    base = rand((48, 64), torch.float32, gen)
    got = cpu.weighted_sum([a, b], [0.5, 0.5], base=base)
    assert got.is_contiguous() and got.shape == (48, 64)
    assert_bits_equal(got, expected([a, b], [0.5, 0.5], base))


def test_weights_forms():
    gen = torch.Generator().manual_seed(6)
    ts = [rand(100, torch.float32, gen) for _ in range(3)]
    ref = expected(ts, [0.5, 0.5, 0.5])
    assert_bits_equal(cpu.weighted_sum(ts, 0.5), ref)
    assert_bits_equal(cpu.weighted_sum(ts, torch.tensor([0.5, 0.5, 0.5])), ref)
    assert_bits_equal(cpu.weighted_sum(ts, torch.tensor(0.5)), ref)


def test_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="nonzero sum"):
        cpu.weighted_sum([x, x], [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="shape"):
        cpu.weighted_sum([x, torch.ones(5)])
    with pytest.raises(ValueError, match="shape"):
        cpu.weighted_sum([x], base=torch.ones(2, 2))
    with pytest.raises(ValueError, match="dtype"):
        cpu.weighted_sum([x, torch.ones(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="out_dtype"):
        cpu.weighted_sum([x], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="weights"):
        cpu.weighted_sum([x, x], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        cpu.weighted_sum([])
    with pytest.raises(ValueError, match="meta"):
        cpu.weighted_sum([torch.ones(4, device="meta")])
    with pytest.raises(ValueError):
        cpu.set_num_threads(0)


def test_binding_checks():
    from pymerge import _C

    x = torch.ones(8)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="dtype tag"):
        _C.weighted_sum(out.data_ptr(), 7, [x.data_ptr()], [0], 0, 0, 8, [1.0], 1.0)
    with pytest.raises(ValueError, match="1 inputs, 2 dtypes"):
        _C.weighted_sum(out.data_ptr(), 0, [x.data_ptr()], [0, 0], 0, 0, 8, [1.0], 1.0)
    with pytest.raises(ValueError, match="overlaps"):
        _C.weighted_sum(x.data_ptr() + 4, 0, [x.data_ptr()], [0], 0, 0, 4, [1.0], 1.0)
    # Exact aliasing with the same element size is safe (block read before written).
    _C.weighted_sum(x.data_ptr(), 0, [x.data_ptr()], [0], 0, 0, 8, [2.0], 1.0)
    assert torch.equal(x, torch.full((8,), 2.0))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=6),
        base_dtype=st.none() | st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-4, 4, allow_nan=False, width=64), min_size=6, max_size=6),
        lam=st.floats(-3, 3, allow_nan=False),
        normalize=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_matches_reference(shape, in_dtypes, base_dtype, out_dtype, weights, lam, normalize, seed):
        gen = torch.Generator().manual_seed(seed)
        tensors = [rand(shape, dt, gen, scale=3.0) for dt in in_dtypes]
        base = rand(shape, base_dtype, gen, scale=3.0) if base_dtype is not None else None
        w = weights[: len(tensors)]
        if normalize and sum(w) == 0:
            with pytest.raises(ValueError):
                cpu.weighted_sum(tensors, w, base=base, lam=lam, normalize=True)
            return
        ref_out = expected(tensors, w, base, lam, normalize, out_dtype)
        check_all_isas(ref_out, tensors, w, base=base, lam=lam, normalize=normalize, out_dtype=out_dtype)


# ---------------------------------------------------------------- dtype conversions


def to_f32(x16: torch.Tensor) -> torch.Tensor:
    from pymerge import _C

    out = torch.empty(x16.numel(), dtype=torch.float32)
    _C._convert_to_f32(TAG[x16.dtype], x16.data_ptr(), out.data_ptr(), x16.numel())
    return out


def from_f32(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from pymerge import _C

    out = torch.empty(x.numel(), dtype=dtype)
    _C._convert_f32_to(TAG[dtype], x.data_ptr(), out.data_ptr(), x.numel())
    return out


def assert_same_values(actual, ref):
    """Bitwise equal, except that any NaN matches any NaN (payloads are not specified)."""
    bits = torch.int32 if actual.dtype == torch.float32 else torch.int16
    nan_a, nan_r = torch.isnan(actual), torch.isnan(ref)
    assert torch.equal(nan_a, nan_r)
    a, r = actual.view(bits)[~nan_a], ref.view(bits)[~nan_r]
    bad = (a != r).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, first at bits {r[bad[0]].item():#x}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_all_16bit_patterns_to_f32(dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    assert_same_values(to_f32(x), x.to(torch.float32))


def _midpoints_and_neighbours(dtype):
    """Every finite 16-bit value, the fp32 halfway points to the next one and their fp32 neighbours."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)].to(torch.float32)
    lo = x.to(torch.float64)
    hi = torch.nextafter(x, torch.full_like(x, float("inf"))).to(dtype).to(torch.float64)
    mid = ((lo + hi) / 2).to(torch.float32)  # exact: needs one bit more than the 16-bit format
    up = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    down = torch.nextafter(mid, torch.full_like(mid, float("-inf")))
    return torch.cat([x, mid, up, down, -mid])


def _specials():
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
            65504.0, 65519.99, 65520.0, -65520.0, 2**-24, 2**-25, 2**-25 * 1.0000001, 2**-26,
            3.0e38, 3.4028235e38, 1e-45, -1e-45, 1.17549435e-38, 1e-40]
    x = torch.tensor(vals, dtype=torch.float32)
    # NaNs with various payloads, signalling ones included.
    nans = torch.tensor([0x7F800001, 0x7FC00001, 0xFF800100, 0x7FBFFFFF, 0x7F802000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([x, nans])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_f32_to_16bit(dtype):
    gen = torch.Generator().manual_seed(123)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 18,), dtype=torch.int64, generator=gen)
    x = torch.cat([
        _specials(),
        _midpoints_and_neighbours(torch.float16),
        _midpoints_and_neighbours(torch.bfloat16),
        random_bits.to(torch.int32).view(torch.float32),
        torch.randn(1 << 16, generator=gen) * 1e-5,  # the fp16 subnormal range
        torch.randn(1 << 16, generator=gen) * 3e4,  # near fp16 overflow
    ]).contiguous()
    got = from_f32(x, dtype)
    assert_same_values(got, x.to(dtype))
    assert torch.isnan(got[torch.isnan(x)]).all()  # NaN stays NaN (never inf)
