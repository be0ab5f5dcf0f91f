// DARE on the GPU: drop and rescale (specs/methods.md, "dare_linear,
// dare_ties"; torch reference pymerge/ops/reference/dare.py, philox.py).
//
// keep_{i,p} = u < fp32(density_i), u from Philox 4x32-10 keyed by
// (name, seed, i) with the flat index p as counter (common/philox.h, shared
// with the CPU kernels): masks are regenerated in every pass, never stored,
// and equal the reference's for any grid. Per model,
// tau_hat = keep ? fp32(tau * f_i) : +0 (f_i = 1 for "no rescale": tau * 1 ==
// tau), then linear_combine or the TIES steps 2-6, one rounding at the end.
//
// Rescale "l1" (the default): the factor f_i = fp32(n1 / n2) needs the exact
// L1 norms n1 = sum |tau_i|, n2 = sum over kept |tau_i| (the reference's
// l1_norm_exact). Every finite fp32 |x| is m * 2^(e - 150) with a 24-bit
// integer m and biased exponent e (subnormals e = 1), so the m are summed in
// 64-bit integers per exponent: integer sums are exact in any order, so the
// kernel may use atomics (integer ones) and still give the exact value, which
// dare_factors_kernel rounds once to fp64 (nearest-even) and divides, on the
// device, with no host round trip. Within a warp, lanes with the same
// exponent first add their mantissas with __reduce_add_sync (32 values of
// < 2^24 fit in 32 bits), then one lane adds to the block's shared histogram.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

#include "common/philox.h"

namespace pymerge {
namespace cuda {
namespace {

constexpr float kLastUniform = 1.0f - 0x1.0p-24f;  // the largest u
constexpr int kHistBins = 257;                     // exponents 0..255, then the NaN count
constexpr int kNanBin = 256;
constexpr int kL1Group = 8;                        // models per histogram launch (shared memory)
constexpr int kCache = 8;                          // models whose d_i stay in registers (ties)
constexpr double kL1Eps = 1e-7;                    // mergekit's eps, as the reference

struct DareArgs {
  Models models;
  philox::Key key[kMaxModels];
  float density[kMaxModels];
  float factor[kMaxModels];  // host factors, used when dev_factors is null
  float w[kMaxModels];
  const float* dev_factors;  // device fp32 [n] (the "l1" rescale) or null
  const void* base;
  int base_dtype;
  void* out;
  int out_dtype;
  int64_t numel;
  float scale;  // c (linear) or lambda (ties)
  bool normalize;
  bool count;
  bool vec;
  // l1 histogram pass
  int m0;                        // first model of the group
  int group;                     // models in the group
  unsigned long long* hist;      // [n, 2, kHistBins]
};

// The 8 keep bits of a pack (bit j: element i0 + j kept); none past numel.
__device__ __forceinline__ uint32_t keep_bits(philox::Key key, float density, int64_t i0, int valid) {
  if (!(density > 0.0f)) return 0u;
  if (density > kLastUniform) return (1u << valid) - 1u;
  uint32_t bits = 0;
  const uint32_t lo = uint32_t(i0), hi = uint32_t(uint64_t(i0) >> 32);
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    // i0 is a multiple of 8, so lo + j never carries into the high word.
    const bool keep = philox::keep(philox::word0(lo + uint32_t(j), hi, key), density);
    bits |= uint32_t(keep && j < valid) << j;
  }
  return bits;
}

template <int kTag>
__device__ __forceinline__ void tau_pack(const DareArgs& a, int i, int64_t i0, const float (&b)[kPack],
                                         float (&t)[kPack]) {
  load_pack(a.models.ptr[i], kTag >= 0 ? kTag : int(a.models.dtype[i]), i0, a.numel, a.vec, t);
#pragma unroll
  for (int j = 0; j < kPack; ++j) t[j] = fsub(t[j], b[j]);
}

// tau_hat_i of a pack.
template <int kTag>
__device__ __forceinline__ void dropped(const DareArgs& a, int i, int64_t i0, int valid, const float (&b)[kPack],
                                        float (&r)[kPack]) {
  const uint32_t bits = keep_bits(a.key[i], a.density[i], i0, valid);
  if (bits == 0u) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) r[j] = 0.0f;
    return;
  }
  tau_pack<kTag>(a, i, i0, b, r);
  const float f = a.dev_factors ? a.dev_factors[i] : a.factor[i];
#pragma unroll
  for (int j = 0; j < kPack; ++j) r[j] = masked(fmul(r[j], f), mask_of((bits >> j) & 1u));
}

