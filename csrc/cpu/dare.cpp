// DARE: drop and rescale (specs/methods.md, "dare_linear, dare_ties"; torch
// reference pymerge/ops/reference/dare.py, philox.py).
//
// keep_{i,p} = u < fp32(density_i), u from Philox 4x32-10 keyed by (name, seed, i)
// with the flat index p as counter (common/philox.h). The "l1" norm pass stores
// the masks bit-packed (1 bit per element and model) for the merge pass, which
// otherwise regenerates them. Per model, tau_hat = keep ? fp32(tau * f_i) : +0,
// with f_i = 1 for "no rescale" (tau * 1 == tau). Then linear_combine or the
// TIES steps 2-6 (sparse_common.h), one rounding to the output dtype.
//
// Rescale "l1": dare_l1_norms makes one pass that gives, per model, sum |tau|
// and sum over kept |tau|, exactly: every finite fp32 |x| is m * 2^(e - 150)
// (24-bit integer m, biased exponent e, subnormals e = 1), so the sums are
// integers per exponent (exact, any order, any thread count; see l1_block) and
// the total is rounded once to fp64 - the reference's l1_norm_exact, bit for bit.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/philox.h"
#include "cpu/bindings.h"
#include "cpu/sparse_bind.h"
#include "cpu/sparse_common.h"

#ifdef PYMERGE_SPARSE_X86_CLONES
#include <immintrin.h>
#endif

namespace pymerge {
namespace cpu {
namespace sparse {

namespace {

constexpr float kLastUniform = 1.0f - 0x1.0p-24f;  // the largest u

// mask[j] = all ones where element start + j is kept (u < density), else 0.
using MaskFn = void (*)(uint32_t* mask, uint64_t start, int64_t n, philox::Key key, float density);

void masks_generic(uint32_t* __restrict mask, uint64_t start, int64_t n, philox::Key key, float density) {
  const uint32_t lo = uint32_t(start), hi = uint32_t(start >> 32);
  if (uint64_t(lo) + uint64_t(n) <= (uint64_t(1) << 32)) {
    // No carry into the high counter word inside the run: a plain vector loop.
    for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(philox::keep(philox::word0(lo + uint32_t(j), hi, key), density));
  } else {
    for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(philox::keep(philox::word0(start + uint64_t(j), key), density));
  }
}

#ifdef PYMERGE_SPARSE_X86_CLONES
// Philox on 8 (AVX2) or 16 (AVX-512) counters at once, one counter per 64-bit
// lane: vpmuludq multiplies the low 32 bits of each lane into a full 64-bit
// product, so hi = p >> 32 and lo = p itself (its high half is never read:
// products use only low halves, and the result is taken from low halves). The
// counter words c1..c3 are the same for every lane (c2 = c3 = 0, c1 = the high
// index word), so round 1 needs one product and round 2's first product is a
// scalar; the last round computes word 0 only. Integer arithmetic: the same
// bits as the portable code.

// Round keys and the lane-independent values of rounds 1-2.
struct PhiloxConsts {
  uint32_t k0[philox::kRounds], k1[philox::kRounds];
  uint32_t r2_hi0, r2_lo0;  // M0 * (hi ^ k0[0])

