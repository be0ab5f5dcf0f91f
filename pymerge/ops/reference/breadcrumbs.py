"""Model Breadcrumbs: drop the largest outliers and the smallest values of each task vector.

specs/methods.md, "breadcrumbs, breadcrumbs_ties".
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype, task_vectors
from pymerge.ops.reference.average import _check_out_dtype, linear_combine
from pymerge.ops.reference.dare import COMBINE
from pymerge.ops.reference.ties import CONSENSUS, _check_choice, ties_combine


def breadcrumbs_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(n_top, n_keep): how many of the largest |tau| to drop, how many of the next to keep.

    n_keep = clamp(int(density * numel), 0, numel) (numel when density >= 1);
    n_top  = clamp(int(gamma * numel), 0, numel - n_keep).
    Products are float64, truncated toward zero. When density + gamma exceed 1 the kept
    count wins and fewer outliers are dropped (mergekit's rule); density >= 1 keeps all.
    """
    density = float(density)
    gamma = float(gamma)
    if density != density or gamma != gamma:
        raise ValueError("density and gamma must not be NaN")
    if numel <= 0:
        return 0, 0
    if density >= 1.0:
        n_keep = numel
    elif density <= 0.0:
        n_keep = 0
    else:
        n_keep = min(numel, int(density * numel))
    n_top = 0 if gamma <= 0.0 else min(numel - n_keep, int(min(gamma, 1.0) * numel))
    return n_top, n_keep


def breadcrumbs_keep_mask(tau_abs_flat: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Rank |tau| descending (equal values: lower flat index first); with
    (n_top, n_keep) = breadcrumbs_counts(...), keep ranks n_top .. n_top + n_keep - 1."""
    x = tau_abs_flat
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError("tau_abs_flat must be a 1-D fp32 tensor")
    n = x.numel()
    n_top, n_keep = breadcrumbs_counts(density, gamma, n)
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    if n_keep == 0:
        return mask
    order = torch.sort(x, descending=True, stable=True).indices
    mask[order[n_top : n_top + n_keep]] = True
    return mask


def check_breadcrumbs_args(base, tensors, combine, consensus, out_dtype):
    """breadcrumbs_merge's checks, in its order (every backend raises the same errors):
    (tensors as a list, combine, consensus, out_dtype) resolved."""
    if base is None:
        raise ValueError("breadcrumbs_merge needs a base tensor")
    combine = _check_choice(combine, COMBINE, "combine")
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    tensors = list(tensors)
    check_inputs(tensors, base)
    return tensors, combine, consensus, _check_out_dtype(resolve_out_dtype(tensors, out_dtype))


def breadcrumbs_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights=None,
    densities=1.0,
    gammas=0.01,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    combine: str = "linear",
    consensus: str = "sum",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """breadcrumbs (combine="linear") and breadcrumbs_ties (combine="ties") for one tensor.

    tau_i = f32(theta_i) - f32(theta_0), flattened; tau_hat_i = tau_i where
    breadcrumbs_keep_mask(|tau_i|, density_i, gamma_i) else +0 (no rescale). Then
      "linear": linear_combine (acc = sum_i w_i * tau_hat_i sequentially in fp32,
                out = f32(theta_0) + acc * c, c = fp32(lam / sum(weights)) if normalize
                else fp32(lam));
      "ties":   ties_combine (TIES steps 2-6; consensus "sum" | "count").
    weights / densities / gammas: a scalar or one value per model. Output: out_dtype,
    default tensors[0].dtype, one rounding.
    """
    tensors, combine, consensus, out_dtype = check_breadcrumbs_args(base, tensors, combine, consensus, out_dtype)
    n = len(tensors)
    dens = per_model(densities, n, "densities")
    gams = per_model(0.01 if gammas is None else gammas, n, "gammas")
    tau = task_vectors(base, tensors)
    zero = torch.zeros((), dtype=torch.float32, device=tau.device)
    trimmed = torch.stack(
        [torch.where(breadcrumbs_keep_mask(tau[i].abs(), dens[i], gams[i]), tau[i], zero) for i in range(n)]
    )
    if combine == "linear":
        return linear_combine(
            base, trimmed, weights, lam=lam, normalize=normalize, shape=tensors[0].shape, out_dtype=out_dtype
        )
    return ties_combine(
        base,
        trimmed,
        weights,
        lam=lam,
        normalize=normalize,
        consensus=consensus,
        shape=tensors[0].shape,
        out_dtype=out_dtype,
    )
