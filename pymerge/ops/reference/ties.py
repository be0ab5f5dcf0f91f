"""TIES-Merging: trim, elect sign, disjoint merge (specs/methods.md, "ties").

Two forms:
- per tensor (mergekit's, the default): `ties_merge`, built from the trim masks
  `topk_keep_mask` / `threshold_keep_mask_inclusive` and `ties_combine` (steps 2-6, shared
  with dare_ties and breadcrumbs_ties);
- model scope (the TIES paper's code): `ties_model_threshold` (per-model threshold over all
  merged tensors), `ties_sign_sum` (per-tensor part of the whole-model majority sign),
  `ties_merge_model` (the merge pass) and the whole-model oracle `ties_model_scope`.

Every sum over models is sequential in model index order, one fp32 add at a time; the
docstrings give the exact op order the compiled kernels reproduce bit for bit.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from pymerge.ops.reference._common import (
    check_inputs,
    f32,
    finish,
    per_model,
    resolve_out_dtype,
    task_vectors,
)
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, _f32_scalar

CONSENSUS = ("sum", "count")
TRIM_TIES = ("exact", "inclusive")
MODEL_MERGE = ("dis-mean", "dis-sum")


def _check_choice(value, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    return k


def _check_flat_abs(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError(f"{name} must be an fp32 tensor")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x


def topk_keep_mask(tau_abs_flat: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest values; equal values are kept lower flat index first.

    tau_abs_flat: fp32 1-D (|tau|). k <= 0 keeps none, k >= numel keeps all.
    Equivalent: element p is kept iff fewer than k elements q satisfy
    (x_q > x_p) or (x_q == x_p and q < p). -0.0 and +0.0 compare equal.
    """
    x = _check_flat_abs(tau_abs_flat, "tau_abs_flat")
    k = _check_k(k)
    n = x.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    order = torch.sort(x, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[order[:k]] = True
    return mask


def threshold_keep_mask_inclusive(tau_abs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep every value >= the k-th largest value (`trim_ties: inclusive`, the TIES code).

    At least k are kept (more when values tie with the k-th largest). k <= 0 keeps none,
    k >= numel keeps all.
    """
    x = _check_flat_abs(tau_abs, "tau_abs")
    k = _check_k(k)
    n = x.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    # the k-th largest is the (n - k + 1)-th smallest
    kth = torch.kthvalue(x, n - k + 1).values
    return x >= kth


def trim_count(density: float, numel: int) -> int:
    """k = numel if density >= 1; 0 if density <= 0; else min(numel, max(1, int(density * numel))).

    density * numel is a float64 product, truncated toward zero.
    """
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    if numel <= 0 or density <= 0.0:
        return 0
    if density >= 1.0:
        return numel
    return min(numel, max(1, int(density * numel)))


def ties_combine(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights=None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    shape=None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES steps 2-6 on already trimmed / dropped deltas.

    base: theta_0 (any float dtype, numel elements); deltas: fp32 [N, numel] = tau_hat_i.
    w_i = fp32(weights[i]) (None: all 1), L = fp32(lam). Per element, all fp32:
        d_i   = w_i * tau_hat_i                            (step 2)
        S     = ((+0 + d_0) + d_1) + ... + d_{N-1}          consensus "sum"
        S     = sum_i sign(d_i)   (exact small integer)     consensus "count"
        maj   = +1 if S >= 0 else -1                        (step 3; -0.0 >= 0)
        m_i   = sign(d_i) == maj                            (zeros never agree)
        mixed = ((+0 + m_0 d_0) + m_1 d_1) + ...            (step 4; m_i d_i = d_i or +0)
        if normalize:                                       (step 5)
            div   = ((+0 + m_0 w_0) + m_1 w_1) + ...;  div = 1 where div == 0
            mixed = mixed / div                             (a true division)
        out   = f32(theta_0) + mixed * L                    (step 6)
    cast once to out_dtype (default base.dtype), reshaped to shape (default base.shape).
    """
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    if deltas.dim() != 2 or deltas.dtype != torch.float32:
        raise ValueError("deltas must be an fp32 tensor of shape [N, numel]")
    n, numel = deltas.shape
    if n == 0:
        raise ValueError("at least one model tensor is needed")
    if base.numel() != numel:
        raise ValueError(f"base has {base.numel()} elements, deltas have {numel}")
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    lam32 = _f32_scalar(_check_finite_scalar(lam, "lam"), deltas.device)
    shape = base.shape if shape is None else shape
    out_dtype = _check_out_dtype(base.dtype if out_dtype is None else out_dtype)
    dev = deltas.device

    w32 = [_f32_scalar(wi, dev) for wi in w]
    d = [w32[i] * deltas[i] for i in range(n)]
    signs = [torch.sign(di) for di in d]

    if consensus == "sum":
        s = torch.zeros(numel, dtype=torch.float32, device=dev)
        for di in d:
            s = s + di
    else:
        s = torch.zeros(numel, dtype=torch.int64, device=dev)
        for si in signs:
            s = s + si.to(torch.int64)
    majority = torch.where(s >= 0, 1.0, -1.0).to(torch.float32)

    zero = torch.zeros((), dtype=torch.float32, device=dev)
    mixed = torch.zeros(numel, dtype=torch.float32, device=dev)
    div = torch.zeros(numel, dtype=torch.float32, device=dev) if normalize else None
    for i in range(n):
        agree = signs[i] == majority
        mixed = mixed + torch.where(agree, d[i], zero)
        if normalize:
            div = div + torch.where(agree, w32[i], zero)
    if normalize:
        div = torch.where(div == 0, torch.ones((), dtype=torch.float32, device=dev), div)
        mixed = mixed / div
    out = f32(base).reshape(-1) + mixed * lam32
    return finish(out, shape, out_dtype)


def ties_trim(
    tau: torch.Tensor, density: float, trim_ties: str = "exact"
) -> torch.Tensor:
    """tau_hat = tau where kept else +0, k = trim_count(density, numel) on |tau| (fp32 1-D)."""
    trim_ties = _check_choice(trim_ties, TRIM_TIES, "trim_ties")
    k = trim_count(density, tau.numel())
    a = tau.abs()
    keep = topk_keep_mask(a, k) if trim_ties == "exact" else threshold_keep_mask_inclusive(a, k)
    return torch.where(keep, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))


def ties_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights=None,
    densities=1.0,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    trim_ties: str = "exact",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES per tensor (mergekit's form, specs/methods.md "ties", steps 1-6).

    tau_i = f32(theta_i) - f32(theta_0) (fp32). Step 1, per model:
    k_i = trim_count(density_i, numel) (density >= 1 keeps all, <= 0 none, else
    max(1, int(density * numel))); tau_hat_i keeps the k_i largest |tau_i| (trim_ties
    "exact": exactly k_i, lower flat index first among equals; "inclusive": every
    |tau_i| >= the k_i-th largest), +0 elsewhere. Steps 2-6: ties_combine (see there for
    the fp32 op order). weights / densities: a scalar or one value per model.
    Output dtype: out_dtype, default tensors[0].dtype.
    """
    if base is None:
        raise ValueError("ties_merge needs a base tensor")
    tensors = list(tensors)
    check_inputs(tensors, base)
    _check_choice(consensus, CONSENSUS, "consensus")
    _check_choice(trim_ties, TRIM_TIES, "trim_ties")
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    n = len(tensors)
    dens = per_model(densities, n, "densities")
    tau = task_vectors(base, tensors)
    trimmed = torch.stack([ties_trim(tau[i], dens[i], trim_ties) for i in range(n)])
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


# ---------------------------------------------------------------- model scope


def ties_model_threshold(abs_values: torch.Tensor, density: float) -> float:
    """t = the (d - int(d * density))-th smallest of the d values (1-based), as a float.

    abs_values: fp32 |tau| of one model over all merged tensors (any shape, flattened).
    d * density is a float64 product truncated toward zero; k = d - int(d * density) is
    clamped to [1, d]. density >= 1 (or d == 0) gives 0.0, which keeps everything under
    the rule keep |tau| >= t; density <= 0 gives the maximum (the TIES code's k = d).
    """
    if not isinstance(abs_values, torch.Tensor) or abs_values.dtype != torch.float32:
        raise ValueError("abs_values must be an fp32 tensor")
    x = abs_values.reshape(-1)
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    d = x.numel()
    if d == 0 or density >= 1.0:
        return 0.0
    if bool((x < 0).any()):
        raise ValueError("abs_values must be non-negative (pass |tau|)")
    kept = int(d * density) if density > 0.0 else 0
    k = min(d, max(1, d - kept))
    return float(torch.kthvalue(x, k).values)


def _trim_at(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    t = _f32_scalar(threshold, tau.device)
    return torch.where(tau.abs() >= t, tau, torch.zeros((), dtype=torch.float32, device=tau.device))


def check_model_scope_args(base, tensors, thresholds) -> tuple[list[torch.Tensor], list[float]]:
    """Model-scope TIES's input checks (every backend raises the same errors): the inputs
    as a list and the per-model thresholds."""
    if base is None:
        raise ValueError("model-scope TIES needs a base tensor")
    tensors = list(tensors)
    check_inputs(tensors, base)
    th = per_model(thresholds, len(tensors), "thresholds")
    for t in th:
        if not t >= 0.0:
            raise ValueError(f"thresholds must be >= 0, got {t}")
    return tensors, th


def _model_scope_inputs(base, tensors, thresholds):
    tensors, th = check_model_scope_args(base, tensors, thresholds)
    tau = task_vectors(base, tensors)
    return tensors, torch.stack([_trim_at(tau[i], th[i]) for i in range(len(tensors))])


def _sequential_sum(rows: torch.Tensor) -> torch.Tensor:
    s = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    for i in range(rows.shape[0]):
        s = s + rows[i]
    return s


def ties_sign_sum(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds
) -> int:
    """sum_p sign(S_p) over this tensor's elements, an exact integer.

    tau_hat_i = tau_i where |tau_i| >= fp32(t_i) else +0;
    S = ((+0 + tau_hat_0) + tau_hat_1) + ... (fp32, model index order).
    The engine adds these over all tensors of the model; the sign of the total is the
    fallback sign of ties_merge_model.
    """
    _, trimmed = _model_scope_inputs(base, tensors, thresholds)
    s = _sequential_sum(trimmed)
    return int(torch.sign(s).to(torch.int64).sum())


def ties_merge_model(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    thresholds,
    fallback_sign: int,
    *,
    lam: float = 1.0,
    merge: str = "dis-mean",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The merge pass of model-scope TIES (the TIES paper's code), given the thresholds.

    Per element, all fp32 (no weights: the official code applies none before the election):
        tau_hat_i = tau_i if |tau_i| >= fp32(t_i) else +0
        S     = ((+0 + tau_hat_0) + tau_hat_1) + ...
        g     = sign(S); where S == 0: g = sign(fallback_sign)
        a_i   = tau_hat_i > 0 if g > 0 else tau_hat_i < 0   (as the official code: g == 0,
                possible only when the model-wide fallback is 0 too, selects negatives)
        total = ((+0 + a_0 tau_hat_0) + a_1 tau_hat_1) + ...
        merged = total / fp32(max(1, sum_i a_i))   "dis-mean" (count of agreeing nonzeros)
        merged = total                              "dis-sum"
        out   = f32(theta_0) + merged * fp32(lam)
    cast once to out_dtype (default tensors[0].dtype). fallback_sign: any int, its sign is
    used (the model-wide sum of ties_sign_sum may be passed directly).
    """
    merge = _check_choice(merge, MODEL_MERGE, "merge")
    if isinstance(fallback_sign, bool) or not isinstance(fallback_sign, int):
        raise ValueError(f"fallback_sign must be an int, got {type(fallback_sign).__name__}")
    tensors, trimmed = _model_scope_inputs(base, tensors, thresholds)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    lam32 = _f32_scalar(_check_finite_scalar(lam, "lam"), trimmed.device)
    dev = trimmed.device
    fb = (fallback_sign > 0) - (fallback_sign < 0)

    s = _sequential_sum(trimmed)
    g = torch.sign(s)
    g = torch.where(s == 0, torch.tensor(float(fb), dtype=torch.float32, device=dev), g)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    total = torch.zeros(s.shape, dtype=torch.float32, device=dev)
    count = torch.zeros(s.shape, dtype=torch.int64, device=dev)
    for i in range(trimmed.shape[0]):
        th = trimmed[i]
        agree = torch.where(g > 0, th > 0, th < 0)
        total = total + torch.where(agree, th, zero)
        count = count + agree.to(torch.int64)
    if merge == "dis-mean":
        merged = total / count.clamp(min=1).to(torch.float32)
    else:
        merged = total
    out = f32(base).reshape(-1) + merged * lam32
    return finish(out, tensors[0].shape, out_dtype)


def ties_model_scope(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    density,
    *,
    lam: float = 1.0,
    merge: str = "dis-mean",
) -> dict[str, torch.Tensor]:
    """Whole-model TIES oracle: concatenate every tensor of each model and merge in one go.

    For each model i: tau_i = concat over names (base's key order) of flattened
    f32(theta_i) - f32(theta_0); t_i = ties_model_threshold(|tau_i|, density_i);
    fallback = sign(sum_p sign(S_p)) over the whole concatenation; then the
    ties_merge_model rule on the concatenation, split back per name, each cast to its
    dtype in models[0]. density: a scalar or one value per model.
    """
    merge = _check_choice(merge, MODEL_MERGE, "merge")
    models = list(models)
    if not models:
        raise ValueError("at least one model is needed")
    names = list(base.keys())
    for i, m in enumerate(models):
        if set(m.keys()) != set(names):
            missing = sorted(set(names) - set(m.keys()))
            extra = sorted(set(m.keys()) - set(names))
            raise ValueError(f"model {i}: tensor names differ from base (missing {missing}, extra {extra})")
        for name in names:
            if m[name].shape != base[name].shape:
                raise ValueError(
                    f"model {i}, tensor {name!r}: shape {tuple(m[name].shape)} != {tuple(base[name].shape)}"
                )
    dens = per_model(density, len(models), "density")
    if not names:
        return {}
    base_cat = torch.cat([f32(base[name]).reshape(-1) for name in names])
    cats = [torch.cat([f32(m[name]).reshape(-1) for name in names]) for m in models]
    thresholds = [ties_model_threshold((c - base_cat).abs(), dens[i]) for i, c in enumerate(cats)]
    fallback = ties_sign_sum(base_cat, cats, thresholds)
    merged = ties_merge_model(
        base_cat, cats, thresholds, fallback, lam=lam, merge=merge, out_dtype=torch.float32
    )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        numel = base[name].numel()
        out[name] = finish(merged[offset : offset + numel], base[name].shape, models[0][name].dtype)
        offset += numel
    return out