  PhiloxConsts(philox::Key key, uint32_t hi) {
    for (int r = 0; r < philox::kRounds; ++r) {
      k0[r] = key.k0 + uint32_t(r) * philox::kW0;
      k1[r] = key.k1 + uint32_t(r) * philox::kW1;
    }
    philox::mulhilo(hi ^ k0[0], philox::kM0, r2_hi0, r2_lo0);
  }
};

#define PYMERGE_AVX2 __attribute__((target("avx2"), always_inline)) inline

PYMERGE_AVX2 __m256i set4(uint32_t v) { return _mm256_set1_epi64x(int64_t(v)); }
PYMERGE_AVX2 __m256i hi4(__m256i p) { return _mm256_srli_epi64(p, 32); }
PYMERGE_AVX2 __m256i xor3_4(__m256i a, __m256i b, __m256i c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }

// Word 0 for the counters (c0 in the low half of each lane, hi, 0, 0).
PYMERGE_AVX2 __m256i word0_x4(__m256i c0, const PhiloxConsts& k) {
  const __m256i m0 = set4(philox::kM0), m1 = set4(philox::kM1);
  // round 1 (x1 = hi, x2 = x3 = 0): x = (hi ^ k0, 0, hi(M0 c0) ^ k1, lo(M0 c0))
  __m256i p0 = _mm256_mul_epu32(c0, m0);
  __m256i x2 = _mm256_xor_si256(hi4(p0), set4(k.k1[0]));
  __m256i x3 = p0;
  // round 2: x0 = hi ^ k0[0] in every lane, x1 = 0
  __m256i p1 = _mm256_mul_epu32(x2, m1);
  __m256i x0 = _mm256_xor_si256(hi4(p1), set4(k.k0[1]));
  __m256i x1 = p1;
  x2 = xor3_4(set4(k.r2_hi0), x3, set4(k.k1[1]));
  x3 = set4(k.r2_lo0);
  for (int r = 2; r < philox::kRounds - 1; ++r) {
    p0 = _mm256_mul_epu32(x0, m0);
    p1 = _mm256_mul_epu32(x2, m1);
    x0 = xor3_4(hi4(p1), x1, set4(k.k0[r]));
    x1 = p1;
    x2 = xor3_4(hi4(p0), x3, set4(k.k1[r]));
    x3 = p0;
  }
  return xor3_4(hi4(_mm256_mul_epu32(x2, m1)), x1, set4(k.k0[philox::kRounds - 1]));
}

// gcc 12's AVX-512 headers trip -Wmaybe-uninitialized on their own
// _mm512_undefined_* placeholders (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define PYMERGE_AVX512 __attribute__((target("avx512f"), always_inline)) inline

PYMERGE_AVX512 __m512i set8(uint32_t v) { return _mm512_set1_epi64(int64_t(v)); }
PYMERGE_AVX512 __m512i hi8(__m512i p) { return _mm512_srli_epi64(p, 32); }
PYMERGE_AVX512 __m512i xor3_8(__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }

// word0_x4 on 8 lanes, with the three-way xor in one instruction.
PYMERGE_AVX512 __m512i word0_x8(__m512i c0, const PhiloxConsts& k) {
  const __m512i m0 = set8(philox::kM0), m1 = set8(philox::kM1);
  __m512i p0 = _mm512_mul_epu32(c0, m0);
  __m512i x2 = _mm512_xor_si512(hi8(p0), set8(k.k1[0]));
  __m512i x3 = p0;
  __m512i p1 = _mm512_mul_epu32(x2, m1);
  __m512i x0 = _mm512_xor_si512(hi8(p1), set8(k.k0[1]));
  __m512i x1 = p1;
  x2 = xor3_8(set8(k.r2_hi0), x3, set8(k.k1[1]));
  x3 = set8(k.r2_lo0);
  for (int r = 2; r < philox::kRounds - 1; ++r) {
    p0 = _mm512_mul_epu32(x0, m0);
    p1 = _mm512_mul_epu32(x2, m1);
    x0 = xor3_8(hi8(p1), x1, set8(k.k0[r]));
    x1 = p1;
    x2 = xor3_8(hi8(p0), x3, set8(k.k1[r]));
    x3 = p0;
  }
  return xor3_8(hi8(_mm512_mul_epu32(x2, m1)), x1, set8(k.k0[philox::kRounds - 1]));
}

// Each step takes two vectors of counters, a = j + {0, 1, 4, 5, ...} and
// b = j + {2, 3, 6, 7, ...}, so that one shuffle_ps (low halves: a0 a1 b0 b1 per
// 128 bits) puts their words back in counter order.

__attribute__((target("avx2"))) void masks_avx2(uint32_t* mask, uint64_t start, int64_t n, philox::Key key,
                                               float density) {
  const uint32_t lo = uint32_t(start), hi = uint32_t(start >> 32);
  int64_t j = 0;
  if (uint64_t(lo) + uint64_t(n) <= (uint64_t(1) << 32)) {
    const PhiloxConsts k(key, hi);
    const __m256i ia = _mm256_setr_epi64x(0, 1, 4, 5), ib = _mm256_setr_epi64x(2, 3, 6, 7);
    const __m256 dens = _mm256_set1_ps(density), scale = _mm256_set1_ps(0x1.0p-24f);
    for (; j + 8 <= n; j += 8) {
      const __m256i c = set4(lo + uint32_t(j));
      const __m256 a = _mm256_castsi256_ps(word0_x4(_mm256_add_epi64(c, ia), k));
      const __m256 b = _mm256_castsi256_ps(word0_x4(_mm256_add_epi64(c, ib), k));
      const __m256i w0 = _mm256_castps_si256(_mm256_shuffle_ps(a, b, 0x88));
      // u = (w0 >> 8) * 2^-24, exact; keep = u < density
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 8)), scale);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mask + j),
                          _mm256_castps_si256(_mm256_cmp_ps(u, dens, _CMP_LT_OQ)));
    }
  }
  if (j < n) masks_generic(mask + j, start + uint64_t(j), n - j, key, density);
}