// ---- the l1 histograms -------------------------------------------------------------

// Adds (mant, kept mant) at `bin` for every lane of the warp (all 32 call it).
__device__ __forceinline__ void hist_add(unsigned long long* h_all, unsigned long long* h_kept, uint32_t bin,
                                         uint32_t mant, uint32_t kept) {
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
  const uint32_t s_all = __reduce_add_sync(peers, mant);
  const uint32_t s_kept = __reduce_add_sync(peers, kept);
  const int leader = __ffs(peers) - 1;
  if ((threadIdx.x & 31) == leader) {
    if (s_all) atomicAdd(h_all + bin, (unsigned long long)s_all);
    if (s_kept) atomicAdd(h_kept + bin, (unsigned long long)s_kept);
  }
}

template <int kTag>
__global__ void __launch_bounds__(kThreads) dare_l1_hist_kernel(const __grid_constant__ DareArgs a) {
  __shared__ unsigned long long h[kL1Group * 2 * kHistBins];
  for (int k = threadIdx.x; k < a.group * 2 * kHistBins; k += blockDim.x) h[k] = 0ull;
  __syncthreads();
  const int64_t n_packs = packs_of(a.numel);
  // Warp-uniform loop: the warp-level aggregation needs all 32 lanes.
  for (int64_t p0 = global_thread() & ~int64_t(31); p0 < n_packs; p0 += grid_threads()) {
    const int64_t p = p0 + (threadIdx.x & 31);
    const bool live = p < n_packs;
    const int64_t i0 = p * kPack;
    const int valid = live ? int(a.numel - i0 < kPack ? a.numel - i0 : kPack) : 0;
    float b[kPack];
    if (live) {
      load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    } else {
#pragma unroll
      for (int j = 0; j < kPack; ++j) b[j] = 0.0f;
    }
    for (int g = 0; g < a.group; ++g) {
      const int i = a.m0 + g;
      float t[kPack] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (live) tau_pack<kTag>(a, i, i0, b, t);
      const uint32_t bits = live ? keep_bits(a.key[i], a.density[i], i0, valid) : 0u;
      unsigned long long* h_all = h + (g * 2) * kHistBins;
      unsigned long long* h_kept = h_all + kHistBins;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const uint32_t x = __float_as_uint(t[j]) & 0x7FFFFFFFu;
        const uint32_t e = x >> 23, frac = x & 0x7FFFFFu;
        uint32_t bin, mant;
        if (e == 255u) {  // inf: a nonzero count in bin 255; NaN: the NaN bin
          bin = frac ? uint32_t(kNanBin) : 255u;
          mant = 1u;
        } else {
          bin = e ? e : 1u;
          mant = e ? (frac | 0x800000u) : frac;
        }
        if (j >= valid) mant = 0u;  // padding (t is 0 there anyway)
        hist_add(h_all, h_kept, bin, mant, mant & (0u - ((bits >> j) & 1u)));
      }
    }
  }
  __syncthreads();
  unsigned long long* out = a.hist + int64_t(a.m0) * 2 * kHistBins;
  for (int k = threadIdx.x; k < a.group * 2 * kHistBins; k += blockDim.x)
    if (h[k]) atomicAdd(out + k, h[k]);
}

