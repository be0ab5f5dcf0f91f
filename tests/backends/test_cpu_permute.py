"""pymerge._C permute_average against the torch reference, bit for bit."""

from __future__ import annotations


import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference

from .cases import CPU, DTYPES, each_isa

pytestmark = [*CPU.marks, pytest.mark.usefixtures("torch_one_thread")]

TILE = 1024  # kernel: work items are (row, tile of 1024 columns)
ROW_COLS = 16384  # kernel: gathered source rows up to this long are upcast whole first
SIZES_1D = [0, 1, 31, 32, 33, 1000, 65537, 3 * TILE + 5]
SHAPES_2D = [(0, 5), (5, 0), (1, 1), (31, 33), (32, 32), (33, 31), (7, 3 * TILE + 5), (300, 77)]


def check(*args, **kw):
    ref = reference.permute_average(*args, **kw)
    for got in each_isa(lambda: cpu.permute_average(*args, **kw)):
        assert_bits_equal(got, ref)
    return ref


def perm_map(n, gen, holes=0.0, src=None, index_dtype=torch.int64):
    """A map of length n into an axis of size src (default n): a permutation, with -1 holes."""
    src = n if src is None else src
    p = torch.randperm(max(src, n), generator=gen)[:n]
    p = torch.where(p < src, p, torch.full_like(p, -1))
    if holes:
        p = torch.where(torch.rand(n, generator=gen) < holes, torch.full_like(p, -1), p)
    return p.to(index_dtype)


def models(shape, n, dtypes, gen):
    return [torch.randn(shape, generator=gen).to(dtypes[i % len(dtypes)]) for i in range(n)]


@pytest.mark.parametrize("shape", SHAPES_2D, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_2d_matches_reference(shape, dtype, normalize):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1] + DTYPES.index(dtype))
    ws = models(shape, 3, [dtype], gen)
    rows = [None, perm_map(shape[0], gen), perm_map(shape[0], gen, holes=0.2)]
    cols = [None, perm_map(shape[1], gen, holes=0.1), perm_map(shape[1], gen)]
    check(ws, [0.5, 0.3, 0.2], rows, cols, normalize_coverage=normalize)
    check(ws, 1.0, None, None, normalize_coverage=normalize)


@pytest.mark.parametrize("size", SIZES_1D)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_1d_matches_reference(size, dtype, normalize):
    gen = torch.Generator().manual_seed(size * 3 + DTYPES.index(dtype))
    ws = models(size, 3, [dtype], gen)
    check(ws, [0.25, -1.5, 0.7], [perm_map(size, gen), None, perm_map(size, gen, holes=0.3)],
          normalize_coverage=normalize)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_models_and_mixed_dtypes(n_models):
    gen = torch.Generator().manual_seed(n_models)
    ws = models((45, 70), n_models, DTYPES, gen)
    rows = [None] + [perm_map(45, gen, holes=0.1) for _ in range(n_models - 1)]
    cols = [perm_map(70, gen, holes=0.1) for _ in range(n_models)]
    coeffs = torch.randn(n_models, generator=gen).tolist()
    for out_dtype in DTYPES:
        for normalize in (False, True):
            check(ws, coeffs, rows, cols, normalize_coverage=normalize, out_dtype=out_dtype)


def test_different_model_sizes():
    # Width alignment: models of other widths mapped onto the output axes.
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randn(20, 30, generator=gen), torch.randn(25, 40, generator=gen).bfloat16(),
          torch.randn(12, 0, generator=gen).half(), torch.randn(0, 30, generator=gen)]
    rows = [None, perm_map(20, gen, src=25), perm_map(20, gen, src=12), torch.full((20,), -1, dtype=torch.int64)]
    cols = [None, perm_map(30, gen, src=40, holes=0.2), torch.full((30,), -1, dtype=torch.int32), None]
    for normalize in (False, True):
        check(ws, [1.0, 0.5, 2.0, 3.0], rows, cols, normalize_coverage=normalize)


def test_wide_and_repeated_source_rows():
    # Gathered source rows of up to ROW_COLS columns are upcast whole and kept while
    # the next tiles (and next output rows mapped to the same source row) read them;
    # wider ones are gathered straight from memory. Both kinds in one call.
    gen = torch.Generator().manual_seed(9)
    wide = ROW_COLS + 3
    ws = [torch.randn(6, wide, generator=gen), torch.randn(4, ROW_COLS, generator=gen).bfloat16(),
          torch.randn(5, 700, generator=gen).half()]
    rows = [None, torch.tensor([0, 0, 3, 3, 3, -1]), torch.tensor([4, 1, 1, 0, 4, 4])]
    cols = [perm_map(wide, gen, holes=0.1), perm_map(wide, gen, src=ROW_COLS), perm_map(wide, gen, src=700)]
    for normalize in (False, True):
        check(ws, [0.5, -1.0, 2.0], rows, cols, normalize_coverage=normalize)


def test_coverage_and_signed_zeros():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(16, 16, generator=gen)
    w0[::3] = -0.0
    w1 = -w0  # exact cancellation: +0, never -0
    holes = perm_map(16, gen, holes=0.5)
    for coeffs in ([1.0, 1.0], [1.0, -1.0], [0.0, -0.0], [-0.0, -0.0], [1 / 3, 0.1]):
        for normalize in (False, True):
            out = check([w0, w1], coeffs, [holes, None], [None, holes], normalize_coverage=normalize)
            # Uncovered elements of an all-hole row are +0.
            assert not torch.signbit(out[holes < 0][:, holes < 0]).any()