__attribute__((target("avx512f"))) void masks_avx512(uint32_t* mask, uint64_t start, int64_t n, philox::Key key,
                                                    float density) {
  const uint32_t lo = uint32_t(start), hi = uint32_t(start >> 32);
  int64_t j = 0;
  if (uint64_t(lo) + uint64_t(n) <= (uint64_t(1) << 32)) {
    const PhiloxConsts k(key, hi);
    const __m512i ia = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), ib = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    const __m512 dens = _mm512_set1_ps(density), scale = _mm512_set1_ps(0x1.0p-24f);
    const __m512i ones = _mm512_set1_epi32(-1);
    for (; j + 16 <= n; j += 16) {
      const __m512i c = set8(lo + uint32_t(j));
      const __m512 a = _mm512_castsi512_ps(word0_x8(_mm512_add_epi64(c, ia), k));
      const __m512 b = _mm512_castsi512_ps(word0_x8(_mm512_add_epi64(c, ib), k));
      const __m512i w0 = _mm512_castps_si512(_mm512_shuffle_ps(a, b, 0x88));
      const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w0, 8)), scale);
      const __mmask16 keep = _mm512_cmp_ps_mask(u, dens, _CMP_LT_OQ);
      _mm512_storeu_si512(mask + j, _mm512_maskz_mov_epi32(keep, ones));
    }
  }
  if (j < n) masks_generic(mask + j, start + uint64_t(j), n - j, key, density);
}
#pragma GCC diagnostic pop
#endif

// The Philox clone for the kernel level (cpu/isa.h).
MaskFn mask_fn() {
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (use_avx512()) return masks_avx512;
  if (use_avx2()) return masks_avx2;
#endif
  return masks_generic;
}

// Keep masks of one model for elements off..off+n, with the shortcuts for
// density <= 0 (nothing kept) and density > the largest u (everything kept).
inline void dare_masks(MaskFn fn, uint32_t* __restrict mask, int64_t off, int64_t n, philox::Key key,
                       float density) {
  if (!(density > 0.0f) || density > kLastUniform) {
    const uint32_t v = mask_of(density > kLastUniform);
    for (int64_t j = 0; j < n; ++j) mask[j] = v;
    return;
  }
  fn(mask, uint64_t(off), n, key, density);
}

// ---- exact L1 norms -------------------------------------------------------------
//
// Per block, every |x| whose exponent lies within 29 of the block's largest is
// m * 2^(e - B) * 2^(B - 150) with m * 2^(e - B) < 2^53, so the block's sum of
// them is an exact uint64 at scale 2^(B - 150) (1024 terms < 2^63), summed in
// vector lanes. That sum goes into the per-exponent integer bins in two 32-bit
// halves (at B and B + 32), so the bins cannot overflow. The rare smaller
// values (and blocks holding inf / NaN) go to the bins one by one.

constexpr int kExpBins = 320;  // biased exponents 0..254, plus the high halves (+32)

struct L1Acc {
  int64_t all[kExpBins];
  int64_t kept[kExpBins];
  uint32_t nan_all, nan_kept, inf_all, inf_kept;
};

inline void l1_one(L1Acc& a, float x, uint32_t keep) {
  const uint32_t bits = f32_to_bits(x) & 0x7FFFFFFFu;
  const uint32_t e = bits >> 23, frac = bits & 0x7FFFFFu;
  if (e == 255) {
    const uint32_t nan = frac != 0, inf = frac == 0;
    a.nan_all |= nan;
    a.inf_all |= inf;
    a.nan_kept |= nan & keep & 1u;
    a.inf_kept |= inf & keep & 1u;
    return;
  }
  const uint32_t mant = e ? (frac | 0x800000u) : frac;
  const uint32_t idx = e ? e : 1u;
  a.all[idx] += int64_t(mant);
  a.kept[idx] += int64_t(mant & keep);
}

inline void l1_split_add(int64_t* bins, int b, uint64_t s) {
  bins[b] += int64_t(s & 0xFFFFFFFFu);
  bins[b + 32] += int64_t(s >> 32);
}

