// PCB-Merging (specs/methods.md, "pcb"): scores, the fused merge given the
// statistics, and the per-tensor merge with exact quantiles.
//
// Per element, in the fp32 op order of pymerge/ops/reference/pcb.py (built
// with -ffp-contract=off, so every arrow is one rounded operation):
//   tau_i   = f32(theta_i) - f32(theta_0)
//   S       = 0; S = S + tau_i for i = 0..N-1
//   a_i     = min(max(|tau_i|, lo_i), hi_i)          (NaN-propagating, as torch)
//   tt_i    = sign(tau_i) * a_i
//   nrm_i   = (a_i - lo_i) / (hi_i - lo_i), or +0 where hi_i == lo_i
//   beta_i  = exp(f32(N) * (nrm_i * nrm_i - 1)) * tanh(tau_i * S)
//   s_i     = max(beta_i - q_i, 0) / (M_i - q_i), or +0 where M_i == q_i
//   num     = 0; num = num + (w_i * tt_i); den = 0; den = den + s_i
//   out     = f32(theta_0) + lam * (num / max(den, 1e-12))   (or with lambdas:
//             w_i = lambda_i * s_i and no lam)
// exp and tanh are evaluated in double and rounded once to fp32: that is the
// correctly rounded fp32 result except in astronomically rare double-rounding
// cases (checked against glibc's double exp/tanh on all 2^32 inputs). torch's
// fp32 exp/tanh (SLEEF, 1 ulp) are not correctly rounded everywhere, so scores
// can differ from the reference in the last bit; see tests/backends/test_cpu_pcb.py.
//
// Selection (pcb_merge, per-tensor scope): lo/hi are exact order statistics of
// |tau_i| (abs_key, computed on the fly from the inputs), q_i of beta_i
// (order_key, -0 counted as +0, NaN above +inf like torch.sort). beta is
// computed once into an fp32 [N, d] buffer: exp and tanh dominate the cost, and
// evaluating them again in each selection pass and in the merge would cost
// three to four times as much as storing and re-reading 4 bytes per score.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/select.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

#if defined(__GNUC__)
#define PYMERGE_PCB_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_PCB_FLATTEN
#endif

