// EMR-Merging (specs/methods.md, "emr"): elect, bit-packed masks, task
// reconstruction, and the bit packing helpers.
//
// emr_elect, per element, in this exact fp32 order (as the torch reference):
//   tau_i = f32(theta_i) - f32(theta_0)
//   s = 0; s = s + tau_i for i = 0..N-1
//   g = s > 0 ? +1 : -1            (zero_sign "neg")
//   g = s > 0 ? +1 : s < 0 ? -1 : 0 (zero_sign "zero")
//   a_i = (g * tau_i) > 0;  e = max over a_i of |tau_i| (+0 if none);  u = g * e
// u is rounded once to the output dtype; a_i goes to bit (p % 32) of word p / 32
// of plane i. One pass over the inputs: each block of kBlock elements is
// upcast once into stack buffers and every output is produced from there
// (with one dtype and up to 8 models, one loop per element; fused_elect_blocks).
//
// The fp64 sums (sum |tau_i| and sum a_i |u|) are made independent of the
// thread count and of the instruction set (common/sums.h): each block is
// summed in fixed lanes, and the per-block sums are added in block order on
// the calling thread.
//
// emr_reconstruct: out = f32(theta_0) + (M ? f32(lam) * f32(u) : +0), two
// rounded fp32 ops (-ffp-contract=off), one rounding to the output dtype.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/sums.h"
#include "common/stream.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

#if defined(__GNUC__)
#define PYMERGE_EMR_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_EMR_FLATTEN
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_EMR_X86_CLONES 1
#include <immintrin.h>
#endif