#ifdef PYMERGE_SPARSE_X86_CLONES
// The lane sums of l1_block over the first multiple of 8 elements; returns how many it did.
__attribute__((target("avx2"))) inline int64_t l1_lanes_avx2(const float* tau, const uint32_t* mask, int64_t n,
                                                              uint32_t lo_e, uint64_t& sa, uint64_t& sk,
                                                              uint32_t& n_out) {
  const __m256i abs_m = _mm256_set1_epi32(0x7FFFFFFF), frac_m = _mm256_set1_epi32(0x7FFFFF);
  const __m256i hidden = _mm256_set1_epi32(0x800000), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i lo = _mm256_set1_epi32(int(lo_e)), lo_m1 = _mm256_set1_epi32(int(lo_e) - 1);
  __m256i a0 = zero, a1 = zero, k0 = zero, k1 = zero, outs = zero;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i x = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tau + j)), abs_m);
    const __m256i e = _mm256_srli_epi32(x, 23);
    const __m256i frac = _mm256_and_si256(x, frac_m);
    const __m256i normal = _mm256_cmpgt_epi32(e, zero);
    const __m256i mant = _mm256_or_si256(frac, _mm256_and_si256(hidden, normal));
    const __m256i ee = _mm256_max_epi32(e, one);
    const __m256i in = _mm256_cmpgt_epi32(ee, lo_m1);
    const __m256i m = _mm256_and_si256(mant, in);
    const __m256i sh = _mm256_and_si256(_mm256_sub_epi32(ee, lo), in);
    // out of range and nonzero: counted, summed later one by one
    outs = _mm256_sub_epi32(outs, _mm256_andnot_si256(in, _mm256_xor_si256(_mm256_cmpeq_epi32(mant, zero), _mm256_set1_epi32(-1))));
    const __m256i v0 = _mm256_sllv_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(m)),
                                         _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sh)));
    const __m256i v1 = _mm256_sllv_epi64(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(m, 1)),
                                         _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sh, 1)));
    const __m256i km = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + j));
    a0 = _mm256_add_epi64(a0, v0);
    a1 = _mm256_add_epi64(a1, v1);
    k0 = _mm256_add_epi64(k0, _mm256_and_si256(v0, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(km))));
    k1 = _mm256_add_epi64(k1, _mm256_and_si256(v1, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(km, 1))));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi64(a0, a1));
  sa += t[0] + t[1] + t[2] + t[3];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi64(k0, k1));
  sk += t[0] + t[1] + t[2] + t[3];
  alignas(32) uint32_t o[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(o), outs);
  for (int l = 0; l < 8; ++l) n_out += o[l];
  return j;
}

// l1_lanes_avx2 on 16 elements per step, with the lane conditions as masks.
// Not inlined: inside the caller the headers' false positive (see the Philox
// clones) would come back.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"), noinline)) int64_t l1_lanes_avx512(const float* tau, const uint32_t* mask, int64_t n,
                                                                    uint32_t lo_e, uint64_t& sa, uint64_t& sk,
                                                                    uint32_t& n_out) {
  const __m512i abs_m = _mm512_set1_epi32(0x7FFFFFFF), frac_m = _mm512_set1_epi32(0x7FFFFF);
  const __m512i hidden = _mm512_set1_epi32(0x800000), one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
  const __m512i lo = _mm512_set1_epi32(int(lo_e));
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFll), high32 = _mm512_set1_epi64(int64_t(0xFFFFFFFF00000000ull));
  __m512i a0 = zero, a1 = zero, k0 = zero, k1 = zero;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i x = _mm512_and_si512(_mm512_loadu_si512(tau + j), abs_m);
    const __m512i e = _mm512_srli_epi32(x, 23);
    const __m512i frac = _mm512_and_si512(x, frac_m);
    const __m512i mant = _mm512_mask_or_epi32(frac, _mm512_cmpgt_epu32_mask(e, zero), frac, hidden);
    const __m512i ee = _mm512_max_epu32(e, one);
    const __mmask16 in = _mm512_cmpge_epu32_mask(ee, lo);
    const __m512i m = _mm512_maskz_mov_epi32(in, mant);
    const __m512i sh = _mm512_maskz_sub_epi32(in, ee, lo);
    // out of range and nonzero: counted, summed later one by one
    n_out += uint32_t(__builtin_popcount(_mm512_mask_test_epi32_mask(__mmask16(~in), mant, mant)));
    // the even and the odd 32-bit lanes as 64-bit lanes (the order of a sum's terms does not matter)
    const __m512i v0 = _mm512_sllv_epi64(_mm512_and_si512(m, low32), _mm512_and_si512(sh, low32));
    const __m512i v1 = _mm512_sllv_epi64(_mm512_srli_epi64(m, 32), _mm512_srli_epi64(sh, 32));
    const __m512i kv = _mm512_loadu_si512(mask + j);
    const __mmask8 km0 = _mm512_test_epi64_mask(kv, low32), km1 = _mm512_test_epi64_mask(kv, high32);
    a0 = _mm512_add_epi64(a0, v0);
    a1 = _mm512_add_epi64(a1, v1);
    k0 = _mm512_mask_add_epi64(k0, km0, k0, v0);
    k1 = _mm512_mask_add_epi64(k1, km1, k1, v1);
  }
  alignas(64) uint64_t t[8];
  _mm512_store_si512(t, _mm512_add_epi64(a0, a1));
  for (int l = 0; l < 8; ++l) sa += t[l];
  _mm512_store_si512(t, _mm512_add_epi64(k0, k1));
  for (int l = 0; l < 8; ++l) sk += t[l];
  return j;
}
#pragma GCC diagnostic pop
#endif