def test_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 65504.0, 3e38, -1.0]
    v = torch.tensor(specials)
    k = len(specials)
    w0, w1 = v.repeat(k).reshape(k, k), v.repeat_interleave(k).reshape(k, k)
    gen = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        for normalize in (False, True):
            check([w0.to(dtype), w1], [2.0, 0.5], [None, perm_map(k, gen, holes=0.3)], [perm_map(k, gen), None],
                  normalize_coverage=normalize)


def test_thread_counts_identical():
    gen = torch.Generator().manual_seed(7)
    shape = (257, 3 * TILE + 100)
    ws = models(shape, 3, [torch.bfloat16, torch.float16, torch.float32], gen)
    rows = [None, perm_map(shape[0], gen), perm_map(shape[0], gen, holes=0.1)]
    cols = [perm_map(shape[1], gen, holes=0.1), None, perm_map(shape[1], gen)]
    outs = []
    for k in (1, 2, 3):
        cpu.set_num_threads(k)
        outs.append(cpu.permute_average(ws, [0.2, 0.3, 0.5], rows, cols, normalize_coverage=True))
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])
    assert_bits_equal(outs[0], reference.permute_average(ws, [0.2, 0.3, 0.5], rows, cols, normalize_coverage=True))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    ws = [torch.randn(40, 30, generator=gen).t(), torch.randn(30, 80, generator=gen)[:, ::2]]
    p = torch.stack([torch.randperm(40, generator=gen), torch.zeros(40, dtype=torch.int64)], 1)[:, 0]  # strided
    assert not p.is_contiguous()
    check(ws, [0.5, 0.5], [None, perm_map(30, gen)], [p, None])


def test_errors():
    w = torch.ones(4, 5)
    with pytest.raises(ValueError, match="at least one"):
        cpu.permute_average([], 1.0)
    with pytest.raises(ValueError, match="1-D or 2-D"):
        cpu.permute_average([torch.ones(2, 2, 2)], 1.0)
    with pytest.raises(ValueError, match="outside"):
        cpu.permute_average([w, w], 1.0, [None, torch.tensor([0, 1, 2, 4])])
    with pytest.raises(ValueError, match="outside"):
        cpu.permute_average([w, w], 1.0, None, [None, torch.tensor([0, 1, 2, 3, -2])])
    with pytest.raises(ValueError, match="lengths"):
        cpu.permute_average([w, w], 1.0, [torch.arange(4), torch.arange(3)])
    with pytest.raises(ValueError, match="identity"):
        cpu.permute_average([w, torch.ones(3, 5)], 1.0)
    with pytest.raises(ValueError, match="int32/int64"):
        cpu.permute_average([w, w], 1.0, [None, torch.arange(4.0)])
    with pytest.raises(ValueError, match="col_maps"):
        cpu.permute_average([torch.ones(4)], 1.0, None, [torch.arange(4)])
    with pytest.raises(ValueError, match="coeffs"):
        cpu.permute_average([w, w], [1.0])
    with pytest.raises(ValueError, match="dtype"):
        cpu.permute_average([w.double()], 1.0)
    with pytest.raises(ValueError, match="out_dtype"):
        cpu.permute_average([w], 1.0, out_dtype=torch.int64)


def test_ops_pick_cpu_backend():
    gen = torch.Generator().manual_seed(9)
    ws = models((6, 7), 2, [torch.bfloat16], gen)
    rows, cols = [None, perm_map(6, gen)], [None, perm_map(7, gen)]
    out = pymerge.ops.permute_average(ws, [0.5, 0.5], rows, cols)
    assert pymerge.ops.last_backend() == "cpu"
    assert_bits_equal(out, reference.permute_average(ws, [0.5, 0.5], rows, cols))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ndim=st.sampled_from([1, 2]),
        out_rows=st.integers(0, 40),
        out_cols=st.integers(0, 40),
        specs=st.lists(
            st.tuples(st.sampled_from(DTYPES), st.integers(0, 45), st.integers(0, 45), st.booleans(), st.booleans(),
                      st.floats(0.0, 0.5), st.floats(-3, 3, allow_nan=False, width=32)),
            min_size=1, max_size=6),
        out_dtype=st.sampled_from(DTYPES),
        normalize=st.booleans(),
        index32=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_matches_reference(ndim, out_rows, out_cols, specs, out_dtype, normalize, index32, seed):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.int32 if index32 else torch.int64
        ws, rows, cols, coeffs = [], [], [], []
        for dtype, r, c, map_rows, map_cols, holes, coeff in specs:
            # A model without a map has the output's size on that axis.
            r = r if map_rows else out_rows
            c = c if map_cols else out_cols
            ws.append(torch.randn((r, c) if ndim == 2 else (r,), generator=gen).to(dtype))
            rows.append(perm_map(out_rows, gen, holes, src=r, index_dtype=idx) if map_rows else None)
            cols.append(perm_map(out_cols, gen, holes, src=c, index_dtype=idx) if map_cols else None)
            coeffs.append(coeff)
        check(ws, coeffs, rows, cols if ndim == 2 else None, normalize_coverage=normalize, out_dtype=out_dtype)