namespace pymerge {
namespace cpu {

namespace emr {

namespace {

// Multiple of 32, so blocks (and therefore thread ranges) never share a mask word.
constexpr int64_t kBlock = 1024;
constexpr int64_t kGrainBlocks = 64;  // >= 64K elements per thread (per piece in reconstruct)
static_assert(kBlock % 32 == 0 && 32 % kSumLanes == 0, "block layout");

template <int T>
inline void load_f32(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

inline void load_any(int tag, float* __restrict dst, const void* src, int64_t off, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { load_f32<decltype(t)::value>(dst, src, off, n); });
}

inline void store_any(int tag, void* dst, int64_t off, const float* __restrict src, int64_t n) {
  dispatch_dtype(tag, [&](auto t) {
    constexpr int T = decltype(t)::value;
    auto* __restrict p = static_cast<typename Dtype<T>::storage*>(dst) + off;
    for (int64_t j = 0; j < n; ++j) p[j] = Dtype<T>::store(src[j]);
  });
}

inline float select_f32(bool c, float a, float b) { return f32_from_bits(select_u32(c, f32_to_bits(a), f32_to_bits(b))); }

struct ElectArgs {
  const void* base;
  int base_dtype;
  const void* const* inputs;
  const int* in_dtypes;
  int64_t n_models;
  int64_t numel;
  bool sign_zero;  // zero_sign "zero"
  void* u;
  int u_dtype;
  uint32_t* masks;  // [n_models, n_words]
  int64_t n_words;
  double* blk_tau;  // [n_blocks, n_models]
  double* blk_u;    // [n_blocks, n_models]
};

// tau = f32(x) - b into t, s = s + tau, and the fp64 sum of |tau| (returned),
// over np elements (b and the tail of t beyond n are zero padding).
template <int T>
inline double tau_sweep(float* __restrict t, float* __restrict s, const float* __restrict b, const void* src,
                        int64_t off, int64_t n, int64_t np) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) {
    const float x = Dtype<T>::load(p[j]) - b[j];
    t[j] = x;
    s[j] = s[j] + x;
  }
  for (int64_t j = n; j < np; ++j) {
    const float x = 0.0f - b[j];
    t[j] = x;
    s[j] = s[j] + x;
  }
  return lane_sum(np, [&](int64_t j) { return std::fabs(t[j]); });
}

inline double dispatch_tau(int tag, float* t, float* s, const float* b, const void* src, int64_t off, int64_t n,
                           int64_t np) {
  double r = 0.0;
  dispatch_dtype(tag, [&](auto d) { r = tau_sweep<decltype(d)::value>(t, s, b, src, off, n, np); });
  return r;
}

// emr_elect when base, models and u share one dtype T and there are at most
// kMaxFusedModels models (the usual case): load, elect and round u in one loop
// per element, with no task-vector rows in between. Per model the loop keeps
// w = |tau| with the sign bit set where the model agrees; the mask words and
// both fp64 sums are made from w as elect_blocks makes them from its rows, so
// every output has the same bits.
constexpr int kMaxFusedModels = 8;

inline bool agrees(float w) { return (f32_to_bits(w) >> 31) != 0u; }

template <int T, int NM, bool kSignZero>
void fused_elect_blocks(const ElectArgs& a, int64_t blk0, int64_t blk1) {
  using S = typename Dtype<T>::storage;
  const S* __restrict base = static_cast<const S*>(a.base);
  const S* __restrict m[NM];
  for (int i = 0; i < NM; ++i) m[i] = static_cast<const S*>(a.inputs[i]);
  S* __restrict u = static_cast<S*>(a.u);
  alignas(64) float w[NM][kBlock];
  alignas(64) float e[kBlock];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t off = blk * kBlock;
    const int64_t n = std::min(kBlock, a.numel - off);
    const int64_t np = (n + 31) & ~int64_t(31);  // padding as in elect_blocks: w = +0, e = +0
    for (int64_t j = 0; j < n; ++j) {
      const float b = Dtype<T>::load(base[off + j]);
      float t[NM];
      float s = 0.0f;
      for (int i = 0; i < NM; ++i) {
        t[i] = Dtype<T>::load(m[i][off + j]) - b;
        s = s + t[i];
      }
      const float neg = kSignZero ? select_f32(s < 0.0f, -1.0f, 0.0f) : -1.0f;
      const float g = select_f32(s > 0.0f, 1.0f, neg);
      float ej = 0.0f;
      for (int i = 0; i < NM; ++i) {
        const bool ag = g * t[i] > 0.0f;
        const float v = select_f32(ag, std::fabs(t[i]), 0.0f);
        ej = v > ej ? v : ej;
        w[i][j] = f32_from_bits(f32_to_bits(std::fabs(t[i])) | (uint32_t(ag) << 31));
      }
      e[j] = ej;
      u[off + j] = Dtype<T>::store(g * ej);
    }
    for (int64_t j = n; j < np; ++j) {
      e[j] = 0.0f;
      for (int i = 0; i < NM; ++i) w[i][j] = 0.0f;
    }
    for (int i = 0; i < NM; ++i) {
      const float* __restrict wi = w[i];
      a.blk_tau[blk * NM + i] = lane_sum(np, [&](int64_t j) { return std::fabs(wi[j]); });
      uint32_t* __restrict words = a.masks + i * a.n_words + off / 32;
      for (int64_t q = 0; q < np / 32; ++q) {
        uint32_t word = 0;
        for (int k = 0; k < 32; ++k) word |= uint32_t(agrees(wi[q * 32 + k])) << k;
        words[q] = word;
      }
      a.blk_u[blk * NM + i] = lane_sum(np, [&](int64_t j) { return select_f32(agrees(wi[j]), e[j], 0.0f); });
    }
  }
}

// Runs fused_elect_blocks where it applies; false otherwise.
template <bool kSignZero>
inline bool fused_elect(const ElectArgs& a, int64_t blk0, int64_t blk1) {
  if (a.u_dtype != a.base_dtype) return false;
  return dispatch_one_dtype<kMaxFusedModels>(a.base_dtype, a.in_dtypes, a.n_models, [&](auto tag, auto nm) {
    fused_elect_blocks<decltype(tag)::value, decltype(nm)::value, kSignZero>(a, blk0, blk1);
  });
}

template <bool kSignZero>
inline void elect_blocks(const ElectArgs& a, int64_t blk0, int64_t blk1) {
  if (fused_elect<kSignZero>(a, blk0, blk1)) return;
  const int64_t N = a.n_models;
  // All N task vectors of a block stay resident: 4 KiB per model. After the
  // election a model's slot holds its agreement mask (all ones / zero bits).
  std::unique_ptr<float[]> tau_store(new float[size_t(N * kBlock)]);
  float* const tau = tau_store.get();
  alignas(64) float b[kBlock];
  alignas(64) float s[kBlock];
  alignas(64) float g[kBlock];
  alignas(64) float e[kBlock];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t off = blk * kBlock;
    const int64_t n = std::min(kBlock, a.numel - off);
    // Padding to whole words: tau = 0 there never agrees, so padding bits and
    // padded sum terms are all zero.
    const int64_t np = (n + 31) & ~int64_t(31);
    load_any(a.base_dtype, b, a.base, off, n);
    for (int64_t j = n; j < np; ++j) b[j] = 0.0f;
    for (int64_t j = 0; j < np; ++j) s[j] = 0.0f;
    for (int64_t i = 0; i < N; ++i) {
      float* t = tau + i * kBlock;
      a.blk_tau[blk * N + i] = dispatch_tau(a.in_dtypes[i], t, s, b, a.inputs[i], off, n, np);
    }
    for (int64_t j = 0; j < np; ++j) {
      const float neg = kSignZero ? select_f32(s[j] < 0.0f, -1.0f, 0.0f) : -1.0f;
      g[j] = select_f32(s[j] > 0.0f, 1.0f, neg);
      e[j] = 0.0f;
    }
    for (int64_t i = 0; i < N; ++i) {
      float* __restrict t = tau + i * kBlock;
      for (int64_t j = 0; j < np; ++j) {
        const bool ag = g[j] * t[j] > 0.0f;
        const float v = select_f32(ag, std::fabs(t[j]), 0.0f);
        e[j] = v > e[j] ? v : e[j];
        t[j] = f32_from_bits(0u - uint32_t(ag));
      }
      uint32_t* __restrict words = a.masks + i * a.n_words + off / 32;
      for (int64_t w = 0; w < np / 32; ++w) {
        uint32_t word = 0;
        for (int k = 0; k < 32; ++k) word |= (f32_to_bits(t[w * 32 + k]) & 1u) << k;
        words[w] = word;
      }
    }
    // u = g * e: g = -1 with nothing agreeing gives -0, as in the reference.
    for (int64_t j = 0; j < np; ++j) s[j] = g[j] * e[j];
    store_any(a.u_dtype, a.u, off, s, n);
    // sum_p a_i |u_p|, with |u| = e wherever some model agrees.
    for (int64_t i = 0; i < N; ++i) {
      const float* __restrict m = tau + i * kBlock;
      a.blk_u[blk * N + i] =
          lane_sum(np, [&](int64_t j) { return f32_from_bits(f32_to_bits(m[j]) & f32_to_bits(e[j])); });
    }
  }
}