// Adds |tau[j]| (and, where mask[j] is set, to the kept sum) for one block.
inline void l1_block(L1Acc& a, const float* __restrict tau, const uint32_t* __restrict mask, int64_t n) {
  uint32_t emax = 0;
  for (int64_t j = 0; j < n; ++j) emax = std::max(emax, (f32_to_bits(tau[j]) >> 23) & 0xFFu);
  if (emax == 255) {
    for (int64_t j = 0; j < n; ++j) l1_one(a, tau[j], mask[j]);
    return;
  }
  const uint32_t lo_e = emax > 30 ? emax - 29 : 1u;  // smallest exponent summed in the lanes
  uint64_t sa = 0, sk = 0;
  uint32_t n_out = 0;
  int64_t j = 0;
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (use_avx512())
    j = l1_lanes_avx512(tau, mask, n, lo_e, sa, sk, n_out);
  else if (use_avx2())
    j = l1_lanes_avx2(tau, mask, n, lo_e, sa, sk, n_out);
#endif
  for (; j < n; ++j) {
    const uint32_t x = f32_to_bits(tau[j]) & 0x7FFFFFFFu;
    const uint32_t e = x >> 23, frac = x & 0x7FFFFFu;
    const uint32_t mant = e ? (frac | 0x800000u) : frac;
    const uint32_t ee = e ? e : 1u;
    const uint32_t in = ee >= lo_e;
    const uint64_t v = uint64_t(mant & (0u - in)) << ((ee - lo_e) & (0u - in));
    sa += v;
    sk += v & (uint64_t(0) - uint64_t(mask[j] & 1u));
    n_out += (in ^ 1u) & (mant != 0);
  }
  l1_split_add(a.all, int(lo_e), sa);
  l1_split_add(a.kept, int(lo_e), sk);
  if (n_out) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t e = (f32_to_bits(tau[j]) & 0x7FFFFFFFu) >> 23;
      if ((e ? e : 1u) < lo_e) l1_one(a, tau[j], mask[j]);
    }
  }
}

// Bit-packed keep masks: element p is bit p % 32 of word p / 32 of its model's plane.
inline int64_t mask_words(int64_t numel) { return (numel + 31) / 32; }

// mask[0..n) (all ones / zero) into ceil(n / 32) words; mask has room up to the next 32.
inline void pack_masks(uint32_t* __restrict words, uint32_t* __restrict mask, int64_t n) {
  const int64_t nw = (n + 31) / 32;
  for (int64_t j = n; j < nw * 32; ++j) mask[j] = 0;
  for (int64_t w = 0; w < nw; ++w) {
    uint32_t word = 0;
    for (int b = 0; b < 32; ++b) word |= (mask[w * 32 + b] & 1u) << b;
    words[w] = word;
  }
}

inline void unpack_masks(uint32_t* __restrict mask, const uint32_t* __restrict words, int64_t n) {
  const int64_t nw = (n + 31) / 32;
  for (int64_t w = 0; w < nw; ++w) {
    const uint32_t word = words[w];
    for (int b = 0; b < 32; ++b) mask[w * 32 + b] = 0u - ((word >> b) & 1u);
  }
}

