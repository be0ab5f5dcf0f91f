"""pymerge._C DARE kernels (dare_merge, dare_keep_mask, Philox), bit for bit against torch."""

from __future__ import annotations


import pytest
import torch

import pymerge.ops
from pymerge.backends import cpu
from pymerge.testing import assert_bits_equal
from pymerge.ops import reference
from pymerge.ops.reference.dare import l1_norm_exact
from pymerge.ops.reference.philox import dare_uniform, philox4x32_10

from .cases import CPU, DTYPES, each_isa, models

pytestmark = CPU.marks

BLOCK = 1024
CHUNK = 1 << 16
ODD = 3 * CHUNK + BLOCK // 2 + 7  # not a multiple of any block, chunk or SIMD width
SIZES = [0, 1, 7, 1000, 65537, ODD]
NAME = "model.layers.0.mlp.up_proj.weight"


# ---------------------------------------------------------------- generator


def test_known_answer_vectors():
    from pymerge import _C

    assert _C._philox4x32_10(0, 0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _C._philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    assert _C._philox4x32_10(*[0xFFFFFFFF] * 6) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _C._fnv1a64(b"") == 0xCBF29CE484222325
    assert _C._fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert _C._dare_key(NAME.encode(), 0, 0) == (0xF6368CC7, 0x792B5FF7)
    assert _C._dare_key(NAME.encode(), 42, 1) == (0x7C73EA64, 0xCBE555DE)
    for seed, index, kept in ((0, 0, [1, 0, 0, 1, 0, 1, 1, 0]), (42, 1, [0, 0, 1, 1, 0, 0, 0, 1])):
        for mask in each_isa(lambda: cpu.dare_keep_mask(8, name=NAME, seed=seed, model_index=index, density=0.5)):
            assert mask.tolist() == [bool(k) for k in kept]


def test_word0_beyond_2_32():
    # Counters whose high word is nonzero (tensors of more than 2^32 elements).
    from pymerge import _C

    k0, k1 = reference.dare_key(NAME, 7, 3)
    for index in (2**32 - 1, 2**32, 2**32 + 5, 2**40 + 123, 2**64 - 1):
        w0, _, _, _ = philox4x32_10(index & 0xFFFFFFFF, index >> 32, 0, 0, k0, k1)
        assert _C._philox_word0(index, k0, k1) == int(w0)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("key", [(0, 0, NAME), (2**64 - 1, 17, "ünïcode.wéight"), (42, 1, "")])
def test_keep_mask_matches_reference(size, key):
    seed, index, name = key
    # reference.dare_keep_mask is dare_uniform(...) < fp32(density): u once, every density from it.
    u = dare_uniform(size, name=name, seed=seed, model_index=index)
    if size <= 1000:
        assert torch.equal(reference.dare_keep_mask(size, name=name, seed=seed, model_index=index, density=0.5), u < 0.5)
    for density in (0.0, 1.0, 0.5, 1e-7, 0.99999994, 1.5, -1.0, 0.3):
        ref = u < torch.tensor(density, dtype=torch.float32)
        kw = dict(name=name, seed=seed, model_index=index, density=density)
        for got in each_isa(lambda: cpu.dare_keep_mask(size, **kw)):
            assert got.dtype == torch.bool and torch.equal(got, ref)


def test_keep_mask_thread_counts_and_dispatch():
    size = 3 * CHUNK + 333
    ref = reference.dare_keep_mask(size, name=NAME, seed=5, model_index=2, density=0.37)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        assert torch.equal(cpu.dare_keep_mask(size, name=NAME, seed=5, model_index=2, density=0.37), ref)
    got = pymerge.ops.dare_keep_mask(size, name=NAME, seed=5, model_index=2, density=0.37)
    assert pymerge.ops.last_backend() == "cpu" and torch.equal(got, ref)
    # u itself: the mask at a density just above u_p flips exactly at u_p.
    u = dare_uniform(64, name=NAME, seed=5, model_index=2)
    for p in (0, 13, 63):
        at = cpu.dare_keep_mask(64, name=NAME, seed=5, model_index=2, density=float(u[p]))
        above = cpu.dare_keep_mask(64, name=NAME, seed=5, model_index=2, density=float(u[p]) + 2**-25)
        assert not at[p] and above[p]


# ---------------------------------------------------------------- exact L1 norms


def l1_pairs(x: torch.Tensor, densities, seed: int = 3):
    """Per density and kernel clone: (kernel norms, reference norms) of tau = x over a zero base."""
    from pymerge import _C

    x = x.float().contiguous()
    zero = torch.zeros_like(x)
    u = dare_uniform(x.numel(), name="t", seed=seed, model_index=0)
    for density in densities:
        kept = torch.where(u < torch.tensor(density, dtype=torch.float32), x, torch.zeros(()))
        ref = (l1_norm_exact(x), l1_norm_exact(kept))
        for got in each_isa(
            lambda: _C.dare_l1_norms([x.data_ptr()], [0], zero.data_ptr(), 0, x.numel(), b"t", seed, [density])[0]
        ):
            yield got, ref


@pytest.mark.parametrize("case", ["randn", "wide", "subnormal", "cancel", "inf", "nan", "zeros", "huge"])
def test_l1_norms_exact(case):
    gen = torch.Generator().manual_seed(len(case))
    n = 50001
    if case == "randn":
        x = torch.randn(n, generator=gen)
    elif case == "wide":  # every exponent, so the per-exponent sums carry across many words
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-149, 127, (n,), generator=gen).float())
    elif case == "subnormal":
        x = torch.randint(0, 2**23, (n,), generator=gen).to(torch.int32).view(torch.float32)
        x = torch.where(torch.rand(n, generator=gen) < 0.5, x, -x)
    elif case == "cancel":  # fp64 summation would round here; the exact sum does not
        x = torch.tensor([3e38, 1e-45, 1.0, 2**-24, -(2**-30)] * 1000)
    elif case == "inf":
        x = torch.randn(n, generator=gen)
        x[777] = float("-inf")
    elif case == "nan":
        x = torch.randn(n, generator=gen)
        x[5] = float("nan")
        x[6] = float("inf")
    elif case == "zeros":
        x = torch.zeros(n)
        x[::2] = -0.0
    else:
        x = torch.full((n,), 3.4e38)
    for got, ref in l1_pairs(x, (0.5, 0.001, 1.0)):
        for g, r in zip(got, ref):
            assert (g != g and r != r) or g == r, (case, got, ref)