namespace pymerge {

namespace cpu {
namespace pcb {

// ---------------------------------------------------------------- fp32 exp / tanh

inline uint64_t dbits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline double dfrom(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Branch-free select (keeps the loops vectorisable, see dtype.h select_u32).
inline double select_f64(bool cond, double a, double b) {
  const uint64_t m = 0 - uint64_t(cond);
  return dfrom((dbits(a) & m) | (dbits(b) & ~m));
}

constexpr double kInvLn2 = 0x1.71547652b82fep0;
constexpr double kLn2Hi = 0x1.62e42feep-1;  // 32 trailing zero bits: k * kLn2Hi is exact
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kRoundShift = 0x1.8p52;  // adding it rounds to an integer held in the low bits

// expm1(r) for |r| <= ln2/2 (plus rounding slack): Taylor series to r^14, the
// remainder is below 1e-18 relative, far under double's own rounding.
inline double expm1_poly(double r) {
  double p = 1.0 / 87178291200.0;
  p = p * r + 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r;
}

// x = k ln2 + r with k = round(x / ln2); returns r and 2^k. |x| <= 700.
inline double reduce_ln2(double x, double& scale, bool& k_zero) {
  const double shifted = x * kInvLn2 + kRoundShift;
  const double k = shifted - kRoundShift;
  scale = dfrom((dbits(shifted) + uint64_t(1023)) << 52);
  k_zero = k == 0.0;
  return (x - k * kLn2Hi) - k * kLn2Lo;
}

inline float exp_f32(float xf) {
  double x = xf;
  // Beyond these the fp32 result is 0 or inf anyway; NaN passes through.
  x = select_f64(x < -160.0, -160.0, x);
  x = select_f64(x > 100.0, 100.0, x);
  double scale;
  bool k_zero;
  const double r = reduce_ln2(x, scale, k_zero);
  return float(scale * (1.0 + expm1_poly(r)));
}

// tanh|x| = expm1(2|x|) / (expm1(2|x|) + 2), sign of x restored (tanh(-0) = -0).
inline float tanh_f32(float xf) {
  double y = std::fabs(2.0 * double(xf));
  y = select_f64(y > 40.0, 40.0, y);  // tanh rounds to 1 long before
  double scale;
  bool k_zero;
  const double r = reduce_ln2(y, scale, k_zero);
  const double p = expm1_poly(r);
  // k == 0: r == y and p is expm1(y) itself, accurate down to the subnormals.
  const double em1 = select_f64(k_zero, p, scale * (1.0 + p) - 1.0);
  const float t = float(em1 / (em1 + 2.0));
  return f32_from_bits((f32_to_bits(t) & 0x7FFFFFFFu) | (f32_to_bits(xf) & 0x80000000u));
}

// ---------------------------------------------------------------- elementwise pieces

inline float select_f32(bool cond, float a, float b) {
  return f32_from_bits(select_u32(cond, f32_to_bits(a), f32_to_bits(b)));
}

// torch.maximum / torch.minimum: a NaN in either operand gives NaN.
inline float max_nan(float a, float b) { return select_f32(a < b || b != b, b, a); }
inline float min_nan(float a, float b) { return select_f32(b < a || b != b, b, a); }

// torch.sign: +-1, or 0 for zeros and NaN.
inline float sign_f32(float x) {
  return f32_from_bits(select_u32(x > 0.0f, 0x3F800000u, 0u) | select_u32(x < 0.0f, 0xBF800000u, 0u));
}

// torch.clamp_min(x, c): keeps NaN (and -0 for c = 0).
inline float clamp_min(float x, float c) { return select_f32(x < c, c, x); }

// Selection key of a score: order_key with -0 as +0 and every NaN above +inf.
inline uint32_t beta_key(float b) { return select_u32(b != b, 0xFFFFFFFFu, order_key(b + 0.0f)); }

inline float beta_from_key(uint32_t k) { return k == 0xFFFFFFFFu ? NAN : from_order_key(k); }

// ---------------------------------------------------------------- the block kernel

// 1024 fp32 = 4 KiB per buffer; the 8 buffers stay in L1.
constexpr int64_t kBlock = 1024;
// 8 blocks per thread at least: every element costs an exp and a tanh per model.
constexpr int64_t kGrainBlocks = 8;

enum Mode { kScores, kFusedMerge, kStoredMerge };

struct Args {
  const void* const* inputs;
  const int* in_dtypes;
  int64_t n_models;
  const void* base;
  int base_dtype;
  int64_t numel;
  const float* lo;
  const float* hi;
  const float* q;  // merge modes
  const float* m;
  float lam;
  const float* lambdas;   // null: lam mode
  float* beta;            // [N, numel]: written by kScores, read by kStoredMerge
  uint32_t* block_max;    // kScores, optional: [n_blocks, N] max beta_key per block
  void* out;              // merge modes
  int out_dtype;
};

template <int T>
inline void load_f32(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

template <int T>
inline void load_tau(float* __restrict tau, const float* __restrict b, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) tau[j] = Dtype<T>::load(p[j]) - b[j];
}

inline void load_tau_any(int tag, float* tau, const float* b, const void* src, int64_t off, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { load_tau<decltype(t)::value>(tau, b, src, off, n); });
}

template <int T>
inline void store_out(void* dst, int64_t off, const float* __restrict b, const float* __restrict tm, int64_t n) {
  auto* __restrict p = static_cast<typename Dtype<T>::storage*>(dst) + off;
  for (int64_t j = 0; j < n; ++j) p[j] = Dtype<T>::store(b[j] + tm[j]);
}

template <Mode kMode>
void run_range(const Args& a, int64_t begin, int64_t end) {
  alignas(64) float b[kBlock];
  alignas(64) float S[kBlock];
  alignas(64) float tau[kBlock];
  alignas(64) float tt[kBlock];
  alignas(64) float ex[kBlock];
  alignas(64) float th[kBlock];
  alignas(64) float num[kBlock];
  alignas(64) float den[kBlock];
  const int64_t N = a.n_models;
  const float fN = float(N);
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = std::min(kBlock, end - off);
    dispatch_dtype(a.base_dtype, [&](auto t) { load_f32<decltype(t)::value>(b, a.base, off, n); });
    if constexpr (kMode != kStoredMerge) {
      for (int64_t i = 0; i < N; ++i) {
        load_tau_any(a.in_dtypes[i], tau, b, a.inputs[i], off, n);
        if (i == 0) {
          for (int64_t j = 0; j < n; ++j) S[j] = 0.0f + tau[j];
        } else {
          for (int64_t j = 0; j < n; ++j) S[j] = S[j] + tau[j];
        }
      }
    }
    if constexpr (kMode != kScores) {
      for (int64_t j = 0; j < n; ++j) num[j] = 0.0f;
      for (int64_t j = 0; j < n; ++j) den[j] = 0.0f;
    }
    for (int64_t i = 0; i < N; ++i) {
      load_tau_any(a.in_dtypes[i], tau, b, a.inputs[i], off, n);
      const float lo = a.lo[i], hi = a.hi[i];
      const float dclip = hi - lo;
      const bool flat = dclip == 0.0f;
      // Clip; tt = sign(tau) * a; ex = exponent argument of intra.
      for (int64_t j = 0; j < n; ++j) {
        const float x = tau[j];
        const float c = min_nan(max_nan(std::fabs(x), lo), hi);
        if constexpr (kMode != kScores) tt[j] = sign_f32(x) * c;
        if constexpr (kMode != kStoredMerge) {
          const float nrm = select_f32(flat, 0.0f, (c - lo) / dclip);
          ex[j] = fN * (nrm * nrm - 1.0f);
        }
      }
      const float* beta;
      if constexpr (kMode == kStoredMerge) {
        beta = a.beta + i * a.numel + off;
      } else {
        for (int64_t j = 0; j < n; ++j) th[j] = tau[j] * S[j];
        float* dst = kMode == kScores ? a.beta + i * a.numel + off : ex;
        for (int64_t j = 0; j < n; ++j) dst[j] = exp_f32(ex[j]) * tanh_f32(th[j]);
        beta = dst;
        if constexpr (kMode == kScores) {
          if (a.block_max != nullptr) {
            uint32_t mk = 0;
            for (int64_t j = 0; j < n; ++j) mk = std::max(mk, beta_key(dst[j]));
            a.block_max[(off / kBlock) * N + i] = mk;
          }
          continue;
        }
      }
      if constexpr (kMode != kScores) {
        const float q = a.q[i];
        const float dq = a.m[i] - q;
        // s_i goes into th (free now); M == q: every s_i is +0.
        if (dq == 0.0f) {
          for (int64_t j = 0; j < n; ++j) th[j] = 0.0f;
        } else {
          for (int64_t j = 0; j < n; ++j) th[j] = clamp_min(beta[j] - q, 0.0f) / dq;
        }
        if (a.lambdas != nullptr) {
          const float li = a.lambdas[i];
          for (int64_t j = 0; j < n; ++j) num[j] = num[j] + (li * th[j]) * tt[j];
        } else {
          for (int64_t j = 0; j < n; ++j) num[j] = num[j] + th[j] * tt[j];
        }
        for (int64_t j = 0; j < n; ++j) den[j] = den[j] + th[j];
      }
    }
    if constexpr (kMode != kScores) {
      const float kDenMin = 1e-12f;
      if (a.lambdas != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
          const float d = clamp_min(den[j], kDenMin);
          num[j] = num[j] / d;
        }
      } else {
        const float lam = a.lam;
        for (int64_t j = 0; j < n; ++j) {
          const float d = clamp_min(den[j], kDenMin);
          num[j] = lam * (num[j] / d);
        }
      }
      dispatch_dtype(a.out_dtype, [&](auto t) { store_out<decltype(t)::value>(a.out, off, b, num, n); });
    }
  }
}

// One copy per instruction set (cpu/isa.h): elementwise IEEE operations only
// and no FMA, so all give the same bits.
using RangeFn = void (*)(const Args&, int64_t, int64_t);

template <Mode kMode>
PYMERGE_PCB_FLATTEN void range_generic(const Args& a, int64_t b, int64_t e) {
  run_range<kMode>(a, b, e);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <Mode kMode>
PYMERGE_CLONE_AVX2 void range_avx2(const Args& a, int64_t b, int64_t e) {
  run_range<kMode>(a, b, e);
}

template <Mode kMode>
PYMERGE_CLONE_AVX512 void range_avx512(const Args& a, int64_t b, int64_t e) {
  run_range<kMode>(a, b, e);
}
#endif

template <Mode kMode>
RangeFn range_fn() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx512()) return range_avx512<kMode>;
  if (use_avx2()) return range_avx2<kMode>;
#endif
  return range_generic<kMode>;
}