struct L1Pass {
  const Inputs* in;
  MaskFn mask_fn;
  const philox::Key* keys;
  const float* dens;
  int64_t chunks;
  std::vector<L1Acc>* parts;  // chunks x models
  uint32_t* bits;             // nullptr, or per model a plane of words(numel) words: the keep masks

  void chunk(int64_t c) const {
    const int64_t nm = in->n;
    L1Acc* acc = parts->data() + c * nm;
    for (int64_t i = 0; i < nm; ++i) {
      L1Acc& a = acc[i];
      std::fill(a.all, a.all + kExpBins, int64_t(0));
      std::fill(a.kept, a.kept + kExpBins, int64_t(0));
      a.nan_all = a.nan_kept = a.inf_all = a.inf_kept = 0;
    }
    alignas(64) float b[kBlock];
    alignas(64) float tau[kBlock];
    alignas(64) uint32_t mask[kBlock];
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      load_any(in->base_dtype, b, in->base, off, n);
      for (int64_t i = 0; i < nm; ++i) {
        tau_any(in->dtypes[i], tau, b, in->models[i], off, n);
        dare_masks(mask_fn, mask, off, n, keys[i], dens[i]);
        l1_block(acc[i], tau, mask, n);
        if (bits) pack_masks(bits + i * mask_words(in->numel) + off / 32, mask, n);
      }
    }
  }
};

// sum_e m[e] * 2^(e - 150) over e < kExpBins, rounded once to fp64 (nearest, ties to even).
double exact_to_double(const int64_t* m) {
  constexpr int kLimbs = 7;  // m[e] < 2^63, e < 320: the total is below 2^384
  uint64_t limb[kLimbs] = {0, 0, 0, 0, 0, 0, 0};
  auto add_at = [&](int word, uint64_t v) {
    for (int w = word; w < kLimbs && v; ++w) {
      const uint64_t s = limb[w] + v;
      v = s < v ? 1 : 0;
      limb[w] = s;
    }
  };
  for (int e = 1; e < kExpBins; ++e) {
    const uint64_t v = uint64_t(m[e]);
    if (!v) continue;
    const int word = e / 64, sh = e % 64;
    add_at(word, v << sh);
    if (sh) add_at(word + 1, v >> (64 - sh));
  }
  int top = -1;
  for (int w = kLimbs - 1; w >= 0 && top < 0; --w)
    for (int b = 63; b >= 0 && top < 0; --b)
      if ((limb[w] >> b) & 1u) top = w * 64 + b;
  if (top < 0) return 0.0;
  auto bit = [&](int p) -> uint64_t { return (limb[p / 64] >> (p % 64)) & 1u; };
  if (top <= 52) return std::ldexp(double(limb[0]), -150);  // exact
  const int shift = top - 52;
  uint64_t mant = 0;
  for (int p = top; p >= shift; --p) mant = (mant << 1) | bit(p);
  const uint64_t round = bit(shift - 1);
  bool sticky = false;
  for (int p = 0; p < shift - 1 && !sticky; ++p) sticky = bit(p) != 0;
  if (round && (sticky || (mant & 1u))) ++mant;  // 2^53 is still exact
  return std::ldexp(double(mant), shift - 150);
}

double l1_value(const int64_t* m, bool nan, bool inf) {
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (inf) return std::numeric_limits<double>::infinity();  // an inf, and no NaN
  return exact_to_double(m);
}

// ---- merge --------------------------------------------------------------------

struct DareRows {
  MaskFn mask_fn;
  const philox::Key* keys;
  const float* dens;
  const float* factors;
  const uint32_t* bits;  // nullptr: regenerate the masks; else the planes dare_l1_norms stored
  int64_t plane;         // words per plane

  struct State {};
  State start(int64_t) const { return {}; }

  void make(State&, int64_t i, int64_t off, int64_t n, Scratch& s, float* __restrict row) const {
    if (!(dens[i] > 0.0f)) {
      for (int64_t j = 0; j < n; ++j) row[j] = 0.0f;
      return;
    }
    uint32_t* __restrict mask = s.mask;
    if (bits)
      unpack_masks(mask, bits + i * plane + off / 32, n);  // off is a multiple of kBlock
    else
      dare_masks(mask_fn, mask, off, n, keys[i], dens[i]);
    const float* __restrict tau = s.tau;
    const float f = factors[i];
    for (int64_t j = 0; j < n; ++j) row[j] = masked(tau[j] * f, mask[j]);
  }
};

