"""Torch reference of PCB-Merging: worked example, guards, and an fp64 numpy cross-check."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.ops.reference.pcb import (
    pcb_clip_bounds,
    pcb_clip_indices,
    pcb_merge,
    pcb_merge_model,
    pcb_merge_with_stats,
    pcb_score_index,
    pcb_score_stats,
    pcb_scores,
)

F32 = torch.float32

TAU = [
    [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30],
    [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20],
    [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10],
]
WORKED_TM = [0, -0.3, -0.6, 0, -0.4, 0.3, 0, 0, 0.40866, 0]


def _pcb_np(tau: np.ndarray, density: float, rho: float, lambdas=None) -> np.ndarray:
    """The spec's steps in fp64 numpy, statistics over all columns of tau [N, d]."""
    n, d = tau.shape
    srt = np.sort(np.abs(tau), axis=1)
    i_lo = min(max(int(d * rho), 0), d - 1)
    i_hi = min(max(int(d * (1 - rho)) - 1, 0), d - 1)
    lo, hi = srt[:, i_lo:i_lo + 1], srt[:, i_hi:i_hi + 1]
    a = np.minimum(np.maximum(np.abs(tau), lo), hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        nrm = np.where(hi == lo, 0.0, (a - lo) / (hi - lo))
    beta = np.exp(n * (nrm**2 - 1)) * np.tanh(tau * tau.sum(axis=0))
    k = min(max(int(d * (1 - density)), 0), d - 1)
    q = np.sort(beta, axis=1)[:, k:k + 1]
    m = beta.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(m == q, 0.0, np.maximum(beta - q, 0) / (m - q))
    lam = np.ones((n, 1)) if lambdas is None else np.asarray(lambdas, dtype=np.float64)[:, None]
    return (lam * s * np.sign(tau) * a).sum(axis=0) / np.maximum(s.sum(axis=0), 1e-12)


def _worked():
    return torch.zeros(10), [torch.tensor(t) for t in TAU]


def test_worked_example():
    base, ts = _worked()
    out = pcb_merge(base, ts, density=0.3, clip_ratio=0.0)
    torch.testing.assert_close(out, torch.tensor(WORKED_TM), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), torch.from_numpy(_pcb_np(np.array(TAU), 0.3, 0.0)),
                               rtol=0, atol=1e-6)


def test_worked_example_model_scope_over_two_tensors():
    # statistics over the concatenation equal the one-tensor statistics
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
    models = [{"a": torch.tensor(t[:4]), "b": torch.tensor(t[4:]).reshape(2, 3)} for t in TAU]
    out = pcb_merge_model(base, models, density=0.3, clip_ratio=0.0)
    assert list(out) == ["a", "b"] and out["b"].shape == (2, 3)
    merged = torch.cat([out["a"], out["b"].reshape(-1)])
    torch.testing.assert_close(merged, torch.tensor(WORKED_TM), rtol=0, atol=1e-4)


def test_model_scope_differs_from_tensor_scope():
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(30, generator=g), "b": torch.randn(50, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) * (0.1 if k == "a" else 1.0) for k, v in base.items()}
              for _ in range(3)]
    out = pcb_merge_model(base, models, density=0.2, clip_ratio=0.05)
    tau = np.concatenate([np.stack([(m[k].double() - base[k].double()).numpy() for m in models])
                          for k in base], axis=1)
    expected = _pcb_np(tau, 0.2, 0.05)
    got = torch.cat([out["a"] - base["a"], out["b"] - base["b"]]).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    per_tensor = pcb_merge(base["a"], [m["a"] for m in models], density=0.2, clip_ratio=0.05)
    assert not torch.allclose(per_tensor, out["a"])


def test_clip_indices_truncate_in_double():
    assert pcb_clip_indices(10, 0.0) == (0, 9)
    assert pcb_clip_indices(10, 0.1) == (1, 8)
    assert pcb_clip_indices(10, 0.15) == (1, 7)  # int(1.5), int(8.5) - 1
    assert pcb_clip_indices(100, 0.29)[0] == 28  # 100 * 0.29 = 28.999999999999996 in double
    assert pcb_clip_indices(1, 0.4) == (0, 0)  # int(0.6) - 1 = -1 clamps to 0
    assert pcb_clip_indices(0, 0.01) == (0, 0)
    assert pcb_score_index(10, 0.3) == 7
    assert pcb_score_index(10, 0.0) == 9  # int(10) clamps to d - 1
    assert pcb_score_index(10, 1.0) == 0