template <Mode kMode>
void run(const Args& a) {
  if (a.numel <= 0 || a.n_models <= 0) return;
  const RangeFn fn = range_fn<kMode>();
  const int64_t n_blocks = (a.numel + kBlock - 1) / kBlock;
  parallel_for(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    fn(a, b0 * kBlock, std::min(b1 * kBlock, a.numel));
  });
}

// ---------------------------------------------------------------- selection

// Below this many keys, copying them and std::nth_element beats two passes of
// 65536-bin histograms (same exact result: the key at a rank is unique).
constexpr int64_t kSmallSelect = int64_t(1) << 16;

// Keys at each 0-based rank (0 <= rank < n) of key_of(0..n-1); the high-digit
// histogram is shared by all ranks, low-digit ones by ranks in one bin.
template <class KeyFn>
void keys_at_ranks(int64_t n, const std::vector<int64_t>& ranks, std::vector<uint32_t>& out, const KeyFn& key_of) {
  out.assign(ranks.size(), 0);
  if (n <= 0) return;
  if (n <= kSmallSelect) {
    std::vector<uint32_t> keys(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) keys[static_cast<size_t>(j)] = key_of(j);
    for (size_t r = 0; r < ranks.size(); ++r) {
      auto nth = keys.begin() + ranks[r];
      std::nth_element(keys.begin(), nth, keys.end());
      out[r] = *nth;
    }
    return;
  }
  if (ranks.size() == 1) {
    out[0] = key_at_rank(n, ranks[0], key_of).key;
    return;
  }
  const auto high = detail::histogram(n, key_of, detail::kRadixBits, false, 0);
  int64_t low_bin = -1;
  std::vector<int64_t> low;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const auto [hb, below] = detail::locate(high, ranks[r]);
    if (hb != low_bin) {
      low = detail::histogram(n, key_of, 0, true, uint32_t(hb));
      low_bin = hb;
    }
    const auto lb = detail::locate(low, ranks[r] - below).first;
    out[r] = (uint32_t(hb) << detail::kRadixBits) | uint32_t(lb);
  }
}

