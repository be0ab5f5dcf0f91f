// DARE: drop and rescale (specs/methods.md, "dare_linear, dare_ties"; torch
// reference pymerge/ops/reference/dare.py, philox.py).
//
// keep_{i,p} = u < fp32(density_i), u from Philox 4x32-10 keyed by (name, seed, i)
// with the flat index p as counter (common/philox.h): masks are regenerated in
// every pass instead of stored. Per model, tau_hat = keep ? fp32(tau * f_i) : +0,
// with f_i = 1 for "no rescale" (tau * 1 == tau). Then linear_combine or the
// TIES steps 2-6 (sparse_common.h), one rounding to the output dtype.
//
// Rescale "l1": dare_l1_norms makes one pass that gives, per model, sum |tau|
// and sum over kept |tau|, exactly: every finite fp32 |x| is m * 2^(e - 150)
// (24-bit integer m, biased exponent e, subnormals e = 1), so the m are summed
// in int64 per exponent (exact, any order, any thread count) and the total is
// rounded once to fp64 - the reference's l1_norm_exact, bit for bit.

#include <algorithm>
#include <atomic>
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
// Philox on 8 (AVX2) or 16 (AVX-512) counters at once. The counter words c1..c3
// are the same for every lane (c2 = c3 = 0, c1 = the high index word), so
// round 1 needs one product and round 2's first product is a scalar; the last
// round computes word 0 only. Integer arithmetic: the same bits as the
// portable code.

#define PYMERGE_AVX2 __attribute__((target("avx2"), always_inline)) inline

PYMERGE_AVX2 void mulhilo8(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(x, m);                         // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

PYMERGE_AVX2 __m256i mulhi8(__m256i x, __m256i m) {
  const __m256i pe = _mm256_mul_epu32(x, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

PYMERGE_AVX2 __m256i set8(uint32_t v) { return _mm256_set1_epi32(int(v)); }

// gcc 12's AVX-512 headers trip -Wmaybe-uninitialized on their own
// _mm512_undefined_* placeholders (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define PYMERGE_AVX512 __attribute__((target("avx512f"), always_inline)) inline

PYMERGE_AVX512 void mulhilo16(__m512i x, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(x, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

PYMERGE_AVX512 __m512i mulhi16(__m512i x, __m512i m) {
  const __m512i pe = _mm512_mul_epu32(x, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

PYMERGE_AVX512 __m512i set16(uint32_t v) { return _mm512_set1_epi32(int(v)); }

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

__attribute__((target("avx2"))) void masks_avx2(uint32_t* mask, uint64_t start, int64_t n, philox::Key key,
                                               float density) {
  const uint32_t lo = uint32_t(start), hi = uint32_t(start >> 32);
  int64_t j = 0;
  if (uint64_t(lo) + uint64_t(n) <= (uint64_t(1) << 32)) {
    const PhiloxConsts k(key, hi);
    const __m256i m0 = set8(philox::kM0), m1 = set8(philox::kM1);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 dens = _mm256_set1_ps(density), scale = _mm256_set1_ps(0x1.0p-24f);
    for (; j + 8 <= n; j += 8) {
      const __m256i c0 = _mm256_add_epi32(set8(lo + uint32_t(j)), iota);
      __m256i hi0, lo0, hi1, lo1;
      // round 1 (x1 = hi, x2 = x3 = 0): x = (hi ^ k0, 0, hi(M0 c0) ^ k1, lo(M0 c0))
      mulhilo8(c0, m0, hi0, lo0);
      __m256i x2 = _mm256_xor_si256(hi0, set8(k.k1[0]));
      __m256i x3 = lo0;
      // round 2: x0 = hi ^ k0[0] in every lane, x1 = 0
      mulhilo8(x2, m1, hi1, lo1);
      __m256i x0 = _mm256_xor_si256(hi1, set8(k.k0[1]));
      __m256i x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(set8(k.r2_hi0), x3), set8(k.k1[1]));
      x3 = set8(k.r2_lo0);
      for (int r = 2; r < philox::kRounds - 1; ++r) {
        mulhilo8(x0, m0, hi0, lo0);
        mulhilo8(x2, m1, hi1, lo1);
        x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), set8(k.k0[r]));
        x1 = lo1;
        x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), set8(k.k1[r]));
        x3 = lo0;
      }
      x0 = _mm256_xor_si256(_mm256_xor_si256(mulhi8(x2, m1), x1), set8(k.k0[philox::kRounds - 1]));
      // u = (x0 >> 8) * 2^-24, exact; keep = u < density
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x0, 8)), scale);
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
    const __m512i m0 = set16(philox::kM0), m1 = set16(philox::kM1);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 dens = _mm512_set1_ps(density), scale = _mm512_set1_ps(0x1.0p-24f);
    const __m512i ones = set16(~0u);
    for (; j + 16 <= n; j += 16) {
      const __m512i c0 = _mm512_add_epi32(set16(lo + uint32_t(j)), iota);
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      __m512i x2 = _mm512_xor_si512(hi0, set16(k.k1[0]));
      __m512i x3 = lo0;
      mulhilo16(x2, m1, hi1, lo1);
      __m512i x0 = _mm512_xor_si512(hi1, set16(k.k0[1]));
      __m512i x1 = lo1;
      x2 = _mm512_xor_si512(_mm512_xor_si512(set16(k.r2_hi0), x3), set16(k.k1[1]));
      x3 = set16(k.r2_lo0);
      for (int r = 2; r < philox::kRounds - 1; ++r) {
        mulhilo16(x0, m0, hi0, lo0);
        mulhilo16(x2, m1, hi1, lo1);
        x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), set16(k.k0[r]));
        x1 = lo1;
        x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), set16(k.k1[r]));
        x3 = lo0;
      }
      x0 = _mm512_xor_si512(_mm512_xor_si512(mulhi16(x2, m1), x1), set16(k.k0[philox::kRounds - 1]));
      const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x0, 8)), scale);
      const __mmask16 keep = _mm512_cmp_ps_mask(u, dens, _CMP_LT_OQ);
      _mm512_storeu_si512(mask + j, _mm512_maskz_mov_epi32(keep, ones));
    }
  }
  if (j < n) masks_generic(mask + j, start + uint64_t(j), n - j, key, density);
}
#pragma GCC diagnostic pop
#endif

