"""Torch reference of permute_average: hand cases and a float32 scalar-loop cross-check."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.ops.reference.permute import permute_average

F32 = torch.float32
I64 = torch.int64


def _loop(ws, coeffs, rows, cols, normalize):
    """out[r, c] by scalar float32 arithmetic, models in order (no FMA in numpy scalars)."""
    ws = [w.numpy() for w in ws]
    n_r = len(rows[0]) if rows[0] is not None else ws[0].shape[0]
    n_c = len(cols[0]) if cols[0] is not None else ws[0].shape[1]
    out = np.zeros((n_r, n_c), dtype=np.float32)
    for r in range(n_r):
        for c in range(n_c):
            acc, cov = np.float32(0), np.float32(0)
            for i, w in enumerate(ws):
                pr = r if rows[i] is None else int(rows[i][r])
                qc = c if cols[i] is None else int(cols[i][c])
                if pr >= 0 and qc >= 0:
                    acc = acc + np.float32(coeffs[i]) * w[pr, qc]
                    cov = cov + np.float32(coeffs[i])
            out[r, c] = (np.float32(0) if cov == 0 else acc / cov) if normalize else acc
    return torch.from_numpy(out)


def test_identity_maps_equal_weighted_sum():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 7, generator=g) for _ in range(3)]
    c = [0.5, -1.25, 2.0]
    expected = ((torch.zeros(5, 7) + 0.5 * ws[0]) + (-1.25) * ws[1]) + 2.0 * ws[2]
    assert torch.equal(permute_average(ws, c), expected)
    eye = [torch.arange(5) for _ in ws]
    eye_c = [torch.arange(7, dtype=torch.int32) for _ in ws]
    assert torch.equal(permute_average(ws, c, eye, eye_c), expected)


def test_random_permutation_equals_indexing():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(6, 4, generator=g) for _ in range(2)]
    p = torch.randperm(6, generator=g)
    q = torch.randperm(4, generator=g)
    out = permute_average(ws, [1.0, 0.5], [None, p], [None, q])
    for r in range(6):
        for c in range(4):
            assert out[r, c].item() == (ws[0][r, c] + 0.5 * ws[1][p[r], q[c]]).item()


def test_minus_one_reads_zero_and_coverage():
    w1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w2 = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    rows = [None, torch.tensor([1, -1])]
    assert permute_average([w1, w2], [1.0, 1.0], rows).tolist() == [[31.0, 42.0], [3.0, 4.0]]
    out = permute_average([w1, w2], [0.5, 1.5], rows, normalize_coverage=True)
    assert out.tolist() == [[45.5 / 2, 61.0 / 2], [3.0, 4.0]]
    cols = [torch.tensor([-1, 0]), torch.tensor([-1, 1])]
    out = permute_average([w1, w2], [1.0, 1.0], rows, cols, normalize_coverage=True)
    # column 0 uncovered: 0; (1 + 40) / 2; row 1 of model 2 uncovered: 3 / 1
    assert out.tolist() == [[0.0, 20.5], [0.0, 3.0]]
    # coefficients summing to 0 over the covered models also give 0
    assert permute_average([w1, w2], [1.0, -1.0], normalize_coverage=True).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_heterogeneous_widths():
    w1 = torch.arange(6, dtype=F32).reshape(2, 3)
    w2 = torch.arange(20, dtype=F32).reshape(4, 5) * 10
    out = permute_average([w1, w2], [1.0, 1.0], [None, torch.tensor([3, 0])], [None, torch.tensor([4, -1, 1])])
    # w2[3, 4] = 190, w2[3, 1] = 160, w2[0, 4] = 40, w2[0, 1] = 10
    expected = [[0 + 190, 1, 2 + 160], [3 + 40, 4, 5 + 10]]
    assert out.tolist() == expected
    # every model mapped: the output takes the maps' length
    v1 = torch.tensor([1.0, 2.0, 3.0])
    v2 = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    out = permute_average([v1, v2], [1.0, 1.0], [torch.tensor([0, 2, -1, 1]), torch.tensor([4, 4, 0, -1])])
    assert out.tolist() == [51.0, 53.0, 10.0, 2.0]


def test_sequential_fp32_order():
    # (1e8 + 1) - 1e8 = 0 in fp32, summed left to right
    ws = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert permute_average(ws, [1.0, 1.0, 1.0]).item() == 0.0
    assert permute_average([ws[0], ws[2], ws[1]], [1.0, 1.0, 1.0]).item() == 1.0


def test_no_fused_multiply_add():
    # c*w = 1 + 2^-11 + 2^-24 rounds (tie, to even) to 1 + 2^-11 before the add
    x = 1 + 2**-12
    out = permute_average([torch.tensor([-(1 + 2**-11)]), torch.tensor([x])], [1.0, x])
    assert out.item() == 0.0


def test_dtypes_round_once():
    v1 = torch.tensor([1.0], dtype=torch.bfloat16)
    v2 = torch.tensor([1.0 + 2**-7], dtype=torch.bfloat16)
    out = permute_average([v1, v2], [0.5, 0.5])
    assert out.dtype == torch.bfloat16 and out.item() == 1.0  # 1 + 2^-8: tie to even
    assert permute_average([v1, v2], [0.25, 0.75]).item() == 1.0 + 2**-7
    assert permute_average([v1, v2], [0.5, 0.5], out_dtype=F32).item() == 1.0 + 2**-8
    h = permute_average([torch.tensor([2.0], dtype=torch.float16), v1], [1.0, 1.0])
    assert h.dtype == torch.float16 and h.item() == 3.0


def test_empty_one_element_one_model():
    assert permute_average([torch.zeros(0, 3)], [1.0]).shape == (0, 3)
    out = permute_average([torch.zeros(0, 3), torch.zeros(2, 3)], [1.0, 1.0],
                          [torch.tensor([], dtype=I64), torch.tensor([], dtype=I64)])
    assert out.shape == (0, 3)
    # a 0-size model axis mapped by -1 only
    out = permute_average([torch.ones(2), torch.zeros(0)], [1.0, 1.0], [None, torch.tensor([-1, -1])])
    assert out.tolist() == [1.0, 1.0]
    assert permute_average([torch.tensor([[3.0]])], 2.0).tolist() == [[6.0]]
    p = torch.tensor([2, 0, 1])
    w = torch.tensor([1.0, 2.0, 3.0])
    assert permute_average([w], [1.0], [p]).tolist() == [3.0, 1.0, 2.0]


def test_validation():
    w = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="outside"):
        permute_average([w, w], [1, 1], [None, torch.tensor([0, 1, 3])])
    with pytest.raises(ValueError, match="outside"):
        permute_average([w, w], [1, 1], [None, torch.tensor([0, -2, 1])])
    with pytest.raises(ValueError, match="lengths"):
        permute_average([w, w], [1, 1], [torch.tensor([0, 1]), torch.tensor([0, 1, 2])])
    with pytest.raises(ValueError, match="identity"):
        permute_average([w, torch.zeros(4, 2)], [1, 1])
    with pytest.raises(ValueError, match="identity"):
        permute_average([w, w], [1, 1], [None, torch.tensor([0, 1])])
    with pytest.raises(ValueError, match="int32/int64"):
        permute_average([w, w], [1, 1], [None, torch.tensor([0.0, 1.0, 2.0])])
    with pytest.raises(ValueError, match="maps for"):
        permute_average([w, w], [1, 1], [None])
    with pytest.raises(ValueError, match="coeffs"):
        permute_average([w, w], [1, 1, 1])
    with pytest.raises(ValueError, match="col_maps"):
        permute_average([torch.zeros(3)], [1], None, [torch.tensor([0])])
    with pytest.raises(ValueError):
        permute_average([torch.zeros(2, 2, 2)], [1])
    with pytest.raises(ValueError):
        permute_average([w, torch.zeros(3)], [1, 1])
    with pytest.raises(ValueError):
        permute_average([], [])


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 3))
    out_r, out_c = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    ws, rows, cols = [], [], []
    for i in range(n):
        mapped_r = i > 0 and draw(st.booleans())
        mapped_c = i > 0 and draw(st.booleans())
        size_r = draw(st.integers(0, 5)) if mapped_r else out_r
        size_c = draw(st.integers(0, 5)) if mapped_c else out_c
        vals = draw(st.lists(st.floats(-100, 100, width=32), min_size=size_r * size_c, max_size=size_r * size_c))
        ws.append(torch.tensor(vals, dtype=F32).reshape(size_r, size_c))
        idx_r = st.lists(st.integers(-1, size_r - 1), min_size=out_r, max_size=out_r)
        idx_c = st.lists(st.integers(-1, size_c - 1), min_size=out_c, max_size=out_c)
        rows.append(torch.tensor(draw(idx_r), dtype=I64) if mapped_r else None)
        cols.append(torch.tensor(draw(idx_c), dtype=torch.int32) if mapped_c else None)
    coeffs = draw(st.lists(st.floats(-2, 2, width=32), min_size=n, max_size=n))
    return ws, coeffs, rows, cols


@settings(max_examples=80, deadline=None)
@given(_cases(), st.booleans())
def test_matches_scalar_loop(case, normalize):
    ws, coeffs, rows, cols = case
    out = permute_average(ws, coeffs, rows, cols, normalize_coverage=normalize)
    expected = _loop(ws, coeffs, rows, cols, normalize)
    assert out.shape == expected.shape
    # bit for bit, NaN-free inputs
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