template <int TB, int TI>
void clip_bounds_typed(const void* base, const void* input, int64_t numel, const std::vector<int64_t>& ranks,
                       std::vector<uint32_t>& keys) {
  const auto* __restrict pb = static_cast<const typename Dtype<TB>::storage*>(base);
  const auto* __restrict pi = static_cast<const typename Dtype<TI>::storage*>(input);
  keys_at_ranks(numel, ranks, keys, [&](int64_t j) {
    return abs_key(Dtype<TI>::load(pi[j]) - Dtype<TB>::load(pb[j]));
  });
}

// (lo_i, hi_i): the |tau_i| at sorted positions i_lo and i_hi.
void clip_bounds(const Args& a, int64_t i, int64_t i_lo, int64_t i_hi, float& lo, float& hi) {
  const std::vector<int64_t> ranks{i_lo, i_hi};
  std::vector<uint32_t> keys;
  dispatch_dtype(a.base_dtype, [&](auto tb) {
    dispatch_dtype(a.in_dtypes[i], [&](auto ti) {
      clip_bounds_typed<decltype(tb)::value, decltype(ti)::value>(a.base, a.inputs[i], a.numel, ranks, keys);
    });
  });
  lo = f32_from_bits(keys[0]);
  hi = f32_from_bits(keys[1]);
}

}  // namespace pcb

using pcb::Args;

void pcb_scores(const Args& a) { pcb::run<pcb::kScores>(a); }

void pcb_merge_with_stats(const Args& a) { pcb::run<pcb::kFusedMerge>(a); }