using ElectFn = void (*)(const ElectArgs&, int64_t, int64_t);

PYMERGE_EMR_FLATTEN void elect_generic(const ElectArgs& a, int64_t b0, int64_t b1) {
  if (a.sign_zero)
    elect_blocks<true>(a, b0, b1);
  else
    elect_blocks<false>(a, b0, b1);
}

#ifdef PYMERGE_EMR_X86_CLONES
PYMERGE_CLONE_AVX2 void elect_avx2(const ElectArgs& a, int64_t b0, int64_t b1) {
  if (a.sign_zero)
    elect_blocks<true>(a, b0, b1);
  else
    elect_blocks<false>(a, b0, b1);
}

PYMERGE_CLONE_AVX512 void elect_avx512(const ElectArgs& a, int64_t b0, int64_t b1) {
  if (a.sign_zero)
    elect_blocks<true>(a, b0, b1);
  else
    elect_blocks<false>(a, b0, b1);
}
#endif

struct ReconArgs {
  void* out;
  int out_dtype;
  const void* base;
  int base_dtype;
  const void* u;
  int u_dtype;
  const uint32_t* words;
  int64_t numel;
  float lam;
  bool stream = false;  // output larger than the cache: written with streaming stores
};

inline void recon_blocks(const ReconArgs& a, int64_t blk0, int64_t blk1) {
  alignas(64) float b[kBlock];
  alignas(64) float u[kBlock];
  alignas(64) float staged[kBlock];  // the rounded block, when streamed
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t off = blk * kBlock;
    const int64_t n = std::min(kBlock, a.numel - off);
    const int64_t np = (n + 31) & ~int64_t(31);
    load_any(a.base_dtype, b, a.base, off, n);
    load_any(a.u_dtype, u, a.u, off, n);
    for (int64_t j = n; j < np; ++j) b[j] = u[j] = 0.0f;
    const uint32_t* __restrict words = a.words + off / 32;
    for (int64_t w = 0; w < np / 32; ++w) {
      const uint32_t word = words[w];
      for (int k = 0; k < 32; ++k) {
        const int64_t j = w * 32 + k;
        const float d = select_f32((word & (1u << k)) != 0, a.lam * u[j], 0.0f);
        b[j] = b[j] + d;
      }
    }
#ifdef PYMERGE_STREAM_STORES
    if (a.stream) {
      const int64_t size = int64_t(dtype_size(a.out_dtype));
      store_any(a.out_dtype, staged, 0, b, n);
      stream_copy(static_cast<char*>(a.out) + off * size, staged, n * size);
      continue;
    }
#endif
    store_any(a.out_dtype, a.out, off, b, n);
  }