// sum_e m[e] * 2^(e - 150) for e in 1..254, rounded once to fp64 (nearest-even).
__device__ double exact_to_double(const unsigned long long* m) {
  constexpr int kLimbs = 6;  // m[e] < 2^64, e <= 254: the total is below 2^326
  unsigned long long limb[kLimbs] = {0, 0, 0, 0, 0, 0};
  for (int e = 1; e < 255; ++e) {
    const unsigned long long v = m[e];
    if (!v) continue;
    const int word = e / 64, sh = e % 64;
    unsigned long long parts[2] = {v << sh, sh ? v >> (64 - sh) : 0ull};
    for (int q = 0; q < 2; ++q) {
      unsigned long long carry = parts[q];
      for (int w = word + q; w < kLimbs && carry; ++w) {
        const unsigned long long s = limb[w] + carry;
        carry = s < carry ? 1ull : 0ull;
        limb[w] = s;
      }
    }
  }
  int top = -1;
  for (int w = kLimbs - 1; w >= 0 && top < 0; --w)
    if (limb[w]) top = w * 64 + 63 - __clzll((long long)limb[w]);
  if (top < 0) return 0.0;
  auto bit = [&](int p) -> unsigned long long { return (limb[p / 64] >> (p % 64)) & 1ull; };
  if (top <= 52) return ldexp(double(limb[0]), -150);  // exact
  const int shift = top - 52;
  unsigned long long mant = 0;
  for (int p = top; p >= shift; --p) mant = (mant << 1) | bit(p);
  const unsigned long long round = bit(shift - 1);
  bool sticky = false;
  for (int p = 0; p < shift - 1 && !sticky; ++p) sticky = bit(p) != 0;
  if (round && (sticky || (mant & 1ull))) ++mant;  // 2^53 is still exact
  return ldexp(double(mant), shift - 150);
}

__device__ double l1_value(const unsigned long long* m) {
  if (m[kNanBin]) return __longlong_as_double(0x7FF8000000000000ll);
  if (m[255]) return __longlong_as_double(0x7FF0000000000000ll);  // an inf, and no NaN
  return exact_to_double(m);
}

// norms[i] = (n1, n2) in fp64; factors[i] = fp32(n1 / n2), or 1 when either is < 1e-7 (or NaN).
__global__ void dare_factors_kernel(const unsigned long long* hist, int n, double* norms, float* factors) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double n1 = l1_value(hist + int64_t(i) * 2 * kHistBins);
  const double n2 = l1_value(hist + (int64_t(i) * 2 + 1) * kHistBins);
  if (norms) {
    norms[2 * i] = n1;
    norms[2 * i + 1] = n2;
  }
  factors[i] = n1 >= kL1Eps && n2 >= kL1Eps ? __double2float_rn(__ddiv_rn(n1, n2)) : 1.0f;
}

// ---- merge ----------------------------------------------------------------------------

// TIES step 3-4 agreement: sign(d) == majority, zeros and NaN never agree.
__device__ __forceinline__ bool agrees(float d, bool pos) { return pos ? d > 0.0f : d < 0.0f; }

