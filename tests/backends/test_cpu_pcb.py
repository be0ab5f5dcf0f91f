"""pymerge._C PCB kernels (csrc/cpu/pcb.cpp) against the torch reference: the cpu-only tests
(exp / tanh, thread counts and kernel clones, bindings). The tests shared with the other
backends are in test_pcb.py.

The kernels evaluate exp and tanh as correctly rounded fp32 values; torch's fp32
exp/tanh (SLEEF, within 1 ulp) are not correctly rounded everywhere. So:
  * against the reference run with correctly rounded exp/tanh (`exact_math`),
    every op is checked bit for bit: scores, statistics and outputs;
  * against the plain reference, scores are within 4 ulp (fp32) and outputs
    are identical except for a small measured fraction (test_pcb.py, test_plain_reference_*).
"""

from __future__ import annotations

import pytest
import torch

from pymerge.backends import cpu
from pymerge.ops.reference import pcb as ref

from .cases import CPU, DTYPES, each_isa, exact_math
from .cases import assert_bits_equal_on_cpu as assert_bits_equal
from .cases import exact_exp, exact_tanh, pcb_models as make, pcb_ref_stats as ref_stats

pytestmark = CPU.marks

# Kernel layout: blocks of 1024, >= 8 blocks per thread; selection switches from
# nth_element to 16-bit radix histograms above 65536 keys (chunks of 32768).
SIZES = [0, 1, 7, 1000, 65537, 100_003]

# ---------------------------------------------------------------- exp / tanh


def test_exp_tanh_are_correctly_rounded():
    from pymerge import _C

    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            -8 * torch.rand(3000, generator=gen),  # intra's exponent range, N <= 8
            torch.randn(3000, generator=gen) * torch.exp(4 * torch.randn(3000, generator=gen)),
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    1e-45,
                    -1e-45,
                    1e-38,
                    88.72,
                    88.73,
                    -103.9,
                    -104.0,
                    -150.0,
                    9.0,
                    9.1,
                    -9.1,
                    float("inf"),
                    float("-inf"),
                    3e38,
                    -3e38,
                ]
            ),
        ]
    )
    exp = torch.tensor([_C._pcb_exp_f32(v) for v in x.tolist()])
    tanh = torch.tensor([_C._pcb_tanh_f32(v) for v in x.tolist()])
    assert_bits_equal(exp, exact_exp(x))
    assert_bits_equal(tanh, exact_tanh(x))
    assert torch.isnan(torch.tensor([_C._pcb_exp_f32(float("nan")), _C._pcb_tanh_f32(float("nan"))])).all()


# ---------------------------------------------------------------- bit for bit with exact math


# Every size with every dtype; the large ones with fewer model counts.
MERGE_CASES = [(size, dtype, n) for size in SIZES[:4] for dtype in DTYPES for n in (1, 4)] + [
    (65537, torch.bfloat16, 2),
    (100_003, torch.float16, 2),
]


@pytest.mark.parametrize("size,dtype,n_models", MERGE_CASES)
def test_merge_with_stats(size, dtype, n_models):
    gen = torch.Generator().manual_seed(size + n_models)
    base, ts = make(size, n_models, [dtype], gen)
    with exact_math():
        stats = ref_stats(base, ts, 0.2, 0.01)
        want = ref.pcb_merge_with_stats(base, ts, *stats, lam=0.7)
        lambdas = [0.5 + i / 3 for i in range(n_models)]
        want_l = ref.pcb_merge_with_stats(base, ts, *stats, lambdas=lambdas, out_dtype=torch.float32)
    assert_bits_equal(cpu.pcb_merge_with_stats(base, ts, *stats, lam=0.7), want)
    assert_bits_equal(cpu.pcb_merge_with_stats(base, ts, *stats, lambdas=lambdas, out_dtype=torch.float32), want_l)


@pytest.mark.parametrize("base_dtype", DTYPES)
def test_mixed_input_dtypes(base_dtype):
    gen = torch.Generator().manual_seed(9)
    base, ts = make(5000, 5, [torch.float16, torch.bfloat16, torch.float32], gen, base_dtype=base_dtype)
    for out_dtype in DTYPES + [torch.float64]:
        with exact_math():
            want = ref.pcb_merge(base, ts, density=0.3, clip_ratio=0.05, out_dtype=out_dtype)
            stats = ref_stats(base, ts, 0.3, 0.05)
            want_s = ref.pcb_merge_with_stats(base, ts, *stats, out_dtype=out_dtype)
            want_b = ref.pcb_scores(base, ts, *stats[:2])
        assert_bits_equal(cpu.pcb_merge(base, ts, density=0.3, clip_ratio=0.05, out_dtype=out_dtype), want)
        assert_bits_equal(cpu.pcb_merge_with_stats(base, ts, *stats, out_dtype=out_dtype), want_s)
        assert_bits_equal(cpu.pcb_scores(base, ts, *stats[:2]), want_b)


def test_thread_counts_and_isas_identical():
    from pymerge.backends.cpu.pcb import _pcb_merge

    gen = torch.Generator().manual_seed(21)
    # Two threads split blocks and histogram chunks; the size is not a multiple of either.
    base, ts = make(3 * 32768 + 1000 + 7, 3, [torch.bfloat16, torch.float16], gen, base_dtype=torch.bfloat16)
    stats = _pcb_merge(base, ts, 0.1, 0.01, 1.0, None, None)[1]
    results = []
    for k in (1, 2):
        cpu.set_num_threads(k)
        results += each_isa(lambda: (cpu.pcb_merge(base, ts), cpu.pcb_merge_with_stats(base, ts, *stats),
                                     cpu.pcb_scores(base, ts, *stats[:2])))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert_bits_equal(a, b)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 48, generator=gen).t()
    ts = [(base + 0.01 * torch.randn(48, 64, generator=gen)).to(torch.bfloat16), (base + 0.02).t().contiguous().t()]
    got = cpu.pcb_merge(base, ts, density=0.3)
    assert got.is_contiguous() and got.shape == (48, 64)
    with exact_math():
        assert_bits_equal(got, ref.pcb_merge(base, ts, density=0.3))


# ---------------------------------------------------------------- bindings


def test_binding_checks():
    from pymerge import _C

    x = torch.ones(8)
    out = torch.empty(8)
    with pytest.raises(ValueError, match="rank"):
        _C.pcb_merge(out.data_ptr(), 0, [x.data_ptr()], [0], x.data_ptr(), 0, 8, 0, 8, 0, 1.0, [])
    with pytest.raises(ValueError, match="overlaps"):
        _C.pcb_merge_with_stats(x.data_ptr() + 4, 0, [x.data_ptr()], [0], out.data_ptr(), 0, 4, [0.0], [1.0], [0.0], [1.0], 1.0, [])
    with pytest.raises(ValueError, match="overlaps"):
        _C.pcb_scores(x.data_ptr(), [out.data_ptr()], [0], x.data_ptr() + 8, 0, 4, [0.0], [1.0])
    with pytest.raises(ValueError, match="dtype tag"):
        _C.pcb_scores(out.data_ptr(), [x.data_ptr()], [5], x.data_ptr(), 0, 8, [0.0], [1.0])
