"""Triton DARE: Philox masks bit for bit (known answers included) and the merge against the reference."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402
from pymerge.ops.reference.philox import dare_uniform  # noqa: E402
from pymerge.testing import assert_bits_equal  # noqa: E402

from .cases import DTYPES, TRITON  # noqa: E402

pytestmark = TRITON.marks

DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.dare.BLOCK_SIZE
NAME = "model.layers.0.mlp.up_proj.weight"


def kernels():
    from pymerge.backends.triton._lib import kernels

    return kernels()


def uniform(numel, name, seed, model_index):
    """u from the triton keep-mask kernel (its WRITE_U output)."""
    from pymerge.backends.triton.dare import _keys

    keep = torch.empty(numel, dtype=torch.bool, device=DEVICE)
    u = torch.empty(numel, dtype=torch.float32, device=DEVICE)
    key = _keys(name, seed, model_index + 1, DEVICE)[model_index : model_index + 1]
    kernels().dare.keep_mask(keep, key, torch.tensor([0.5], device=DEVICE), u)
    return u.cpu()


# ---------------------------------------------------------------- generator


@pytest.mark.parametrize(
    "seed,model_index,u_expected,kept",
    [
        (0, 0, [0.2095472, 0.8308294, 0.5785931, 0.1482173, 0.5504553, 0.2931392, 0.2053509, 0.9230911], [1, 0, 0, 1, 0, 1, 1, 0]),
        (42, 1, [0.7070955, 0.6671999, 0.1539854, 0.4926723, 0.6971354, 0.6938226, 0.6334432, 0.3768930], [0, 0, 1, 1, 0, 0, 0, 1]),
    ],
)
def test_known_answer_vectors(seed, model_index, u_expected, kept):
    # specs/methods.md, "Known-answer vectors for the DARE generator"
    u = uniform(8, NAME, seed, model_index)
    assert torch.allclose(u, torch.tensor(u_expected), rtol=0, atol=1e-7)  # the spec prints 7 digits
    assert torch.equal(u, dare_uniform(8, name=NAME, seed=seed, model_index=model_index))
    mask = tb.dare_keep_mask(8, name=NAME, seed=seed, model_index=model_index, density=0.5, device=DEVICE)
    assert mask.cpu().tolist() == [bool(k) for k in kept]


_uniform = kernels().dare._uniform if tb.available() else None


@triton.jit
def _philox_kernel(out_ptr, key_ptr, counter_ptr):
    key = tl.load(key_ptr).to(tl.uint64, bitcast=True)
    c0 = tl.load(counter_ptr + 0).to(tl.uint32)
    c1 = tl.load(counter_ptr + 1).to(tl.uint32)
    c2 = tl.load(counter_ptr + 2).to(tl.uint32)
    c3 = tl.load(counter_ptr + 3).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(key, c0, c1, c2, c3)
    tl.store(out_ptr + 0, r0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 1, r1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 2, r2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 3, r3.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _uniform_at_kernel(u_ptr, key_ptr, offs_ptr, N: tl.constexpr):
    offs = tl.load(offs_ptr + tl.arange(0, N))
    tl.store(u_ptr + tl.arange(0, N), _uniform(key_ptr, 0, offs))


def as_int64(word64):
    return word64 - (1 << 64) if word64 >= 1 << 63 else word64


def test_philox_known_answers():
    # Triton's Philox 4x32-10 (behind tl.randint) against the spec's raw vectors, all four words
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ]
    for counter, (k0, k1), expected in cases:
        out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
        key = torch.tensor([as_int64(k0 | (k1 << 32))], dtype=torch.int64, device=DEVICE)
        _philox_kernel[(1,)](out, key, torch.tensor(counter, dtype=torch.int64, device=DEVICE))
        assert tuple(out.cpu().tolist()) == expected


def test_counter_high_word():
    # Elements past 2^32 use counter (p mod 2^32, p >> 32, 0, 0); checked at chosen offsets
    # since such tensors are too large for a test.
    from pymerge.ops.reference.philox import MASK32, dare_key

    offs = torch.tensor([0, 5, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 17, 2**40 + 2**31, 2**62 + 1], dtype=torch.int64)
    for seed, model_index in ((0, 0), (9, 2)):
        key64 = reference.philox.dare_key64(NAME, seed, model_index)
        u = torch.empty(offs.numel(), dtype=torch.float32, device=DEVICE)
        key = torch.tensor([as_int64(key64)], dtype=torch.int64, device=DEVICE)
        _uniform_at_kernel[(1,)](u, key, offs.to(DEVICE), N=offs.numel())
        k0, k1 = dare_key(NAME, seed, model_index)
        zero = torch.zeros((), dtype=torch.int64)
        w0 = reference.philox4x32_10(offs & MASK32, offs >> 32, zero, zero, k0, k1)[0]
        assert torch.equal(u.cpu(), (w0 >> 8).to(torch.float32) * 2.0**-24)


@pytest.mark.parametrize(
    "name,seed,model_index,numel",
    [
        ("", 0, 0, 7),
        ("a", 1, 3, 1),
        (NAME, 2**64 - 1, 7, BLOCK + 5),
        ("transformer.h.11.attn.c_attn.weight", 123456789, 0, 300),
        ("émbed", 5, 1, 64),
    ],
)
def test_masks_bit_identical(name, seed, model_index, numel):
    assert torch.equal(uniform(numel, name, seed, model_index), dare_uniform(numel, name=name, seed=seed, model_index=model_index))
    for density in (0.0, 1e-30, 0.3, 1.0):
        got = tb.dare_keep_mask(numel, name=name, seed=seed, model_index=model_index, density=density, device=DEVICE)
        ref = reference.dare_keep_mask(numel, name=name, seed=seed, model_index=model_index, density=density)
        assert got.dtype == torch.bool and torch.equal(got.cpu(), ref)


def test_mask_edges_and_errors():
    assert tb.dare_keep_mask(0, name="w", seed=0, model_index=0, density=0.5, device=DEVICE).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        tb.dare_keep_mask(4, name="w", seed=0, model_index=0, density=float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match="seed"):
        tb.dare_keep_mask(4, name="w", seed=-1, model_index=0, density=0.5, device=DEVICE)
    with pytest.raises(ValueError, match="model_index"):
        tb.dare_keep_mask(4, name="w", seed=0, model_index=-1, density=0.5, device=DEVICE)
    with pytest.raises(ValueError, match="numel"):
        tb.dare_keep_mask(-1, name="w", seed=0, model_index=0, density=0.5, device=DEVICE)


# ---------------------------------------------------------------- merge


def make(size, n_models, dtypes, gen, base_dtype=None):
    base_dtype = base_dtype or dtypes[0]
    base = (torch.randn(size, generator=gen) * 0.5).to(base_dtype)
    tensors = [(base.float() + 0.02 * torch.randn(size, generator=gen)).to(dtypes[i % len(dtypes)]) for i in range(n_models)]
    return base, tensors


def run(base, tensors, *args, **kw):
    return tb.dare_merge(base.to(DEVICE), [t.to(DEVICE) for t in tensors], *args, **kw).cpu()


@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("rescale", ["l1", "inverse_density", "none"])
def test_merge_matches_reference(combine, rescale):
    gen = torch.Generator().manual_seed(len(rescale) + len(combine))
    weights, densities = [0.5, 1.0, -0.3], [0.3, 0.7, 0.5]
    for k, size in enumerate([0, 1, 7, 1000, 2 * BLOCK + 77]):
        dtype = DTYPES[k % 3]
        base, tensors = make(size, 3, [dtype], gen)
        kw = dict(name=NAME, seed=size, lam=0.9, normalize=k % 2 == 1, rescale=rescale, combine=combine)
        ref = reference.dare_merge(base, tensors, weights, densities, **kw)
        assert_bits_equal(run(base, tensors, weights, densities, **kw), ref)


@pytest.mark.parametrize("n_models", [1, 2, 4, 8])
@pytest.mark.parametrize("combine,consensus", [("linear", "sum"), ("ties", "sum"), ("ties", "count")])
def test_merge_mixed_dtypes_and_model_counts(n_models, combine, consensus):
    gen = torch.Generator().manual_seed(10 * n_models + len(consensus))
    base, tensors = make(1000, n_models, DTYPES, gen, base_dtype=torch.bfloat16)
    weights = [(-1) ** i * (0.4 + i / 5) for i in range(n_models)]
    densities = [0.2 + 0.1 * i for i in range(n_models)]
    out_dtype = DTYPES[n_models % 3]
    kw = dict(name="w", seed=7, combine=combine, consensus=consensus, normalize=combine == "ties", out_dtype=out_dtype)
    ref = reference.dare_merge(base, tensors, weights, densities, **kw)
    assert_bits_equal(run(base, tensors, weights, densities, **kw), ref)


def test_rescale_edges():
    gen = torch.Generator().manual_seed(3)
    base, tensors = make(500, 3, [torch.float32], gen)
    tensors[1] = base.clone()  # tau = 0: both norms < 1e-7, no rescale
    tiny = base.clone()
    tiny[0] += 1e-6  # n1 >= 1e-7 while the kept part may be 0
    for densities in ([0.0, 0.5, 1.0], [1e-9, 2.0, -1.0]):
        for ts in (tensors, [tensors[0], tiny, tensors[2]]):
            for rescale in (True, "inverse_density", False):
                kw = dict(name="edge", seed=1, rescale=rescale)
                assert_bits_equal(run(base, ts, None, densities, **kw), reference.dare_merge(base, ts, None, densities, **kw))


def test_l1_factor_vs_exact_norms():
    # The factor from the fp64 partial sums against fp32(exact n1 / exact n2): equal here,
    # at most one fp32 ulp apart in general (triton_kernels/dare.py).
    from pymerge.backends.triton.dare import _keys
    from pymerge.ops.reference.dare import l1_norm_exact

    gen = torch.Generator().manual_seed(11)
    base, tensors = make(3 * BLOCK + 11, 4, DTYPES, gen)
    dens = [0.1, 0.3, 0.6, 0.9]
    keys = _keys("f", 5, 4, DEVICE)
    d32 = torch.tensor(dens, dtype=torch.float32, device=DEVICE)
    flat = [t.to(DEVICE) for t in tensors]
    norms = kernels().dare.l1_norms(base.to(DEVICE), flat, keys, d32).cpu()
    factors = kernels().dare.l1_factors(base.to(DEVICE), flat, keys, d32, 1e-7).cpu()
    for i, t in enumerate(tensors):
        tau = t.float() - base.float()
        keep = reference.dare_keep_mask(tau.numel(), name="f", seed=5, model_index=i, density=dens[i])
        n1, n2 = l1_norm_exact(tau), l1_norm_exact(torch.where(keep, tau, 0.0))
        assert abs(norms[i, 0].item() - n1) <= 1e-12 * n1 and abs(norms[i, 1].item() - n2) <= 1e-12 * n2
        exact = torch.tensor(n1 / n2, dtype=torch.float32)
        assert factors[i].view(torch.int32).item() == exact.view(torch.int32).item()


def test_merge_errors():
    x = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="base"):
        tb.dare_merge(None, [x], name="w")
    with pytest.raises(ValueError, match="name"):
        tb.dare_merge(x, [x], name=3)
    with pytest.raises(ValueError, match="rescale"):
        tb.dare_merge(x, [x], name="w", rescale="l2")
    with pytest.raises(ValueError, match="combine"):
        tb.dare_merge(x, [x], name="w", combine="mean")
    with pytest.raises(ValueError, match="consensus"):
        tb.dare_merge(x, [x], name="w", consensus="vote")
    with pytest.raises(ValueError, match="NaN"):
        tb.dare_merge(x, [x], None, float("nan"), name="w")
    with pytest.raises(ValueError, match="densities"):
        tb.dare_merge(x, [x, x], None, [0.5], name="w")
    with pytest.raises(ValueError, match="seed"):
        tb.dare_merge(x, [x], name="w", seed=-3)
