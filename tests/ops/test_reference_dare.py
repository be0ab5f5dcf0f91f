"""DARE oracle: drop with the spec's Philox masks, each rescale mode, both combines."""

import math

import pytest
import torch

from pymerge.ops.reference.dare import dare_drop, dare_merge, l1_norm_exact

NAME = "model.layers.0.mlp.up_proj.weight"
# spec known answers at density 0.5: seed 0 / model 0 and seed 42 / model 1
KEEP_S0_M0 = [1, 0, 0, 1, 0, 1, 1, 0]
KEEP_S42_M1 = [0, 0, 1, 1, 0, 0, 0, 1]
U_S0_M0 = [0.2095472, 0.8308294, 0.5785931, 0.1482173, 0.5504553, 0.2931392, 0.2053509, 0.9230911]


def _f(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


RAMP = _f(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)


def test_drop_without_rescale_uses_the_spec_mask():
    out = dare_merge(torch.zeros(8), [RAMP], densities=0.5, name=NAME, seed=0, rescale="none")
    _exact(out, RAMP * _f(*KEEP_S0_M0))
    assert out.tolist() == [1.0, 0.0, 0.0, 4.0, 0.0, 6.0, 7.0, 0.0]


def test_l1_rescale():
    # kept 1 + 4 + 6 + 7 = 18 of 36: factor 2
    out = dare_merge(torch.zeros(8), [RAMP], densities=0.5, name=NAME, seed=0)
    _exact(out, _f(2.0, 0.0, 0.0, 8.0, 0.0, 12.0, 14.0, 0.0))
    _exact(dare_merge(torch.zeros(8), [RAMP], densities=0.5, name=NAME, seed=0, rescale=True), out)
    # model index 1, seed 42: kept 3 + 4 + 8 = 15 of 36 -> factor fp32(2.4); model 0 is all zero
    out = dare_merge(torch.zeros(8), [torch.zeros(8), RAMP], densities=0.5, name=NAME, seed=42)
    f = torch.tensor(2.4, dtype=torch.float32)
    _exact(out, torch.stack([0 * f, 0 * f, 3 * f, 4 * f, 0 * f, 0 * f, 0 * f, 8 * f]))
    assert out[2].item() == 7.200000286102295


def test_inverse_density_rescale():
    out = dare_merge(
        torch.zeros(8), [torch.zeros(8), RAMP], densities=0.5, name=NAME, seed=42, rescale="inverse_density"
    )
    _exact(out, _f(0.0, 0.0, 6.0, 8.0, 0.0, 0.0, 0.0, 16.0))
    # density 0.25 keeps u < 0.25: elements 0, 3, 6 of the spec's u values; factor 4
    assert [u < 0.25 for u in U_S0_M0] == [True, False, False, True, False, False, True, False]
    out = dare_merge(torch.zeros(8), [RAMP], densities=0.25, name=NAME, seed=0, rescale="inverse_density")
    _exact(out, _f(4.0, 0.0, 0.0, 16.0, 0.0, 0.0, 28.0, 0.0))
    # density above 1 keeps all and does not shrink
    out = dare_merge(torch.zeros(8), [RAMP], densities=2.0, name=NAME, rescale="inverse_density")
    _exact(out, RAMP)


def test_l1_rescale_skipped_for_tiny_norms():
    tiny = torch.full((8,), 1e-9)
    out = dare_merge(torch.zeros(8), [tiny], densities=0.5, name=NAME, seed=0)
    _exact(out, tiny * _f(*KEEP_S0_M0))


def test_density_edges_and_all_zero():
    base = _f(1.0, -1.0, 0.5)
    model = _f(2.0, 3.0, -4.0)
    for rescale in ("l1", "inverse_density", "none"):
        _exact(dare_merge(base, [model], densities=0.0, name="t", rescale=rescale), base)
        _exact(dare_merge(base, [model], densities=1.0, name="t", rescale=rescale), model)
        _exact(dare_merge(base, [base.clone()], densities=0.5, name="t", rescale=rescale), base)
        _exact(
            dare_merge(base, [model], densities=0.0, name="t", rescale=rescale, combine="ties", normalize=True),
            base,
        )


def test_keep_fraction_on_a_large_tensor():
    n = 1 << 18
    out = dare_merge(torch.zeros(n), [torch.ones(n)], densities=0.3, name="big", seed=3, rescale="none")
    frac = (out != 0).double().mean().item()
    assert abs(frac - 0.3) < 0.006  # about 6.5 standard deviations


def test_masks_are_keyed_by_seed_name_and_model_index():
    ones = torch.ones(2048)

    def mask(name="w", seed=1, index=0):
        return dare_drop(ones, density=0.5, name=name, seed=seed, model_index=index, rescale="none") != 0

    ref = mask()
    assert torch.equal(ref, mask())
    assert not torch.equal(ref, mask(seed=2))
    assert not torch.equal(ref, mask(name="v"))
    assert not torch.equal(ref, mask(index=1))
    # in dare_merge the index is the position in `tensors`
    out = dare_merge(torch.zeros(2048), [torch.zeros(2048), ones], densities=0.5, name="w", seed=1, rescale="none")
    _exact(out != 0, mask(index=1))


def test_linear_combine_weights_lambda_normalize():
    base = _f(1.0)
    models = [_f(5.0), _f(9.0)]  # tau = 4, 8
    # acc = 1*4 + 3*8 = 28; c = fp32(1 / 4)
    _exact(dare_merge(base, models, [1.0, 3.0], 1.0, name="x", normalize=True), _f(8.0))
    _exact(dare_merge(base, models, [1.0, 3.0], 1.0, name="x", lam=0.5), _f(15.0))
    with pytest.raises(ValueError, match="sum to 0"):
        dare_merge(base, models, [1.0, -1.0], 1.0, name="x", normalize=True)


def test_ties_combine():
    base = torch.zeros(3)
    models = [_f(1.0, -2.0, 4.0), _f(-3.0, -1.0, 2.0)]
    # S = [-2, -3, 6]: mixed [-3, -3, 6]; div [1, 2, 2]
    out = dare_merge(base, models, densities=1.0, name="x", combine="ties")
    _exact(out, _f(-3.0, -3.0, 6.0))  # normalize defaults to False (disjoint sum)
    out = dare_merge(base, models, densities=1.0, name="x", combine="ties", normalize=True)
    _exact(out, _f(-3.0, -1.5, 3.0))
    three = [_f(1.0), _f(1.0), _f(-5.0)]
    _exact(dare_merge(torch.zeros(1), three, name="x", combine="ties"), _f(-5.0))
    _exact(dare_merge(torch.zeros(1), three, name="x", combine="ties", consensus="count"), _f(2.0))


def test_output_dtype_empty_and_one_element():
    base = torch.ones(2)
    model = _f(1.0 + 3 * 2**-8, 1.0)
    out = dare_merge(base, [model], name="x", out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    _exact(out, torch.tensor([1 + 2**-6, 1.0], dtype=torch.bfloat16))
    assert dare_merge(base.half(), [model.half()], name="x").dtype == torch.float16
    empty = dare_merge(torch.zeros(0, 5), [torch.zeros(0, 5)], densities=0.5, name="x")
    assert empty.shape == (0, 5)
    one = dare_merge(torch.tensor(0.0), [torch.tensor(3.0)], densities=1.0, name="x")
    _exact(one, torch.tensor(3.0))


def test_validation():
    base = torch.zeros(2)
    with pytest.raises(ValueError, match="'l1', 'inverse_density', 'none'"):
        dare_merge(base, [base], name="x", rescale="l2")
    with pytest.raises(ValueError, match="'linear', 'ties'"):
        dare_merge(base, [base], name="x", combine="mean")
    with pytest.raises(ValueError, match="'sum', 'count'"):
        dare_merge(base, [base], name="x", combine="ties", consensus="max")
    with pytest.raises(ValueError, match="name"):
        dare_merge(base, [base], name=3)
    with pytest.raises(TypeError):
        dare_merge(base, [base])
    with pytest.raises(ValueError, match="shape"):
        dare_merge(base, [torch.zeros(3)], name="x")
    with pytest.raises(ValueError, match="seed"):
        dare_merge(base, [base], name="x", seed=-1)


def test_l1_norm_exact_is_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.exp2(torch.randint(-140, 120, (5000,), generator=g).float())
    x[:10] = 1e-45  # subnormals
    x[10:20] = -0.0
    assert l1_norm_exact(x) == math.fsum(abs(v) for v in x.double().tolist())
    assert l1_norm_exact(torch.zeros(0)) == 0.0
    assert l1_norm_exact(_f(1.0, float("inf"))) == math.inf
    assert math.isnan(l1_norm_exact(_f(float("nan"))))
    with pytest.raises(ValueError, match="fp32"):
        l1_norm_exact(torch.zeros(2, dtype=torch.float64))
