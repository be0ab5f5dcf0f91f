"""Breadcrumbs oracle: drop the top gamma, keep the next density fraction, combine."""

import pytest
import torch

from pymerge.ops.reference.breadcrumbs import breadcrumbs_counts, breadcrumbs_keep_mask, breadcrumbs_merge


def _f(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "density, gamma, numel, expected",
    [
        (0.5, 0.1, 10, (1, 5)),
        (0.95, 0.1, 10, (1, 9)),  # int(9.5) = 9, room for 1 outlier
        (0.95, 0.2, 10, (1, 9)),  # keep wins: only 1 outlier dropped
        (1.0, 0.1, 10, (0, 10)),  # density 1 keeps everything
        (0.5, 0.6, 10, (5, 5)),
        (0.5, 0.01, 10, (0, 5)),  # int(0.1) = 0
        (0.0, 0.1, 10, (1, 0)),
        (0.5, 0.0, 10, (0, 5)),
        (0.5, 0.1, 0, (0, 0)),
        (0.5, 0.5, 1, (0, 0)),
    ],
)
def test_counts(density, gamma, numel, expected):
    assert breadcrumbs_counts(density, gamma, numel) == expected


def test_keep_mask_with_ties():
    a = _f(5.0, 1.0, 4.0, 4.0, 2.0, 3.0, 0.0, 4.0)
    # ranks: 5(0) 4(2) 4(3) 4(7) 3(5) 2(4) 1(1) 0(6); drop 1, keep the next 4
    assert breadcrumbs_keep_mask(a, 0.5, 0.125).tolist() == [False, False, True, True, False, True, False, True]
    # drop 2, keep 2: equal values keep the lower index first
    assert breadcrumbs_keep_mask(a, 0.25, 0.25).tolist() == [False, False, False, True, False, False, False, True]


def test_merge_linear():
    tau = _f(5.0, -1.0, 4.0, -4.0, 2.0, -3.0, 0.0, 4.0)
    base = torch.full((8,), 2.0)
    out = breadcrumbs_merge(base, [base + tau], densities=0.5, gammas=0.125)
    _exact(out, base + _f(0.0, 0.0, 4.0, -4.0, 0.0, -3.0, 0.0, 4.0))
    out = breadcrumbs_merge(base, [base + tau], [2.0], densities=0.5, gammas=0.125, lam=0.5)
    _exact(out, base + _f(0.0, 0.0, 4.0, -4.0, 0.0, -3.0, 0.0, 4.0))
    # normalize: acc = 2 tau_hat, c = fp32(1 / 2)
    out = breadcrumbs_merge(base, [base + tau], [2.0], densities=0.5, gammas=0.125, normalize=True)
    _exact(out, base + _f(0.0, 0.0, 4.0, -4.0, 0.0, -3.0, 0.0, 4.0))


def test_merge_two_models_linear_and_ties():
    base = torch.zeros(4)
    m1 = _f(10.0, 3.0, -2.0, 1.0)  # drop 10, keep 3, -2
    m2 = _f(-1.0, -2.0, 9.0, 4.0)  # drop 9, keep 4, -2
    kw = dict(densities=0.5, gammas=0.25)
    _exact(breadcrumbs_merge(base, [m1, m2], **kw), _f(0.0, 1.0, -2.0, 4.0))
    # ties: S = [0, 1, -2, 4] -> majority [+, +, -, +]; mixed [0, 3, -2, 4]
    _exact(breadcrumbs_merge(base, [m1, m2], combine="ties", **kw), _f(0.0, 3.0, -2.0, 4.0))
    # per-model gammas / densities
    out = breadcrumbs_merge(base, [m1, m2], densities=[0.25, 0.5], gammas=[0.0, 0.25])
    # m1: keep the top 1 (10); m2: drop 9, keep 4 and -2
    _exact(out, _f(10.0, -2.0, 0.0, 4.0))


def test_density_edges_all_zero_empty_one_element():
    base = _f(1.0, 2.0, 3.0)
    model = _f(4.0, 0.0, 2.0)
    _exact(breadcrumbs_merge(base, [model], densities=1.0, gammas=0.5), model)
    _exact(breadcrumbs_merge(base, [model], densities=0.0), base)
    _exact(breadcrumbs_merge(base, [model], densities=0.0, combine="ties", normalize=True), base)
    _exact(breadcrumbs_merge(base, [base.clone(), base.clone()], densities=0.5, gammas=0.3), base)
    assert breadcrumbs_merge(torch.zeros(0), [torch.zeros(0)]).shape == (0,)
    # one element: int(0.5 * 1) = 0 kept
    _exact(breadcrumbs_merge(torch.tensor(1.0), [torch.tensor(2.0)], densities=0.5), torch.tensor(1.0))


def test_output_dtype():
    base = torch.ones(2, dtype=torch.bfloat16)
    model = torch.tensor([1.5, 1.0], dtype=torch.bfloat16)
    out = breadcrumbs_merge(base, [model], densities=1.0, gammas=0.0)
    assert out.dtype == torch.bfloat16
    _exact(out, model)
    out = breadcrumbs_merge(
        torch.ones(1), [_f(1.0 + 3 * 2**-8)], densities=1.0, gammas=0.0, out_dtype=torch.bfloat16
    )
    _exact(out, torch.tensor([1 + 2**-6], dtype=torch.bfloat16))


def test_validation():
    base = torch.zeros(2)
    with pytest.raises(ValueError, match="'linear', 'ties'"):
        breadcrumbs_merge(base, [base], combine="sum")
    with pytest.raises(ValueError, match="'sum', 'count'"):
        breadcrumbs_merge(base, [base], consensus="x")
    with pytest.raises(ValueError, match="gammas"):
        breadcrumbs_merge(base, [base, base], gammas=[0.1])
    with pytest.raises(ValueError, match="shape"):
        breadcrumbs_merge(base, [torch.zeros(3)])
