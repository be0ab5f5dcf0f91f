// PCB-Merging on the GPU (specs/methods.md, "pcb"): scores, the fused merge
// given the statistics, and the per-tensor merge with exact quantiles. Same
// results as csrc/cpu/pcb.cpp, bit for bit.
//
// Per element, in the fp32 op order of pymerge/ops/reference/pcb.py, every
// arrow one rounded operation (intrinsics, never contracted into an FMA):
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
// exp and tanh: the CPU kernel's double-precision evaluation, rounded once to
// fp32 (correctly rounded but for astronomically rare double-rounding cases),
// with the same double operations in the same order, so the GPU and CPU
// scores agree bit for bit. torch's fp32 exp/tanh are not correctly rounded
// everywhere: against the plain torch reference the scores may differ in the
// last bit (see tests/backends/test_cpu_pcb.py for the measured effect).
//
// pcb_merge (per-tensor scope): lo/hi are exact order statistics of |tau_i|
// and q_i of beta_i (order keys, -0 as +0, NaN above +inf like torch.sort),
// by the radix selection of sparse_common.cuh; M_i is the max key (integer
// atomicMax). beta is computed once into an fp32 [N, d] buffer: exp and tanh
// dominate the cost, and the selection passes and the merge re-read 4 bytes
// per score instead of recomputing them. The statistics come back to the
// host between the passes (they are also returned).

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"
#include "cuda/sparse_common.cuh"