template <int kTag, bool kTies>
__global__ void __launch_bounds__(kThreads) dare_merge_kernel(const __grid_constant__ DareArgs a) {
  const int64_t n_packs = packs_of(a.numel);
  const int n = a.models.n;
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    const int valid = int(a.numel - i0 < kPack ? a.numel - i0 : kPack);
    float b[kPack];
    load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    float o[kPack];
    if (!kTies) {
      // linear_combine: acc = +0; acc = acc + w_i * tau_hat_i; out = b + acc * c
      float acc[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) acc[j] = 0.0f;
      for (int i = 0; i < n; ++i) {
        float r[kPack];
        dropped<kTag>(a, i, i0, valid, b, r);
        const float wi = a.w[i];
#pragma unroll
        for (int j = 0; j < kPack; ++j) acc[j] = fadd(acc[j], fmul(wi, r[j]));
      }
#pragma unroll
      for (int j = 0; j < kPack; ++j) o[j] = fadd(b[j], fmul(acc[j], a.scale));
    } else {
      // ties_combine: d_i = w_i * tau_hat_i; S = sum d_i ("sum") or sum sign(d_i) ("count");
      // majority +1 iff S >= 0; mixed = sum of agreeing d_i; div = sum of agreeing w_i
      // (normalize; 0 -> 1); out = b + (mixed [/ div]) * lambda.
      float cache[kCache][kPack];
      float s[kPack];
      int cnt[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) s[j] = 0.0f, cnt[j] = 0;
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        if (i < n) {
          dropped<kTag>(a, i, i0, valid, b, cache[i]);
#pragma unroll
          for (int j = 0; j < kPack; ++j) {
            const float d = fmul(a.w[i], cache[i][j]);
            cache[i][j] = d;
            s[j] = fadd(s[j], d);
            cnt[j] += int(d > 0.0f) - int(d < 0.0f);
          }
        }
      }
      for (int i = kCache; i < n; ++i) {
        float r[kPack];
        dropped<kTag>(a, i, i0, valid, b, r);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          const float d = fmul(a.w[i], r[j]);
          s[j] = fadd(s[j], d);
          cnt[j] += int(d > 0.0f) - int(d < 0.0f);
        }
      }
      bool pos[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) pos[j] = a.count ? cnt[j] >= 0 : s[j] >= 0.0f;  // NaN: majority -1
      float mixed[kPack], div[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) mixed[j] = 0.0f, div[j] = 0.0f;
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        if (i < n) {
#pragma unroll
          for (int j = 0; j < kPack; ++j) {
            const bool ag = agrees(cache[i][j], pos[j]);
            mixed[j] = fadd(mixed[j], ag ? cache[i][j] : 0.0f);
            if (a.normalize) div[j] = fadd(div[j], ag ? a.w[i] : 0.0f);
          }
        }
      }
      for (int i = kCache; i < n; ++i) {
        float r[kPack];
        dropped<kTag>(a, i, i0, valid, b, r);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          const float d = fmul(a.w[i], r[j]);
          const bool ag = agrees(d, pos[j]);
          mixed[j] = fadd(mixed[j], ag ? d : 0.0f);
          if (a.normalize) div[j] = fadd(div[j], ag ? a.w[i] : 0.0f);
        }
      }
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        float m = mixed[j];
        if (a.normalize) m = fdiv(m, div[j] == 0.0f ? 1.0f : div[j]);
        o[j] = fadd(b[j], fmul(m, a.scale));
      }
    }
    store_pack(a.out, a.out_dtype, i0, a.numel, a.vec, o);
  }
}

// The 0/1 keep mask of one model as bytes.
__global__ void __launch_bounds__(kThreads) dare_keep_mask_kernel(uint8_t* out, int64_t numel, philox::Key key,
                                                                  float density) {
  const int64_t n_packs = packs_of(numel);
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    const int valid = int(numel - i0 < kPack ? numel - i0 : kPack);
    const uint32_t bits = keep_bits(key, density, i0, valid);
    if (valid == kPack && (reinterpret_cast<uintptr_t>(out) & 7u) == 0) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= ((bits >> j) & 1u) << (8 * j);
        hi |= ((bits >> (j + 4)) & 1u) << (8 * j);
      }
      *reinterpret_cast<uint2*>(out + i0) = make_uint2(lo, hi);
    } else {
      for (int j = 0; j < valid; ++j) out[i0 + j] = uint8_t((bits >> j) & 1u);
    }
  }
}

template <class Launch>
void dispatch_tag(int tag, Launch&& launch) {
  switch (tag) {
    case FLOAT32: launch(std::integral_constant<int, FLOAT32>{}); break;
    case FLOAT16: launch(std::integral_constant<int, FLOAT16>{}); break;
    case BFLOAT16: launch(std::integral_constant<int, BFLOAT16>{}); break;
    default: launch(std::integral_constant<int, -1>{}); break;
  }
}

}  // namespace

