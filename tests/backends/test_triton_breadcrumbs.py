"""Triton breadcrumbs kernel (breadcrumbs, breadcrumbs_ties), bit for bit against the torch reference: the
triton-only tests. The tests shared with the other backends are in test_breadcrumbs.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import pymerge.ops  # noqa: E402
from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402
from pymerge.testing import assert_bits_equal  # noqa: E402

from .cases import DTYPES, TRITON, breadcrumbs_error_cases, shaped_models, special_grid  # noqa: E402
from .cases import models as _models  # noqa: E402

pytestmark = TRITON.marks
DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.histogram.BLOCK_SIZE
ODD = 2 * BLOCK + 37


def models(size, dtypes, gen, **kw):
    """(base, tensors); tiny: values from a small exact set, so |tau| ties everywhere."""
    return _models(size, dtypes, gen, steps=3, **kw)


def dev(base, ts):
    return base.to(DEVICE), [t.to(DEVICE) for t in ts]


def check(got, ref):
    assert got.device.type == torch.device(DEVICE).type
    assert_bits_equal(got.cpu(), ref)


@pytest.mark.parametrize("combine,normalize,consensus", [("linear", False, "sum"), ("linear", True, "sum"),
                                                         ("ties", True, "count"), ("ties", False, "sum")])
def test_ties_at_both_ends(combine, normalize, consensus):
    # Both thresholds fall inside long runs of equal |tau| spanning blocks.
    gen = torch.Generator().manual_seed(len(combine) + normalize)
    base, ts = models(ODD, [torch.bfloat16, torch.float16, torch.float32], gen, tiny=True)
    args = ([0.8, -1.2, 0.5], [0.2, 0.5, 0.31], [0.1, 0.05, 0.3])
    kw = dict(combine=combine, normalize=normalize, consensus=consensus, lam=1.1)
    check(tb.breadcrumbs_merge(*dev(base, ts), *args, **kw), reference.breadcrumbs_merge(base, ts, *args, **kw))


@pytest.mark.parametrize(
    "densities,gammas",
    [(0.0, 0.01), (1.0, 0.5), (0.5, 0.0), (0.7, 0.5), (1e-9, 0.999), (0.3, 1.5), (0.3, -1.0),
     ([0.0, 1.0, 0.4], [0.5, 0.0, 0.6])],
)
def test_count_edges(densities, gammas):
    gen = torch.Generator().manual_seed(3)
    base, ts = models(700, [torch.bfloat16] * 3, gen, tiny=True)
    for combine in ("linear", "ties"):
        ref = reference.breadcrumbs_merge(base, ts, [1.0, 2.0, -1.0], densities, gammas, combine=combine)
        check(tb.breadcrumbs_merge(*dev(base, ts), [1.0, 2.0, -1.0], densities, gammas, combine=combine), ref)


@pytest.mark.parametrize("n_models", [1, 2, 5, 8])
def test_model_counts_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(300 + n_models)
    dts = [DTYPES[(i + 2) % 3] for i in range(n_models)]
    base, ts = models(1100, dts, gen, base_dtype=torch.float16, tiny=n_models % 2 == 1)
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 1) for i in range(n_models)]
    kw = dict(out_dtype=DTYPES[n_models % 3], combine="ties" if n_models % 2 else "linear", normalize=n_models > 4)
    ref = reference.breadcrumbs_merge(base, ts, weights, densities, 0.05, **kw)
    check(tb.breadcrumbs_merge(*dev(base, ts), weights, densities, 0.05, **kw), ref)


def test_special_values_shapes_and_dispatch():
    base, a, b = special_grid()
    for combine, densities, gammas in (("linear", 0.5, 0.1), ("ties", 0.9, 0.05), ("ties", 1.0, 0.0)):
        ref = reference.breadcrumbs_merge(base, [a, b], [1.0, 0.5], densities, gammas, combine=combine)
        check(tb.breadcrumbs_merge(*dev(base, [a, b]), [1.0, 0.5], densities, gammas, combine=combine), ref)
    gen = torch.Generator().manual_seed(4)
    base2 = torch.randn(40, 24, generator=gen).bfloat16()
    m = (base2.float().t() + 0.02 * torch.randn(24, 40, generator=gen)).bfloat16().t()
    got = pymerge.ops.breadcrumbs_merge(*dev(base2, [m, m * 1.01]), densities=0.4, gammas=None, backend="triton")
    assert pymerge.ops.last_backend() == "triton" and got.shape == (40, 24) and got.dtype == torch.bfloat16
    check(got, reference.breadcrumbs_merge(base2, [m, m * 1.01], densities=0.4, gammas=None))


def test_errors_match_reference():
    x = torch.ones(4, device=DEVICE)
    for case in breadcrumbs_error_cases(x):
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.breadcrumbs_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            tb.breadcrumbs_merge(base, tensors, **case)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 40), min_size=0, max_size=2),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
        densities=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=5, max_size=5),
        gammas=st.lists(st.floats(-0.1, 0.6, allow_nan=False), min_size=5, max_size=5),
        lam=st.floats(-2, 2, allow_nan=False),
        normalize=st.booleans(),
        combine=st.sampled_from(["linear", "ties"]),
        consensus=st.sampled_from(["sum", "count"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_breadcrumbs_merge(shape, in_dtypes, base_dtype, out_dtype, weights, densities, gammas, lam,
                                        normalize, combine, consensus, tiny, seed):
        base, ts = shaped_models(shape, in_dtypes, base_dtype, tiny, seed, steps=3)
        n = len(ts)
        w = weights[:n]
        if normalize and combine == "linear" and sum(w) == 0.0:
            w = [1.0] * n
        kw = dict(lam=lam, normalize=normalize, combine=combine, consensus=consensus, out_dtype=out_dtype)
        ref = reference.breadcrumbs_merge(base, ts, w, densities[:n], gammas[:n], **kw)
        check(tb.breadcrumbs_merge(*dev(base, ts), w, densities[:n], gammas[:n], **kw), ref)