// Test hook: the widest Philox vectors to use (0: no limit; 256: AVX2 at most).
std::atomic<int> g_max_vector_bits{0};

// The Philox clone for this CPU: the baseline one when average.cpp's choice
// is "generic" (no AVX2, or forced by its test hook).
MaskFn mask_fn() {
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (use_avx2()) {
    static const bool avx512 = [] {
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") != 0;
    }();
    const int cap = g_max_vector_bits.load(std::memory_order_relaxed);
    return avx512 && (cap == 0 || cap >= 512) ? masks_avx512 : masks_avx2;
  }
#endif
  return masks_generic;
}

const char* mask_isa() {
  const MaskFn fn = mask_fn();
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (fn == masks_avx512) return "avx512";
  if (fn == masks_avx2) return "avx2";
#endif
  return fn == masks_generic ? "generic" : "unknown";
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

constexpr int kExpBins = 256;
// Interleaved accumulators: consecutive elements of equal exponent would
// otherwise wait on each other's read-modify-write.
constexpr int kLanes = 4;

struct L1Acc {
  int64_t all[kLanes][kExpBins];
  int64_t kept[kLanes][kExpBins];
  uint32_t nan_all;
  uint32_t nan_kept;
};

inline void l1_add(int64_t* __restrict all, int64_t* __restrict kept, float x, uint32_t keep) {
  const uint32_t bits = f32_to_bits(x) & 0x7FFFFFFFu;
  const uint32_t e = bits >> 23, frac = bits & 0x7FFFFFu;
  const uint32_t mant = e ? (frac | 0x800000u) : frac;
  const uint32_t idx = e ? e : 1u;
  all[idx] += int64_t(mant);
  kept[idx] += int64_t(mant & keep);
}

struct L1Pass {
  const Inputs* in;
  MaskFn mask_fn;
  const philox::Key* keys;
  const float* dens;
  int64_t chunks;
  std::vector<L1Acc>* parts;  // chunks x models

  void chunk(int64_t c) const {
    const int64_t nm = in->n;
    std::vector<L1Acc> acc(static_cast<size_t>(nm));
    for (auto& a : acc) {
      std::fill(&a.all[0][0], &a.all[0][0] + kLanes * kExpBins, int64_t(0));
      std::fill(&a.kept[0][0], &a.kept[0][0] + kLanes * kExpBins, int64_t(0));
      a.nan_all = a.nan_kept = 0;
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
        L1Acc& a = acc[size_t(i)];
        uint32_t nan_all = 0, nan_kept = 0;
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t nan = mask_of((f32_to_bits(tau[j]) & 0x7FFFFFFFu) > 0x7F800000u);
          nan_all |= nan;
          nan_kept |= nan & mask[j];
        }
        a.nan_all |= nan_all;
        a.nan_kept |= nan_kept;
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes)
          for (int l = 0; l < kLanes; ++l) l1_add(a.all[l], a.kept[l], tau[j + l], mask[j + l]);
        for (; j < n; ++j) l1_add(a.all[0], a.kept[0], tau[j], mask[j]);
      }
    }
    std::copy(acc.begin(), acc.end(), parts->begin() + c * nm);
  }
};

