"""Torch reference of slerp: hand-derived cases and an fp64 cross-check."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pymerge.ops.reference.slerp import slerp

F32 = torch.float32


def _slerp_row_fp64(a: list[float], b: list[float], t: float) -> list[float]:
    """The spec's formula for one row in plain Python floats."""
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    na = 1.0 if na <= 1e-8 else na
    nb = 1.0 if nb <= 1e-8 else nb
    dot = max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b)) / (na * nb)))
    if abs(dot) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    th = math.acos(dot)
    ca, cb = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return [ca * x + cb * y for x, y in zip(a, b)]


def test_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, generator=g)
    b = torch.randn(4, 7, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


def test_orthogonal_unit_vectors_midpoint():
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([r, r]), rtol=0, atol=1e-7)


def test_orthogonal_rows_keep_their_own_scale():
    # coefficients depend only on the directions; magnitudes pass through
    out = slerp(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]), 0.5)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([3 * r, 4 * r]), rtol=1e-6, atol=0)


def test_rows_are_independent_and_parallel_rows_lerp():
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 4.0], [-1.0, -2.0]])
    out = slerp(a, b, 0.25)
    # row 0: orthogonal -> sin(3pi/8), sin(pi/8); row 1 parallel, row 2 antiparallel -> lerp
    expected = torch.tensor([
        [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)],
        [0.75 * 1 + 0.25 * 2, 0.75 * 2 + 0.25 * 4],
        [0.75 * 1 - 0.25 * 1, 0.75 * 2 - 0.25 * 2],
    ])
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=1e-7)
    assert torch.equal(out[1:], expected[1:])


def test_whole_tensor_is_not_one_row():
    # the same data as one flat row takes a different (single) angle
    a = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    rowwise = slerp(a, b, 0.5)
    flat = slerp(a.reshape(-1), b.reshape(-1), 0.5)
    expected_flat = _slerp_row_fp64([1, 0, 1, 2], [0, 1, 2, 4], 0.5)
    torch.testing.assert_close(flat, torch.tensor(expected_flat), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(rowwise.reshape(-1), flat)


def test_threshold_boundary():
    # dot = cos(phi): just above 0.9995 lerps, just below slerps
    for phi, lerp in ((0.031, True), (0.0325, False)):
        a = torch.tensor([1.0, 0.0], dtype=torch.float64)
        b = torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float64)
        assert (math.cos(phi) > 0.9995) == lerp
        out = slerp(a.float(), b.float(), 0.5)
        expected = torch.tensor(_slerp_row_fp64(a.tolist(), b.float().double().tolist(), 0.5), dtype=F32)
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-7)
        plain_lerp = 0.5 * a.float() + 0.5 * b.float()
        assert torch.equal(out, plain_lerp) == lerp


def test_zero_rows():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    out = slerp(a, b, 0.5)
    # a zero row has norm 1 and dot 0: theta = pi/2, out = sin(pi/4) * b
    torch.testing.assert_close(out[0], torch.tensor([0.0, math.sqrt(2)]), rtol=1e-7, atol=0)
    assert torch.equal(out[1], torch.zeros(2))


def test_one_dim_is_one_row_and_zero_dim():
    a = torch.tensor([1.0, 2.0, -1.0, 0.5])
    b = torch.tensor([0.5, -1.0, 2.0, 1.0])
    expected = _slerp_row_fp64(a.tolist(), b.tolist(), 0.3)
    torch.testing.assert_close(slerp(a, b, 0.3), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    out = slerp(torch.tensor(2.0), torch.tensor(3.0), 0.5)
    assert out.shape == () and out.item() == 2.5


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0), (1,), (1, 1)])
def test_empty_and_one_element(shape):
    a = torch.full(shape, 2.0)
    b = torch.full(shape, 4.0)
    out = slerp(a, b, 0.5)
    assert out.shape == torch.Size(shape) and out.dtype == F32
    assert torch.equal(out, torch.full(shape, 3.0))


def test_low_precision_rounds_once():
    # 0.5*1 + 0.5*(1 + 2^-7) = 1 + 2^-8: a tie in bf16, to even -> 1.0
    a = torch.tensor([1.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    out = slerp(a, b, 0.5)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0
    # 0.25 + 0.75*(1 + 2^-7) = 1.005859375 -> nearest bf16 is 1 + 2^-7
    assert slerp(a, b, 0.75).item() == 1.0 + 2**-7
    assert slerp(a, b, 0.5, out_dtype=F32).item() == 1.0 + 2**-8


def test_mixed_dtypes_and_out_dtype():
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    b = torch.tensor([[3.0, 6.0]], dtype=torch.bfloat16)
    out = slerp(a, b, 0.5)
    assert out.dtype == torch.float16 and out.tolist() == [[2.0, 4.0]]
    assert slerp(a, b, 0.5, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_errors():
    with pytest.raises(ValueError):
        slerp(torch.zeros(2), torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        slerp(torch.zeros(2, dtype=torch.int32), torch.zeros(2), 0.5)
    with pytest.raises(ValueError):
        slerp(torch.zeros(2), torch.zeros(2), float("nan"))


finite = st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.data(), st.floats(0, 1))
def test_matches_fp64_formula(rows, cols, data, t):
    a = data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    b = data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    ta = torch.tensor(a, dtype=F32).reshape(rows, cols)
    tb = torch.tensor(b, dtype=F32).reshape(rows, cols)
    out = slerp(ta, tb, t)
    for r in range(rows):
        ra, rb = ta[r].double().tolist(), tb[r].double().tolist()
        na = math.sqrt(sum(x * x for x in ra))
        nb = math.sqrt(sum(x * x for x in rb))
        if na > 1e-8 and nb > 1e-8:
            # stay clear of the branch switch, where rounding may pick either side
            assume(abs(abs(sum(x * y for x, y in zip(ra, rb)) / (na * nb)) - 0.9995) > 1e-6)
        expected = torch.tensor(_slerp_row_fp64(ra, rb, t), dtype=torch.float64)
        scale = max(1.0, max(map(abs, ra + rb)))
        torch.testing.assert_close(out[r].double(), expected, rtol=0, atol=4e-6 * scale)
