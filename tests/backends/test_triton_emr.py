"""Triton EMR elect / reconstruct against the reference: u and bit-planes bit for bit, sums to 1e-12."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402

from .cases import DTYPES, TRITON, assert_same_bits as assert_bits_equal  # noqa: E402

pytestmark = TRITON.marks

DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.emr.BLOCK_SIZE


def check_elect(base, tensors, **kw):
    ref = reference.emr_elect(base, tensors, **kw)
    got = tb.emr_elect(base.to(DEVICE), [t.to(DEVICE) for t in tensors], **kw)
    assert_bits_equal(got.u.cpu(), ref.u)
    assert_bits_equal(got.masks.cpu(), ref.masks)
    assert got.numel == ref.numel
    for name in ("abs_tau_sum", "abs_masked_u_sum"):
        g, r = getattr(got, name).cpu(), getattr(ref, name)
        assert g.dtype == torch.float64 and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=0)
    return got


def make(shape, n_models, dtypes, gen):
    base = torch.randn(shape, generator=gen).to(dtypes[0])
    tensors = [(base.float() + 0.05 * torch.randn(shape, generator=gen)).to(dtypes[(i + 1) % len(dtypes)]) for i in range(n_models)]
    return base, tensors


@pytest.mark.parametrize("size", [0, 1, 7, 33, 1000, 2 * BLOCK + 77])
@pytest.mark.parametrize("zero_sign", ["neg", "zero"])
def test_elect_matches_reference(size, zero_sign):
    gen = torch.Generator().manual_seed(size + len(zero_sign))
    for k, dtype in enumerate(DTYPES):
        base, tensors = make(size, 3, [dtype], gen)
        if size:
            tensors[k % 3][: size // 2] = base[: size // 2]  # exact zeros in tau: s == 0 and no agreement
        check_elect(base, tensors, zero_sign=zero_sign, out_dtype=DTYPES[(k + 1) % 3])


@pytest.mark.parametrize("n_models", [1, 2, 5, 8])
def test_elect_mixed_dtypes_and_model_counts(n_models):
    gen = torch.Generator().manual_seed(n_models)
    base, tensors = make((20, 53), n_models, DTYPES, gen)
    check_elect(base, tensors)


def test_worked_example():
    # specs/methods.md, "Worked example"
    t1 = [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30]
    t2 = [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20]
    t3 = [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10]
    base = torch.zeros(10)
    tensors = [torch.tensor(t) for t in (t1, t2, t3)]
    got = check_elect(base, tensors)
    masks = reference.unpack_bits(got.masks.cpu(), 10).to(torch.int64).tolist()
    assert masks == [[1, 1, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 1, 0, 1, 1, 1]]
    lam = reference.emr_rescalers([got.abs_tau_sum.tolist()], [got.abs_masked_u_sum.tolist()], [10], scope="model")
    assert lam == pytest.approx([0.86636, 1.76829, 0.67347], abs=1e-5)


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 1000, 2 * BLOCK + 77])
def test_reconstruct_matches_reference(size):
    gen = torch.Generator().manual_seed(50 + size)
    pairs = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.float32)]
    for k, (base_dtype, u_dtype) in enumerate(pairs):
        base = torch.randn(size, generator=gen).to(base_dtype)
        u = torch.randn(size, generator=gen).to(u_dtype)
        words = reference.pack_bits(torch.rand(size, generator=gen) < 0.4)
        for out_dtype in (None, DTYPES[k]):
            ref = reference.emr_reconstruct(base, u, words, 1.2345678, out_dtype=out_dtype)
            got = tb.emr_reconstruct(base.to(DEVICE), u.to(DEVICE), words.to(DEVICE), 1.2345678, out_dtype=out_dtype)
            assert_bits_equal(got.cpu(), ref)


def test_reconstruct_round_trip_shapes():
    gen = torch.Generator().manual_seed(9)
    base, tensors = make((7, 45), 3, [torch.bfloat16], gen)
    r = tb.emr_elect(base.to(DEVICE), [t.to(DEVICE) for t in tensors])
    for i in range(3):
        got = tb.emr_reconstruct(base.to(DEVICE), r.u, r.masks[i], 0.9)
        assert got.shape == (7, 45) and got.dtype == torch.bfloat16
        assert_bits_equal(got.cpu(), reference.emr_reconstruct(base, r.u.cpu(), r.masks[i].cpu(), 0.9))


def test_errors():
    x = torch.ones(40, device=DEVICE)
    with pytest.raises(ValueError, match="zero_sign"):
        tb.emr_elect(x, [x], zero_sign="pos")
    with pytest.raises(ValueError, match="shape"):
        tb.emr_elect(x, [torch.ones(41, device=DEVICE)])
    with pytest.raises(ValueError, match="mask_words"):
        tb.emr_reconstruct(x, x, torch.zeros(1, dtype=torch.int32, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="mask_words"):
        tb.emr_reconstruct(x, x, torch.zeros(2, dtype=torch.int64, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="u shape"):
        tb.emr_reconstruct(x, torch.ones(39, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE), 1.0)