def test_clip_bounds_hand():
    tau_abs = torch.tensor(TAU).abs()
    lo, hi = pcb_clip_bounds(tau_abs, 0.1)
    # sorted |tau_i|, positions 1 and 8: 0 .01 .02 .05 .1 .2 .3 .3 .4 .5 /
    # 0 .02 .03 .1 .1 .2 .2 .3 .3 .4 / 0 0 .05 .1 .1 .1 .2 .2 .3 .6
    torch.testing.assert_close(lo, torch.tensor([0.01, 0.02, 0.0]))
    torch.testing.assert_close(hi, torch.tensor([0.4, 0.3, 0.3]))
    lo, hi = pcb_clip_bounds(tau_abs, 0.0)
    assert lo.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(hi, torch.tensor([0.5, 0.4, 0.6]))
    lo, hi = pcb_clip_bounds(torch.zeros(2, 0), 0.1)
    assert lo.tolist() == hi.tolist() == [0.0, 0.0]


def test_score_stats_hand():
    beta = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0], [0.0, -1.0, 0.5, 0.5, 0.25]])
    q, m = pcb_score_stats(beta, 0.4)  # k = int(5 * 0.6) = 3
    assert q.tolist() == [4.0, 0.5] and m.tolist() == [5.0, 0.5]
    q, _ = pcb_score_stats(beta, 1.0)
    assert q.tolist() == [1.0, -1.0]
    q, _ = pcb_score_stats(beta, 0.0)
    assert q.tolist() == [5.0, 0.5]


def test_scores_match_formula_and_use_unclipped_tau():
    base, ts = _worked()
    tau = np.array(TAU)
    lo, hi = pcb_clip_bounds(torch.tensor(TAU).abs(), 0.1)
    beta = pcb_scores(base, ts, lo, hi)
    lo_n, hi_n = lo.double().numpy()[:, None], hi.double().numpy()[:, None]
    a = np.clip(np.abs(tau), lo_n, hi_n)
    expected = np.exp(3 * (((a - lo_n) / (hi_n - lo_n)) ** 2 - 1)) * np.tanh(tau * tau.sum(axis=0))
    np.testing.assert_allclose(beta.double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_single_model_keeps_top_scores():
    # one model: beta grows with |tau|, so only the largest survives r = 0.4 (q = 4th smallest)
    base = torch.ones(5)
    tau = [0.125, -0.25, 0.375, -0.5, 0.625]
    model = base + torch.tensor(tau)
    assert pcb_merge(base, [model], density=0.4, clip_ratio=0.0).tolist() == [1, 1, 1, 1, 1.625]
    assert pcb_merge(base, [model], density=0.4, clip_ratio=0.0, lam=2.0).tolist() == [1, 1, 1, 1, 2.25]
    assert pcb_merge(base, [model], density=0.4, clip_ratio=0.0, lambdas=[2.0]).tolist() == [1, 1, 1, 1, 2.25]
    # density 0: q = M, all scores 0, the merge adds nothing
    assert torch.equal(pcb_merge(base, [model], density=0.0, clip_ratio=0.0), base)


def test_lambdas_per_model():
    base, ts = _worked()
    lambdas = [0.5, 2.0, 1.5]
    out = pcb_merge(base, ts, density=0.5, clip_ratio=0.1, lambdas=lambdas)
    expected = _pcb_np(np.array(TAU), 0.5, 0.1, lambdas)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        pcb_merge(base, ts, lam=2.0, lambdas=lambdas)
    with pytest.raises(ValueError):
        pcb_merge(base, ts, lambdas=[1.0, 2.0])


def test_equal_clip_bounds_guard():
    # model 1's |tau| is constant: hi == lo, normalised value 0, no NaN
    base = torch.zeros(4)
    ts = [torch.tensor([0.5, -0.5, 0.5, -0.5]), torch.tensor([0.1, 0.2, -0.3, 0.4])]
    lo, hi = pcb_clip_bounds(torch.stack(ts).abs(), 0.0)
    beta = pcb_scores(base, ts, lo, hi)
    s = ts[0] + ts[1]
    expected_1 = torch.exp(torch.tensor(-2.0)) * torch.tanh(ts[0] * s)  # exp(N * (0 - 1))
    torch.testing.assert_close(beta[0], expected_1, rtol=1e-6, atol=0)
    out = pcb_merge(base, ts, density=0.5, clip_ratio=0.0)
    assert torch.isfinite(out).all()
    expected = _pcb_np(torch.stack(ts).double().numpy(), 0.5, 0.0)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)


