"""DARE (drop and rescale): dare_linear and dare_ties (specs/methods.md, "dare_linear, dare_ties").

Elements are dropped with the counter-based Philox mask of `philox.dare_keep_mask`, so
the result depends only on (seed, tensor name, model index, element index).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype, task_vectors
from pymerge.ops.reference.average import _check_out_dtype, linear_combine
from pymerge.ops.reference.philox import dare_keep_mask
from pymerge.ops.reference.ties import CONSENSUS, _check_choice, ties_combine

RESCALE = ("l1", "inverse_density", "none")
COMBINE = ("linear", "ties")

# norms below this skip the l1 rescale (mergekit's eps)
L1_EPS = 1e-7


def _check_rescale(rescale) -> str:
    # the config's `rescale: true / false` map to l1 / none
    if rescale is True:
        return "l1"
    if rescale is False:
        return "none"
    return _check_choice(rescale, RESCALE, "rescale")


def l1_norm_exact(x: torch.Tensor) -> float:
    """sum_p |x_p| of an fp32 tensor, as the float64 nearest to the exact sum.

    Exact, hence independent of summation order: every finite fp32 |x| is
    mantissa * 2^(e - 150) (e = biased exponent, subnormals e = 1); the integer mantissas
    are summed per exponent in int64 (< 2^24 each, no overflow below 2^39 elements),
    then combined as one rational and rounded once to float64 (nearest-even).
    A kernel may use any fp64 summation instead: its value then differs in the last
    fp64 bits, which the fp32 rounding of the rescale factor almost always absorbs.
    """
    if x.dtype != torch.float32:
        raise ValueError("l1_norm_exact takes an fp32 tensor")
    if x.numel() == 0:
        return 0.0
    bits = x.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    exp = bits >> 23
    if bool((exp == 0xFF).any()):
        return float("nan") if bool(torch.isnan(x).any()) else float("inf")
    frac = bits & 0x7FFFFF
    mant = torch.where(exp > 0, frac | 0x800000, frac)
    exp = torch.where(exp > 0, exp, torch.ones_like(exp))
    sums = torch.zeros(256, dtype=torch.int64, device=x.device).scatter_add_(0, exp, mant)
    total = 0
    for e, m in enumerate(sums.tolist()):
        if m:
            total += m << e  # scaled by 2^150, so every term is an integer
    return float(Fraction(total, 1 << 150))


def dare_drop(
    tau: torch.Tensor,
    *,
    density: float,
    name: str,
    seed: int,
    model_index: int,
    rescale="l1",
) -> torch.Tensor:
    """Drop and rescale one fp32 task vector (1-D): tau_hat_p = keep_p ? fp32(tau_p * f) : +0.

    keep = dare_keep_mask(numel, name, seed, model_index, density).
    f, the factor, is one fp32 number:
      "l1":              n1 = l1_norm_exact(tau), n2 = l1_norm_exact(keep ? tau : 0);
                         f = fp32(n1 / n2) (float64 division, rounded once) unless
                         n1 < 1e-7 or n2 < 1e-7, then no rescale;
      "inverse_density": f = fp32(1 / min(density, 1)) (float64 division); no rescale
                         when density <= 0 (nothing is kept);
      "none":            no rescale.
    "No rescale" means tau_hat_p = keep_p ? tau_p : +0 (same bits as f = 1).
    """
    rescale = _check_rescale(rescale)
    if tau.dtype != torch.float32 or tau.dim() != 1:
        raise ValueError("tau must be a 1-D fp32 tensor")
    density = float(density)
    keep = dare_keep_mask(
        tau.numel(), name=name, seed=seed, model_index=model_index, density=density, device=tau.device
    )
    zero = torch.zeros((), dtype=torch.float32, device=tau.device)
    kept = torch.where(keep, tau, zero)
    factor = None
    if rescale == "l1":
        n1 = l1_norm_exact(tau)
        n2 = l1_norm_exact(kept)
        if n1 >= L1_EPS and n2 >= L1_EPS:
            factor = n1 / n2
    elif rescale == "inverse_density" and density > 0.0:
        factor = 1.0 / min(density, 1.0)
    if factor is None:
        return kept
    f32 = torch.tensor(factor, dtype=torch.float32, device=tau.device)
    return torch.where(keep, tau * f32, zero)


def check_dare_args(base, tensors, name, rescale, combine, consensus, out_dtype):
    """dare_merge's checks, in its order (every backend raises the same errors):
    (tensors as a list, rescale, combine, consensus, out_dtype) resolved."""
    if base is None:
        raise ValueError("dare_merge needs a base tensor")
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    rescale = _check_rescale(rescale)
    combine = _check_choice(combine, COMBINE, "combine")
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    tensors = list(tensors)
    check_inputs(tensors, base)
    return tensors, rescale, combine, consensus, _check_out_dtype(resolve_out_dtype(tensors, out_dtype))


def dare_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights=None,
    densities=1.0,
    *,
    name: str,
    seed: int = 0,
    lam: float = 1.0,
    normalize: bool = False,
    rescale="l1",
    combine: str = "linear",
    consensus: str = "sum",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dare_linear (combine="linear") and dare_ties (combine="ties") for one tensor.

    tau_i = f32(theta_i) - f32(theta_0), flattened; model i (0-based position in tensors)
    is dropped and rescaled by dare_drop(tau_i, density_i, name, seed, i, rescale)
    (rescale: "l1" = the spec's `rescale: true`, "inverse_density", "none"; True/False
    are accepted for "l1"/"none"). Then, on the dropped deltas tau_hat:
      "linear": linear_combine (the weighted_sum-with-base op order:
                acc = sum_i w_i * tau_hat_i sequentially, out = f32(theta_0) + acc * c,
                c = fp32(lam / sum(weights)) if normalize else fp32(lam));
      "ties":   ties_combine (TIES steps 2-6, no magnitude trim; consensus "sum"|"count").
    normalize defaults to False for both (mergekit's dare_ties is a disjoint sum).
    weights / densities: a scalar or one value per model. Output: out_dtype, default
    tensors[0].dtype, one rounding.
    """
    tensors, rescale, combine, consensus, out_dtype = check_dare_args(
        base, tensors, name, rescale, combine, consensus, out_dtype
    )
    n = len(tensors)
    dens = per_model(densities, n, "densities")
    tau = task_vectors(base, tensors)
    dropped = torch.stack(
        [
            dare_drop(tau[i], density=dens[i], name=name, seed=seed, model_index=i, rescale=rescale)
            for i in range(n)
        ]
    )
    if combine == "linear":
        return linear_combine(
            base, dropped, weights, lam=lam, normalize=normalize, shape=tensors[0].shape, out_dtype=out_dtype
        )
    return ties_combine(
        base,
        dropped,
        weights,
        lam=lam,
        normalize=normalize,
        consensus=consensus,
        shape=tensors[0].shape,
        out_dtype=out_dtype,
    )
