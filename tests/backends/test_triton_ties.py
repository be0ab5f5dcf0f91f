"""Triton TIES kernels, bit for bit against the torch reference: the triton-only tests (block
borders, small interpreted cases). The tests shared with the other backends are in test_ties.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import pymerge.ops  # noqa: E402
from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402
from pymerge.testing import assert_bits_equal  # noqa: E402

from .cases import (DTYPES, TRITON, WORKED_MERGED, models, shaped_models, special_pairs,  # noqa: E402
                    thresholds_for, ties_error_cases, worked_example)

pytestmark = TRITON.marks
DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.histogram.BLOCK_SIZE
ODD = 2 * BLOCK + 37  # several blocks, the last one partial


def dev(base, ts):
    return base.to(DEVICE), [t.to(DEVICE) for t in ts]


def check(got, ref):
    assert got.device.type == torch.device(DEVICE).type
    assert_bits_equal(got.cpu(), ref)


# ---------------------------------------------------------------- ties_merge


@pytest.mark.parametrize("trim_ties", ["exact", "inclusive"])
@pytest.mark.parametrize("consensus,normalize", [("sum", True), ("count", False)])
def test_ties_at_the_threshold(trim_ties, consensus, normalize):
    gen = torch.Generator().manual_seed(len(trim_ties) + len(consensus) + normalize)
    base, ts = models(ODD, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen, tiny=True)
    args = ([0.8, -1.2, 0.5, 1.0], [0.2, 0.5, 0.77, 0.05])
    kw = dict(normalize=normalize, consensus=consensus, trim_ties=trim_ties, lam=1.3)
    check(tb.ties_merge(*dev(base, ts), *args, **kw), reference.ties_merge(base, ts, *args, **kw))


def test_the_tie_break_splits_runs_across_blocks():
    """The exact rule keeps a prefix of the threshold-equal keys: the per-block offsets decide."""
    from pymerge.backends.triton._lib import kernels

    hist = kernels().histogram
    # |tau| = 1 everywhere except a few larger ones: the threshold run spans every block.
    size = 3 * BLOCK + 5
    base = torch.zeros(size)
    tau = torch.ones(size)
    tau[::97] = 2.0
    x = base + tau * torch.where(torch.arange(size) % 3 == 0, -1.0, 1.0)
    big = int((tau == 2).sum())
    for k in (big + BLOCK - 3, big + 2 * BLOCK + 11):
        trims = hist.top_k_trims(base.to(DEVICE), [x.to(DEVICE)], [(0, k)])
        assert trims.split
        keep = reference.ties.topk_keep_mask((x - base).abs(), k)
        got = tb.ties_merge(base.to(DEVICE), [x.to(DEVICE)], densities=k / size + 1e-12, normalize=False)
        ref = reference.ties_merge(base, [x], densities=k / size + 1e-12, normalize=False)
        check(got, ref)
        assert torch.equal(got.cpu() != 0, keep)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(100 + n_models)
    dts = [DTYPES[(i + 1) % 3] for i in range(n_models)]
    base, ts = models(1100 if n_models in (1, 8) else 300, dts, gen, base_dtype=torch.float16, tiny=n_models % 3 == 0)
    weights = [(-1) ** i * (0.4 + i / 5) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    kw = dict(out_dtype=DTYPES[n_models % 3], consensus="count" if n_models % 2 else "sum")
    check(tb.ties_merge(*dev(base, ts), weights, densities, **kw), reference.ties_merge(base, ts, weights, densities, **kw))


@pytest.mark.parametrize("densities", [0.0, 1.0, 1e-12, 0.9999999, 2.0, -0.5, [0.0, 1.0, 0.5], [1.0, 0.0, 1e-3]])
def test_density_edges(densities):
    gen = torch.Generator().manual_seed(7)
    base, ts = models(700, [torch.bfloat16] * 3, gen, tiny=True)
    check(tb.ties_merge(*dev(base, ts), [1.0, 2.0, -1.0], densities), reference.ties_merge(base, ts, [1.0, 2.0, -1.0], densities))


def test_weights_that_cancel_and_zero_weights():
    gen = torch.Generator().manual_seed(8)
    base, ts = models(600, [torch.float32] * 4, gen, tiny=True)
    for weights in ([1.0, -1.0, 1.0, -1.0], [0.0, -0.0, 1.0, 0.0]):
        for normalize in (True, False):
            ref = reference.ties_merge(base, ts, weights, 0.6, normalize=normalize)
            check(tb.ties_merge(*dev(base, ts), weights, 0.6, normalize=normalize), ref)


def test_special_values():
    base, a, b = special_pairs()
    for trim_ties in ("exact", "inclusive"):
        for consensus, density in (("sum", 0.3), ("count", 0.9)):
            kw = dict(trim_ties=trim_ties, consensus=consensus)
            ref = reference.ties_merge(base, [a, b], [1.0, 0.5], density, **kw)
            check(tb.ties_merge(*dev(base, [a, b]), [1.0, 0.5], density, **kw), ref)


def test_shapes_non_contiguous_and_dispatch():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(24, 40, generator=gen).bfloat16()
    a = (base.float().t() + 0.01 * torch.randn(40, 24, generator=gen)).bfloat16().t()  # non-contiguous
    b = (base.float() + 0.01 * torch.randn(24, 40, generator=gen)).to(torch.float16)
    got = pymerge.ops.ties_merge(base.to(DEVICE), [a.to(DEVICE), b.to(DEVICE)], densities=0.4, backend="triton")
    assert pymerge.ops.last_backend() == "triton"
    assert got.shape == (24, 40) and got.dtype == torch.bfloat16 and got.is_contiguous()
    check(got, reference.ties_merge(base, [a, b], densities=0.4))
    scalar = torch.tensor(1.5)
    check(tb.ties_merge(scalar.to(DEVICE), [scalar.to(DEVICE) + 1]), reference.ties_merge(scalar, [scalar + 1]))
    assert tb.ties_merge(torch.zeros(0, 3, device=DEVICE), [torch.zeros(0, 3, device=DEVICE)]).shape == (0, 3)


def test_errors_match_reference():
    for case in ties_error_cases(torch.ones(4, device=DEVICE), torch.ones(5, device=DEVICE)):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.ties_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            tb.ties_merge(base, tensors, **case)
    with pytest.raises(ValueError, match="meta"):
        tb.ties_merge(torch.ones(4, device="meta"), [torch.ones(4, device="meta")])


# ---------------------------------------------------------------- model scope


@pytest.mark.parametrize("size", [0, 7, ODD])
@pytest.mark.parametrize("merge", ["dis-mean", "dis-sum"])
def test_ties_merge_model_matches_reference(size, merge):
    gen = torch.Generator().manual_seed(size + len(merge))
    for tiny, fallback, out_dtype in ((False, -3, None), (True, 0, torch.float32), (True, 1, torch.float16)):
        base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32], gen, tiny=tiny)
        th = thresholds_for(base, ts, 0.5) if size else [0.0] * 4
        kw = dict(lam=0.7, merge=merge, out_dtype=out_dtype)
        check(tb.ties_merge_model(*dev(base, ts), th, fallback, **kw), reference.ties_merge_model(base, ts, th, fallback, **kw))


def test_model_scope_worked_example_and_special_values():
    # specs/methods.md worked example, through the whole-model oracle's thresholds.
    zero, tau, th = worked_example()
    fb = tb.ties_sign_sum(*dev(zero, tau), th)
    got = tb.ties_merge_model(*dev(zero, tau), th, fb).cpu()
    torch.testing.assert_close(got, torch.tensor(WORKED_MERGED))
    assert_bits_equal(got, reference.ties_merge_model(zero, tau, th, fb))
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, -3e38, 1.0, -2.0])
    base = specials.repeat(10)
    ts = [specials.repeat_interleave(10), specials.flip(0).repeat(10)]
    for th, fallbacks in (([0.0, 0.0], (-1, 0, 1)), ([float("inf"), 1e-45], (1,))):
        assert tb.ties_sign_sum(*dev(base, ts), th) == reference.ties_sign_sum(base, ts, th)
        for fallback in fallbacks:
            check(tb.ties_merge_model(*dev(base, ts), th, fallback), reference.ties_merge_model(base, ts, th, fallback))


# ---------------------------------------------------------------- properties

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    @FEW
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=2),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
        densities=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=5, max_size=5),
        lam=st.floats(-2, 2, allow_nan=False),
        normalize=st.booleans(),
        consensus=st.sampled_from(["sum", "count"]),
        trim_ties=st.sampled_from(["exact", "inclusive"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_merge(shape, in_dtypes, base_dtype, out_dtype, weights, densities, lam, normalize, consensus,
                                 trim_ties, tiny, seed):
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed)
        n = len(ts)
        kw = dict(lam=lam, normalize=normalize, consensus=consensus, trim_ties=trim_ties, out_dtype=out_dtype)
        ref = reference.ties_merge(base, ts, weights[:n], densities[:n], **kw)
        check(tb.ties_merge(*dev(base, ts), weights[:n], densities[:n], **kw), ref)

    @FEW
    @given(
        shape=st.lists(st.integers(0, 30), min_size=0, max_size=2),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        thresholds=st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 1e-3, 2.0]), min_size=5, max_size=5),
        fallback=st.integers(-2, 2),
        lam=st.floats(-2, 2, allow_nan=False),
        merge=st.sampled_from(["dis-mean", "dis-sum"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_ties_model_scope(shape, in_dtypes, base_dtype, thresholds, fallback, lam, merge, tiny, seed):
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed)
        th = thresholds[: len(ts)]
        assert tb.ties_sign_sum(*dev(base, ts), th) == reference.ties_sign_sum(base, ts, th)
        ref = reference.ties_merge_model(base, ts, th, fallback, lam=lam, merge=merge)
        check(tb.ties_merge_model(*dev(base, ts), th, fallback, lam=lam, merge=merge), ref)
