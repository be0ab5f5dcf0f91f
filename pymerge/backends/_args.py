"""Argument checks and derived kernel arguments shared by the compiled backends.

The cpu, cuda and triton versions of an op accept exactly what the torch reference
accepts, raise the same errors, and hand their kernels the same derived values: trim
counts, scalars rounded once to fp32, flags. Those are worked out here, once, so that
the backends cannot drift apart; each backend only places the buffers and launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor
from pymerge.ops.reference.breadcrumbs import breadcrumbs_counts, check_breadcrumbs_args
from pymerge.ops.reference.dare import check_dare_args
from pymerge.ops.reference.pcb import _check_ratio, _resolve_lambdas, pcb_clip_indices, pcb_score_index
from pymerge.ops.reference.philox import _check_seed
from pymerge.ops.reference.ties import CONSENSUS, MODEL_MERGE, TRIM_TIES, _check_choice, check_model_scope_args, trim_count


def fp32(x: float) -> float:
    """x rounded once (nearest-even) to fp32, as a Python float.

    The value a kernel then uses is exactly torch.tensor(x, dtype=torch.float32): a
    binding's double -> float conversion, or Triton's, is exact on it.
    """
    return float(torch.tensor(float(x), dtype=torch.float64).to(torch.float32))


def weights32(weights, n: int) -> list[float]:
    """Per-model weights, checked finite, rounded to fp32."""
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    return [fp32(wi) for wi in w]


def _combine_scalars(weights, n: int, lam, normalize, combine: str) -> tuple[list[float], float]:
    """(fp32 weights, fp32 scale) of linear_combine / ties_combine: the scale is c = lam [/ sum(weights)]
    for "linear" (normalize with a zero sum raises), lambda for "ties"."""
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    if combine == "linear":
        scale = scale_factor(w, lam, normalize)
    else:
        scale = fp32(_check_finite_scalar(lam, "lam"))
    return [fp32(wi) for wi in w], scale


class TiesArgs(NamedTuple):
    tensors: list[torch.Tensor]
    out_dtype: torch.dtype
    ks: list[int]  # per model: how many |tau| are kept
    weights: list[float]  # fp32
    lam: float  # fp32
    normalize: bool
    count_consensus: bool
    inclusive: bool


def ties_args(base, tensors, weights, densities, *, lam, normalize, consensus, trim_ties, out_dtype) -> TiesArgs:
    """The checked arguments of ties_merge (reference.ties.ties_merge)."""
    if base is None:
        raise ValueError("ties_merge needs a base tensor")
    tensors = list(tensors)
    check_inputs(tensors, base)
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    trim_ties = _check_choice(trim_ties, TRIM_TIES, "trim_ties")
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    n = len(tensors)
    ks = [trim_count(d, base.numel()) for d in per_model(densities, n, "densities")]
    return TiesArgs(tensors, out_dtype, ks, weights32(weights, n), fp32(_check_finite_scalar(lam, "lam")),
                    bool(normalize), consensus == "count", trim_ties == "inclusive")


class BreadcrumbsArgs(NamedTuple):
    tensors: list[torch.Tensor]
    out_dtype: torch.dtype
    counts: list[tuple[int, int]]  # per model: (n_top dropped, n_keep kept)
    weights: list[float]  # fp32
    scale: float  # fp32: c of the linear combine, lambda of the TIES one
    combine_ties: bool
    normalize: bool
    count_consensus: bool


def breadcrumbs_args(base, tensors, weights, densities, gammas, *, lam, normalize, combine, consensus,
                     out_dtype) -> BreadcrumbsArgs:
    """The checked arguments of breadcrumbs_merge (reference.breadcrumbs.breadcrumbs_merge)."""
    tensors, combine, consensus, out_dtype = check_breadcrumbs_args(base, tensors, combine, consensus, out_dtype)
    n = len(tensors)
    dens = per_model(densities, n, "densities")
    gams = per_model(0.01 if gammas is None else gammas, n, "gammas")
    counts = [breadcrumbs_counts(dens[i], gams[i], base.numel()) for i in range(n)]
    w32, scale = _combine_scalars(weights, n, lam, normalize, combine)
    return BreadcrumbsArgs(tensors, out_dtype, counts, w32, scale, combine == "ties", bool(normalize),
                           consensus == "count")


def check_density(density) -> float:
    """A DARE keep probability as a float (NaN refused; the kernels clamp the rest)."""
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    return density


class DareArgs(NamedTuple):
    tensors: list[torch.Tensor]
    out_dtype: torch.dtype
    name: str
    seed: int
    densities: list[float]  # as given, checked
    densities32: list[float]  # fp32
    rescale: str  # "l1", "inverse_density" or "none"
    weights: list[float]  # fp32
    scale: float  # fp32: c of the linear combine, lambda of the TIES one
    combine_ties: bool
    normalize: bool
    count_consensus: bool

    def inverse_density_factors(self) -> list[float]:
        """fp32(1 / min(density, 1)) per model (1 for density 0): the "inverse_density" rescale."""
        return [fp32(1.0 / min(d, 1.0)) if d > 0.0 else 1.0 for d in self.densities]


def dare_args(base, tensors, weights, densities, *, name, seed, lam, normalize, rescale, combine, consensus,
              out_dtype) -> DareArgs:
    """The checked arguments of dare_merge (reference.dare.dare_merge)."""
    tensors, rescale, combine, consensus, out_dtype = check_dare_args(
        base, tensors, name, rescale, combine, consensus, out_dtype
    )
    n = len(tensors)
    dens = [check_density(d) for d in per_model(densities, n, "densities")]
    seed = _check_seed(seed)
    w32, scale = _combine_scalars(weights, n, lam, normalize, combine)
    return DareArgs(tensors, out_dtype, name, seed, dens, [fp32(d) for d in dens], rescale, w32, scale,
                    combine == "ties", bool(normalize), consensus == "count")


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PcbArgs(NamedTuple):
    out_dtype: torch.dtype
    kernel_dtype: torch.dtype  # what the kernel writes: out_dtype, or fp32 (cast once after) for other dtypes
    lam: float  # fp32
    lambdas: list[float] | None  # fp32, per model; None: lam for every model
    i_lo: int  # pcb_merge only: ranks of the clip quantiles of |tau| ...
    i_hi: int
    k_q: int  # ... and of the score quantile

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel's output in out_dtype (the reference's final .to(out_dtype))."""
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)