// sum_e m[e] * 2^(e - 150), rounded once to fp64 (nearest, ties to even).
double exact_to_double(const int64_t* m) {
  constexpr int kLimbs = 6;  // m[e] < 2^63, e <= 254: the total is below 2^326
  uint64_t limb[kLimbs] = {0, 0, 0, 0, 0, 0};
  auto add_at = [&](int word, uint64_t v) {
    for (int w = word; w < kLimbs && v; ++w) {
      const uint64_t s = limb[w] + v;
      v = s < v ? 1 : 0;
      limb[w] = s;
    }
  };
  for (int e = 1; e < 255; ++e) {
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

double l1_value(const int64_t* m, bool nan) {
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (m[255]) return std::numeric_limits<double>::infinity();  // an inf, and no NaN
  return exact_to_double(m);
}

// ---- merge --------------------------------------------------------------------

struct DareRows {
  MaskFn mask_fn;
  const philox::Key* keys;
  const float* dens;
  const float* factors;

  struct State {};
  State start(int64_t) const { return {}; }

  void make(State&, int64_t i, int64_t off, int64_t n, Scratch& s, float* __restrict row) const {
    if (!(dens[i] > 0.0f)) {
      for (int64_t j = 0; j < n; ++j) row[j] = 0.0f;
      return;
    }
    uint32_t* __restrict mask = s.mask;
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
                                                     const std::vector<float>& dens) {
  const int64_t nm = in.n;
  std::vector<std::pair<double, double>> norms(static_cast<size_t>(nm), {0.0, 0.0});
  if (in.numel <= 0) return norms;
  const auto keys = model_keys(name, seed, nm);
  const int64_t chunks = chunk_count(in.numel);
  std::vector<L1Acc> parts(static_cast<size_t>(chunks * nm));
  run_chunks(L1Pass{&in, mask_fn(), keys.data(), dens.data(), chunks, &parts}, chunks);
  for (int64_t i = 0; i < nm; ++i) {
    int64_t all[kExpBins] = {0}, kept[kExpBins] = {0};
    bool nan_all = false, nan_kept = false;
    for (int64_t c = 0; c < chunks; ++c) {
      const L1Acc& a = parts[size_t(c * nm + i)];
      for (int l = 0; l < kLanes; ++l)
        for (int e = 0; e < kExpBins; ++e) {
          all[e] += a.all[l][e];
          kept[e] += a.kept[l][e];
        }
      nan_all |= a.nan_all != 0;
      nan_kept |= a.nan_kept != 0;
    }
    norms[size_t(i)] = {l1_value(all, nan_all), l1_value(kept, nan_kept)};
  }
  return norms;
}

void dare_merge(const Inputs& in, void* out, int out_dtype, const std::string& name, uint64_t seed,
                const std::vector<float>& dens, const std::vector<float>& factors, const std::vector<float>& weights,
                bool ties, float scale, bool normalize, bool count) {
  if (in.numel <= 0) return;
  const auto keys = model_keys(name, seed, in.n);
  const int64_t chunks = chunk_count(in.numel);
  const DareRows rows{mask_fn(), keys.data(), dens.data(), factors.data()};
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
                                                             uint64_t seed, const std::vector<float>& densities) {
  const SparseArgs args("dare_l1_norms", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(densities, "densities");
  const std::string n = name;
  py::gil_scoped_release release;
  return pymerge::cpu::sparse::dare_l1_norms(args.inputs(), n, seed, densities);
}

void dare_merge_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                        const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                        const py::bytes& name, uint64_t seed, const std::vector<float>& densities,
                        const std::vector<float>& factors, const std::vector<float>& weights, bool combine_ties,
                        float scale, bool normalize, bool consensus_count) {
  const SparseArgs args("dare_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(densities, "densities");
  args.check_per_model(factors, "factors");
  args.check_per_model(weights, "weights");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  const std::string n = name;
  py::gil_scoped_release release;
  pymerge::cpu::sparse::dare_merge(args.inputs(), reinterpret_cast<void*>(out_ptr), out_dtype, n, seed, densities,
                                   factors, weights, combine_ties, scale, normalize, consensus_count);
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
        "Per model (sum |tau|, sum over kept |tau|), each the fp64 nearest to the exact sum; name is the "
        "tensor name's UTF-8 bytes, densities fp32.");
  m.def("dare_merge", &dare_merge_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("densities"), py::arg("factors"), py::arg("weights"), py::arg("combine_ties"),
        py::arg("scale"), py::arg("normalize"), py::arg("consensus_count"),
        "DARE drop (Philox mask) and rescale by the fp32 factors, then linear_combine (scale = c) or the "
        "TIES steps 2-6 (scale = lambda); one rounding to out_dtype.");
  m.def("dare_keep_mask", &dare_keep_mask_binding, py::arg("out_ptr"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("model_index"), py::arg("density"),
        "Writes the 0/1 keep mask (u < density, density fp32) of numel elements as bytes.");
  // Test helpers: the Philox clone in use, and the generator pieces of common/philox.h.
  m.def(
      "_dare_philox_isa",
      [](int max_vector_bits) {
        pymerge::cpu::sparse::g_max_vector_bits.store(max_vector_bits, std::memory_order_relaxed);
        return std::string(pymerge::cpu::sparse::mask_isa());
      },
      py::arg("max_vector_bits"),
      "Limit the Philox vectors to max_vector_bits (0: no limit); returns the clone now in use.");
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