# ---------------------------------------------------------------- dare_merge

RESCALES = ["l1", "inverse_density", "none", True, False]


@pytest.mark.parametrize(
    "size,dtype", [(s, dt) for s in SIZES[:4] for dt in DTYPES] + [(65537, torch.float16), (ODD, torch.bfloat16)]
)
def test_dare_merge_matches_reference(size, dtype):
    gen = torch.Generator().manual_seed(size + 31 * DTYPES.index(dtype))
    base, ts = models(size, [dtype] * 3, gen)
    args = (base, ts, [1.0, -0.6, 0.8], [0.3, 0.7, 1.0])
    for combine in ("linear", "ties"):
        kw = dict(name=NAME, seed=9, lam=0.75, combine=combine)
        ref = reference.dare_merge(*args, **kw)
        for got in each_isa(lambda: cpu.dare_merge(*args, **kw)):
            assert_bits_equal(got, ref)


@pytest.mark.parametrize("rescale", RESCALES)
@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_rescale_combine_normalize(rescale, combine, normalize):
    gen = torch.Generator().manual_seed(len(str(rescale)) + len(combine) + normalize)
    base, ts = models(20011, [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16], gen,
                      base_dtype=torch.bfloat16)
    args = (base, ts, [0.5, 1.5, -0.7, 1.0], [0.1, 0.5, 0.0, 1.0])
    for consensus in ("sum", "count") if combine == "ties" else ("sum",):
        for out_dtype in DTYPES:
            kw = dict(name="blk.3.attn_q.weight", seed=2024, lam=1.25, normalize=normalize, rescale=rescale,
                      combine=combine, consensus=consensus, out_dtype=out_dtype)
            ref = reference.dare_merge(*args, **kw)
            assert_bits_equal(cpu.dare_merge(*args, **kw), ref)


@pytest.mark.parametrize("n_models", range(1, 9))
def test_model_counts(n_models):
    gen = torch.Generator().manual_seed(200 + n_models)
    dts = [DTYPES[i % 3] for i in range(n_models)]
    base, ts = models(7777, dts, gen, base_dtype=torch.float32, tiny=n_models % 2 == 0)
    weights = [(-1) ** i * (0.3 + i / 4) for i in range(n_models)]
    densities = [(i + 1) / (n_models + 2) for i in range(n_models)]
    for combine in ("linear", "ties"):
        kw = dict(name=f"t{n_models}", seed=n_models, combine=combine, out_dtype=torch.bfloat16)
        ref = reference.dare_merge(base, ts, weights, densities, **kw)
        assert_bits_equal(cpu.dare_merge(base, ts, weights, densities, **kw), ref)


def test_l1_skip_below_eps_and_identical_models():
    # All-zero task vectors (norm < 1e-7: no rescale) and tiny ones next to normal ones.
    base = torch.randn(3000)
    same = base.clone()
    tiny = base + 1e-12
    other = base + 0.01 * torch.randn(3000)
    for combine in ("linear", "ties"):
        kw = dict(name="x", seed=1, combine=combine)
        ref = reference.dare_merge(base, [same, tiny, other], None, 0.5, **kw)
        assert_bits_equal(cpu.dare_merge(base, [same, tiny, other], None, 0.5, **kw), ref)


@pytest.mark.parametrize("rescale", ["l1", "inverse_density"])
def test_thread_counts_identical(rescale):
    gen = torch.Generator().manual_seed(13)
    size = 2 * CHUNK + 12345  # three threads: chunk borders inside blocks
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.bfloat16], gen)
    args = (base, ts, [0.25, -0.5, 1.0], [0.3, 0.41, 0.62])
    kw = dict(name=NAME, seed=77, rescale=rescale, combine="ties")
    ref = reference.dare_merge(*args, **kw)
    for threads in (1, 2, 3):
        cpu.set_num_threads(threads)
        for got in each_isa(lambda: cpu.dare_merge(*args, **kw)):
            assert_bits_equal(got, ref)


