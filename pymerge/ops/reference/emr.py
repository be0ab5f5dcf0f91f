"""Torch reference of EMR-Merging: elect, bit-packed masks, rescalers, reconstruction."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from pymerge.ops.reference._common import (
    FLOAT_DTYPES,
    check_inputs,
    f32,
    finish,
    resolve_out_dtype,
    task_vectors,
)

ZERO_SIGNS = ("neg", "zero")
RESCALE_SCOPES = ("tensor_mean_sum", "model")


def n_words(n: int) -> int:
    """Number of 32-bit words holding n bits."""
    return (n + 31) // 32


def check_pack_bits(mask: torch.Tensor) -> tuple[int, torch.Size]:
    """pack_bits' checks (every backend raises the same errors): (n, leading shape)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_bits: mask dtype {mask.dtype} is not bool")
    if mask.dim() == 0:
        raise ValueError("pack_bits: mask must have at least one axis")
    return mask.shape[-1], mask.shape[:-1]


def check_unpack_bits(words: torch.Tensor, n: int) -> tuple[int, torch.Size]:
    """unpack_bits' checks (every backend raises the same errors): (n as an int, leading shape)."""
    if words.dtype != torch.int32:
        raise ValueError(f"unpack_bits: words dtype {words.dtype} is not int32")
    n = int(n)
    if n < 0:
        raise ValueError(f"unpack_bits: n = {n} < 0")
    if words.dim() == 0 or words.shape[-1] != n_words(n):
        raise ValueError(f"unpack_bits: need {n_words(n)} words on the last axis for n = {n}, "
                         f"got shape {tuple(words.shape)}")
    return n, words.shape[:-1]


def check_reconstruct_shapes(base: torch.Tensor, u: torch.Tensor, mask_words: torch.Tensor) -> int:
    """emr_reconstruct's shape checks (every backend raises the same errors): numel."""
    if u.shape != base.shape:
        raise ValueError(f"emr_reconstruct: u shape {tuple(u.shape)} != base shape {tuple(base.shape)}")
    numel = base.numel()
    if mask_words.dtype != torch.int32 or mask_words.dim() != 1 or mask_words.shape[0] != n_words(numel):
        raise ValueError(f"emr_reconstruct: mask_words must be int32 [{n_words(numel)}], "
                         f"got {mask_words.dtype} {tuple(mask_words.shape)}")
    return numel


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask [..., n] into int32 words [..., ceil(n/32)].

    Element 32*w + j of the last axis is bit j (value 2**j) of word w; the
    last word is zero-padded. Words hold the uint32 bit pattern in int32
    storage (bit 31 set reads as a negative int32).
    """
    n, lead = check_pack_bits(mask)
    w = n_words(n)
    dev = mask.device
    padded = torch.zeros(*lead, w * 32, dtype=torch.int64, device=dev)
    padded[..., :n] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=dev), torch.arange(32, device=dev))
    words = (padded.reshape(*lead, w, 32) * weights).sum(dim=-1)
    # uint32 pattern -> int32 with the same bits
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 words [..., ceil(n/32)] -> bool [..., n]."""
    n, lead = check_unpack_bits(words, n)
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    bits = torch.bitwise_right_shift(w64[..., None], torch.arange(32, device=words.device)) & 1
    return bits.reshape(*lead, n_words(n) * 32)[..., :n].to(torch.bool)


class EmrElect(NamedTuple):
    """Result of `emr_elect` for one tensor."""

    u: torch.Tensor  # unified task vector, shape of base, out_dtype
    masks: torch.Tensor  # int32 [N, ceil(numel/32)], one bit-plane per model
    abs_tau_sum: torch.Tensor  # float64 [N]: sum |tau_i|
    abs_masked_u_sum: torch.Tensor  # float64 [N]: sum |M_i * u| (fp32 u)
    numel: int


def _check_zero_sign(zero_sign: str) -> None:
    if zero_sign not in ZERO_SIGNS:
        raise ValueError(f"zero_sign must be one of {ZERO_SIGNS}, got {zero_sign!r}")