#ifdef PYMERGE_STREAM_STORES
  if (a.stream) stream_fence();
#endif
}

using ReconFn = void (*)(const ReconArgs&, int64_t, int64_t);

PYMERGE_EMR_FLATTEN void recon_generic(const ReconArgs& a, int64_t b0, int64_t b1) { recon_blocks(a, b0, b1); }

#ifdef PYMERGE_EMR_X86_CLONES
PYMERGE_CLONE_AVX2 void recon_avx2(const ReconArgs& a, int64_t b0, int64_t b1) {
  recon_blocks(a, b0, b1);
}
#endif

}  // namespace

// Preconditions (checked by the binding): valid tags, n_models >= 1, numel >= 1,
// masks of n_models * ceil(numel/32) words, abs_tau / abs_u of n_models doubles.
void elect(const ElectArgs& args, double* abs_tau, double* abs_u) {
  const int64_t N = args.n_models;
  const int64_t n_blocks = (args.numel + kBlock - 1) / kBlock;
  std::vector<double> blk_tau(size_t(n_blocks * N)), blk_u(size_t(n_blocks * N));
  ElectArgs a = args;
  a.blk_tau = blk_tau.data();
  a.blk_u = blk_u.data();
  ElectFn fn = elect_generic;
#ifdef PYMERGE_EMR_X86_CLONES
  if (use_avx512())
    fn = elect_avx512;
  else if (use_avx2())
    fn = elect_avx2;
#endif
  parallel_for(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { fn(a, b0, b1); });
  for (int64_t i = 0; i < N; ++i) {
    abs_tau[i] = ordered_sum(blk_tau.data() + i, n_blocks, N);
    abs_u[i] = ordered_sum(blk_u.data() + i, n_blocks, N);
  }
}

void reconstruct(const ReconArgs& args) {
  const int64_t n_blocks = (args.numel + kBlock - 1) / kBlock;
  ReconArgs a = args;
  ReconFn fn = recon_generic;
#ifdef PYMERGE_EMR_X86_CLONES
  if (use_avx2()) {
    fn = recon_avx2;
    a.stream = stream_output(a.numel, int64_t(dtype_size(a.out_dtype)));
  }
#endif
  parallel_for_dynamic(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { fn(a, b0, b1); });
}

namespace {

// Bit j of a word is byte j of its 32-byte run (any nonzero byte is a 1).
inline uint32_t pack_word(const uint8_t* __restrict p, int64_t m) {
  uint32_t word = 0;
  for (int64_t k = 0; k < m; ++k) word |= uint32_t(p[k] != 0) << k;
  return word;
}

inline void unpack_word(uint32_t word, uint8_t* __restrict p, int64_t m) {
  for (int64_t k = 0; k < m; ++k) p[k] = uint8_t((word >> k) & 1u);
}

// Full words of one row, 32 bytes per vector: a byte compare and movemask one
// way; the way back spreads each word byte over 8 lanes and tests one bit each.
using PackFn = void (*)(const uint8_t*, int64_t, uint32_t*);
using UnpackFn = void (*)(const uint32_t*, int64_t, uint8_t*);

void pack_words_generic(const uint8_t* bits, int64_t nw, uint32_t* words) {
  for (int64_t w = 0; w < nw; ++w) words[w] = pack_word(bits + w * 32, 32);
}

void unpack_words_generic(const uint32_t* words, int64_t nw, uint8_t* bits) {
  for (int64_t w = 0; w < nw; ++w) unpack_word(words[w], bits + w * 32, 32);
}

#ifdef PYMERGE_EMR_X86_CLONES
__attribute__((target("avx2"))) void pack_words_avx2(const uint8_t* bits, int64_t nw, uint32_t* words) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t w = 0; w < nw; ++w) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + w * 32));
    words[w] = ~uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
  }
}

