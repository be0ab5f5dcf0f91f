"""Digit histograms of selection keys (csrc/cpu/histogram.cpp), RadixSelect.add_histogram, and the
model-scope statistics of ties / pcb computed through them: the cpu-only tests. The ops against
torch, with the other backends, are in test_histogram.py."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from pymerge.backends import cpu
from pymerge.ops import selection
from pymerge.ops.selection import RadixSelect

from .cases import NEEDS_CPU as needs_cpu
from .cases import hist_tensors as tensors

# Histogram chunks: 32768 keys. The ops against torch at every size are in test_histogram.py.


# ---------------------------------------------------------------- the ops against torch


@needs_cpu
def test_nan_goes_to_the_last_bin():
    base = torch.zeros(6)
    t = torch.tensor([1.0, float("nan"), -float("nan"), 2.0, float("nan"), 0.0])
    for h in (
        cpu.abs_tau_histogram(base, t, shift=16),
        selection.abs_tau_histogram(base, t, shift=16),
        cpu.order_key_histogram(t, shift=16),
        selection.order_key_histogram(t, shift=16),
    ):
        assert int(h[0xFFFF]) == 3 and int(h.sum()) == 6
    assert int(cpu.order_key_histogram(t, shift=0, prefix=0xFFFF)[0xFFFF]) == 3
    # -0 counts as +0
    z = torch.tensor([0.0, -0.0])
    assert int(cpu.order_key_histogram(z, shift=16)[0x8000]) == 2


@needs_cpu
def test_thread_counts_identical():
    gen = torch.Generator().manual_seed(1)
    base, t = tensors(5 * 32768 + 123, torch.bfloat16, torch.bfloat16, gen)
    got = []
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        h = cpu.abs_tau_histogram(base, t, shift=16)
        got.append((h, cpu.abs_tau_histogram(base, t, shift=0, prefix=int(h.argmax())), cpu.order_key_histogram(t.float(), shift=16)))
    for r in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, got[0]))


@needs_cpu
@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_argument_errors(impl):
    abs_h = cpu.abs_tau_histogram if impl == "cpu" else selection.abs_tau_histogram
    ord_h = cpu.order_key_histogram if impl == "cpu" else selection.order_key_histogram
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="shift"):
        abs_h(x, x, shift=8)
    with pytest.raises(ValueError, match="prefix applies"):
        abs_h(x, x, shift=16, prefix=3)
    with pytest.raises(ValueError, match="needs a prefix"):
        ord_h(x, shift=0)
    with pytest.raises(ValueError, match="needs a prefix"):
        ord_h(x, shift=0, prefix=65536)
    with pytest.raises(ValueError, match="shape"):
        abs_h(x, torch.zeros(5), shift=16)
    with pytest.raises(ValueError, match="dtype|fp32"):
        ord_h(x.double(), shift=16)
    if impl == "cpu":
        with pytest.raises(ValueError, match="meta"):
            cpu.order_key_histogram(torch.zeros(4, device="meta"), shift=16)
        with pytest.raises(ValueError, match="dtype"):
            cpu.abs_tau_histogram(x, x.double(), shift=16)


# ---------------------------------------------------------------- RadixSelect with histograms


def _abs_op(kind):
    return cpu.abs_tau_histogram if kind == "cpu" else selection.abs_tau_histogram


def _ord_op(kind):
    return cpu.order_key_histogram if kind == "cpu" else selection.order_key_histogram


KINDS = [pytest.param("cpu", marks=needs_cpu), "torch"]


@pytest.mark.parametrize("kind", KINDS)
def test_radix_select_abs_histograms(kind):
    """|tau| of several tensors (model-scope clip bounds): ranks from add_histogram == sort."""
    hist = _abs_op(kind)
    gen = torch.Generator().manual_seed(7)
    chunks = [
        tensors(s, dt, dt, gen, specials=False)
        for s, dt in [(40_000, torch.bfloat16), (7, torch.float32), (1000, torch.float16), (0, torch.float32)]
    ]
    chunks.append((torch.zeros(50), torch.zeros(50)))  # tau == 0: many ties at the bottom
    a = torch.cat([(t.float() - b.float()).abs() for b, t in chunks])
    srt = a.sort().values
    n = a.numel()
    ranks = [0, 49, 50, n // 100, n // 2, n - 1]
    sel = RadixSelect(len(ranks), ranks)
    for b, t in chunks:  # phase 1: one histogram shared by every stream
        h = hist(b, t, shift=16)
        for s in range(len(ranks)):
            sel.add_histogram(s, h, keys="abs")
    sel.next_phase()
    for b, t in reversed(chunks):  # any order in phase 2
        for s in range(len(ranks)):
            sel.add_histogram(s, hist(b, t, shift=0, prefix=sel.prefix(s, keys="abs")), keys="abs", count=t.numel())
    assert sel.values() == [srt[r].item() for r in ranks]


@pytest.mark.parametrize("kind", KINDS)
def test_radix_select_order_histograms_mixed_with_update(kind):
    hist = _ord_op(kind)
    gen = torch.Generator().manual_seed(8)
    chunks = [torch.randn(s, generator=gen) * 1e-3 for s in (33_000, 5, 2000)]
    chunks.append(torch.tensor([0.0, -0.0, -0.0, 1.0]))
    x = torch.cat(chunks)
    ranks = [0, 1, x.numel() // 3, x.numel() - 1]
    sel = RadixSelect(len(ranks), ranks)
    rng = random.Random(0)
    for phase in range(2):
        for c in chunks:
            for s in range(len(ranks)):
                if rng.random() < 0.5:
                    sel.update(s, c)
                elif phase == 0:
                    sel.add_histogram(s, hist(c, shift=16))
                else:
                    sel.add_histogram(s, hist(c, shift=0, prefix=sel.prefix(s)), count=c.numel())
        sel.next_phase()
    want = [v + 0.0 for v in x.sort().values[ranks].tolist()]  # zeros as +0.0
    assert sel.values() == want


def test_add_histogram_errors():
    x = torch.arange(10, dtype=torch.float32)
    h = selection.order_key_histogram(x, shift=16)
    sel = RadixSelect(1, [3])
    with pytest.raises(ValueError, match="65536"):
        sel.add_histogram(0, h[:100])
    with pytest.raises(ValueError, match="integer"):
        sel.add_histogram(0, h.float())
    with pytest.raises(ValueError, match="negative"):
        sel.add_histogram(0, -h)
    with pytest.raises(ValueError, match="keys"):
        sel.add_histogram(0, h, keys="signed")
    with pytest.raises(ValueError, match="stream"):
        sel.add_histogram(1, h)
    with pytest.raises(ValueError, match="count"):
        sel.add_histogram(0, h, count=3)
    with pytest.raises(ValueError, match="NaN"):
        sel.add_histogram(0, selection.order_key_histogram(torch.tensor([float("nan")]), shift=16))
    with pytest.raises(ValueError, match="top bit"):
        sel.add_histogram(0, h, keys="abs")  # order keys of positive values are >= 0x80000000
    with pytest.raises(ValueError, match="phase 2 only"):
        sel.prefix(0)
    sel.add_histogram(0, h)
    sel.next_phase()
    with pytest.raises(ValueError, match="count="):
        sel.add_histogram(0, selection.order_key_histogram(x, shift=0, prefix=sel.prefix(0)))
    neg = RadixSelect(1, [0])
    neg.update(0, torch.tensor([-1.0, 2.0]))
    neg.next_phase()
    with pytest.raises(ValueError, match="negative"):
        neg.prefix(0, keys="abs")
    with pytest.raises(ValueError, match="more than count"):
        sel.add_histogram(0, selection.order_key_histogram(x, shift=0, prefix=sel.prefix(0)), count=0)
    sel.add_histogram(0, selection.order_key_histogram(x, shift=0, prefix=sel.prefix(0)), count=10)
    assert sel.values() == [3.0]
    # The caller's histogram is copied, not aliased.
    assert torch.equal(h, selection.order_key_histogram(x, shift=16))


def test_histogram_op_selection():
    assert selection.histogram_op("abs_tau_histogram", "torch", "cpu") is None
    # on CUDA tensors "auto" takes a GPU kernel (cuda, else Triton compiled for the GPU), never the interpreter
    on_gpu = selection.histogram_op("abs_tau_histogram", "auto", "cuda")
    assert (on_gpu is None) == (not torch.cuda.is_available())
    assert selection.histogram_op("no_such_histogram", "auto", "cpu") is None
    if cpu.available():
        assert selection.histogram_op("abs_tau_histogram", "auto", "cpu") is cpu.abs_tau_histogram
        assert selection.histogram_op("order_key_histogram", "cpu", "cpu") is cpu.order_key_histogram


# ---------------------------------------------------------------- the engine's model-scope passes


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _inputs(family):
    from pymerge.io import CheckpointReader

    with CheckpointReader(family.base) as b:
        base = {n: b.get(n).clone() for n in b.names()}
    models = []
    for m in family.models:
        with CheckpointReader(m) as r:
            models.append({n: r.get(n).clone() for n in r.names()})
    return base, models


@needs_cpu
@pytest.mark.parametrize("method", ["ties", "pcb"])
def test_model_scope_statistics_use_the_cpu_histograms(family, tmp_path, monkeypatch, method):
    import pymerge
    from pymerge.ops import reference as ref

    calls = {"abs_tau_histogram": 0, "order_key_histogram": 0}
    for name in calls:
        real = getattr(cpu, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu, name, spy)
    if method == "ties":
        params, per_model = {"scope": "model", "merge": "dis-mean"}, {"density": 0.4}
    else:
        params, per_model = {"density": 0.2, "clip_ratio": 0.05}, {}
    cfg = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(m), "parameters": dict(per_model)} for m in family.models],
        "parameters": params,
    }
    pymerge.merge(cfg, tmp_path / "out")
    assert calls["abs_tau_histogram"] > 0
    assert (calls["order_key_histogram"] > 0) == (method == "pcb")
    out = _load_dir(tmp_path / "out")
    base, models = _inputs(family)
    if method == "ties":
        want = ref.ties_model_scope(base, models, 0.4, merge="dis-mean")
    else:
        # exp/tanh correctly rounded, as the kernels compute them (see test_cpu_pcb.py)
        exp, tanh = torch.exp, torch.tanh
        monkeypatch.setattr(torch, "exp", lambda x: exp(x.double()).float())
        monkeypatch.setattr(torch, "tanh", lambda x: tanh(x.double()).float())
        want = ref.pcb_merge_model(base, models, density=0.2, clip_ratio=0.05)
        monkeypatch.undo()
    for name in base:
        torch.testing.assert_close(out[name], want[name].to(out[name].dtype), rtol=0, atol=0, msg=name)
