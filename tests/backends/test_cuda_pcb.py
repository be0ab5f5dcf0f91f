"""pymerge._C_cuda PCB kernels (csrc/cuda/pcb.cu) against the torch reference: the cuda-only tests
(exp / tanh, views and streams, bindings). The tests shared with the other backends are in
test_pcb.py. Needs a GPU.

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

from .cases import CUDA, DTYPES, exact_math, pcb_error_cases, pcb_stats_length_errors
from .cases import assert_bits_equal_on_cpu as assert_bits_equal
from .cases import exact_exp, exact_tanh, pcb_models as make, pcb_ref_stats as ref_stats

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