__attribute__((target("avx2"))) void unpack_words_avx2(const uint32_t* words, int64_t nw, uint8_t* bits) {
  // Lane k reads word byte k / 8 and tests bit k % 8.
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t w = 0; w < nw; ++w) {
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(words[w])), spread);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + w * 32), _mm256_and_si256(set, one));
  }
}
#endif

// The rows x ceil(n/32) words split among threads: full(e, q, count) for a run of
// whole words inside one row (first element e, first word q), partial(e, q, m)
// for a row's last word when it holds m < 32 elements.
template <class Full, class Partial>
void for_word_runs(int64_t rows, int64_t n, const Full& full, const Partial& partial) {
  constexpr int64_t kGrainWords = 1 << 14;
  const int64_t nw = (n + 31) / 32, whole = n / 32;
  parallel_for(rows * nw, kGrainWords, [&](int64_t w0, int64_t w1) {
    for (int64_t q = w0; q < w1;) {
      const int64_t r = q / nw, w = q % nw;
      const int64_t run = std::min(w1 - q, std::max<int64_t>(whole - w, 0));
      if (run > 0) {
        full(r * n + w * 32, q, run);
        q += run;
      } else {
        partial(r * n + w * 32, q, n - w * 32);
        ++q;
      }
    }
  });
}

}  // namespace

// rows x n bytes (0/1) -> rows x ceil(n/32) words, last word zero-padded.
void pack(const uint8_t* bits, int64_t rows, int64_t n, uint32_t* words) {
  PackFn fn = pack_words_generic;
#ifdef PYMERGE_EMR_X86_CLONES
  if (use_avx2()) fn = pack_words_avx2;
#endif
  for_word_runs(
      rows, n, [&](int64_t e, int64_t q, int64_t count) { fn(bits + e, count, words + q); },
      [&](int64_t e, int64_t q, int64_t m) { words[q] = pack_word(bits + e, m); });
}

void unpack(const uint32_t* words, int64_t rows, int64_t n, uint8_t* bits) {
  UnpackFn fn = unpack_words_generic;
#ifdef PYMERGE_EMR_X86_CLONES
  if (use_avx2()) fn = unpack_words_avx2;
#endif
  for_word_runs(
      rows, n, [&](int64_t e, int64_t q, int64_t count) { fn(words + q, count, bits + e); },
      [&](int64_t e, int64_t q, int64_t m) { unpack_word(words[q], bits + e, m); });
}

}  // namespace emr
}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;
namespace emr = pymerge::cpu::emr;

int64_t words_for(int64_t n) { return (n + 31) / 32; }

void emr_elect_binding(uintptr_t base_ptr, int base_dtype, const std::vector<uintptr_t>& in_ptrs,
                       const std::vector<int>& in_dtypes, int64_t numel, bool sign_zero, uintptr_t u_ptr,
                       int u_dtype, uintptr_t masks_ptr, uintptr_t abs_tau_ptr, uintptr_t abs_u_ptr) {
  const size_t n = in_ptrs.size();
  if (n == 0) throw py::value_error("emr_elect: at least one input is needed");
  if (in_dtypes.size() != n)
    throw py::value_error("emr_elect: " + std::to_string(n) + " inputs, " + std::to_string(in_dtypes.size()) +
                          " dtypes");
  if (numel < 0) throw py::value_error("emr_elect: numel < 0");
  check_dtype(base_dtype, "base");
  check_dtype(u_dtype, "u");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "input " + std::to_string(i));
  check_ptr(abs_tau_ptr, "abs_tau_sum");
  check_ptr(abs_u_ptr, "abs_masked_u_sum");
  auto* abs_tau = mptr<double>(abs_tau_ptr);
  auto* abs_u = mptr<double>(abs_u_ptr);
  if (numel == 0) {
    for (size_t i = 0; i < n; ++i) abs_tau[i] = abs_u[i] = 0.0;
    return;
  }
  check_ptr(base_ptr, "base");
  check_ptr(u_ptr, "u");
  check_ptr(masks_ptr, "masks");
  for (size_t i = 0; i < n; ++i) {
    check_ptr(in_ptrs[i], "input " + std::to_string(i));
    check_no_overlap(u_ptr, u_dtype, in_ptrs[i], in_dtypes[i], numel, "input " + std::to_string(i));
  }
  check_no_overlap(u_ptr, u_dtype, base_ptr, base_dtype, numel, "base");

  std::vector<const void*> inputs(n);
  for (size_t i = 0; i < n; ++i) inputs[i] = reinterpret_cast<const void*>(in_ptrs[i]);
  emr::ElectArgs a{};
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_dtype;
  a.inputs = inputs.data();
  a.in_dtypes = in_dtypes.data();
  a.n_models = int64_t(n);
  a.numel = numel;
  a.sign_zero = sign_zero;
  a.u = reinterpret_cast<void*>(u_ptr);
  a.u_dtype = u_dtype;
  a.masks = mptr<uint32_t>(masks_ptr);
  a.n_words = words_for(numel);
  py::gil_scoped_release release;
  emr::elect(a, abs_tau, abs_u);
}

