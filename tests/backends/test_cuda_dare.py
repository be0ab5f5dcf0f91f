"""pymerge._C_cuda DARE against the torch reference, bit for bit (needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pymerge.ops
from pymerge.backends import cuda
from pymerge.ops import reference
from pymerge.ops.reference.dare import l1_norm_exact
from pymerge.testing import assert_bits_equal

from .cases import CUDA, DTYPES

pytestmark = CUDA.marks

NAME = "model.layers.0.mlp.up_proj.weight"


def inputs(numel, k, dtype, gen, scale=0.02):
    b32 = torch.randn(numel, generator=gen)
    return b32.to(dtype), [(b32 + scale * torch.randn(numel, generator=gen)).to(dtype) for _ in range(k)]


def check(base, tensors, weights=None, densities=0.5, **kw):
    ref = reference.dare_merge(base, tensors, weights, densities, **kw)
    got = cuda.dare_merge(base.cuda(), [t.cuda() for t in tensors], weights, densities, **kw)
    assert_bits_equal(got.cpu(), ref)


def test_known_answer_mask():
    # specs/methods.md: seed 0, model 0, density 0.5 -> 1 0 0 1 0 1 1 0; seed 42, model 1 -> 0 0 1 1 0 0 0 1
    m = cuda.dare_keep_mask(8, name=NAME, seed=0, model_index=0, density=0.5, device="cuda")
    assert m.cpu().tolist() == [True, False, False, True, False, True, True, False]
    m = cuda.dare_keep_mask(8, name=NAME, seed=42, model_index=1, density=0.5, device="cuda")
    assert m.cpu().tolist() == [False, False, True, True, False, False, False, True]


@pytest.mark.parametrize("numel", [0, 1, 7, 9, 4097, 300_001])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0, 1.5])
def test_keep_mask_matches_reference(numel, density):
    for seed, idx in ((0, 0), (7, 3), (2**64 - 1, 11)):
        ref = reference.dare_keep_mask(numel, name=NAME, seed=seed, model_index=idx, density=density)
        got = cuda.dare_keep_mask(numel, name=NAME, seed=seed, model_index=idx, density=density, device="cuda")
        assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("numel", [1, 9, 2049, 65536 + 5, 1_000_003])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_l1_norms_and_factors_exact(numel, dtype, k):
    gen = torch.Generator().manual_seed(numel + k)
    b, ms = inputs(numel, k, dtype, gen)
    dens = [0.1 + 0.8 * i / max(k - 1, 1) for i in range(k)]
    factors, norms = cuda.dare.l1_factors(b.cuda(), [m.cuda() for m in ms], name=NAME, seed=3, densities=dens,
                                          with_norms=True)
    norms = norms.cpu()
    for i, m in enumerate(ms):
        tau = m.float() - b.float()
        keep = reference.dare_keep_mask(numel, name=NAME, seed=3, model_index=i, density=dens[i])
        n1 = l1_norm_exact(tau)
        n2 = l1_norm_exact(torch.where(keep, tau, torch.zeros(())))
        assert norms[i, 0].item() == n1 and norms[i, 1].item() == n2
        want = float(torch.tensor(n1 / n2, dtype=torch.float32)) if n1 >= 1e-7 and n2 >= 1e-7 else 1.0
        assert factors[i].item() == want


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 2049, 65536 + 3, 500_001])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_matches_reference(numel, dtype, k, combine):
    gen = torch.Generator().manual_seed(numel * 7 + k)
    b, ms = inputs(numel, k, dtype, gen)
    w = (0.5 + torch.rand(k, generator=gen)).tolist()
    dens = (0.2 + 0.7 * torch.rand(k, generator=gen)).tolist()
    for rescale in ("l1", "inverse_density", "none"):
        check(b, ms, w, dens, name=NAME, seed=11, rescale=rescale, combine=combine)
    if combine == "ties":
        check(b, ms, w, dens, name=NAME, seed=11, combine="ties", consensus="count", normalize=True)
    else:
        check(b, ms, w, dens, name=NAME, seed=11, normalize=True, lam=0.8, out_dtype=torch.float32)


def test_more_models_than_register_cache_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    b32 = torch.randn(7001, generator=gen)
    ms = [(b32 + 0.05 * torch.randn(7001, generator=gen)).to(DTYPES[i % 3]) for i in range(13)]
    w = torch.randn(13, generator=gen).tolist()  # negative weights flip signs before the election
    for combine in ("linear", "ties"):
        check(b32.to(torch.bfloat16), ms, w, 0.4, name="t", seed=1, combine=combine)
        check(b32.to(torch.bfloat16), ms, w, 0.4, name="t", seed=1, combine=combine, normalize=combine == "ties")


def test_dispatch():
    gen = torch.Generator().manual_seed(6)
    b, ms = inputs(3000, 3, torch.bfloat16, gen)
    ref = reference.dare_merge(b, ms, None, 0.3, name=NAME, seed=9, combine="ties")
    got = pymerge.ops.dare_merge(b.cuda(), [m.cuda() for m in ms], None, 0.3, name=NAME, seed=9, combine="ties")
    assert pymerge.ops.last_backend() == "cuda"
    assert_bits_equal(got.cpu(), ref)


def test_errors():
    x = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        cuda.dare_merge(torch.ones(4), [x], name="a")
    with pytest.raises(ValueError, match="NaN"):
        cuda.dare_merge(x, [x], 1.0, float("nan"), name="a")
    with pytest.raises(ValueError, match="cuda backend"):
        cuda.dare_keep_mask(4, name="a", seed=0, model_index=0, density=0.5, device="cpu")


@settings(max_examples=25, deadline=None)
@given(
    numel=st.integers(0, 3000),
    k=st.integers(1, 10),
    dtype=st.sampled_from(DTYPES),
    combine=st.sampled_from(["linear", "ties"]),
    rescale=st.sampled_from(["l1", "inverse_density", "none"]),
    seed=st.integers(0, 2**64 - 1),
    density=st.floats(0.0, 1.0),
)
def test_property(numel, k, dtype, combine, rescale, seed, density):
    gen = torch.Generator().manual_seed(seed % 2**31)
    b, ms = inputs(numel, k, dtype, gen, scale=0.5)
    check(b, ms, None, density, name=f"p{numel}", seed=seed, combine=combine, rescale=rescale)
