"""Model Breadcrumbs: keep ranks [n_top, n_top + n_keep) of |tau_i| descending, then linear or TIES.

Ranks follow the exact top-k order (value descending, lower flat index first
among equals), so the kept set is the top-(n_top + n_keep) set minus the top-n_top
set: two trims per model from one radix selection (histogram.top_k_trims
histograms both thresholds of a model in the same two passes), then
ties._trim_merge_kernel with its dropping trim (DROP) in one more pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import ties
from .histogram import top_k_trims


def merge(
    out: torch.Tensor,
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    n_top: Sequence[int],
    n_keep: Sequence[int],
    weights: torch.Tensor,
    scale: float,
    *,
    combine_ties: bool,
    count_consensus: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """out = base + combine(tau_hat) * scale (flat, contiguous, numel >= 1).

    Model i keeps ranks [n_top[i], n_top[i] + n_keep[i]); n_keep[i] == 0 keeps nothing.
    weights fp32 [N] on the device; scale an fp32 value (c for linear, lam for ties).
    """
    n = len(xs)
    keep = [(i, n_top[i] + n_keep[i] if n_keep[i] > 0 else 0) for i in range(n)]
    drop = [(i, n_top[i] if n_keep[i] > 0 else 0) for i in range(n)]
    trims = top_k_trims(base, xs, keep + drop)
    return ties.trim_merge(
        out,
        base,
        xs,
        trims,
        weights,
        scale,
        drop=True,
        ties=combine_ties,
        count_consensus=count_consensus,
        normalize=normalize,
    )
