"""DARE on the GPU (csrc/cuda/dare.cu): dare_linear / dare_ties and the Philox keep mask.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.dare and reference.philox. The keep masks are regenerated
from (seed, name, model index, element index) in every pass, never stored; the
"l1" rescale takes one extra pass for the exact L1 norms, and its factors stay
on the device (no host round trip).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.cuda._lib import (
    check_models,
    contiguous,
    fp32,
    lib,
    on_device,
    out_tag,
    same_device,
    stream,
    tag,
)
from pymerge.backends._args import check_density, dare_args
from pymerge.ops.reference._common import per_model
from pymerge.ops.reference.philox import _check_model_index, _check_numel, _check_seed

__all__ = ["dare_merge", "dare_keep_mask"]


def _buffers(base: torch.Tensor, tensors: list[torch.Tensor]):
    device = same_device([("base", base)] + [(f"model {i}", t) for i, t in enumerate(tensors)])
    check_models(len(tensors))
    tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = tag(base, "base")
    return device, contiguous(base), [contiguous(t) for t in tensors], base_tag, tags


def l1_factors(base, tensors, *, name: str, seed: int, densities, with_norms: bool = False):
    """Device fp32 [N] rescale factors of the "l1" rule (and, with_norms, the exact fp64 norms [N, 2])."""
    kernels = lib()
    tensors = list(tensors)
    device, base_c, inputs, base_tag, tags = _buffers(base, tensors)
    n = len(tensors)
    dens32 = [fp32(check_density(d)) for d in per_model(densities, n, "densities")]
    hist = torch.zeros((n, 2, kernels.DARE_HIST_BINS), dtype=torch.int64, device=device)
    factors = torch.empty(n, dtype=torch.float32, device=device)
    norms = torch.empty((n, 2), dtype=torch.float64, device=device) if with_norms else None
    with on_device(device):
        kernels.dare_l1_factors([t.data_ptr() for t in inputs], tags, base_c.data_ptr(), base_tag, base_c.numel(),
                                name.encode("utf-8"), _check_seed(seed), dens32, hist.data_ptr(),
                                factors.data_ptr(), norms.data_ptr() if norms is not None else 0, stream(device))
    return (factors, norms) if with_norms else factors


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
    """dare_linear (combine="linear") and dare_ties (combine="ties"); see
    reference.dare.dare_merge.

    tau_hat_i = keep_i ? fp32(tau_i * f_i) : +0 with keep_i the Philox mask of
    (name, seed, i) at fp32(density_i) and f_i the fp32 rescale factor ("l1":
    fp32(n1 / n2) of the exact L1 norms unless either is < 1e-7, computed on the
    device; "inverse_density": fp32(1 / min(density, 1)) when density > 0;
    "none": 1); then linear_combine or the TIES steps 2-6, rounded once to
    out_dtype (default tensors[0].dtype).
    """
    kernels = lib()
    a = dare_args(base, tensors, weights, densities, name=name, seed=seed, lam=lam, normalize=normalize,
                  rescale=rescale, combine=combine, consensus=consensus, out_dtype=out_dtype)
    n = len(a.tensors)
    device, base_c, inputs, base_tag, tags = _buffers(base, a.tensors)
    o_tag = out_tag(a.out_dtype)
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=device)
    if base_c.numel() == 0:
        return out

    factors = [1.0] * n
    dev_factors = None
    if a.rescale == "l1":
        dev_factors = l1_factors(base_c, inputs, name=a.name, seed=a.seed, densities=a.densities32)
    elif a.rescale == "inverse_density":
        factors = a.inverse_density_factors()

    with on_device(device):
        kernels.dare_merge(
            out.data_ptr(), o_tag, [t.data_ptr() for t in inputs], tags, base_c.data_ptr(), base_tag, base_c.numel(),
            a.name.encode("utf-8"), a.seed, a.densities32, factors, dev_factors.data_ptr() if dev_factors is not None else 0,
            a.weights, a.combine_ties, a.scale, a.normalize, a.count_consensus, stream(device),
        )
    return out


def dare_keep_mask(
    numel: int,
    *,
    name: str,
    seed: int,
    model_index: int,
    density: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """keep_p = u_p < fp32(density), u from Philox 4x32-10 keyed by (name, seed,
    model_index), counter = p; see reference.philox.dare_keep_mask. CUDA devices only
    (device None: the current CUDA device)."""
    kernels = lib()
    density = check_density(density)
    numel = _check_numel(numel)
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    seed = _check_seed(seed)
    model_index = _check_model_index(model_index)
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"dare_keep_mask: the cuda backend makes CUDA masks, not {device} ones")
    out = torch.empty(numel, dtype=torch.bool, device=device)
    if numel:
        with on_device(out.device):
            kernels.dare_keep_mask(out.data_ptr(), numel, name.encode("utf-8"), seed, model_index, fp32(density),
                                   stream(out.device))
    return out
