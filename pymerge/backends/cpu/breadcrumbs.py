"""Model Breadcrumbs on the CPU (csrc/cpu/breadcrumbs.cpp): breadcrumbs and breadcrumbs_ties.

Same signature, argument checks and results (bit for bit) as
pymerge.ops.reference.breadcrumbs.breadcrumbs_merge.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, fp32, lib
from pymerge.backends.cpu._sparse import buffers
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor
from pymerge.ops.reference.breadcrumbs import breadcrumbs_counts
from pymerge.ops.reference.dare import COMBINE
from pymerge.ops.reference.ties import CONSENSUS, _check_choice

__all__ = ["breadcrumbs_merge"]


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
    """breadcrumbs (combine="linear") / breadcrumbs_ties (combine="ties"); see
    reference.breadcrumbs.breadcrumbs_merge.

    Per model, with (n_top, n_keep) = breadcrumbs_counts(density_i, gamma_i, numel), keep
    ranks n_top .. n_top + n_keep - 1 of |tau_i| descending (equal values: lower flat
    index first); then linear_combine or the TIES steps 2-6, one rounding to out_dtype.
    """
    kernels = lib()
    if base is None:
        raise ValueError("breadcrumbs_merge needs a base tensor")
    combine = _check_choice(combine, COMBINE, "combine")
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    tensors = list(tensors)
    check_inputs(tensors, base)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    n = len(tensors)
    dens = per_model(densities, n, "densities")
    gams = per_model(0.01 if gammas is None else gammas, n, "gammas")
    numel = base.numel()
    counts = [breadcrumbs_counts(dens[i], gams[i], numel) for i in range(n)]
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    if combine == "linear":
        scale = scale_factor(w, lam, normalize)  # fp32 c; raises for normalize with sum 0
    else:
        scale = fp32(_check_finite_scalar(lam, "lam"))
    bufs = buffers(base, tensors)
    out = empty(tensors[0].shape, dtype=out_dtype)
    if numel == 0:
        return out
    kernels.breadcrumbs_merge(
        out.data_ptr(),
        DTYPE_TAGS[out_dtype],
        *bufs.args(),
        [c[0] for c in counts],
        [c[1] for c in counts],
        [fp32(wi) for wi in w],
        combine == "ties",
        scale,
        bool(normalize),
        consensus == "count",
    )
    return out
