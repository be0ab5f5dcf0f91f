"""Streaming exact selection: order keys and the two-pass radix select, against torch.sort."""

import math
import random

import pytest
import torch

from pymerge.ops.selection import RadixSelect, fp32_from_order_key, fp32_order_key


def test_order_key_is_monotone_and_invertible():
    tiny = torch.finfo(torch.float32).tiny
    big = torch.finfo(torch.float32).max
    vals = torch.tensor(
        [-float("inf"), -big, -2.0, -1.0, -tiny, -1e-45, -0.0, 0.0, 1e-45, tiny, 1.0, 2.0, big, float("inf")],
        dtype=torch.float32,
    )
    keys = fp32_order_key(vals)
    assert keys.dtype == torch.int64
    assert bool((keys[1:] > keys[:-1]).all())
    assert int(keys.min()) >= 0 and int(keys.max()) <= 0xFFFFFFFF
    assert keys[7].item() == 0x80000000  # +0.0
    assert keys[6].item() == 0x7FFFFFFF  # -0.0
    back = fp32_from_order_key(keys)
    assert torch.equal(back.view(torch.int32), vals.view(torch.int32))


def test_order_key_random_roundtrip_and_order():
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[~torch.isnan(x)]
    x = torch.where(x == 0, torch.zeros(()), x)
    keys = fp32_order_key(x)
    assert torch.equal(fp32_from_order_key(keys).view(torch.int32), x.view(torch.int32))
    ks = keys.sort().values
    xs = x.sort().values
    assert torch.equal(fp32_from_order_key(ks).view(torch.int32), xs.view(torch.int32))


def _run(sel, streams, rng):
    """Feed every stream's chunks in a random interleaving, for both phases."""
    for _ in range(2):
        jobs = [(s, c) for s, chunks in enumerate(streams) for c in chunks]
        rng.shuffle(jobs)
        for s, c in jobs:
            sel.update(s, c)
        sel.next_phase()
    assert sel.done


def _chunks(x, rng, max_chunk):
    out, i = [], 0
    while i < x.numel():
        n = rng.randint(0, max_chunk)
        out.append(x[i : i + n])
        i += n
    return out


def test_radix_select_matches_sort():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    data = []
    a = torch.randn(30000, generator=g)
    a[:500] = 0.0
    a[500:900] = -0.0
    a[900:3000] = a[3000]  # many duplicates
    data.append(a)
    data.append(torch.randint(-5, 6, (7000,), generator=g).float())  # heavy ties
    data.append(torch.randn(5000, generator=g) * 1e-30)  # near zero, same high bits often
    data.append(1.0 + torch.rand(4000, generator=g) * 2**-10)  # one high-16-bit bin
    data.append(torch.tensor([-3.5]))
    ranks = []
    for x in data:
        n = x.numel()
        ranks.append(rng.choice([0, n - 1, n // 2, rng.randrange(n)]))
    sel = RadixSelect(len(data), ranks)
    _run(sel, [_chunks(x, rng, 2500) for x in data], rng)
    got = sel.values()
    for x, r, v in zip(data, ranks, got):
        expected = x.sort().values[r].item()
        assert v == expected
        assert str(v) != "-0.0"  # canonical zero


@pytest.mark.parametrize("seed", range(4))
def test_radix_select_every_rank_small(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (40,), generator=g).float() * torch.tensor([0.5, -0.0, 1e-40, 7.0]).repeat(10)
    xs = x.sort().values
    n = x.numel()
    sel = RadixSelect(n, list(range(n)))
    chunks = _chunks(x, rng, 9)
    _run(sel, [chunks] * n, rng)
    got = sel.values()
    assert got == [float(v) for v in xs.tolist()]
    assert all(math.copysign(1.0, v) == 1.0 for v in got if v == 0)  # -0.0 comes back as +0.0


def test_low_precision_inputs_and_late_ranks():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, generator=g).to(torch.bfloat16)
    sel = RadixSelect(1)
    for c in x.split(512):
        sel.update(0, c)
    assert sel.totals == [3000]
    sel.set_ranks([2999 - 7])
    sel.next_phase()
    for c in x.split(700):
        sel.update(0, c)
    sel.next_phase()
    assert sel.values() == [x.float().sort().values[2992].item()]
    h = torch.randn(100, generator=g).half()
    sel = RadixSelect(1, [10])
    _run(sel, [[h]], random.Random(0))
    assert sel.values() == [h.float().sort().values[10].item()]


def test_errors():
    x = torch.arange(10, dtype=torch.float32)
    sel = RadixSelect(2, [3, 10])
    sel.update(0, x)
    sel.update(1, x)
    with pytest.raises(ValueError, match="rank 10"):
        sel.next_phase()
    sel = RadixSelect(1, [-1])
    sel.update(0, x)
    with pytest.raises(ValueError, match="rank -1"):
        sel.next_phase()
    sel = RadixSelect(1, [0])
    with pytest.raises(ValueError, match=r"\[0, 0\)"):
        sel.next_phase()  # nothing fed
    sel = RadixSelect(1, [2])
    sel.update(0, x)
    sel.next_phase()
    with pytest.raises(ValueError, match="ranks"):
        sel.set_ranks([1])
    sel.update(0, x[:5])
    with pytest.raises(ValueError, match="phase 2 saw 5"):
        sel.next_phase()
    sel = RadixSelect(1, [2])
    sel.update(0, x)
    with pytest.raises(ValueError, match="not done"):
        sel.values()
    sel.next_phase()
    sel.update(0, x)
    assert not sel.done
    assert sel.values() == [2.0]  # ends phase 2
    assert sel.done and sel.values() == [2.0]
    with pytest.raises(ValueError, match="done"):
        sel.update(0, x)
    with pytest.raises(ValueError, match="done"):
        sel.next_phase()
    with pytest.raises(ValueError, match="NaN"):
        RadixSelect(1, [0]).update(0, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="stream"):
        RadixSelect(1, [0]).update(1, x)
    with pytest.raises(ValueError, match="fp32"):
        RadixSelect(1, [0]).update(0, x.double())
    with pytest.raises(ValueError, match="streams"):
        RadixSelect(2, [0])
    with pytest.raises(ValueError, match="never set"):
        s = RadixSelect(1)
        s.update(0, x)
        s.next_phase()
    with pytest.raises(ValueError, match="n_streams"):
        RadixSelect(0)


def test_ties_threshold_via_radix_select():
    from pymerge.ops.reference.ties import ties_model_threshold

    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=g) for s in (1000, 37, 4096)]
    a = torch.cat([t.reshape(-1) for t in tensors]).abs()
    d, density = a.numel(), 0.3
    k = d - int(d * density)  # 1-based, as the spec
    sel = RadixSelect(1, [k - 1])
    for _ in range(2):
        for t in tensors:
            sel.update(0, t.abs())
        sel.next_phase()
    assert sel.values()[0] == ties_model_threshold(a, density)
