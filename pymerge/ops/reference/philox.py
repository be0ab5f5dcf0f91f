"""Counter-based random numbers for DARE: Philox 4x32-10 keyed by (seed, name, model).

Contract (specs/methods.md, "dare_linear, dare_ties"):

- h = FNV-1a 64 of the tensor name's UTF-8 bytes.
- key64 = h XOR (seed * 0x9E3779B97F4A7C15) XOR ((i + 1) * 0xC2B2AE3D27D4EB4F), all mod 2^64,
  for the 0-based model index i; key = (k0, k1) = (low 32 bits, high 32 bits) of key64.
- Element p (flat index) uses the counter (p mod 2^32, p >> 32, 0, 0).
- u_p = (word0 >> 8) * 2^-24, exactly representable in fp32, in [0, 1 - 2^-24].
- Element p is kept when u_p < fp32(density).

Because the counter is the element index, the mask does not depend on tiling, thread
count or backend. All words are held as uint32 values inside int64 tensors (torch has no
general uint32 arithmetic); every intermediate stays below 2^63.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3

SEED_MULT = 0x9E3779B97F4A7C15
INDEX_MULT = 0xC2B2AE3D27D4EB4F

# Philox 4x32 round multipliers and Weyl key increments (Salmon et al., Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash: h = offset; for each byte b: h = (h XOR b) * prime mod 2^64."""
    if isinstance(data, str):
        raise TypeError("fnv1a64 takes bytes; encode the name as UTF-8 first")
    h = FNV64_OFFSET
    for b in bytes(data):
        h = ((h ^ b) * FNV64_PRIME) & MASK64
    return h


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed


def _check_model_index(model_index: int) -> int:
    if isinstance(model_index, bool) or not isinstance(model_index, int):
        raise ValueError(f"model_index must be an int, got {type(model_index).__name__}")
    if model_index < 0:
        raise ValueError(f"model_index must be >= 0, got {model_index}")
    return model_index


def dare_key64(name: str, seed: int, model_index: int) -> int:
    """key64 = fnv1a64(utf8(name)) ^ (seed * 0x9E3779B97F4A7C15) ^ ((i+1) * 0xC2B2AE3D27D4EB4F) mod 2^64."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    seed = _check_seed(seed)
    model_index = _check_model_index(model_index)
    h = fnv1a64(name.encode("utf-8"))
    return (h ^ ((seed * SEED_MULT) & MASK64) ^ (((model_index + 1) * INDEX_MULT) & MASK64)) & MASK64


def dare_key(name: str, seed: int, model_index: int) -> tuple[int, int]:
    """The Philox key (k0, k1) = (key64 & 0xFFFFFFFF, key64 >> 32) of one (tensor, seed, model)."""
    key64 = dare_key64(name, seed, model_index)
    return key64 & MASK32, key64 >> 32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product a * m, a: uint32 values in int64, m: uint32 constant.

    m is split into 16-bit halves so that each partial product is < 2^48 and no int64
    intermediate overflows.
    """
    m_lo = m & 0xFFFF
    m_hi = m >> 16
    p_lo = a * m_lo  # < 2^48
    p_hi = a * m_hi  # < 2^48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def _as_word(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64:
            raise ValueError(f"Philox counter words must be int64 tensors, got {x.dtype}")
        return x
    t = torch.as_tensor(int(x), dtype=torch.int64)
    return t if like is None else t.to(like.device)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox 4x32-10 on uint32 words held in int64 tensors (broadcast together).

    One round, with (hi, lo) = the 64-bit product split in 32-bit halves:
        (hi0, lo0) = M0 * c0; (hi1, lo1) = M1 * c2
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    followed by the key bump k0 += W0, k1 += W1 (mod 2^32) between rounds; 10 rounds.
    Returns the four output words as int64 tensors holding uint32 values.
    """
    for k, kname in ((k0, "k0"), (k1, "k1")):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MASK32:
            raise ValueError(f"{kname} must be an int in [0, 2^32), got {k!r}")
    like = next((c for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    words = [_as_word(c, like) for c in (c0, c1, c2, c3)]
    for w in words:
        # int64 inputs outside uint32 would silently break the 16-bit split
        if w.numel() and (int(w.min()) < 0 or int(w.max()) > MASK32):
            raise ValueError("Philox counter words must hold uint32 values (0 <= c < 2^32)")
    x0, x1, x2, x3 = torch.broadcast_tensors(*words)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(x0, PHILOX_M0)
        hi1, lo1 = _mulhilo(x2, PHILOX_M1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _check_numel(numel: int) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    return numel


def dare_uniform(
    numel: int, *, name: str, seed: int, model_index: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """u_p = (word0 >> 8) * 2^-24 for p = 0..numel-1, as fp32 (exact).

    word0 is the first Philox 4x32-10 output word for counter (p & 0xFFFFFFFF, p >> 32, 0, 0)
    and key dare_key(name, seed, model_index).
    """
    numel = _check_numel(numel)
    k0, k1 = dare_key(name, seed, model_index)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=idx.device)
    w0, _, _, _ = philox4x32_10(idx & MASK32, idx >> 32, zero, zero, k0, k1)
    # 24-bit integers convert to fp32 exactly; scaling by 2^-24 is exact too
    return (w0 >> 8).to(torch.float32) * (2.0**-24)


def dare_keep_mask(
    numel: int,
    *,
    name: str,
    seed: int,
    model_index: int,
    density: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """keep_p = u_p < fp32(density) (see dare_uniform). density >= 1 keeps all, <= 0 none."""
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    u = dare_uniform(numel, name=name, seed=seed, model_index=model_index, device=device)
    return u < torch.tensor(density, dtype=torch.float32, device=u.device)
