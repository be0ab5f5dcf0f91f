"""Digit histograms of selection keys on the GPU (csrc/cuda/histogram.cu) against the torch versions
in pymerge.ops.selection, and RadixSelect fed with them: the cuda-only tests (the ops against torch
at every size are in test_histogram.py). Needs a GPU.

Kernel geometry: each block counts in 16-bit shared-memory counters and flushes them
every 57344 elements, so the sizes below include runs of one key longer than that.
"""

from __future__ import annotations

import pytest
import torch

from pymerge.backends import cuda
from pymerge.ops import selection
from pymerge.ops.selection import RadixSelect

from .cases import CUDA, DTYPES, prefixes
from .cases import hist_tensors as tensors

pytestmark = CUDA.marks

HIST_TILE = 57344


def abs_both(base, t, **kw):
    got = cuda.abs_tau_histogram(base.cuda(), t.cuda(), **kw)
    assert got.device.type == "cuda" and got.dtype == torch.int64 and got.shape == (65536,)
    return got.cpu(), selection.abs_tau_histogram(base, t, **kw)


def ord_both(v, **kw):
    got = cuda.order_key_histogram(v.cuda(), **kw)
    assert got.device.type == "cuda" and got.dtype == torch.int64 and got.shape == (65536,)
    return got.cpu(), selection.order_key_histogram(v, **kw)


@pytest.mark.parametrize("size", [HIST_TILE - 1, HIST_TILE, 2 * HIST_TILE + 5, 300_001])
def test_long_runs_of_one_key(size):
    # Every key equal (and every key in one of two bins): the 16-bit shared counters of a
    # block reach their largest count between flushes.
    base = torch.zeros(size, dtype=torch.bfloat16)
    t = torch.full((size,), 0.5, dtype=torch.bfloat16)
    got, want = abs_both(base, t, shift=16)
    assert torch.equal(got, want) and int(got.max()) == size
    assert torch.equal(*abs_both(base, t, shift=0, prefix=int(want.argmax())))
    t[::2] = -0.25
    assert torch.equal(*abs_both(base, t, shift=16))
    assert torch.equal(*ord_both(t, shift=16))
    assert torch.equal(*ord_both(torch.zeros(size), shift=0, prefix=0x8000))


def test_nan_and_signed_zero():
    base = torch.zeros(6)
    t = torch.tensor([1.0, float("nan"), -float("nan"), 2.0, float("nan"), 0.0])
    for h, _ in (abs_both(base, t, shift=16), ord_both(t, shift=16)):
        assert int(h[0xFFFF]) == 3 and int(h.sum()) == 6
    assert int(cuda.order_key_histogram(t.cuda(), shift=0, prefix=0xFFFF)[0xFFFF]) == 3
    z = torch.tensor([0.0, -0.0])
    assert int(cuda.order_key_histogram(z.cuda(), shift=16)[0x8000]) == 2


def test_views_streams_and_repeatability():
    gen = torch.Generator().manual_seed(3)
    base, t = tensors(100_003, torch.bfloat16, torch.bfloat16, gen)
    bd, td = base.cuda()[1:], t.cuda()[1:]  # misaligned views
    want = selection.abs_tau_histogram(base[1:], t[1:], shift=16)
    for _ in range(3):
        assert torch.equal(cuda.abs_tau_histogram(bd, td, shift=16).cpu(), want)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        h = cuda.order_key_histogram(td[::3], shift=16)  # non-contiguous
    s.synchronize()
    assert torch.equal(h.cpu(), selection.order_key_histogram(t[1:][::3], shift=16))


