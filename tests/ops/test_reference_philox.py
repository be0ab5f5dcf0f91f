"""Philox 4x32-10, FNV-1a and the DARE key / uniform / mask: the spec's known answers."""

import random

import pytest
import torch

from pymerge.ops.reference.philox import (
    dare_key,
    dare_keep_mask,
    dare_uniform,
    fnv1a64,
    philox4x32_10,
)

NAME = "model.layers.0.mlp.up_proj.weight"


def _w(*vals):
    return [torch.tensor(v, dtype=torch.int64) for v in vals]


def _words(out):
    return tuple(int(x) for x in out)


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert _words(philox4x32_10(*_w(*counter), *key)) == expected


def _philox_scalar(c, k):
    # independent scalar Philox with Python big ints
    c, (k0, k1) = list(c), k
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k1, p0 & 0xFFFFFFFF]
    return tuple(c)


def test_philox_vectorised_matches_scalar_on_random_words():
    rng = random.Random(1234)
    m = 0xFFFFFFFF
    counters = [[rng.choice([0, m, rng.getrandbits(32)]) for _ in range(4)] for _ in range(64)]
    k0, k1 = rng.getrandbits(32), rng.getrandbits(32)
    cols = [torch.tensor([c[j] for c in counters], dtype=torch.int64) for j in range(4)]
    out = philox4x32_10(*cols, k0, k1)
    for i, c in enumerate(counters):
        assert tuple(int(o[i]) for o in out) == _philox_scalar(c, (k0, k1))
    for o in out:
        assert o.dtype == torch.int64 and int(o.min()) >= 0 and int(o.max()) <= m


def test_philox_broadcasts_python_ints():
    c0 = torch.tensor([0, 0x243F6A88], dtype=torch.int64)
    out = philox4x32_10(c0, 0, 0, 0, 0, 0)
    assert tuple(int(o[0]) for o in out) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_philox_rejects_bad_words():
    with pytest.raises(ValueError, match="uint32"):
        philox4x32_10(*_w(-1, 0, 0, 0), 0, 0)
    with pytest.raises(ValueError, match="uint32"):
        philox4x32_10(*_w(1 << 32, 0, 0, 0), 0, 0)
    with pytest.raises(ValueError, match="k0"):
        philox4x32_10(*_w(0, 0, 0, 0), 1 << 32, 0)
    with pytest.raises(ValueError, match="int64"):
        philox4x32_10(torch.zeros(1, dtype=torch.int32), 0, 0, 0, 0, 0)


def test_fnv1a64_known_answers():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    with pytest.raises(TypeError):
        fnv1a64("a")


def test_dare_key_known_answers():
    assert dare_key(NAME, 0, 0) == (0xF6368CC7, 0x792B5FF7)
    assert dare_key(NAME, 42, 1) == (0x7C73EA64, 0xCBE555DE)


@pytest.mark.parametrize(
    "seed, index, u_expected, keep_expected",
    [
        (
            0,
            0,
            [0.2095472, 0.8308294, 0.5785931, 0.1482173, 0.5504553, 0.2931392, 0.2053509, 0.9230911],
            [1, 0, 0, 1, 0, 1, 1, 0],
        ),
        (
            42,
            1,
            [0.7070955, 0.6671999, 0.1539854, 0.4926723, 0.6971354, 0.6938226, 0.6334432, 0.3768930],
            [0, 0, 1, 1, 0, 0, 0, 1],
        ),
    ],
)
def test_dare_uniform_and_mask_known_answers(seed, index, u_expected, keep_expected):
    u = dare_uniform(8, name=NAME, seed=seed, model_index=index)
    assert u.dtype == torch.float32 and u.shape == (8,)
    # the spec prints 7 decimals; the values are exact multiples of 2^-24
    torch.testing.assert_close(u, torch.tensor(u_expected), rtol=0, atol=6e-8)
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.round())
    keep = dare_keep_mask(8, name=NAME, seed=seed, model_index=index, density=0.5)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [bool(k) for k in keep_expected]


def test_uniform_range_and_keep_fraction():
    n = 1 << 20
    u = dare_uniform(n, name="x", seed=7, model_index=3)
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0 - 2**-24
    keep = dare_keep_mask(n, name="x", seed=7, model_index=3, density=0.3)
    frac = keep.double().mean().item()
    assert abs(frac - 0.3) < 0.003  # about 6.5 standard deviations
    # a prefix of a longer stream is the shorter stream (counter = element index)
    torch.testing.assert_close(dare_uniform(100, name="x", seed=7, model_index=3), u[:100], rtol=0, atol=0)


def test_mask_depends_on_seed_name_and_index_only():
    def mask(**kw):
        args = dict(name=NAME, seed=5, model_index=2, density=0.5)
        args.update(kw)
        return dare_keep_mask(4096, **args)

    ref = mask()
    assert torch.equal(ref, mask())
    assert not torch.equal(ref, mask(seed=6))
    assert not torch.equal(ref, mask(name=NAME + "x"))
    assert not torch.equal(ref, mask(model_index=3))


def test_mask_density_edges_and_empty():
    assert dare_keep_mask(1000, name="t", seed=0, model_index=0, density=0.0).sum() == 0
    assert dare_keep_mask(1000, name="t", seed=0, model_index=0, density=-1.0).sum() == 0
    assert dare_keep_mask(1000, name="t", seed=0, model_index=0, density=1.0).all()
    assert dare_keep_mask(1000, name="t", seed=0, model_index=0, density=2.0).all()
    assert dare_keep_mask(0, name="t", seed=0, model_index=0, density=0.5).shape == (0,)
    assert dare_uniform(0, name="t", seed=0, model_index=0).dtype == torch.float32


def test_key_and_size_validation():
    with pytest.raises(ValueError, match="seed"):
        dare_key(NAME, -1, 0)
    with pytest.raises(ValueError, match="seed"):
        dare_key(NAME, 1 << 64, 0)
    with pytest.raises(ValueError, match="model_index"):
        dare_key(NAME, 0, -1)
    with pytest.raises(ValueError, match="name"):
        dare_key(b"abc", 0, 0)
    with pytest.raises(ValueError, match="numel"):
        dare_uniform(-1, name=NAME, seed=0, model_index=0)
    with pytest.raises(ValueError, match="NaN"):
        dare_keep_mask(4, name=NAME, seed=0, model_index=0, density=float("nan"))
    # the largest seed is allowed
    assert dare_key(NAME, (1 << 64) - 1, 0) != dare_key(NAME, 0, 0)
