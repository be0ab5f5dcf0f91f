"""Model Breadcrumbs on the CPU (csrc/cpu/breadcrumbs.cpp): breadcrumbs and breadcrumbs_ties.

Same signature, argument checks and results (bit for bit) as
pymerge.ops.reference.breadcrumbs.breadcrumbs_merge.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import breadcrumbs_args
from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, lib
from pymerge.backends.cpu._sparse import buffers

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
    a = breadcrumbs_args(base, tensors, weights, densities, gammas, lam=lam, normalize=normalize, combine=combine,
                         consensus=consensus, out_dtype=out_dtype)
    bufs = buffers(base, a.tensors)
    out = empty(a.tensors[0].shape, dtype=a.out_dtype)
    if out.numel() == 0:
        return out
    kernels.breadcrumbs_merge(
        out.data_ptr(),
        DTYPE_TAGS[a.out_dtype],
        *bufs.args(),
        [c[0] for c in a.counts],
        [c[1] for c in a.counts],
        a.weights,
        a.combine_ties,
        a.scale,
        a.normalize,
        a.count_consensus,
    )
    return out
