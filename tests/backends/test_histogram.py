"""Digit histograms of selection keys (abs_tau_histogram, order_key_histogram) of every backend against
the torch versions in pymerge.ops.selection: the tests whose bodies are the same for each backend.
The backend-specific ones (thread counts, long runs, streams, RadixSelect fed with them, argument
errors) are in test_<backend>_histogram.py."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import selection

from .cases import DTYPES, hist_tensors, over, prefixes

# cpu: chunks of 32768 keys; cuda: 16-bit shared counters flushed every 57344 elements;
# triton: blocks of 1024 (triton_kernels.histogram.BLOCK_SIZE), kept small for the interpreter.
CUDA_TILE = 57344
CPU_SIZES = [0, 1, 7, 1000, 65537, 100_003]
CUDA_SIZES = [0, 1, 7, 8, 1000, CUDA_TILE + 1, 3 * CUDA_TILE + 1001]
TRITON_SIZES = [0, 1, 7, 2 * 1024 + 37]
PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
]


def same(bk, got, want):
    """got: a histogram on bk's device with want's counts."""
    assert got.device.type == torch.device(bk.device).type
    assert got.dtype == torch.int64 and got.shape == (65536,)
    return torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bk,size,base_dtype,dtype", over(
    cpu=[(size,) + p for p in PAIRS for size in CPU_SIZES],
    triton=[(0, torch.float32, torch.float32), (1, torch.float16, torch.float16), (7, torch.bfloat16, torch.float32)]
    + [(TRITON_SIZES[-1],) + p for p in PAIRS[:4]],
    cuda=[(size,) + p for p in PAIRS for size in CUDA_SIZES],
))
def test_abs_tau_histogram_matches_torch(bk, size, base_dtype, dtype):
    gen = torch.Generator().manual_seed(size + 3 * DTYPES.index(dtype))
    base, t = hist_tensors(size, base_dtype, dtype, gen)
    b, (td,) = bk.put(base, [t])
    high = bk.mod.abs_tau_histogram(b, td, shift=16)
    want = selection.abs_tau_histogram(base, t, shift=16)
    assert same(bk, high, want) and int(high.sum()) == size
    for p in prefixes(want):
        got = bk.mod.abs_tau_histogram(b, td, shift=0, prefix=p)
        assert same(bk, got, selection.abs_tau_histogram(base, t, shift=0, prefix=p))


@pytest.mark.parametrize("bk,size,dtype", over(
    cpu=[(size, dtype) for dtype in DTYPES for size in CPU_SIZES],
    triton=list(zip(TRITON_SIZES, DTYPES + DTYPES)) + [(TRITON_SIZES[-1], dt) for dt in DTYPES[:2]],
    cuda=[(size, dtype) for dtype in DTYPES for size in CUDA_SIZES],
))
def test_order_key_histogram_matches_torch(bk, size, dtype):
    gen = torch.Generator().manual_seed(size + 11 * DTYPES.index(dtype))
    v = (torch.randn(size, generator=gen) * torch.exp(3 * torch.randn(size, generator=gen))).to(dtype)
    if size >= 8:
        v[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 1.0, -1.0]).to(dtype)
    want = selection.order_key_histogram(v, shift=16)
    assert same(bk, bk.mod.order_key_histogram(bk.put(v), shift=16), want)
    for p in prefixes(want):
        got = bk.mod.order_key_histogram(bk.put(v), shift=0, prefix=p)
        assert same(bk, got, selection.order_key_histogram(v, shift=0, prefix=p))
