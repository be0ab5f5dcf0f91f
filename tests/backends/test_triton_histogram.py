"""Triton digit histograms of selection keys (abs_tau_histogram, order_key_histogram) against torch,
their selection through histogram_op, and RadixSelect fed with them: the triton-only tests (the ops
against torch are in test_histogram.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference, selection  # noqa: E402
from pymerge.ops.selection import RadixSelect  # noqa: E402

from .cases import TRITON  # noqa: E402
from .cases import hist_tensors as tensors  # noqa: E402

pytestmark = TRITON.marks
DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.histogram.BLOCK_SIZE


def test_nan_goes_to_the_last_bin_and_minus_zero_is_zero():
    base = torch.zeros(6, device=DEVICE)
    t = torch.tensor([1.0, float("nan"), -float("nan"), 2.0, float("nan"), 0.0], device=DEVICE)
    for h in (tb.abs_tau_histogram(base, t, shift=16), tb.order_key_histogram(t, shift=16)):
        assert int(h[0xFFFF]) == 3 and int(h.sum()) == 6
    assert int(tb.order_key_histogram(t, shift=0, prefix=0xFFFF)[0xFFFF]) == 3
    assert int(tb.abs_tau_histogram(base, t, shift=0, prefix=0xFFFF)[0xFFFF]) == 3
    z = torch.tensor([0.0, -0.0], device=DEVICE)
    assert int(tb.order_key_histogram(z, shift=16)[0x8000]) == 2
    assert int(tb.abs_tau_histogram(z, z.flip(0), shift=16)[0]) == 2


def test_argument_errors():
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="shift"):
        tb.abs_tau_histogram(x, x, shift=8)
    with pytest.raises(ValueError, match="prefix applies"):
        tb.abs_tau_histogram(x, x, shift=16, prefix=3)
    with pytest.raises(ValueError, match="needs a prefix"):
        tb.order_key_histogram(x, shift=0)
    with pytest.raises(ValueError, match="needs a prefix"):
        tb.order_key_histogram(x, shift=0, prefix=65536)
    with pytest.raises(ValueError, match="shape"):
        tb.abs_tau_histogram(x, torch.zeros(5, device=DEVICE), shift=16)
    with pytest.raises(ValueError, match="dtype"):
        tb.order_key_histogram(x.double(), shift=16)
    with pytest.raises(ValueError, match="dtype"):
        tb.abs_tau_histogram(x, x.double(), shift=16)
    with pytest.raises(ValueError, match="meta"):
        tb.order_key_histogram(torch.zeros(4, device="meta"), shift=16)


def test_histogram_op_selection():
    for name in ("abs_tau_histogram", "order_key_histogram"):
        # an explicit "triton" gets the Triton op for CUDA tensors (and CPU ones while interpreted)
        assert selection.histogram_op(name, "triton", DEVICE) is getattr(tb, name)
        assert selection.histogram_op(name, "torch", DEVICE) is None
    if not tb.interpreted():
        # "auto" on a GPU: the compiled CUDA op where there is one, else Triton
        assert selection.histogram_op("abs_tau_histogram", "auto", "cuda") is not None
    assert selection.histogram_op("no_such_histogram", "triton", DEVICE) is None


def test_radix_select_with_triton_histograms_gives_the_model_threshold():
    """Model-scope TIES thresholds from per-tensor histograms == the concatenation's kthvalue."""
    gen = torch.Generator().manual_seed(7)
    chunks = [tensors(s, dt, dt, gen, specials=False) for s, dt in [(1500, torch.bfloat16), (7, torch.float32), (300, torch.float16)]]
    chunks.append((torch.zeros(50), torch.zeros(50)))  # tau == 0: many ties at the bottom
    a = torch.cat([(t.float() - b.float()).abs() for b, t in chunks])
    n = a.numel()
    densities = [0.0, 0.2, 0.5, 0.99]
    ranks = [n - int(n * d) - 1 for d in densities]
    sel = RadixSelect(len(ranks), ranks)
    for b, t in chunks:  # phase 1: one histogram shared by every stream
        h = tb.abs_tau_histogram(b.to(DEVICE), t.to(DEVICE), shift=16)
        for s in range(len(ranks)):
            sel.add_histogram(s, h, keys="abs")
    sel.next_phase()
    for b, t in reversed(chunks):  # any order in phase 2
        for s in range(len(ranks)):
            h = tb.abs_tau_histogram(b.to(DEVICE), t.to(DEVICE), shift=0, prefix=sel.prefix(s, keys="abs"))
            sel.add_histogram(s, h, keys="abs", count=t.numel())
    want = [reference.ties.ties_model_threshold(a, d) for d in densities]
    assert sel.values() == want


def test_radix_select_order_histograms():
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randn(s, generator=gen) * 1e-3 for s in (1500, 5)]
    chunks.append(torch.tensor([0.0, -0.0, -0.0, 1.0]))
    chunks.append(torch.randn(300, generator=gen).to(torch.bfloat16))
    x = torch.cat([c.float() for c in chunks])
    ranks = [0, 1, x.numel() // 3, x.numel() - 1]
    sel = RadixSelect(len(ranks), ranks)
    for c in chunks:
        h = tb.order_key_histogram(c.to(DEVICE), shift=16)
        for s in range(len(ranks)):
            sel.add_histogram(s, h)
    sel.next_phase()
    for c in chunks:
        for s in range(len(ranks)):
            sel.add_histogram(s, tb.order_key_histogram(c.to(DEVICE), shift=0, prefix=sel.prefix(s)), count=c.numel())
    assert sel.values() == [v + 0.0 for v in x.sort().values[ranks].tolist()]  # zeros as +0.0


def test_keys_at_ranks_counts_below_and_equal():
    """The selection step the trims use: key, how many keys lie below it, how many equal it."""
    from pymerge.backends.triton._lib import kernels

    hist = kernels().histogram
    gen = torch.Generator().manual_seed(9)
    size = 2 * BLOCK + 37
    base = torch.zeros(size)
    xs = [torch.randint(-6, 7, (size,), generator=gen).float() / 4, torch.randn(size, generator=gen)]
    ranks = torch.tensor([[0, size // 2], [size - 1, 17]])
    keys, less, equal = hist.keys_at_ranks(base.to(DEVICE), [x.to(DEVICE) for x in xs], hist.KEY_MAG, ranks.to(DEVICE))
    for i, x in enumerate(xs):
        a = x.abs()
        srt = a.sort().values
        for s in range(2):
            v = srt[ranks[i, s]]
            assert hist.mag_values(keys[i, s].reshape(1)).item() == v.item()
            assert int(less[i, s]) == int((a < v).sum()) and int(equal[i, s]) == int((a == v).sum())