namespace pymerge {
namespace cuda {
namespace pcb {
namespace {

// ---------------------------------------------------------------- fp32 exp / tanh

__device__ __forceinline__ double dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double dsub(double a, double b) { return __dadd_rn(a, -b); }

constexpr double kInvLn2 = 0x1.71547652b82fep0;
constexpr double kLn2Hi = 0x1.62e42feep-1;  // 32 trailing zero bits: k * kLn2Hi is exact
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kRoundShift = 0x1.8p52;  // adding it rounds to an integer held in the low bits

// expm1(r) for |r| <= ln2/2: Taylor series to r^14 (Horner, as the CPU kernel).
__device__ __forceinline__ double expm1_poly(double r) {
  double p = 1.0 / 87178291200.0;
  p = dadd(dmul(p, r), 1.0 / 6227020800.0);
  p = dadd(dmul(p, r), 1.0 / 479001600.0);
  p = dadd(dmul(p, r), 1.0 / 39916800.0);
  p = dadd(dmul(p, r), 1.0 / 3628800.0);
  p = dadd(dmul(p, r), 1.0 / 362880.0);
  p = dadd(dmul(p, r), 1.0 / 40320.0);
  p = dadd(dmul(p, r), 1.0 / 5040.0);
  p = dadd(dmul(p, r), 1.0 / 720.0);
  p = dadd(dmul(p, r), 1.0 / 120.0);
  p = dadd(dmul(p, r), 1.0 / 24.0);
  p = dadd(dmul(p, r), 1.0 / 6.0);
  p = dadd(dmul(p, r), 0.5);
  p = dadd(dmul(p, r), 1.0);
  return dmul(p, r);
}

// x = k ln2 + r with k = round(x / ln2); returns r and 2^k. |x| <= 700.
__device__ __forceinline__ double reduce_ln2(double x, double& scale, bool& k_zero) {
  const double shifted = dadd(dmul(x, kInvLn2), kRoundShift);
  const double k = dsub(shifted, kRoundShift);
  scale = __longlong_as_double(
      (long long)(((unsigned long long)__double_as_longlong(shifted) + 1023ull) << 52));
  k_zero = k == 0.0;
  return dsub(dsub(x, dmul(k, kLn2Hi)), dmul(k, kLn2Lo));
}

__device__ __forceinline__ float exp_f32(float xf) {
  double x = xf;
  // Beyond these the fp32 result is 0 or inf anyway; NaN passes through.
  x = x < -160.0 ? -160.0 : x;
  x = x > 100.0 ? 100.0 : x;
  double scale;
  bool k_zero;
  const double r = reduce_ln2(x, scale, k_zero);
  return __double2float_rn(dmul(scale, dadd(1.0, expm1_poly(r))));
}

// tanh|x| = expm1(2|x|) / (expm1(2|x|) + 2), sign of x restored (tanh(-0) = -0).
__device__ __forceinline__ float tanh_f32(float xf) {
  double y = fabs(dmul(2.0, double(xf)));
  y = y > 40.0 ? 40.0 : y;  // tanh rounds to 1 long before
  double scale;
  bool k_zero;
  const double r = reduce_ln2(y, scale, k_zero);
  const double p = expm1_poly(r);
  // k == 0: r == y and p is expm1(y) itself, accurate down to the subnormals.
  const double em1 = k_zero ? p : dsub(dmul(scale, dadd(1.0, p)), 1.0);
  const float t = __double2float_rn(__ddiv_rn(em1, dadd(em1, 2.0)));
  return __uint_as_float((__float_as_uint(t) & 0x7FFFFFFFu) | (__float_as_uint(xf) & 0x80000000u));
}

// ---------------------------------------------------------------- elementwise pieces

// torch.maximum / torch.minimum: a NaN in either operand gives NaN.
__device__ __forceinline__ float max_nan(float a, float b) { return (a < b || b != b) ? b : a; }
__device__ __forceinline__ float min_nan(float a, float b) { return (b < a || b != b) ? b : a; }

// torch.sign: +-1, or 0 for zeros and NaN.
__device__ __forceinline__ float sign_f32(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// torch.clamp_min(x, c): keeps NaN.
__device__ __forceinline__ float clamp_min(float x, float c) { return x < c ? c : x; }

// ---------------------------------------------------------------- the kernel

enum Mode { kScores, kFusedMerge, kStoredMerge };

struct Args {
  Models models;
  const void* base;
  int base_dtype;
  int64_t numel;
  float lo[kMaxModels], hi[kMaxModels];
  float q[kMaxModels], m[kMaxModels];  // merge modes
  float lambdas[kMaxModels];           // has_lambdas: lambda mode
  bool has_lambdas;
  float lam;
  float* beta;      // [N, numel]: written by kScores, read by kStoredMerge
  uint32_t* mkeys;  // kScores, optional: [N] max order key of beta_i
  void* out;        // merge modes
  int out_dtype;
  bool vec;       // inputs and out 16-byte aligned
  bool vec_beta;  // every row of beta 16-byte aligned
};

template <Mode kMode>
__global__ void __launch_bounds__(kThreads) pcb_kernel(const __grid_constant__ Args a) {
  __shared__ uint32_t smax[kMaxModels];
  const int N = a.models.n;
  const float fN = float(N);
  const bool track_max = kMode == kScores && a.mkeys != nullptr;
  if (track_max) {
    for (int i = threadIdx.x; i < N; i += blockDim.x) smax[i] = 0u;
    __syncthreads();
  }
  const int64_t n_packs = packs_of(a.numel);
  // Block-uniform trip count: whole warps stay together for the max reduction.
  for (int64_t p0 = int64_t(blockIdx.x) * blockDim.x; p0 < n_packs; p0 += grid_threads()) {
    const int64_t p = p0 + threadIdx.x;
    const int64_t i0 = p * kPack;
    const uint32_t valid = sparse::valid_bits(i0, a.numel);
    float b[kPack], S[kPack], num[kPack], den[kPack];
    load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
#pragma unroll
    for (int j = 0; j < kPack; ++j) S[j] = num[j] = den[j] = 0.0f;
    if (kMode != kStoredMerge) {
      for (int i = 0; i < N; ++i) {
        float x[kPack];
        load_pack(a.models.ptr[i], a.models.dtype[i], i0, a.numel, a.vec, x);
#pragma unroll
        for (int j = 0; j < kPack; ++j) S[j] = fadd(S[j], fsub(x[j], b[j]));
      }
    }
    for (int i = 0; i < N; ++i) {
      float x[kPack];
      load_pack(a.models.ptr[i], a.models.dtype[i], i0, a.numel, a.vec, x);
      const float lo = a.lo[i], hi = a.hi[i];
      const float dclip = fsub(hi, lo);
      const bool flat = dclip == 0.0f;
      float tt[kPack], beta[kPack];
      if (kMode == kStoredMerge) load_pack(a.beta + i * a.numel, FLOAT32, i0, a.numel, a.vec_beta, beta);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float tau = fsub(x[j], b[j]);
        const float c = min_nan(max_nan(fabsf(tau), lo), hi);
        tt[j] = fmul(sign_f32(tau), c);
        if (kMode != kStoredMerge) {
          const float nrm = flat ? 0.0f : fdiv(fsub(c, lo), dclip);
          const float ex = fmul(fN, fsub(fmul(nrm, nrm), 1.0f));
          beta[j] = fmul(exp_f32(ex), tanh_f32(fmul(tau, S[j])));
        }
      }
      if (kMode == kScores) {
        store_pack(a.beta + i * a.numel, FLOAT32, i0, a.numel, a.vec_beta, beta);
        if (track_max) {
          uint32_t mk = 0;
#pragma unroll
          for (int j = 0; j < kPack; ++j)
            if ((valid >> j) & 1u) mk = max(mk, sparse::value_key(beta[j]));
          mk = __reduce_max_sync(sparse::kFullMask, mk);
          if ((threadIdx.x & 31) == 0 && mk) atomicMax(&smax[i], mk);
        }
        continue;
      }
      const float q = a.q[i];
      const float dq = fsub(a.m[i], q);
      const float li = a.lambdas[i];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float s = dq == 0.0f ? 0.0f : fdiv(clamp_min(fsub(beta[j], q), 0.0f), dq);
        num[j] = fadd(num[j], a.has_lambdas ? fmul(fmul(li, s), tt[j]) : fmul(s, tt[j]));
        den[j] = fadd(den[j], s);
      }
    }
    if (kMode != kScores && valid) {
      const float kDenMin = 1e-12f;
      float o[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float d = clamp_min(den[j], kDenMin);
        const float tm = a.has_lambdas ? fdiv(num[j], d) : fmul(a.lam, fdiv(num[j], d));
        o[j] = fadd(b[j], tm);
      }
      store_pack(a.out, a.out_dtype, i0, a.numel, a.vec, o);
    }
  }
  if (track_max) {
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += blockDim.x)
      if (smax[i]) atomicMax(&a.mkeys[i], smax[i]);
  }
}

template <Mode kMode>
void launch(const Args& a, cudaStream_t st) {
  if (a.numel <= 0) return;
  const int grid = grid_for(packs_of(a.numel), bind::sm_count());
  pcb_kernel<kMode><<<grid, kThreads, 0, st>>>(a);
  bind::check_launch("pcb_kernel");
}

// Test hook: the kernels' exp and tanh over a buffer.
__global__ void exp_tanh_kernel(const float* x, float* e, float* t, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    e[i] = exp_f32(x[i]);
    t[i] = tanh_f32(x[i]);
  }
}

// Per-tensor scope: fills lo, hi, q, m ([N] each) and writes a.out.
void merge_tensor(Args a, int64_t i_lo, int64_t i_hi, int64_t k_q, std::vector<float>& lo, std::vector<float>& hi,
                  std::vector<float>& q, std::vector<float>& m, cudaStream_t st) {
  const int N = a.models.n;
  const int64_t d = a.numel;
  // Clip bounds: the |tau_i| at sorted positions i_lo and i_hi.
  std::vector<sparse::SelState> host(size_t(2 * N));
  {
    bind::DeviceBuffer states(host.size() * sizeof(sparse::SelState), st);
    std::vector<sparse::SelRequest> reqs;
    for (int i = 0; i < N; ++i) {
      reqs.push_back({i, i_lo, 2 * i});
      reqs.push_back({i, i_hi, 2 * i + 1});
    }
    sparse::TauKeys<sparse::kAbsKey> src{a.models, a.base, a.base_dtype, d, a.vec};
    sparse::select_ranks(src, d, reqs, states.as<sparse::SelState>(), st);
    bind::check_cuda(cudaMemcpyAsync(host.data(), states.as<void>(), host.size() * sizeof(sparse::SelState),
                                     cudaMemcpyDeviceToHost, st),
                     "cudaMemcpyAsync");
    bind::check_cuda(cudaStreamSynchronize(st), "cudaStreamSynchronize");
  }
  for (int i = 0; i < N; ++i) {
    lo[size_t(i)] = a.lo[i] = f32_from_bits(host[size_t(2 * i)].key);
    hi[size_t(i)] = a.hi[i] = f32_from_bits(host[size_t(2 * i + 1)].key);
  }

  bind::DeviceBuffer beta(size_t(N) * size_t(d) * sizeof(float), st);
  bind::DeviceBuffer mkeys(size_t(N) * sizeof(uint32_t), st);
  bind::check_cuda(cudaMemsetAsync(mkeys.as<void>(), 0, size_t(N) * sizeof(uint32_t), st), "cudaMemsetAsync");
  a.beta = beta.as<float>();
  a.mkeys = mkeys.as<uint32_t>();
  a.vec_beta = aligned16(a.beta) && d % 4 == 0;
  launch<kScores>(a, st);
  a.mkeys = nullptr;

  // q_i: the beta_i at sorted position k_q; M_i: the largest.
  {
    std::vector<sparse::SelState> qs(static_cast<size_t>(N));
    std::vector<uint32_t> mk(static_cast<size_t>(N));
    bind::DeviceBuffer states(qs.size() * sizeof(sparse::SelState), st);
    std::vector<sparse::SelRequest> reqs;
    for (int i = 0; i < N; ++i) reqs.push_back({i, k_q, i});
    sparse::RowKeys src{a.beta, d, a.vec_beta};
    sparse::select_ranks(src, d, reqs, states.as<sparse::SelState>(), st);
    bind::check_cuda(cudaMemcpyAsync(qs.data(), states.as<void>(), qs.size() * sizeof(sparse::SelState),
                                     cudaMemcpyDeviceToHost, st),
                     "cudaMemcpyAsync");
    bind::check_cuda(cudaMemcpyAsync(mk.data(), mkeys.as<void>(), mk.size() * sizeof(uint32_t),
                                     cudaMemcpyDeviceToHost, st),
                     "cudaMemcpyAsync");
    bind::check_cuda(cudaStreamSynchronize(st), "cudaStreamSynchronize");
    for (int i = 0; i < N; ++i) {
      q[size_t(i)] = a.q[i] = sparse::value_from_key(qs[size_t(i)].key);
      m[size_t(i)] = a.m[i] = sparse::value_from_key(mk[size_t(i)]);
    }
  }
  launch<kStoredMerge>(a, st);
}

}  // namespace
}  // namespace pcb
}  // namespace cuda
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace pymerge {
namespace cuda {
namespace api {
namespace {

namespace pc = pymerge::cuda;
namespace ps = pymerge::cuda::sparse;
using namespace pymerge::cuda::bind;
using pc::pcb::Args;

void check_len(const std::vector<float>& v, size_t n, const char* what) {
  if (v.size() != n)
    fail(std::string(what) + ": " + std::to_string(v.size()) + " values for " + std::to_string(n) + " models");
}

Args args_for(const ps::SparseArgs& in) {
  Args a{};
  a.models = in.models();
  a.base = in.base();
  a.base_dtype = in.base_dtype();
  a.numel = in.numel();
  return a;
}

void set_lambdas(Args& a, float lam, const std::vector<float>& lambdas) {
  a.lam = lam;
  a.has_lambdas = !lambdas.empty();
  for (size_t i = 0; i < lambdas.size(); ++i) a.lambdas[i] = lambdas[i];
}

}  // namespace

// Check the arguments and launch on `stream`; used by the bindings below.
void pcb_scores(uintptr_t out_ptr, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                uintptr_t base_ptr, int base_dtype, int64_t numel, const std::vector<float>& lo,
                const std::vector<float>& hi, uintptr_t stream) {
  const ps::SparseArgs in("pcb_scores", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  check_len(lo, in.n(), "lo");
  check_len(hi, in.n(), "hi");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  // out is [N, numel] fp32, larger than any input: it must not overlap one at all.
  const uintptr_t out_end = out_ptr + uintptr_t(numel) * in.n() * sizeof(float);
  auto disjoint = [&](uintptr_t p, int dtype, const std::string& what) {
    const uintptr_t end = p + uintptr_t(numel) * pymerge::dtype_size(dtype);
    if (out_ptr < end && p < out_end) fail("output buffer overlaps " + what);
  };
  for (size_t i = 0; i < in.n(); ++i) disjoint(in_ptrs[i], in_dtypes[i], "input " + std::to_string(i));
  disjoint(base_ptr, base_dtype, "base");
  Args a = args_for(in);
  for (size_t i = 0; i < in.n(); ++i) a.lo[i] = lo[i], a.hi[i] = hi[i];
  a.beta = mptr<float>(out_ptr);
  a.vec = in.vec();
  a.vec_beta = pc::aligned16(a.beta) && numel % 4 == 0;
  pc::pcb::launch<pc::pcb::kScores>(a, stream_from(stream));
}

void pcb_merge_with_stats(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                          const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                          const std::vector<float>& lo, const std::vector<float>& hi,
                          const std::vector<float>& q, const std::vector<float>& m, float lam,
                          const std::vector<float>& lambdas, uintptr_t stream) {
  const ps::SparseArgs in("pcb_merge_with_stats", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  check_dtype(out_dtype, "out");
  const size_t n = in.n();
  check_len(lo, n, "lo");
  check_len(hi, n, "hi");
  check_len(q, n, "q");
  check_len(m, n, "M");
  if (!lambdas.empty()) check_len(lambdas, n, "lambdas");
  if (numel == 0) return;
  in.check_out(out_ptr, out_dtype);
  Args a = args_for(in);
  for (size_t i = 0; i < n; ++i) a.lo[i] = lo[i], a.hi[i] = hi[i], a.q[i] = q[i], a.m[i] = m[i];
  set_lambdas(a, lam, lambdas);
  a.out = mptr<void>(out_ptr);
  a.out_dtype = out_dtype;
  a.vec = in.vec(out_ptr);
  pc::pcb::launch<pc::pcb::kFusedMerge>(a, stream_from(stream));
}

using Stats = std::tuple<std::vector<float>, std::vector<float>, std::vector<float>, std::vector<float>>;

// Returns (lo, hi, q, M); synchronises the stream.
Stats pcb_merge(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                int64_t i_lo, int64_t i_hi, int64_t k_q, float lam, const std::vector<float>& lambdas,
                uintptr_t stream) {
  const ps::SparseArgs in("pcb_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  check_dtype(out_dtype, "out");
  const size_t n = in.n();
  if (!lambdas.empty()) check_len(lambdas, n, "lambdas");
  std::vector<float> lo(n, 0.0f), hi(n, 0.0f), q(n, 0.0f), m(n, 0.0f);
  if (numel > 0) {
    for (int64_t r : {i_lo, i_hi, k_q})
      if (r < 0 || r >= numel) fail("pcb_merge: rank " + std::to_string(r) + " outside [0, numel)");
    in.check_out(out_ptr, out_dtype);
    Args a = args_for(in);
    set_lambdas(a, lam, lambdas);
    a.out = mptr<void>(out_ptr);
    a.out_dtype = out_dtype;
    a.vec = in.vec(out_ptr);
    pc::pcb::merge_tensor(a, i_lo, i_hi, k_q, lo, hi, q, m, stream_from(stream));
  }
  return Stats(lo, hi, q, m);
}

void pcb_exp_tanh(uintptr_t x_ptr, uintptr_t exp_ptr, uintptr_t tanh_ptr, int64_t numel, uintptr_t stream) {
  if (numel <= 0) return;
  check_ptr(x_ptr, "x");
  check_ptr(exp_ptr, "exp");
  check_ptr(tanh_ptr, "tanh");
  pc::pcb::exp_tanh_kernel<<<pc::grid_for(numel, sm_count()), pc::kThreads, 0, stream_from(stream)>>>(
      cptr<float>(x_ptr), mptr<float>(exp_ptr), mptr<float>(tanh_ptr), numel);
  check_launch("exp_tanh_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(pcb) {
  namespace py = pybind11;
  namespace api = pymerge::cuda::api;
  m.def("pcb_scores", &api::pcb_scores, py::arg("out_ptr"), py::arg("in_ptrs"), py::arg("in_dtypes"),
        py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("lo"), py::arg("hi"), py::arg("stream"),
        "PCB scores beta into an fp32 [N, numel] device buffer, given the clip bounds lo, hi (fp32).");
  m.def("pcb_merge_with_stats", &api::pcb_merge_with_stats, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("lo"), py::arg("hi"), py::arg("q"), py::arg("M"), py::arg("lam"), py::arg("lambdas"),
        py::arg("stream"), "PCB merge of one tensor given the statistics (one fused pass). Empty lambdas: lam mode.");
  m.def("pcb_merge", &api::pcb_merge, py::call_guard<py::gil_scoped_release>(), py::arg("out_ptr"),
        py::arg("out_dtype"), py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("i_lo"),
        py::arg("i_hi"), py::arg("k_q"), py::arg("lam"), py::arg("lambdas"), py::arg("stream"),
        "PCB merge with per-tensor statistics at the given sorted positions; returns (lo, hi, q, M). "
        "Synchronises the stream (the statistics come back to the host).");
  m.def("_pcb_exp_tanh", &api::pcb_exp_tanh, py::arg("x_ptr"), py::arg("exp_ptr"), py::arg("tanh_ptr"),
        py::arg("numel"), py::arg("stream"), "Test hook: the kernels' fp32 exp and tanh of an fp32 device buffer.");
}
#endif