def pcb_args(base, n: int, *, lam, lambdas, out_dtype, density=None, clip_ratio=None) -> PcbArgs:
    """The checked arguments of pcb_merge (with density and clip_ratio) or pcb_merge_with_stats
    (reference.pcb), after the input checks."""
    if density is not None:
        _check_ratio(density, "density")
    lambdas = _resolve_lambdas(lam, lambdas, n)
    out_dtype = resolve_out_dtype([base], out_dtype)
    i_lo = i_hi = k_q = 0
    if density is not None:
        i_lo, i_hi = pcb_clip_indices(base.numel(), clip_ratio)
        k_q = pcb_score_index(base.numel(), density)
    return PcbArgs(out_dtype, out_dtype if out_dtype in _KERNEL_DTYPES else torch.float32, fp32(lam),
                   None if lambdas is None else [fp32(x) for x in lambdas], i_lo, i_hi, k_q)


def model_scope_args(base, tensors, thresholds) -> tuple[list[torch.Tensor], list[float]]:
    """The checked inputs and fp32 thresholds of model-scope TIES (ties_sign_sum, ties_merge_model)."""
    tensors, th = check_model_scope_args(base, tensors, thresholds)
    return tensors, [fp32(t) for t in th]


class TiesModelArgs(NamedTuple):
    tensors: list[torch.Tensor]
    thresholds: list[float]  # fp32
    fallback: int  # -1, 0 or +1
    lam: float  # fp32
    dis_mean: bool
    out_dtype: torch.dtype


def ties_model_args(base, tensors, thresholds, fallback_sign, *, lam, merge, out_dtype) -> TiesModelArgs:
    """The checked arguments of ties_merge_model (reference.ties.ties_merge_model)."""
    merge = _check_choice(merge, MODEL_MERGE, "merge")
    if isinstance(fallback_sign, bool) or not isinstance(fallback_sign, int):
        raise ValueError(f"fallback_sign must be an int, got {type(fallback_sign).__name__}")
    tensors, th32 = model_scope_args(base, tensors, thresholds)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    return TiesModelArgs(tensors, th32, (fallback_sign > 0) - (fallback_sign < 0),
                         fp32(_check_finite_scalar(lam, "lam")), merge == "dis-mean", out_dtype)