// Per-tensor scope: fills lo, hi, q, m ([N] each) and writes a.out.
void pcb_merge_tensor(Args a, int64_t i_lo, int64_t i_hi, int64_t k_q, float* lo, float* hi, float* q, float* m) {
  const int64_t N = a.n_models, d = a.numel;
  if (d <= 0 || N <= 0) return;
  for (int64_t i = 0; i < N; ++i) pcb::clip_bounds(a, i, i_lo, i_hi, lo[i], hi[i]);
  a.lo = lo;
  a.hi = hi;

  const int64_t n_blocks = (d + pcb::kBlock - 1) / pcb::kBlock;
  std::unique_ptr<float[]> beta(new float[static_cast<size_t>(N * d)]);
  std::vector<uint32_t> block_max(static_cast<size_t>(n_blocks * N));
  a.beta = beta.get();
  a.block_max = block_max.data();
  pcb::run<pcb::kScores>(a);
  a.block_max = nullptr;

  const std::vector<int64_t> ranks{k_q};
  std::vector<uint32_t> key;
  for (int64_t i = 0; i < N; ++i) {
    const float* bi = beta.get() + i * d;
    pcb::keys_at_ranks(d, ranks, key, [bi](int64_t j) { return pcb::beta_key(bi[j]); });
    q[i] = pcb::beta_from_key(key[0]);
    uint32_t mk = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) mk = std::max(mk, block_max[static_cast<size_t>(blk * N + i)]);
    m[i] = pcb::beta_from_key(mk);
  }
  a.q = q;
  a.m = m;
  pcb::run<pcb::kStoredMerge>(a);
}

// Test hooks: the fp32 exp and tanh the kernels use.
float pcb_exp_f32(float x) { return pcb::exp_f32(x); }
float pcb_tanh_f32(float x) { return pcb::tanh_f32(x); }

}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;
using pymerge::cpu::Args;

// Common checks; fills ptrs and the input part of a (which points into ptrs).
void check_inputs(const char* op, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                  uintptr_t base_ptr, int base_dtype, int64_t numel, std::vector<const void*>& ptrs, Args& a) {
  const size_t n = in_ptrs.size();
  const std::string name(op);
  if (n == 0) throw py::value_error(name + ": at least one input is needed");
  if (in_dtypes.size() != n)
    throw py::value_error(name + ": " + std::to_string(n) + " inputs, " + std::to_string(in_dtypes.size()) +
                          " dtypes");
  if (numel < 0) throw py::value_error(name + ": numel < 0");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "input " + std::to_string(i));
  check_dtype(base_dtype, "base");
  ptrs.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (numel > 0) check_ptr(in_ptrs[i], "input " + std::to_string(i));
    ptrs[i] = reinterpret_cast<const void*>(in_ptrs[i]);
  }
  if (numel > 0) check_ptr(base_ptr, "base");
  a = Args{};
  a.inputs = ptrs.data();
  a.in_dtypes = in_dtypes.data();
  a.n_models = int64_t(n);
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_dtype;
  a.numel = numel;
}

void check_len(const std::vector<float>& v, size_t n, const char* what) {
  if (v.size() != n)
    throw py::value_error(std::string(what) + ": " + std::to_string(v.size()) + " values for " + std::to_string(n) +
                          " models");
}

void check_out(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
               const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel) {
  check_ptr(out_ptr, "out");
  for (size_t i = 0; i < in_ptrs.size(); ++i)
    check_no_overlap(out_ptr, out_dtype, in_ptrs[i], in_dtypes[i], numel, "input " + std::to_string(i));
  // Exact aliasing is safe: each block is written only after its last read.
  check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");
}

void scores_binding(uintptr_t out_ptr, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                    uintptr_t base_ptr, int base_dtype, int64_t numel, const std::vector<float>& lo,
                    const std::vector<float>& hi) {
  Args a;
  std::vector<const void*> ptrs;
  check_inputs("pcb_scores", in_ptrs, in_dtypes, base_ptr, base_dtype, numel, ptrs, a);
  check_len(lo, in_ptrs.size(), "lo");
  check_len(hi, in_ptrs.size(), "hi");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  // out is [N, numel] fp32, larger than any input: it must not overlap one at all.
  const uintptr_t out_end = out_ptr + uintptr_t(numel) * in_ptrs.size() * sizeof(float);
  auto disjoint = [&](uintptr_t p, int dtype, const std::string& what) {
    const uintptr_t end = p + uintptr_t(numel) * pymerge::dtype_size(dtype);
    if (out_ptr < end && p < out_end) throw py::value_error("output buffer overlaps " + what);
  };
  for (size_t i = 0; i < in_ptrs.size(); ++i) disjoint(in_ptrs[i], in_dtypes[i], "input " + std::to_string(i));
  disjoint(base_ptr, base_dtype, "base");
  a.lo = lo.data();
  a.hi = hi.data();
  a.beta = reinterpret_cast<float*>(out_ptr);
  py::gil_scoped_release release;
  pymerge::cpu::pcb_scores(a);
}