struct MaskPass {
  MaskFn mask_fn;
  uint8_t* out;
  int64_t numel;
  philox::Key key;
  float density;
  int64_t chunks;

  void chunk(int64_t c) const {
    alignas(64) uint32_t mask[kBlock];
    const int64_t begin = chunk_begin(numel, chunks, c), end = chunk_begin(numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      dare_masks(mask_fn, mask, off, n, key, density);
      uint8_t* __restrict o = out + off;
      for (int64_t j = 0; j < n; ++j) o[j] = uint8_t(mask[j] & 1u);
    }
  }
};

std::vector<philox::Key> model_keys(const std::string& name, uint64_t seed, int64_t n) {
  const uint64_t h = philox::fnv1a64(reinterpret_cast<const unsigned char*>(name.data()), name.size());
  std::vector<philox::Key> keys(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keys[size_t(i)] = philox::dare_key(h, seed, uint64_t(i));
  return keys;
}

}  // namespace

std::vector<std::pair<double, double>> dare_l1_norms(const Inputs& in, const std::string& name, uint64_t seed,
                                                     const std::vector<float>& dens, uint32_t* bits) {
  const int64_t nm = in.n;
  std::vector<std::pair<double, double>> norms(static_cast<size_t>(nm), {0.0, 0.0});
  if (in.numel <= 0) return norms;
  const auto keys = model_keys(name, seed, nm);
  const int64_t chunks = chunk_count(in.numel);
  std::vector<L1Acc> parts(static_cast<size_t>(chunks * nm));
  run_chunks(L1Pass{&in, mask_fn(), keys.data(), dens.data(), chunks, &parts, bits}, chunks);
  for (int64_t i = 0; i < nm; ++i) {
    int64_t all[kExpBins] = {0}, kept[kExpBins] = {0};
    bool nan_all = false, nan_kept = false, inf_all = false, inf_kept = false;
    for (int64_t c = 0; c < chunks; ++c) {
      const L1Acc& a = parts[size_t(c * nm + i)];
      for (int e = 0; e < kExpBins; ++e) {
        all[e] += a.all[e];
        kept[e] += a.kept[e];
      }
      nan_all |= a.nan_all != 0;
      nan_kept |= a.nan_kept != 0;
      inf_all |= a.inf_all != 0;
      inf_kept |= a.inf_kept != 0;
    }
    norms[size_t(i)] = {l1_value(all, nan_all, inf_all), l1_value(kept, nan_kept, inf_kept)};
  }
  return norms;
}

void dare_merge(const Inputs& in, void* out, int out_dtype, const std::string& name, uint64_t seed,
                const std::vector<float>& dens, const std::vector<float>& factors, const std::vector<float>& weights,
                bool ties, float scale, bool normalize, bool count, const uint32_t* bits) {
  if (in.numel <= 0) return;
  const auto keys = model_keys(name, seed, in.n);
  const int64_t chunks = chunk_count(in.numel);
  const DareRows rows{mask_fn(), keys.data(), dens.data(), factors.data(), bits, mask_words(in.numel)};
  if (ties)
    merge(in, out, out_dtype, rows, TiesCombine{weights.data(), scale, normalize, count}, chunks);
  else
    merge(in, out, out_dtype, rows, LinearCombine{weights.data(), scale}, chunks);
}

void dare_keep_mask(uint8_t* out, int64_t numel, const std::string& name, uint64_t seed, uint64_t model_index,
                    float density) {
  if (numel <= 0) return;
  const uint64_t h = philox::fnv1a64(reinterpret_cast<const unsigned char*>(name.data()), name.size());
  const int64_t chunks = chunk_count(numel);
  run_chunks(MaskPass{mask_fn(), out, numel, philox::dare_key(h, seed, model_index), density, chunks}, chunks);
}

}  // namespace sparse
}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using pymerge::bind::SparseArgs;