void emr_reconstruct_binding(uintptr_t out_ptr, int out_dtype, uintptr_t base_ptr, int base_dtype, uintptr_t u_ptr,
                             int u_dtype, uintptr_t words_ptr, int64_t numel, float lam) {
  if (numel < 0) throw py::value_error("emr_reconstruct: numel < 0");
  check_dtype(out_dtype, "out");
  check_dtype(base_dtype, "base");
  check_dtype(u_dtype, "u");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  check_ptr(base_ptr, "base");
  check_ptr(u_ptr, "u");
  check_ptr(words_ptr, "mask_words");
  check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");
  check_no_overlap(out_ptr, out_dtype, u_ptr, u_dtype, numel, "u");
  emr::ReconArgs a{reinterpret_cast<void*>(out_ptr), out_dtype, reinterpret_cast<const void*>(base_ptr), base_dtype,
                   reinterpret_cast<const void*>(u_ptr), u_dtype, cptr<uint32_t>(words_ptr), numel, lam};
  py::gil_scoped_release release;
  emr::reconstruct(a);
}

void pack_bits_binding(uintptr_t bits_ptr, int64_t rows, int64_t n, uintptr_t words_ptr) {
  if (rows < 0 || n < 0) throw py::value_error("pack_bits: negative size");
  if (rows == 0 || n == 0) return;
  check_ptr(bits_ptr, "mask");
  check_ptr(words_ptr, "words");
  py::gil_scoped_release release;
  emr::pack(cptr<uint8_t>(bits_ptr), rows, n, mptr<uint32_t>(words_ptr));
}

void unpack_bits_binding(uintptr_t words_ptr, int64_t rows, int64_t n, uintptr_t bits_ptr) {
  if (rows < 0 || n < 0) throw py::value_error("unpack_bits: negative size");
  if (rows == 0 || n == 0) return;
  check_ptr(words_ptr, "words");
  check_ptr(bits_ptr, "mask");
  py::gil_scoped_release release;
  emr::unpack(cptr<uint32_t>(words_ptr), rows, n, mptr<uint8_t>(bits_ptr));
}

}  // namespace

PYMERGE_BINDINGS(emr) {
  m.def("emr_elect", &emr_elect_binding, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("numel"), py::arg("sign_zero"), py::arg("u_ptr"), py::arg("u_dtype"),
        py::arg("masks_ptr"), py::arg("abs_tau_ptr"), py::arg("abs_u_ptr"),
        "EMR elect over contiguous buffers of numel elements: writes u (u_dtype), the int32 bit-planes "
        "[N, ceil(numel/32)] and the fp64 sums sum|tau_i| and sum a_i|u| (N doubles each).");
  m.def("emr_reconstruct", &emr_reconstruct_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("u_ptr"), py::arg("u_dtype"), py::arg("words_ptr"), py::arg("numel"),
        py::arg("lam"), "out = base + (M ? lam * u : +0) in fp32, rounded once to out_dtype; lam taken as fp32.");
  m.def("pack_bits", &pack_bits_binding, py::arg("bits_ptr"), py::arg("rows"), py::arg("n"), py::arg("words_ptr"),
        "rows x n bool bytes -> rows x ceil(n/32) uint32 words (bit j of word w = element 32w+j).");
  m.def("unpack_bits", &unpack_bits_binding, py::arg("words_ptr"), py::arg("rows"), py::arg("n"),
        py::arg("bits_ptr"), "Inverse of pack_bits: rows x ceil(n/32) words -> rows x n bool bytes.");
}