def test_merge_with_stats_equals_per_tensor():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 8, generator=g)
    ts = [base + torch.randn(8, 8, generator=g) for _ in range(3)]
    tau = torch.stack([(t - base).reshape(-1) for t in ts])
    lo, hi = pcb_clip_bounds(tau.abs(), 0.02)
    q, m = pcb_score_stats(pcb_scores(base, ts, lo, hi), 0.25)
    out = pcb_merge_with_stats(base, ts, lo, hi, q, m, lam=0.5)
    assert out.shape == (8, 8)
    assert torch.equal(out, pcb_merge(base, ts, density=0.25, clip_ratio=0.02, lam=0.5))
    expected = base.double().numpy().reshape(-1) + 0.5 * _pcb_np(tau.double().numpy(), 0.25, 0.02)
    np.testing.assert_allclose(out.double().numpy().reshape(-1), expected, rtol=0, atol=1e-5)


def test_dtypes_and_rounding():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, generator=g).to(torch.bfloat16)
    ts = [torch.randn(64, generator=g).to(torch.float16), torch.randn(64, generator=g)]
    out = pcb_merge(base, ts, density=0.3)
    assert out.dtype == torch.bfloat16
    out32 = pcb_merge(base, ts, density=0.3, out_dtype=F32)
    assert out32.dtype == F32 and torch.equal(out32.to(torch.bfloat16), out)
    tau = torch.stack([t.float() - base.float() for t in ts]).double().numpy()
    expected = base.double().numpy() + _pcb_np(tau, 0.3, 0.01)
    np.testing.assert_allclose(out32.double().numpy(), expected, rtol=0, atol=1e-5)
    merged = pcb_merge_model({"w": base}, [{"w": ts[0]}, {"w": ts[1]}], density=0.3)
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"], out)


def test_empty_and_one_element():
    out = pcb_merge(torch.zeros(0), [torch.zeros(0), torch.zeros(0)])
    assert out.shape == (0,)
    # one element: hi == lo and q == M, nothing survives
    base = torch.tensor([2.0])
    assert pcb_merge(base, [torch.tensor([3.0]), torch.tensor([5.0])]).tolist() == [2.0]
    base_d = {"e": torch.zeros(0, 4), "w": torch.zeros(10)}
    models = [{"e": torch.zeros(0, 4), "w": torch.tensor(t)} for t in TAU]
    out = pcb_merge_model(base_d, models, density=0.3, clip_ratio=0.0)
    assert out["e"].shape == (0, 4)
    torch.testing.assert_close(out["w"], torch.tensor(WORKED_TM), rtol=0, atol=1e-4)


def test_errors():
    base, ts = _worked()
    with pytest.raises(ValueError):
        pcb_merge(base, ts, density=1.5)
    with pytest.raises(ValueError):
        pcb_merge(base, ts, clip_ratio=-0.1)
    with pytest.raises(ValueError):
        pcb_merge(base, [torch.zeros(9)])
    with pytest.raises(ValueError):
        pcb_merge_with_stats(base, ts, [0.0] * 2, [1.0] * 3, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError):
        pcb_merge_model({"w": base}, [{"v": base}])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 40), st.floats(0.05, 1.0), st.sampled_from([0.0, 0.01, 0.1]),
       st.integers(0, 2**31 - 1))
def test_matches_numpy_fp64(n, d, density, rho, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    # small deltas keep tanh away from saturation, where fp32 ties (M == q) would not be ties in fp64
    ts = [base + 0.3 * torch.randn(d, generator=g) for _ in range(n)]
    out = pcb_merge(base, ts, density=density, clip_ratio=rho, out_dtype=F32)
    tau = torch.stack([t - base for t in ts]).double().numpy()
    expected = base.double().numpy() + _pcb_np(tau, density, rho)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=5e-5)