void merge_with_stats_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                              const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                              const std::vector<float>& lo, const std::vector<float>& hi,
                              const std::vector<float>& q, const std::vector<float>& m, float lam,
                              const std::vector<float>& lambdas) {
  Args a;
  std::vector<const void*> ptrs;
  check_inputs("pcb_merge_with_stats", in_ptrs, in_dtypes, base_ptr, base_dtype, numel, ptrs, a);
  check_dtype(out_dtype, "out");
  const size_t n = in_ptrs.size();
  check_len(lo, n, "lo");
  check_len(hi, n, "hi");
  check_len(q, n, "q");
  check_len(m, n, "M");
  if (!lambdas.empty()) check_len(lambdas, n, "lambdas");
  if (numel == 0) return;
  check_out(out_ptr, out_dtype, in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  a.lo = lo.data();
  a.hi = hi.data();
  a.q = q.data();
  a.m = m.data();
  a.lam = lam;
  a.lambdas = lambdas.empty() ? nullptr : lambdas.data();
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  py::gil_scoped_release release;
  pymerge::cpu::pcb_merge_with_stats(a);
}

py::tuple merge_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                        const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                        int64_t i_lo, int64_t i_hi, int64_t k_q, float lam, const std::vector<float>& lambdas) {
  Args a;
  std::vector<const void*> ptrs;
  check_inputs("pcb_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel, ptrs, a);
  check_dtype(out_dtype, "out");
  const size_t n = in_ptrs.size();
  if (!lambdas.empty()) check_len(lambdas, n, "lambdas");
  std::vector<float> lo(n, 0.0f), hi(n, 0.0f), q(n, 0.0f), m(n, 0.0f);
  if (numel > 0) {
    for (int64_t r : {i_lo, i_hi, k_q})
      if (r < 0 || r >= numel) throw py::value_error("pcb_merge: rank " + std::to_string(r) + " outside [0, numel)");
    check_out(out_ptr, out_dtype, in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
    a.lam = lam;
    a.lambdas = lambdas.empty() ? nullptr : lambdas.data();
    a.out = reinterpret_cast<void*>(out_ptr);
    a.out_dtype = out_dtype;
    py::gil_scoped_release release;
    pymerge::cpu::pcb_merge_tensor(a, i_lo, i_hi, k_q, lo.data(), hi.data(), q.data(), m.data());
  }
  return py::make_tuple(lo, hi, q, m);
}

}  // namespace

PYMERGE_BINDINGS(pcb) {
  m.def("pcb_scores", &scores_binding, py::arg("out_ptr"), py::arg("in_ptrs"), py::arg("in_dtypes"),
        py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("lo"), py::arg("hi"),
        "PCB scores beta into an fp32 [N, numel] buffer, given the clip bounds lo, hi (fp32).");
  m.def("pcb_merge_with_stats", &merge_with_stats_binding, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("lo"), py::arg("hi"), py::arg("q"), py::arg("M"), py::arg("lam"), py::arg("lambdas"),
        "PCB merge of one tensor given the statistics (one fused pass). Empty lambdas: lam mode.");
  m.def("pcb_merge", &merge_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("i_lo"),
        py::arg("i_hi"), py::arg("k_q"), py::arg("lam"), py::arg("lambdas"),
        "PCB merge with per-tensor statistics at the given sorted positions; returns (lo, hi, q, M).");
  m.def("_pcb_exp_f32", &pymerge::cpu::pcb_exp_f32, py::arg("x"));
  m.def("_pcb_tanh_f32", &pymerge::cpu::pcb_tanh_f32, py::arg("x"));
}
