"""Torch reference of PCB-Merging (Parameter Competition Balancing).

Steps (specs/methods.md, "pcb"): 1 clip |tau| per model to [lo, hi];
2 intra-balancing; 3 inter-balancing; 4 score beta and its statistics (q, M);
5 merge. Per-tensor scope takes the statistics over one tensor
(`pcb_merge`), model scope over all tensors of a model (`pcb_merge_model`);
`pcb_merge_with_stats` is the merge pass given the statistics.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.ops.reference._common import (
    check_inputs,
    f32,
    finish,
    per_model,
    resolve_out_dtype,
    task_vectors,
)

DEN_MIN = 1e-12


def _check_ratio(value: float, name: str) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} = {value} is not in [0, 1]")
    return value


def _sorted_index(d: int, position: float) -> int:
    """int(position) (truncation of a double), clamped into [0, d - 1]."""
    return min(max(int(position), 0), max(d - 1, 0))


def pcb_clip_indices(d: int, clip_ratio: float) -> tuple[int, int]:
    """0-based sorted positions of (lo, hi): int(d*rho) and int(d*(1-rho)) - 1,
    computed in double with truncation, each clamped into [0, d-1]."""
    rho = _check_ratio(clip_ratio, "clip_ratio")
    i_lo = _sorted_index(d, d * rho)
    i_hi = min(max(int(d * (1.0 - rho)) - 1, 0), max(d - 1, 0))
    return i_lo, i_hi


def pcb_score_index(d: int, density: float) -> int:
    """0-based sorted position of q: int(d*(1-r)) in double, clamped into [0, d-1]."""
    r = _check_ratio(density, "density")
    return _sorted_index(d, d * (1.0 - r))


def _as_f32_vector(x, n: int, name: str, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(x).to(device=device, dtype=torch.float32).reshape(-1)
    if v.numel() != n:
        raise ValueError(f"{name}: {v.numel()} values for {n} models")
    return v


def pcb_clip_bounds(tau_abs: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip bounds (lo [N], hi [N]) fp32 from |tau| [N, d] (sorted or not).

    sorted_i = |tau_i| sorted ascending; lo_i = sorted_i[i_lo], hi_i = sorted_i[i_hi]
    with (i_lo, i_hi) = `pcb_clip_indices(d, clip_ratio)`. d == 0 gives zeros.
    """
    if tau_abs.dim() != 2:
        raise ValueError(f"pcb_clip_bounds: need [N, d], got shape {tuple(tau_abs.shape)}")
    x = f32(tau_abs)
    n, d = x.shape
    i_lo, i_hi = pcb_clip_indices(d, clip_ratio)
    if d == 0:
        return x.new_zeros(n), x.new_zeros(n)
    srt = torch.sort(x, dim=1).values
    return srt[:, i_lo].clone(), srt[:, i_hi].clone()


def _scores_from_tau(tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta, tau_tilde), both fp32 [N, d], from tau fp32 [N, d]; see `pcb_scores`."""
    n = tau.shape[0]
    lo = lo[:, None]
    hi = hi[:, None]
    a = torch.minimum(torch.maximum(tau.abs(), lo), hi)
    tau_tilde = torch.sign(tau) * a
    den = hi - lo
    zero = tau.new_zeros(())
    # hi == lo: normalised value 0 (the authors' code would give NaN)
    nrm = torch.where(den == 0, zero, (a - lo) / den)
    intra = torch.exp(tau.new_tensor(float(n)) * (nrm * nrm - 1.0))
    total = tau.new_zeros(tau.shape[1])
    for j in range(n):
        total = total + tau[j]
    inter = torch.tanh(tau * total)
    return intra * inter, tau_tilde


def pcb_scores(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    lo: torch.Tensor | Sequence[float],
    hi: torch.Tensor | Sequence[float],
) -> torch.Tensor:
    """Scores beta fp32 [N, numel] of one tensor given the clip bounds (steps 1-4).

    tau_i = f32(theta_i) - f32(theta_0), flattened. Per element, fp32, each
    arrow one rounded op (no FMA):
      a_i     = min(max(|tau_i|, lo_i), hi_i)
      nrm_i   = (a_i - lo_i) / (hi_i - lo_i), or +0 where hi_i == lo_i
      intra_i = exp(f32(N) * ((nrm_i * nrm_i) - 1))
      S       = sum_j tau_j, sequentially: S = 0; S = S + tau_j for j = 1..N
      inter_i = tanh(tau_i * S)              (unclipped tau)
      beta_i  = intra_i * inter_i
    exp and tanh are the platform's fp32 functions (not bit-exact across backends).
    """
    check_inputs(tensors, base)
    n = len(tensors)
    tau = task_vectors(base, tensors)
    lo, hi = (_as_f32_vector(v, n, name, tau.device) for v, name in ((lo, "lo"), (hi, "hi")))
    beta, _ = _scores_from_tau(tau, lo, hi)
    return beta


def pcb_score_stats(beta: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N], M [N]) fp32 from beta [N, d]: q_i = sorted(beta_i)[k] (ascending,
    k = `pcb_score_index(d, density)`), M_i = max beta_i. d == 0 gives zeros."""
    if beta.dim() != 2:
        raise ValueError(f"pcb_score_stats: need [N, d], got shape {tuple(beta.shape)}")
    x = f32(beta)
    n, d = x.shape
    k = pcb_score_index(d, density)
    if d == 0:
        return x.new_zeros(n), x.new_zeros(n)
    srt = torch.sort(x, dim=1).values
    return srt[:, k].clone(), srt[:, d - 1].clone()