def test_argument_errors():
    x = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="shift"):
        cuda.abs_tau_histogram(x, x, shift=8)
    with pytest.raises(ValueError, match="prefix applies"):
        cuda.abs_tau_histogram(x, x, shift=16, prefix=3)
    with pytest.raises(ValueError, match="needs a prefix"):
        cuda.order_key_histogram(x, shift=0)
    with pytest.raises(ValueError, match="needs a prefix"):
        cuda.order_key_histogram(x, shift=0, prefix=65536)
    with pytest.raises(ValueError, match="shape"):
        cuda.abs_tau_histogram(x, torch.zeros(5, device="cuda"), shift=16)
    with pytest.raises(ValueError, match="dtype"):
        cuda.order_key_histogram(x.double(), shift=16)
    with pytest.raises(ValueError, match="dtype"):
        cuda.abs_tau_histogram(x, x.double(), shift=16)
    with pytest.raises(ValueError, match="cuda"):
        cuda.order_key_histogram(torch.zeros(4), shift=16)
    with pytest.raises(ValueError, match="cuda"):
        cuda.abs_tau_histogram(torch.zeros(4), x, shift=16)


def test_radix_select_abs_histograms():
    """|tau| of several tensors (model-scope clip bounds): ranks from add_histogram == sort."""
    gen = torch.Generator().manual_seed(7)
    chunks = [
        tensors(s, dt, dt, gen, specials=False)
        for s, dt in [(140_000, torch.bfloat16), (7, torch.float32), (1000, torch.float16), (0, torch.float32)]
    ]
    chunks.append((torch.zeros(50), torch.zeros(50)))  # tau == 0: many ties at the bottom
    a = torch.cat([(t.float() - b.float()).abs() for b, t in chunks])
    srt = a.sort().values
    n = a.numel()
    ranks = [0, 49, 50, n // 100, n // 2, n - 1]
    sel = RadixSelect(len(ranks), ranks)
    dev = [(b.cuda(), t.cuda()) for b, t in chunks]
    for b, t in dev:
        h = cuda.abs_tau_histogram(b, t, shift=16)
        for s in range(len(ranks)):
            sel.add_histogram(s, h, keys="abs")
    sel.next_phase()
    for b, t in reversed(dev):
        for s in range(len(ranks)):
            h = cuda.abs_tau_histogram(b, t, shift=0, prefix=sel.prefix(s, keys="abs"))
            sel.add_histogram(s, h, keys="abs", count=t.numel())
    assert sel.values() == [srt[r].item() for r in ranks]


def test_radix_select_order_histograms():
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randn(s, generator=gen) * 1e-3 for s in (133_000, 5, 2000)]
    chunks.append(torch.tensor([0.0, -0.0, -0.0, 1.0]))
    x = torch.cat(chunks)
    ranks = [0, 1, x.numel() // 3, x.numel() - 1]
    sel = RadixSelect(len(ranks), ranks)
    dev = [c.cuda() for c in chunks]
    for c in dev:
        for s in range(len(ranks)):
            sel.add_histogram(s, cuda.order_key_histogram(c, shift=16))
    sel.next_phase()
    for c in dev:
        for s in range(len(ranks)):
            sel.add_histogram(s, cuda.order_key_histogram(c, shift=0, prefix=sel.prefix(s)), count=c.numel())
    want = [v + 0.0 for v in x.sort().values[ranks].tolist()]  # zeros as +0.0
    assert sel.values() == want


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        size=st.integers(0, 70_000),
        base_dtype=st.sampled_from(DTYPES),
        dtype=st.sampled_from(DTYPES),
        quantized=st.booleans(),
        offset=st.integers(0, 3),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_histograms(size, base_dtype, dtype, quantized, offset, seed):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(size + offset, generator=gen)
        tau = 0.1 * torch.randn(size + offset, generator=gen)
        if quantized:  # few distinct keys: long runs in one bin
            tau = torch.round(tau * 8) / 8
        t = (base + tau).to(dtype)[offset:]
        base = base.to(base_dtype)[offset:]
        high, want = abs_both(base, t, shift=16)
        assert torch.equal(high, want)
        for p in prefixes(want)[:2]:
            assert torch.equal(*abs_both(base, t, shift=0, prefix=p))
        got, want = ord_both(t, shift=16)
        assert torch.equal(got, want)
        for p in prefixes(want)[:2]:
            assert torch.equal(*ord_both(t, shift=0, prefix=p))
