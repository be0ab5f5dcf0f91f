"""TIES oracle: per-tensor trim/elect/merge, ties_combine op order, model scope."""

import pytest
import torch

from pymerge.ops.reference.ties import (
    threshold_keep_mask_inclusive,
    ties_combine,
    ties_merge,
    ties_merge_model,
    ties_model_scope,
    ties_model_threshold,
    ties_sign_sum,
    topk_keep_mask,
    trim_count,
)


def _f(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ trim masks


def test_topk_exact_breaks_ties_by_lower_index():
    x = _f(1.0, 3.0, 3.0, 2.0, 3.0)
    assert topk_keep_mask(x, 2).tolist() == [False, True, True, False, False]
    assert topk_keep_mask(x, 3).tolist() == [False, True, True, False, True]
    assert topk_keep_mask(x, 4).tolist() == [False, True, True, True, True]
    assert topk_keep_mask(x, 0).tolist() == [False] * 5
    assert topk_keep_mask(x, -3).tolist() == [False] * 5
    assert topk_keep_mask(x, 5).tolist() == [True] * 5
    assert topk_keep_mask(x, 9).tolist() == [True] * 5
    # -0.0 equals +0.0: the lower index wins
    assert topk_keep_mask(_f(0.0, -0.0, 0.0), 1).tolist() == [True, False, False]
    assert topk_keep_mask(torch.zeros(0), 3).shape == (0,)


def test_topk_exact_many_ties_keeps_lowest_indices():
    x = torch.zeros(20000)
    x[7] = 1.0
    x[19999] = 2.0
    keep = topk_keep_mask(x, 300)
    expected = torch.zeros(20000, dtype=torch.bool)
    # 2.0 and 1.0 first, then the 298 zeros of lowest index: 0..298 without 7
    expected[:299] = True
    expected[19999] = True
    assert int(keep.sum()) == 300
    assert torch.equal(keep, expected)


def test_threshold_inclusive_keeps_all_ties():
    x = _f(1.0, 3.0, 3.0, 2.0, 3.0)
    assert threshold_keep_mask_inclusive(x, 2).tolist() == [False, True, True, False, True]
    assert threshold_keep_mask_inclusive(x, 4).tolist() == [False, True, True, True, True]
    assert threshold_keep_mask_inclusive(x, 0).tolist() == [False] * 5
    assert threshold_keep_mask_inclusive(x, 5).tolist() == [True] * 5
    assert threshold_keep_mask_inclusive(torch.zeros(0), 1).shape == (0,)


def test_mask_validation():
    with pytest.raises(ValueError, match="fp32"):
        topk_keep_mask(torch.zeros(3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="1-D"):
        topk_keep_mask(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="int"):
        threshold_keep_mask_inclusive(torch.zeros(3), 1.5)


@pytest.mark.parametrize(
    "density, numel, k",
    [
        (0.5, 5, 2),
        (0.1, 5, 1),  # max(1, 0)
        (0.0, 5, 0),
        (-0.2, 5, 0),
        (1.0, 5, 5),
        (1.5, 5, 5),
        (0.3, 10, 3),  # 3.0000000000000004
        (0.7, 10, 7),  # 7.000000000000001
        (0.57, 100, 56),  # 56.99999999999999 truncates
        (0.5, 0, 0),
        (0.5, 1, 1),
    ],
)
def test_trim_count(density, numel, k):
    assert trim_count(density, numel) == k


# ------------------------------------------------------------------ per-tensor TIES


def test_ties_hand_example_sum_consensus():
    base = _f(10.0, 10.0, 10.0, 10.0)
    t1 = base + _f(1.0, -2.0, 0.5, 0.0)
    t2 = base + _f(-3.0, 1.0, 0.5, 0.0)
    # S = [-2, -1, 1, 0] -> majority [-1, -1, +1, +1]; mixed [-3, -2, 1, 0]; div [1, 1, 2, 0->1]
    _exact(ties_merge(base, [t1, t2]), base + _f(-3.0, -2.0, 0.5, 0.0))
    _exact(ties_merge(base, [t1, t2], normalize=False), base + _f(-3.0, -2.0, 1.0, 0.0))
    _exact(ties_merge(base, [t1, t2], normalize=False, lam=0.5), base + _f(-1.5, -1.0, 0.5, 0.0))


def test_ties_zero_sum_elects_plus():
    base = _f(0.0)
    # S == 0 -> majority +1: only the positive delta is merged
    _exact(ties_merge(base, [_f(2.0), _f(-2.0)]), _f(2.0))
    _exact(ties_merge(base, [_f(-2.0), _f(2.0)], normalize=False), _f(2.0))


def test_consensus_count_vs_sum():
    base = _f(0.0)
    models = [_f(1.0), _f(1.0), _f(-5.0)]
    # sum: S = -3 -> -1 -> only -5 survives
    _exact(ties_merge(base, models), _f(-5.0))
    # count: 1 + 1 - 1 = 1 >= 0 -> +1 -> (1 + 1) / 2
    _exact(ties_merge(base, models, consensus="count"), _f(1.0))
    _exact(ties_merge(base, models, consensus="count", normalize=False), _f(2.0))


def test_negative_weight_flips_the_election():
    base = _f(0.0)
    models = [_f(1.0), _f(0.5)]
    # weights [1, 4]: d = [1, 2], both agree: 3 / 5
    _exact(ties_merge(base, models, [1.0, 4.0]), _f(3.0) / _f(5.0))
    # weights [1, -4]: d = [1, -2], S = -1 -> -1: only model 2, divided by its weight -4
    _exact(ties_merge(base, models, [1.0, -4.0]), _f(0.5))
    _exact(ties_merge(base, models, [1.0, -4.0], normalize=False), _f(-2.0))


def test_exact_vs_inclusive_ties_at_threshold():
    base = torch.zeros(4)
    model = _f(3.0, 1.0, 3.0, 2.0)
    # density 0.25 -> k = 1; exact keeps index 0 only, inclusive keeps both 3s
    _exact(ties_merge(base, [model], densities=0.25), _f(3.0, 0.0, 0.0, 0.0))
    _exact(ties_merge(base, [model], densities=0.25, trim_ties="inclusive"), _f(3.0, 0.0, 3.0, 0.0))


def test_per_model_density_and_weights():
    base = torch.zeros(3)
    m1 = _f(1.0, -4.0, 2.0)
    m2 = _f(5.0, 1.0, -1.0)
    # density [2/3, 1/3] -> k = [2, 1]: tau1 keeps -4, 2; tau2 keeps 5
    # weights [10, 1]: d1 = [0, -40, 20], d2 = [5, 0, 0]; every nonzero agrees
    out = ties_merge(base, [m1, m2], [10.0, 1.0], densities=[2 / 3, 1 / 3], normalize=False)
    _exact(out, _f(5.0, -40.0, 20.0))
    out = ties_merge(base, [m1, m2], [10.0, 1.0], densities=[2 / 3, 1 / 3])
    _exact(out, _f(5.0, -4.0, 2.0))


def test_density_zero_and_all_zero_task_vectors_give_base():
    base = _f(1.5, -2.0, 0.25)
    models = [base + _f(1.0, 2.0, 3.0), base - _f(1.0, 1.0, 1.0)]
    # nothing kept: div is 0 everywhere -> 1, no NaN
    _exact(ties_merge(base, models, densities=0.0), base)
    _exact(ties_merge(base, [base.clone(), base.clone()]), base)
    _exact(ties_merge(base, [base.clone()], consensus="count"), base)


def test_density_one_keeps_all_and_one_model():
    base = _f(1.0, 2.0, 3.0)
    model = _f(2.0, 0.0, 3.5)
    _exact(ties_merge(base, [model], densities=1.0), model)
    # one model, weight 2, normalize: 2 tau / 2
    _exact(ties_merge(base, [model], [2.0]), model)
    _exact(ties_merge(base, [model], [2.0], normalize=False), _f(3.0, -2.0, 4.0))


def test_output_dtype_rounding_and_default():
    base = torch.ones(2)
    model = _f(1.0 + 3 * 2**-8, 1.0 + 2**-9)
    out = ties_merge(base, [model], out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # 1 + 1.5 ulp ties to even (1 + 2^-6); 1 + 0.25 ulp rounds down
    _exact(out, torch.tensor([1 + 2**-6, 1.0], dtype=torch.bfloat16))
    h = ties_merge(base.half(), [model.half()])
    assert h.dtype == torch.float16
    _exact(ties_merge(base, [model.to(torch.bfloat16)]).float(), _f(1.015625, 1.0))


def test_empty_and_one_element_and_shape():
    out = ties_merge(torch.zeros(0, 3), [torch.zeros(0, 3), torch.zeros(0, 3)], densities=0.5)
    assert out.shape == (0, 3)
    _exact(ties_merge(torch.tensor(1.0), [torch.tensor(3.0)], densities=0.1), torch.tensor(3.0))
    out = ties_merge(torch.zeros(2, 2), [torch.ones(2, 2)])
    assert out.shape == (2, 2)


def test_validation_messages():
    base = torch.zeros(2)
    with pytest.raises(ValueError, match="'sum', 'count'"):
        ties_merge(base, [base], consensus="majority")
    with pytest.raises(ValueError, match="'exact', 'inclusive'"):
        ties_merge(base, [base], trim_ties="strict")
    with pytest.raises(ValueError, match="shape"):
        ties_merge(base, [torch.zeros(3)])
    with pytest.raises(ValueError, match="densities"):
        ties_merge(base, [base, base], densities=[0.5])
    with pytest.raises(ValueError, match="base"):
        ties_merge(None, [base])


def test_ties_combine_sequential_sums():
    tiny = 2.0**-24
    deltas = _f(1.0, tiny, tiny).reshape(3, 1)
    # mixed = ((0 + 1) + 2^-24) + 2^-24 = 1 (pairwise would give 1 + 2^-23)
    out = ties_combine(torch.zeros(1), deltas, normalize=False)
    _exact(out, _f(1.0))
    # division, then the lambda product: 3 / 2 * 3
    out = ties_combine(torch.zeros(1), _f(1.0, 2.0).reshape(2, 1), lam=3.0)
    _exact(out, _f(4.5))
    # a true division: d = [1, 4], div = 3 -> fp32(5 / 3) = 0x3FD55555 (5 * fp32(1/3) is 0x3FD55556)
    out = ties_combine(torch.zeros(1), _f(1.0, 2.0).reshape(2, 1), [1.0, 2.0])
    assert out.view(torch.int32).item() == 0x3FD55555
    with pytest.raises(ValueError, match="fp32"):
        ties_combine(torch.zeros(1), torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="elements"):
        ties_combine(torch.zeros(2), torch.zeros(2, 1))


# ------------------------------------------------------------------ model scope

T1 = [0.30, -0.10, 0.05, 0.0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30]
T2 = [-0.20, -0.30, 0.10, 0.0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20]
T3 = [0.10, 0.20, -0.60, 0.0, -0.10, 0.30, 0.0, -0.05, 0.20, -0.10]


@pytest.mark.parametrize(
    "merge, expected",
    [
        ("dis-mean", [0.2, -0.3, -0.6, 0.0, -0.25, 0.25, 0.0, 0.0, 0.26667, -0.2]),
        ("dis-sum", [0.4, -0.3, -0.6, 0.0, -0.5, 0.5, 0.0, 0.0, 0.8, -0.4]),
    ],
)
def test_model_scope_worked_example(merge, expected):
    base = {"w": torch.zeros(10)}
    models = [{"w": _f(*t)} for t in (T1, T2, T3)]
    out = ties_model_scope(base, models, 0.4, merge=merge)["w"]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=5e-6)
    assert out[3] == 0 and out[6] == 0 and out[7] == 0


def test_model_scope_worked_example_split_over_two_tensors():
    # the same example split into two tensors must give the same numbers
    base = {"a": torch.zeros(2, 2), "b": torch.zeros(6)}
    models = [{"a": _f(*t[:4]).reshape(2, 2), "b": _f(*t[4:])} for t in (T1, T2, T3)]
    out = ties_model_scope(base, models, 0.4)
    whole = ties_model_scope({"w": torch.zeros(10)}, [{"w": _f(*t)} for t in (T1, T2, T3)], 0.4)["w"]
    _exact(torch.cat([out["a"].reshape(-1), out["b"]]), whole)


def test_model_threshold():
    x = _f(5.0, 1.0, 3.0, 3.0, 2.0)
    assert ties_model_threshold(x, 0.4) == 3.0  # k = 5 - 2 = 3rd smallest of [1 2 3 3 5]
    assert ties_model_threshold(x, 0.9) == 1.0  # k = 5 - 4
    assert ties_model_threshold(x, 1.0) == 0.0
    assert ties_model_threshold(x, 0.0) == 5.0  # k = d
    assert ties_model_threshold(torch.zeros(0), 0.5) == 0.0
    assert ties_model_threshold(_f(*[abs(v) for v in T1]), 0.4) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="non-negative"):
        ties_model_threshold(_f(-1.0, 2.0), 0.5)


def test_sign_sum_and_merge_pass():
    base = torch.zeros(4)
    m1 = _f(1.0, -1.0, 0.1, 0.0)
    m2 = _f(1.0, 2.0, -0.1, 0.0)
    # S = [2, 1, 0, 0] -> 1 + 1
    assert ties_sign_sum(base, [m1, m2], [0.0, 0.0]) == 2
    # thresholds drop +-0.1 and m2's 1 < 1.5: S = [1, 1, 0, 0]
    assert ties_sign_sum(base, [m1, m2], [0.5, 1.5]) == 2
    assert ties_sign_sum(base, [-m1, -m2], [0.0, 0.0]) == -2
    out = ties_merge_model(base, [m1, m2], [0.0, 0.0], 1)
    # p0: both +1 -> mean 1; p1: S = 1 > 0 -> only 2; p2: S = 0 -> fallback +1 -> 0.1
    _exact(out, _f(1.0, 2.0, 0.1, 0.0))
    out = ties_merge_model(base, [m1, m2], [0.0, 0.0], -3, merge="dis-sum", lam=2.0)
    _exact(out, _f(4.0, 4.0, -0.2, 0.0))


@pytest.mark.parametrize("fallback, expected", [(1, 0.5), (-1, -0.5), (7, 0.5), (0, -0.5)])
def test_merge_pass_fallback_sign(fallback, expected):
    # S == 0: the fallback sign decides; 0 keeps the negatives, as the official code does
    out = ties_merge_model(torch.zeros(1), [_f(0.5), _f(-0.5)], [0.0, 0.0], fallback)
    _exact(out, _f(expected))


def test_model_scope_fallback_comes_from_other_tensors():
    base = {"a": torch.zeros(1), "b": torch.zeros(2)}
    models = [{"a": _f(0.5), "b": _f(-1.0, -1.0)}, {"a": _f(-0.5), "b": _f(-1.0, 0.0)}]
    # a: S = 0; b: S = [-2, -1] -> model sign sum -2 -> fallback -1
    out = ties_model_scope(base, models, 1.0)
    _exact(out["a"], _f(-0.5))
    _exact(out["b"], _f(-1.0, -1.0))  # b[1]: the zero of model 2 is not counted


def test_model_scope_matches_streaming_decomposition():
    g = torch.Generator().manual_seed(0)
    names = {"x": (3, 5), "y": (7,), "z": (2, 2, 2)}
    base = {k: torch.randn(s, generator=g) for k, s in names.items()}
    models = [{k: base[k] + torch.randn(s, generator=g) for k, s in names.items()} for _ in range(3)]
    models[1]["y"][2] = base["y"][2]  # some exact zeros
    dens = [0.3, 0.5, 0.7]
    ref = ties_model_scope(base, models, dens, lam=0.8)
    # the engine's way: thresholds over the whole model, sign sums per tensor, merge per tensor
    thresholds = []
    for i, m in enumerate(models):
        a = torch.cat([(m[k].float() - base[k].float()).abs().reshape(-1) for k in names])
        thresholds.append(ties_model_threshold(a, dens[i]))
    total = sum(ties_sign_sum(base[k], [m[k] for m in models], thresholds) for k in names)
    for k in names:
        out = ties_merge_model(base[k], [m[k] for m in models], thresholds, total, lam=0.8)
        _exact(out, ref[k])


def test_model_scope_dtypes_and_validation():
    base = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    models = [{"w": torch.tensor([1.0, -1.0], dtype=torch.bfloat16)}]
    out = ties_model_scope(base, models, 1.0)
    assert out["w"].dtype == torch.bfloat16
    _exact(out["w"], models[0]["w"])
    with pytest.raises(ValueError, match="'dis-mean', 'dis-sum'"):
        ties_model_scope(base, models, 0.5, merge="dis-max")
    with pytest.raises(ValueError, match="missing"):
        ties_model_scope(base, [{"v": torch.zeros(2)}], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ties_model_scope(base, [{"w": torch.zeros(3)}], 0.5)
    with pytest.raises(ValueError, match="fallback_sign"):
        ties_merge_model(torch.zeros(1), [_f(1.0)], [0.0], 0.5)
    assert ties_model_scope({}, [{}], 0.5) == {}