std::vector<std::pair<double, double>> dare_l1_norms_binding(const std::vector<uintptr_t>& in_ptrs,
                                                             const std::vector<int>& in_dtypes, uintptr_t base_ptr,
                                                             int base_dtype, int64_t numel, const py::bytes& name,
                                                             uint64_t seed, const std::vector<float>& densities,
                                                             uintptr_t masks_out_ptr) {
  const SparseArgs args("dare_l1_norms", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(densities, "densities");
  const std::string n = name;
  py::gil_scoped_release release;
  return pymerge::cpu::sparse::dare_l1_norms(args.inputs(), n, seed, densities,
                                             reinterpret_cast<uint32_t*>(masks_out_ptr));
}

void dare_merge_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                        const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                        const py::bytes& name, uint64_t seed, const std::vector<float>& densities,
                        const std::vector<float>& factors, const std::vector<float>& weights, bool combine_ties,
                        float scale, bool normalize, bool consensus_count, uintptr_t masks_ptr) {
  const SparseArgs args("dare_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(densities, "densities");
  args.check_per_model(factors, "factors");
  args.check_per_model(weights, "weights");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  const std::string n = name;
  py::gil_scoped_release release;
  pymerge::cpu::sparse::dare_merge(args.inputs(), reinterpret_cast<void*>(out_ptr), out_dtype, n, seed, densities,
                                   factors, weights, combine_ties, scale, normalize, consensus_count,
                                   reinterpret_cast<const uint32_t*>(masks_ptr));
}

void dare_keep_mask_binding(uintptr_t out_ptr, int64_t numel, const py::bytes& name, uint64_t seed,
                            uint64_t model_index, float density) {
  if (numel < 0) throw py::value_error("dare_keep_mask: numel < 0");
  if (numel == 0) return;
  pymerge::bind::check_ptr(out_ptr, "dare_keep_mask: out");
  const std::string n = name;
  py::gil_scoped_release release;
  pymerge::cpu::sparse::dare_keep_mask(reinterpret_cast<uint8_t*>(out_ptr), numel, n, seed, model_index, density);
}

}  // namespace

PYMERGE_BINDINGS(dare) {
  namespace philox = pymerge::philox;
  m.def("dare_l1_norms", &dare_l1_norms_binding, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("numel"), py::arg("name"), py::arg("seed"), py::arg("densities"),
        py::arg("masks_out_ptr") = 0,
        "Per model (sum |tau|, sum over kept |tau|), each the fp64 nearest to the exact sum; name is the "
        "tensor name's UTF-8 bytes, densities fp32. masks_out_ptr (0: none): int32 buffer of "
        "n_models * ceil(numel / 32) words that receives the keep masks, bit p % 32 of word p / 32 of "
        "each model's plane, for dare_merge(masks_ptr=...).");
  m.def("dare_merge", &dare_merge_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("densities"), py::arg("factors"), py::arg("weights"), py::arg("combine_ties"),
        py::arg("scale"), py::arg("normalize"), py::arg("consensus_count"), py::arg("masks_ptr") = 0,
        "DARE drop (Philox mask) and rescale by the fp32 factors, then linear_combine (scale = c) or the "
        "TIES steps 2-6 (scale = lambda); one rounding to out_dtype. masks_ptr (0: regenerate): the "
        "keep masks dare_l1_norms stored for the same inputs, name, seed and densities.");
  m.def("dare_keep_mask", &dare_keep_mask_binding, py::arg("out_ptr"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("model_index"), py::arg("density"),
        "Writes the 0/1 keep mask (u < density, density fp32) of numel elements as bytes.");
  // Test helpers: the generator pieces of common/philox.h.
  m.def(
      "_philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const philox::Block r = philox::philox4x32_10(philox::Block{{c0, c1, c2, c3}}, philox::Key{k0, k1});
        return py::make_tuple(r.x[0], r.x[1], r.x[2], r.x[3]);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));
  m.def(
      "_philox_word0",
      [](uint64_t index, uint32_t k0, uint32_t k1) { return philox::word0(index, philox::Key{k0, k1}); },
      py::arg("index"), py::arg("k0"), py::arg("k1"));
  m.def(
      "_fnv1a64",
      [](const py::bytes& data) {
        const std::string s = data;
        return philox::fnv1a64(reinterpret_cast<const unsigned char*>(s.data()), s.size());
      },
      py::arg("data"));
  m.def(
      "_dare_key",
      [](const py::bytes& name, uint64_t seed, uint64_t model_index) {
        const std::string s = name;
        const philox::Key k =
            philox::dare_key(philox::fnv1a64(reinterpret_cast<const unsigned char*>(s.data()), s.size()), seed,
                             model_index);
        return py::make_tuple(k.k0, k.k1);
      },
      py::arg("name"), py::arg("seed"), py::arg("model_index"));
}