namespace api {

using namespace pymerge::cuda::bind;

int dare_hist_bins() { return kHistBins; }

// Common argument checks and the kernel arguments of dare_l1 / dare_merge.
DareArgs dare_args(const char* op, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                   uintptr_t base_ptr, int base_dtype, int64_t numel, const std::string& name, uint64_t seed,
                   const std::vector<float>& densities, int& common) {
  const size_t n = in_ptrs.size();
  const std::string o(op);
  if (n == 0) fail(o + ": at least one model is needed");
  if (n > size_t(kMaxModels)) fail(o + ": at most " + std::to_string(kMaxModels) + " models per call");
  if (in_dtypes.size() != n || densities.size() != n) fail(o + ": per-model argument lists differ in length");
  if (numel < 0) fail(o + ": numel < 0");
  check_dtype(base_dtype, "base");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "model " + std::to_string(i));
  DareArgs a{};
  const uint64_t h = philox::fnv1a64(reinterpret_cast<const unsigned char*>(name.data()), name.size());
  common = in_dtypes[0];
  bool vec = base_ptr != 0 && aligned16(reinterpret_cast<void*>(base_ptr));
  for (size_t i = 0; i < n; ++i) {
    a.models.ptr[i] = reinterpret_cast<const void*>(in_ptrs[i]);
    a.models.dtype[i] = int8_t(in_dtypes[i]);
    a.key[i] = philox::dare_key(h, seed, uint64_t(i));
    a.density[i] = densities[i];
    a.factor[i] = 1.0f;
    a.w[i] = 1.0f;
    vec = vec && aligned16(a.models.ptr[i]);
    if (in_dtypes[i] != common) common = -1;
  }
  a.models.n = int(n);
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_dtype;
  a.numel = numel;
  a.vec = vec;
  if (numel > 0) {
    check_ptr(base_ptr, "base");
    for (size_t i = 0; i < n; ++i) check_ptr(in_ptrs[i], "model " + std::to_string(i));
  }
  return a;
}

// hist: device int64 [n, 2, dare_hist_bins()], zero-filled by the caller. Then
// factors (device fp32 [n]) and, when norms_ptr != 0, the norms (device fp64 [n, 2]).
void dare_l1_factors(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, uintptr_t base_ptr,
                     int base_dtype, int64_t numel, const std::string& name, uint64_t seed,
                     const std::vector<float>& densities, uintptr_t hist_ptr, uintptr_t factors_ptr,
                     uintptr_t norms_ptr, uintptr_t stream) {
  int common = -1;
  DareArgs a = dare_args("dare_l1_factors", in_ptrs, in_dtypes, base_ptr, base_dtype, numel, name, seed, densities,
                         common);
  check_ptr(hist_ptr, "hist");
  check_ptr(factors_ptr, "factors");
  const cudaStream_t s = stream_from(stream);
  a.hist = mptr<unsigned long long>(hist_ptr);
  const int n = a.models.n;
  if (numel > 0) {
    const int grid = grid_for(packs_of(numel), sm_count());
    for (int m0 = 0; m0 < n; m0 += kL1Group) {
      a.m0 = m0;
      a.group = n - m0 < kL1Group ? n - m0 : kL1Group;
      dispatch_tag(common, [&](auto t) {
        dare_l1_hist_kernel<decltype(t)::value><<<grid, kThreads, 0, s>>>(a);
      });
      check_launch("dare_l1_hist_kernel");
    }
  }
  dare_factors_kernel<<<1, 64, 0, s>>>(a.hist, n, norms_ptr ? mptr<double>(norms_ptr) : nullptr,
                                       mptr<float>(factors_ptr));
  check_launch("dare_factors_kernel");
}