def test_special_values_and_shapes():
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3e38, -1.0])
    base = specials.repeat(8)
    a = specials.repeat_interleave(8)
    b = specials.flip(0).repeat(8)
    for rescale in ("l1", "none"):
        for combine in ("linear", "ties"):
            kw = dict(name="s", seed=0, rescale=rescale, combine=combine)
            ref = reference.dare_merge(base, [a, b], [1.0, 0.5], 0.7, **kw)
            assert_bits_equal(cpu.dare_merge(base, [a, b], [1.0, 0.5], 0.7, **kw), ref)
    gen = torch.Generator().manual_seed(4)
    base2 = torch.randn(40, 24, generator=gen).to(torch.float16)
    m = (base2.float().t() + 0.02 * torch.randn(24, 40, generator=gen)).to(torch.float16).t()
    got = pymerge.ops.dare_merge(base2, [m], densities=0.4, name="w", seed=3)
    assert pymerge.ops.last_backend() == "cpu" and got.shape == (40, 24) and got.dtype == torch.float16
    assert_bits_equal(got, reference.dare_merge(base2, [m], densities=0.4, name="w", seed=3))


def test_errors_match_reference():
    x = torch.ones(4)
    cases = [
        dict(base=None, tensors=[x], name="n"),
        dict(base=x, tensors=[x], name=3),
        dict(base=x, tensors=[x], name="n", rescale="l2"),
        dict(base=x, tensors=[x], name="n", combine="mean"),
        dict(base=x, tensors=[x], name="n", consensus="x"),
        dict(base=x, tensors=[x], name="n", seed=-1),
        dict(base=x, tensors=[x], name="n", seed=2**64),
        dict(base=x, tensors=[x], name="n", densities=float("nan")),
        dict(base=x, tensors=[x, x], name="n", weights=[1.0, -1.0], normalize=True),
        dict(base=x, tensors=[x], name="n", lam=float("inf")),
        dict(base=x, tensors=[x, torch.ones(3)], name="n"),
    ]
    for case in cases:
        base, tensors = case.pop("base"), case.pop("tensors")
        with pytest.raises(ValueError):
            reference.dare_merge(base, tensors, **case)
        with pytest.raises(ValueError):
            cpu.dare_merge(base, tensors, **case)
    for kw in (dict(density=float("nan")), dict(model_index=-1), dict(seed=True), dict(name=b"n")):
        args = dict(name="n", seed=0, model_index=0, density=0.5)
        args.update(kw)
        with pytest.raises(ValueError):
            reference.dare_keep_mask(4, **args)
        with pytest.raises(ValueError):
            cpu.dare_keep_mask(4, **args)
    with pytest.raises(ValueError):
        cpu.dare_keep_mask(-1, name="n", seed=0, model_index=0, density=0.5)


# ---------------------------------------------------------------- properties

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    @_settings
    @given(
        size=st.integers(0, 400),
        in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=5),
        base_dtype=st.sampled_from(DTYPES),
        out_dtype=st.sampled_from(DTYPES),
        weights=st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
        densities=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=5, max_size=5),
        lam=st.floats(-2, 2, allow_nan=False),
        normalize=st.booleans(),
        rescale=st.sampled_from(RESCALES),
        combine=st.sampled_from(["linear", "ties"]),
        consensus=st.sampled_from(["sum", "count"]),
        tiny=st.booleans(),
        seed=st.integers(0, 2**64 - 1),
        name=st.text(max_size=12),
    )
    def test_property_dare_merge(size, in_dtypes, base_dtype, out_dtype, weights, densities, lam, normalize,
                                 rescale, combine, consensus, tiny, seed, name):
        gen = torch.Generator().manual_seed(seed % 2**31)
        base, ts = models(size, in_dtypes, gen, base_dtype=base_dtype, tiny=tiny, scale=0.3)
        n = len(ts)
        w = weights[:n]
        kw = dict(name=name, seed=seed, lam=lam, normalize=normalize, rescale=rescale, combine=combine,
                  consensus=consensus, out_dtype=out_dtype)
        if combine == "linear" and normalize and sum(w) == 0:
            with pytest.raises(ValueError):
                cpu.dare_merge(base, ts, w, densities[:n], **kw)
            return
        ref = reference.dare_merge(base, ts, w, densities[:n], **kw)
        assert_bits_equal(cpu.dare_merge(base, ts, w, densities[:n], **kw), ref)

    @_settings
    @given(
        size=st.integers(0, 3000),
        seed=st.integers(0, 2**64 - 1),
        model_index=st.integers(0, 2**40),
        density=st.floats(-0.5, 1.5, allow_nan=False),
        name=st.text(max_size=20),
    )
    def test_property_dare_keep_mask(size, seed, model_index, density, name):
        kw = dict(name=name, seed=seed, model_index=model_index, density=density)
        assert torch.equal(cpu.dare_keep_mask(size, **kw), reference.dare_keep_mask(size, **kw))