def _merge_from_tau(
    base: torch.Tensor,
    tau: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    q: torch.Tensor,
    m: torch.Tensor,
    lam: float,
    lambdas: list[float] | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    beta, tau_tilde = _scores_from_tau(tau, lo, hi)
    q = q[:, None]
    m = m[:, None]
    zero = tau.new_zeros(())
    den_s = m - q
    s = torch.where(den_s == 0, zero, torch.clamp_min(beta - q, 0.0) / den_s)
    num = tau.new_zeros(tau.shape[1])
    den = tau.new_zeros(tau.shape[1])
    for i in range(tau.shape[0]):
        w = s[i] if lambdas is None else tau.new_tensor(lambdas[i]) * s[i]
        num = num + w * tau_tilde[i]
        den = den + s[i]
    den = torch.clamp_min(den, tau.new_tensor(DEN_MIN))
    merged = num / den
    if lambdas is None:
        merged = tau.new_tensor(float(lam)) * merged
    out = f32(base).reshape(-1) + merged
    return finish(out, base.shape, out_dtype)


def _resolve_lambdas(lam: float, lambdas, n: int) -> list[float] | None:
    if lambdas is None:
        return None
    if float(lam) != 1.0:
        raise ValueError("pass either lam or lambdas, not both")
    return per_model(lambdas, n, "lambdas")


def pcb_merge_with_stats(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    lo,
    hi,
    q,
    M,
    *,
    lam: float = 1.0,
    lambdas: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor given the statistics lo, hi, q, M (each [N] fp32).

    beta and tau_tilde_i = sign(tau_i) * a_i as in `pcb_scores` (a_i the
    clipped |tau_i|; sign(0) = 0). Per element, fp32, one rounded op per arrow:
      s_i  = max(beta_i - q_i, 0) / (M_i - q_i), or +0 where M_i == q_i
      w_i  = s_i, or with lambdas: f32(lambda_i) * s_i
      num  = 0; num = num + (w_i * tau_tilde_i) for i = 1..N
      den  = 0; den = den + s_i for i = 1..N; den = max(den, f32(1e-12))
      tm   = num / den
      out  = f32(theta_0) + (f32(lam) * tm), or with lambdas: f32(theta_0) + tm
    then one rounding to out_dtype (default base.dtype). lambdas replaces lam
    (passing both is an error).
    """
    check_inputs(tensors, base)
    n = len(tensors)
    lambdas = _resolve_lambdas(lam, lambdas, n)
    out_dtype = resolve_out_dtype([base], out_dtype)
    tau = task_vectors(base, tensors)
    vecs = [_as_f32_vector(v, n, name, tau.device) for v, name in ((lo, "lo"), (hi, "hi"), (q, "q"), (M, "M"))]
    return _merge_from_tau(base, tau, *vecs, lam, lambdas, out_dtype)


def pcb_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    density: float = 0.1,
    clip_ratio: float = 0.01,
    lam: float = 1.0,
    lambdas: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PCB with per-tensor scope: lo, hi = `pcb_clip_bounds(|tau|, clip_ratio)`,
    q, M = `pcb_score_stats(beta, density)` over this tensor, then
    `pcb_merge_with_stats`. density = r (keep ratio), clip_ratio = rho."""
    check_inputs(tensors, base)
    n = len(tensors)
    _check_ratio(density, "density")
    lambdas = _resolve_lambdas(lam, lambdas, n)
    out_dtype = resolve_out_dtype([base], out_dtype)
    tau = task_vectors(base, tensors)
    lo, hi = pcb_clip_bounds(tau.abs(), clip_ratio)
    beta, _ = _scores_from_tau(tau, lo, hi)
    q, m = pcb_score_stats(beta, density)
    return _merge_from_tau(base, tau, lo, hi, q, m, lam, lambdas, out_dtype)


def pcb_merge_model(
    base: dict[str, torch.Tensor],
    models: Sequence[dict[str, torch.Tensor]],
    *,
    density: float = 0.1,
    clip_ratio: float = 0.01,
    lam: float = 1.0,
    lambdas: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """PCB with model scope (the authors' code).

    Every tensor of base is merged; each model must hold it with the same
    shape (fp32/fp16/bf16). Pass 1: lo, hi from |tau_i| of all tensors of
    model i concatenated in base's dict order. Pass 2: q, M from beta (with
    those lo, hi) likewise concatenated. Pass 3: each tensor merged by
    `pcb_merge_with_stats` with these statistics; outputs in base's dtype.
    """
    if len(models) == 0:
        raise ValueError("pcb_merge_model: at least one model is needed")
    n = len(models)
    _check_ratio(density, "density")
    _check_ratio(clip_ratio, "clip_ratio")
    lambdas = _resolve_lambdas(lam, lambdas, n)
    taus: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        ts = []
        for i, m in enumerate(models):
            if name not in m:
                raise ValueError(f"pcb_merge_model: tensor {name!r} missing from model {i}")
            ts.append(m[name])
        try:
            check_inputs(ts, b)
        except ValueError as err:
            raise ValueError(f"pcb_merge_model: tensor {name!r}: {err}") from None
        taus[name] = task_vectors(b, ts)
    dev = next(iter(taus.values())).device if taus else None
    empty = torch.zeros(n, 0, dtype=torch.float32, device=dev)
    all_tau = torch.cat([empty, *taus.values()], dim=1)
    lo, hi = pcb_clip_bounds(all_tau.abs(), clip_ratio)
    all_beta = torch.cat([empty, *(_scores_from_tau(t, lo, hi)[0] for t in taus.values())], dim=1)
    q, m = pcb_score_stats(all_beta, density)
    return {
        name: _merge_from_tau(base[name], tau, lo, hi, q, m, lam, lambdas, base[name].dtype)
        for name, tau in taus.items()
    }