// factors: host fp32 per model, or factors_ptr (device fp32 [n], from
// dare_l1_factors) when nonzero. scale: c (linear) or lambda (ties).
void dare_merge(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                const std::string& name, uint64_t seed, const std::vector<float>& densities,
                const std::vector<float>& factors, uintptr_t factors_ptr, const std::vector<float>& weights,
                bool combine_ties, float scale, bool normalize, bool consensus_count, uintptr_t stream) {
  int common = -1;
  DareArgs a =
      dare_args("dare_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel, name, seed, densities, common);
  const size_t n = in_ptrs.size();
  if (factors.size() != n || weights.size() != n) fail("dare_merge: per-model argument lists differ in length");
  check_dtype(out_dtype, "out");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  for (size_t i = 0; i < n; ++i)
    check_no_overlap(out_ptr, out_dtype, in_ptrs[i], in_dtypes[i], numel, "model " + std::to_string(i));
  check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");
  for (size_t i = 0; i < n; ++i) {
    a.factor[i] = factors[i];
    a.w[i] = weights[i];
  }
  a.dev_factors = cptr<float>(factors_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.scale = scale;
  a.normalize = normalize;
  a.count = consensus_count;
  a.vec = a.vec && aligned16(a.out);
  const int grid = grid_for(packs_of(numel), sm_count());
  const cudaStream_t s = stream_from(stream);
  dispatch_tag(common, [&](auto t) {
    constexpr int T = decltype(t)::value;
    if (combine_ties)
      dare_merge_kernel<T, true><<<grid, kThreads, 0, s>>>(a);
    else
      dare_merge_kernel<T, false><<<grid, kThreads, 0, s>>>(a);
  });
  check_launch("dare_merge_kernel");
}

void dare_keep_mask(uintptr_t out_ptr, int64_t numel, const std::string& name, uint64_t seed, uint64_t model_index,
                    float density, uintptr_t stream) {
  if (numel < 0) fail("dare_keep_mask: numel < 0");
  if (numel == 0) return;
  check_ptr(out_ptr, "dare_keep_mask: out");
  const uint64_t h = philox::fnv1a64(reinterpret_cast<const unsigned char*>(name.data()), name.size());
  dare_keep_mask_kernel<<<grid_for(packs_of(numel), sm_count()), kThreads, 0, stream_from(stream)>>>(
      mptr<uint8_t>(out_ptr), numel, philox::dare_key(h, seed, model_index), density);
  check_launch("dare_keep_mask_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(dare) {
  namespace py = pybind11;
  namespace api = pymerge::cuda::api;
  m.attr("DARE_HIST_BINS") = api::dare_hist_bins();
  m.def("dare_l1_factors", &api::dare_l1_factors, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("numel"), py::arg("name"), py::arg("seed"), py::arg("densities"),
        py::arg("hist_ptr"), py::arg("factors_ptr"), py::arg("norms_ptr"), py::arg("stream"),
        "Exact L1 norms (sum |tau|, sum over kept |tau|) per model via integer exponent histograms "
        "(hist: zeroed device int64 [n, 2, DARE_HIST_BINS]); writes the fp32 rescale factors [n] and, when "
        "norms_ptr != 0, the fp64 norms [n, 2]. name: the tensor name's UTF-8 bytes.");
  m.def("dare_merge", &api::dare_merge, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("densities"), py::arg("factors"), py::arg("factors_ptr"), py::arg("weights"),
        py::arg("combine_ties"), py::arg("scale"), py::arg("normalize"), py::arg("consensus_count"),
        py::arg("stream"),
        "DARE drop (Philox mask) and rescale (host factors, or device factors at factors_ptr), then "
        "linear_combine (scale = c) or the TIES steps 2-6 (scale = lambda); one rounding to out_dtype.");
  m.def("dare_keep_mask", &api::dare_keep_mask, py::arg("out_ptr"), py::arg("numel"), py::arg("name"),
        py::arg("seed"), py::arg("model_index"), py::arg("density"), py::arg("stream"),
        "Writes the 0/1 keep mask (u < density, density fp32) of numel elements as bytes.");
}
#endif