def _elect32(tau: torch.Tensor, zero_sign: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(u fp32 [d], agree bool [N, d]) from tau fp32 [N, d]."""
    s = tau.new_zeros(tau.shape[1])
    for i in range(tau.shape[0]):
        s = s + tau[i]
    pos, neg, zero = (tau.new_tensor(v) for v in (1.0, -1.0, 0.0))
    if zero_sign == "neg":
        g = torch.where(s > 0, pos, neg)
    else:
        g = torch.where(s > 0, pos, torch.where(s < 0, neg, zero))
    agree = (g * tau) > 0
    e = torch.where(agree, tau.abs(), zero).amax(dim=0)
    # g = -1 with no agreeing model gives u = -0, as the authors' code does
    u = g * e
    return u, agree


def emr_elect(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    zero_sign: str = "neg",
    out_dtype: torch.dtype | None = None,
) -> EmrElect:
    """Elect the unified task vector u and the per-model masks of one tensor.

    tau_i = f32(theta_i) - f32(theta_0), flattened (fp32). Per element p:
      1. s = sum_i tau_i,p in fp32, sequentially: s = 0; s = s + tau_i for i = 1..N.
      2. g = +1 if s > 0 else -1 (zero_sign "neg", the authors' code);
         with zero_sign "zero" (the paper): g = +1 if s > 0, -1 if s < 0, 0 if s == 0.
      3. a_i = [g * tau_i,p > 0] (strict: a zero never agrees; g = 0 -> all false).
      4. e = max over i with a_i of |tau_i,p| (+0 if none); u = g * e in fp32
         (so g = -1 with no agreeing model gives u = -0).
    Outputs: u rounded once to out_dtype (default base.dtype); masks = pack_bits(a)
    as int32 [N, ceil(numel/32)]; abs_tau_sum[i] = sum_p |tau_i,p| and
    abs_masked_u_sum[i] = sum_p a_i,p * |u_p| (fp32 u before rounding), both
    fp64 sums of the exactly upcast fp32 values.
    """
    check_inputs(tensors, base)
    _check_zero_sign(zero_sign)
    out_dtype = resolve_out_dtype([base], out_dtype)
    tau = task_vectors(base, tensors)
    u, agree = _elect32(tau, zero_sign)
    abs_tau_sum = tau.abs().to(torch.float64).sum(dim=1)
    zero64 = torch.zeros((), dtype=torch.float64, device=tau.device)
    abs_masked_u_sum = torch.where(agree, u.abs().to(torch.float64), zero64).sum(dim=1)
    return EmrElect(
        u=finish(u, base.shape, out_dtype),
        masks=pack_bits(agree),
        abs_tau_sum=abs_tau_sum,
        abs_masked_u_sum=abs_masked_u_sum,
        numel=base.numel(),
    )


def emr_rescalers(
    abs_tau_sums: Sequence[Sequence[float]] | torch.Tensor,
    abs_masked_u_sums: Sequence[Sequence[float]] | torch.Tensor,
    numels: Sequence[int],
    *,
    scope: str = "tensor_mean_sum",
) -> list[float]:
    """Rescalers lambda_i from per-tensor statistics.

    abs_tau_sums[n][i] = sum |tau_i| over tensor n, abs_masked_u_sums[n][i] =
    sum |M_i * u| over tensor n (as returned by `emr_elect`), numels[n] = its
    element count. Tensors with numel 0 are skipped. All arithmetic in fp64
    (Python floats), sums sequential in tensor order:
      scope "tensor_mean_sum": lambda_i = sum_n (S_tau[n][i] / numel_n) / sum_n (S_u[n][i] / numel_n)
      scope "model":           lambda_i = sum_n S_tau[n][i] / sum_n S_u[n][i]
    A zero denominator (model i agrees nowhere, or no tensor) gives lambda_i = 1.
    """
    if scope not in RESCALE_SCOPES:
        raise ValueError(f"rescale scope must be one of {RESCALE_SCOPES}, got {scope!r}")
    t_rows = [[float(v) for v in row] for row in abs_tau_sums]
    u_rows = [[float(v) for v in row] for row in abs_masked_u_sums]
    numels = [int(n) for n in numels]
    if not (len(t_rows) == len(u_rows) == len(numels)):
        raise ValueError(f"emr_rescalers: {len(t_rows)}, {len(u_rows)} and {len(numels)} tensors differ")
    n_models = len(t_rows[0]) if t_rows else 0
    for n, (tr, ur) in enumerate(zip(t_rows, u_rows)):
        if len(tr) != n_models or len(ur) != n_models:
            raise ValueError(f"emr_rescalers: tensor {n} has {len(tr)}/{len(ur)} values for {n_models} models")
    num = [0.0] * n_models
    den = [0.0] * n_models
    for tr, ur, numel in zip(t_rows, u_rows, numels):
        if numel == 0:
            continue
        for i in range(n_models):
            if scope == "tensor_mean_sum":
                num[i] += tr[i] / numel
                den[i] += ur[i] / numel
            else:
                num[i] += tr[i]
                den[i] += ur[i]
    return [nu / de if de != 0.0 else 1.0 for nu, de in zip(num, den)]


def emr_reconstruct(
    base: torch.Tensor,
    u: torch.Tensor,
    mask_words: torch.Tensor,
    lam: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Task reconstruction theta_hat = theta_0 + lam * M ⊙ u, in one pass.

    mask_words: one model's bit-plane, int32 [ceil(numel/32)] (`pack_bits` layout).
    Per element, in fp32 (two rounded ops, no FMA):
      out = f32(theta_0) + (M ? (f32(lam) * f32(u)) : +0)
    where f32(lam) is lam rounded to fp32 (RNE); one rounding to out_dtype
    (default base.dtype).
    """
    if base.dtype not in FLOAT_DTYPES or u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"emr_reconstruct: dtypes {base.dtype}, {u.dtype} must be fp32, fp16 or bf16")
    numel = check_reconstruct_shapes(base, u, mask_words)
    out_dtype = base.dtype if out_dtype is None else out_dtype
    mask = unpack_bits(mask_words, numel)
    u32 = f32(u).reshape(-1)
    lam32 = u32.new_tensor(float(lam))
    delta = torch.where(mask.to(u32.device), lam32 * u32, u32.new_zeros(()))
    out = f32(base).reshape(-1) + delta
    return finish(out, base.shape, out_dtype)


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype in FLOAT_DTYPES


def emr_merge_model(
    base: dict[str, torch.Tensor],
    models: Sequence[dict[str, torch.Tensor]],
    *,
    zero_sign: str = "neg",
    rescale_scope: str = "tensor_mean_sum",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """Whole-model EMR: (u per tensor, masks per tensor, lambdas).

    Tensors are visited in base's dict order. A tensor is merged when base's
    and every model's tensor are fp32/fp16/bf16 of the same shape; others
    (non-float, task heads whose shapes differ) are left out of all outputs.
    A name missing from a model is an error. u has base's dtype; masks are
    int32 [N, ceil(numel/32)]; lambdas = `emr_rescalers` over the merged
    tensors in that order.
    """
    if len(models) == 0:
        raise ValueError("emr_merge_model: at least one model is needed")
    _check_zero_sign(zero_sign)
    if rescale_scope not in RESCALE_SCOPES:
        raise ValueError(f"rescale_scope must be one of {RESCALE_SCOPES}, got {rescale_scope!r}")
    u_out: dict[str, torch.Tensor] = {}
    masks_out: dict[str, torch.Tensor] = {}
    s_tau, s_u, numels = [], [], []
    for name, b in base.items():
        for i, m in enumerate(models):
            if name not in m:
                raise ValueError(f"emr_merge_model: tensor {name!r} missing from model {i}")
        ts = [m[name] for m in models]
        if not _is_float(b) or any(not _is_float(t) or t.shape != b.shape for t in ts):
            continue
        r = emr_elect(b, ts, zero_sign=zero_sign)
        u_out[name] = r.u
        masks_out[name] = r.masks
        s_tau.append(r.abs_tau_sum.tolist())
        s_u.append(r.abs_masked_u_sum.tolist())
        numels.append(r.numel)
    if not s_tau:
        return u_out, masks_out, [1.0] * len(models)
    return u_out, masks_out, emr_rescalers(s_tau, s_u, numels, scope=rescale_scope)
