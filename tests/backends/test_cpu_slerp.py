"""pymerge._C slerp against the torch reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference
from pymerge.ops.reference.slerp import slerp_coefficients

from .cases import CPU, DTYPES, each_isa

pytestmark = [*CPU.marks, pytest.mark.usefixtures("torch_one_thread")]

cpu_slerp = importlib.import_module("pymerge.backends.cpu.slerp")

SEG = 2048  # kernel: rows are cut into segments of 2048 elements
SHAPES = [(0,), (3, 0), (0, 5), (), (1,), (31,), (32,), (33,), (1000,), (65537,), (33, 1000), (7, 3 * SEG + 5),
          (300, 333), (4, 5, 6)]


def check(a, b, t, **kw):
    ref = reference.slerp(a, b, t, **kw)
    for got in each_isa(lambda: cpu.slerp(a, b, t, **kw)):
        assert_bits_equal(got, ref)


def pair(shape, dtypes, gen, mix=0.7):
    """b partly aligned with a: rows on the slerp branch, not parallel."""
    x = torch.randn(shape, generator=gen)
    y = mix * x + (1 - mix) * torch.randn(shape, generator=gen)
    return x.to(dtypes[0]), y.to(dtypes[1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(math.prod(shape) + len(shape) + DTYPES.index(dtype))
    a, b = pair(shape, (dtype, dtype), gen)
    for t in (0.0, 0.3, 1.0):
        check(a, b, t)


@pytest.mark.parametrize("a_dtype", DTYPES)
@pytest.mark.parametrize("b_dtype", DTYPES)
def test_mixed_dtypes(a_dtype, b_dtype):
    gen = torch.Generator().manual_seed(DTYPES.index(a_dtype) * 3 + DTYPES.index(b_dtype))
    a, b = pair((17, 129), (a_dtype, b_dtype), gen)
    for out_dtype in DTYPES:
        check(a, b, 0.45, out_dtype=out_dtype)


def test_branches_and_degenerate_rows():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(10, 50, generator=gen)
    b = torch.randn(10, 50, generator=gen)
    b[0] = a[0] * 3  # parallel: lerp
    b[1] = -a[1]  # antiparallel: lerp
    b[2] = a[2] + 1e-3 * b[2]  # |dot| just above 0.9995: lerp
    a[3] = 0.0  # zero row: norm counts as 1, dot = 0
    a[4] = 1e-10  # norm <= 1e-8
    a[5], b[5] = 0.0, 0.0
    b[6] = -0.0
    a[7, ::2] = float("inf")
    b[8, 3] = float("nan")
    for t in (0.0, 0.25, 0.5, 0.9, 1.0, -0.5, 1.5):
        for dtype in DTYPES:
            check(a.to(dtype), b.to(dtype), t)
    ca, _ = slerp_coefficients(a, b, 0.25)
    assert ca[0].item() == ca[1].item() == ca[2].item() == 0.75  # the lerp branch was taken


ROW_MAX = 8 * SEG  # kernel: wider rows take two passes over the memory


@pytest.mark.parametrize("cols", [300, ROW_MAX, ROW_MAX + 1], ids=str)
def test_every_row_coefficient_matches(cols):
    # Many rows on the slerp branch: the kernel's fp64 sums and its acos/sin
    # differ from torch's in the last bits for many rows, yet the fp32
    # coefficients agree, on the one-pass and the two-pass path alike.
    gen = torch.Generator().manual_seed(cols)
    rows = 1_200_000 // cols
    a, b = pair((rows, cols), (torch.float32, torch.float32), gen)
    for t in (0.2, 0.5, 0.8):
        ca, cb = cpu_slerp.slerp_coefficients(a, b, t)
        rca, rcb = slerp_coefficients(a, b, t)
        assert torch.equal(ca, rca) and torch.equal(cb, rcb)


def test_rows_around_the_one_pass_limit():
    # Just below and at ROW_MAX: one pass per row; above: the two-pass path.
    gen = torch.Generator().manual_seed(11)
    for cols in (ROW_MAX - 3, ROW_MAX, ROW_MAX + 3, 2 * ROW_MAX + SEG // 2):
        a, b = pair((3, cols), (torch.bfloat16, torch.float32), gen)
        for t in (0.1, 0.7):
            check(a, b, t)
            check(a, b, t, out_dtype=torch.float16)


def test_coefficients_of_empty_rows():
    ca, cb = cpu_slerp.slerp_coefficients(torch.ones(3, 0), torch.ones(3, 0), 0.25)
    rca, rcb = slerp_coefficients(torch.ones(3, 0), torch.ones(3, 0), 0.25)
    assert torch.equal(ca, rca) and torch.equal(cb, rcb)


@pytest.mark.parametrize("shape", [(3 * SEG * 40 + 17,), (70, 3 * SEG + 1), (5000, 40)], ids=str)
def test_thread_counts_identical(shape):
    gen = torch.Generator().manual_seed(len(shape))
    a, b = pair(shape, (torch.bfloat16, torch.float16), gen)
    outs = []
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        outs.append(cpu.slerp(a, b, 0.35))
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])
    assert_bits_equal(outs[0], reference.slerp(a, b, 0.35))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(64, 48, generator=gen).t()
    b = torch.randn(48, 128, generator=gen)[:, ::2]
    check(a, b, 0.6)


def test_errors():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="differ"):
        cpu.slerp(x, torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="finite"):
        cpu.slerp(x, x, float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        cpu.slerp(x, x.double(), 0.5)
    with pytest.raises(ValueError, match="out_dtype"):
        cpu.slerp(x, x, 0.5, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="meta"):
        cpu.slerp(torch.ones(4, device="meta"), x, 0.5)


def test_ops_pick_cpu_backend():
    a, b = pair((4, 8), (torch.bfloat16, torch.bfloat16), torch.Generator().manual_seed(0))
    out = pymerge.ops.slerp(a, b, 0.5)
    assert pymerge.ops.last_backend() == "cpu"
    assert_bits_equal(out, reference.slerp(a, b, 0.5))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shape=st.lists(st.integers(0, 30), min_size=0, max_size=3),
        a_dtype=st.sampled_from(DTYPES),
        b_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        t=st.floats(-0.5, 1.5, allow_nan=False),
        mix=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_matches_reference(shape, a_dtype, b_dtype, out_dtype, t, mix, seed):
        gen = torch.Generator().manual_seed(seed)
        a, b = pair(shape, (a_dtype, b_dtype), gen, mix)
        ref = reference.slerp(a, b, t, out_dtype=out_dtype)
        got = cpu.slerp(a, b, t, out_dtype=out_dtype)
        if a.numel() == 0:
            assert got.shape == ref.shape and got.dtype == ref.dtype
            return
        # Bit for bit on every row whose fp32 coefficients agree (all of them,
        # but for a last-bit fp64 difference straddling an fp32 rounding
        # boundary); there the coefficients are one fp32 ulp apart.
        from pymerge.ops.reference.slerp import _rows

        rows, cols = _rows(a.shape)
        ca, cb = cpu_slerp.slerp_coefficients(a, b, t)
        rca, rcb = slerp_coefficients(a, b, t)
        same = (ca == rca) & (cb == rcb)
        for c, r in ((ca, rca), (cb, rcb)):
            assert ((c - r).abs() <= torch.finfo(torch.float32).eps * r.abs()).all()
        assert_bits_equal(got.reshape(rows, cols)[same], ref.reshape(rows, cols)[same])
