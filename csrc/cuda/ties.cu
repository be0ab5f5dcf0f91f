// TIES-Merging on the GPU (specs/methods.md, "ties"; torch reference
// pymerge/ops/reference/ties.py; same results as csrc/cpu/ties.cpp).
//
// ties_merge (per tensor): per model the exact k_i largest |tau_i| (two radix
// sweeps over 16-bit digits, sparse_common.cuh), the tie-break counts where a
// run of equal keys is split, then one fused pass: trim, weight, elect,
// disjoint merge, normalize, lambda, + base, one rounding.
//
// Model scope (the TIES paper's code), given the per-model thresholds t_i:
//   tau_hat_i = |tau_i| >= t_i ? tau_i : +0;  S = ((+0 + tau_hat_0) + tau_hat_1) + ...
// ties_sign_sum:    sum_p sign(S_p), an exact integer (integer atomics only).
// ties_merge_model: g = sign(S), S == 0 -> sign(fallback); agree_i = g > 0 ? tau_hat_i > 0
//   : tau_hat_i < 0; total = ((+0 + [a_0] tau_hat_0) + ...); merged = total / fp32(max(1,
//   count)) ("dis-mean") or total ("dis-sum"); out = b + merged * lam.
// Both read each input once; the elected sign is known only after the last
// model, so both candidate sums are accumulated (see Acc in sparse_common.cuh).

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"
#include "cuda/sparse_common.cuh"

namespace pymerge {
namespace cuda {
namespace ties {
namespace {

using sparse::SparseArgs;

struct ModelArgs {
  Models models;
  const void* base;
  int base_dtype;
  void* out;  // merge: the output; sign sum: unsigned long long total
  int out_dtype;
  int64_t numel;
  float t[kMaxModels];  // fp32 thresholds
  float lam;
  int fallback;  // -1, 0, +1
  bool dis_mean;
  bool vec;
};

// tau_hat of one pack of model i (the reference's |tau| >= t: NaN never kept).
__device__ __forceinline__ void thresholded(const ModelArgs& a, int i, int64_t i0, const float (&b)[kPack],
                                            float (&th)[kPack]) {
  load_pack(a.models.ptr[i], a.models.dtype[i], i0, a.numel, a.vec, th);
  const float ti = a.t[i];
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    const float tau = fsub(th[j], b[j]);
    th[j] = masked(tau, mask_of(fabsf(tau) >= ti));
  }
}

__global__ void __launch_bounds__(kThreads) sign_sum_kernel(const __grid_constant__ ModelArgs a) {
  __shared__ long long scratch[32];
  long long part = 0;
  const int64_t n_packs = packs_of(a.numel);
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    float b[kPack], s[kPack];
    load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
#pragma unroll
    for (int j = 0; j < kPack; ++j) s[j] = 0.0f;
    for (int i = 0; i < a.models.n; ++i) {
      float th[kPack];
      thresholded(a, i, i0, b, th);
#pragma unroll
      for (int j = 0; j < kPack; ++j) s[j] = fadd(s[j], th[j]);
    }
    const uint32_t valid = sparse::valid_bits(i0, a.numel);
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      if ((valid >> j) & 1u) part += int(s[j] > 0.0f) - int(s[j] < 0.0f);
  }
  long long total;
  sparse::block_exclusive_scan(part, scratch, total);
  if (threadIdx.x == 0 && total != 0)
    atomicAdd(static_cast<unsigned long long*>(a.out), (unsigned long long)total);  // two's complement sum
}

__global__ void __launch_bounds__(kThreads) merge_model_kernel(const __grid_constant__ ModelArgs a) {
  const int64_t n_packs = packs_of(a.numel);
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    float b[kPack];
    load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    float s[kPack], tpos[kPack], tneg[kPack];
    int cpos[kPack], cneg[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) s[j] = tpos[j] = tneg[j] = 0.0f, cpos[j] = cneg[j] = 0;
    for (int i = 0; i < a.models.n; ++i) {
      float th[kPack];
      thresholded(a, i, i0, b, th);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        s[j] = fadd(s[j], th[j]);
        const bool up = th[j] > 0.0f, down = th[j] < 0.0f;
        tpos[j] = fadd(tpos[j], masked(th[j], mask_of(up)));
        tneg[j] = fadd(tneg[j], masked(th[j], mask_of(down)));
        cpos[j] += int(up);
        cneg[j] += int(down);
      }
    }
    float o[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      // g > 0, or S == 0 with a positive fallback; NaN S (g = 0) selects the negatives.
      const bool up = s[j] > 0.0f || (s[j] == 0.0f && a.fallback > 0);
      float total = up ? tpos[j] : tneg[j];
      const int cnt = up ? cpos[j] : cneg[j];
      if (a.dis_mean) total = fdiv(total, float(cnt > 1 ? cnt : 1));
      o[j] = fadd(b[j], fmul(total, a.lam));
    }
    store_pack(a.out, a.out_dtype, i0, a.numel, a.vec, o);
  }
}

ModelArgs model_args(const SparseArgs& args, const std::vector<float>& thresholds) {
  ModelArgs a{};
  a.models = args.models();
  a.base = args.base();
  a.base_dtype = args.base_dtype();
  a.numel = args.numel();
  for (size_t i = 0; i < thresholds.size(); ++i) a.t[i] = thresholds[i];
  return a;
}

}  // namespace
}  // namespace ties
}  // namespace cuda
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Argument checks and launches (pymerge::cuda::api), then the bindings
// ---------------------------------------------------------------------------

namespace pymerge {
namespace cuda {
namespace api {

using namespace pymerge::cuda::bind;
namespace pc = pymerge::cuda;
namespace ps = pymerge::cuda::sparse;
using ps::SparseArgs;

void ties_merge(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                const std::vector<int64_t>& ks, const std::vector<float>& weights, float lam, bool normalize,
                bool consensus_count, bool inclusive, uintptr_t stream) {
  const SparseArgs args("ties_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(ks, "ks");
  args.check_per_model(weights, "weights");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  ps::TrimJob job = args.trim_job(out_ptr, out_dtype);
  job.inclusive = inclusive;
  job.n_req = int(args.n());
  ps::CombineArgs ca{};
  for (size_t i = 0; i < args.n(); ++i) {
    job.mode[i] = ps::trim_mode(ks[i], numel);
    job.k[i] = ks[i];
    ca.w[i] = weights[i];
  }
  ca.scale = lam;
  ca.normalize = normalize;
  if (consensus_count)
    ps::trim_merge<ps::kTiesCount, false>(job, ca, stream_from(stream));
  else
    ps::trim_merge<ps::kTiesSum, false>(job, ca, stream_from(stream));
}

int64_t ties_sign_sum(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, uintptr_t base_ptr,
                      int base_dtype, int64_t numel, const std::vector<float>& thresholds, uintptr_t stream) {
  const SparseArgs args("ties_sign_sum", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(thresholds, "thresholds");
  if (numel == 0) return 0;
  pc::ties::ModelArgs a = pc::ties::model_args(args, thresholds);
  a.vec = args.vec();
  const cudaStream_t st = stream_from(stream);
  DeviceBuffer total(sizeof(unsigned long long), st);
  check_cuda(cudaMemsetAsync(total.as<void>(), 0, sizeof(unsigned long long), st), "cudaMemsetAsync");
  a.out = total.as<void>();
  pc::ties::sign_sum_kernel<<<pc::grid_for(pc::packs_of(numel), sm_count()), pc::kThreads, 0, st>>>(a);
  check_launch("sign_sum_kernel");
  unsigned long long host = 0;
  check_cuda(cudaMemcpyAsync(&host, total.as<void>(), sizeof host, cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(st), "cudaStreamSynchronize");
  return static_cast<int64_t>(host);
}

void ties_merge_model(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                      const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                      const std::vector<float>& thresholds, int fallback_sign, float lam, bool dis_mean,
                      uintptr_t stream) {
  const SparseArgs args("ties_merge_model", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(thresholds, "thresholds");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  pc::ties::ModelArgs a = pc::ties::model_args(args, thresholds);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.lam = lam;
  a.fallback = (fallback_sign > 0) - (fallback_sign < 0);
  a.dis_mean = dis_mean;
  a.vec = args.vec(out_ptr);
  const cudaStream_t st = stream_from(stream);
  pc::ties::merge_model_kernel<<<pc::grid_for(pc::packs_of(numel), sm_count()), pc::kThreads, 0, st>>>(a);
  check_launch("merge_model_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(ties) {
  namespace py = pybind11;
  namespace api = pymerge::cuda::api;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("ties_merge", &api::ties_merge, nogil, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("ks"),
        py::arg("weights"), py::arg("lam"), py::arg("normalize"), py::arg("consensus_count"),
        py::arg("inclusive"), py::arg("stream"),
        "Per-tensor TIES on `stream`: keep the ks[i] largest |x_i - base| (exact count, lower index first "
        "among equals; inclusive: every value >= the ks[i]-th largest), then TIES steps 2-6 in fp32, one "
        "rounding to out_dtype. Device addresses of contiguous buffers.");
  m.def("ties_sign_sum", &api::ties_sign_sum, nogil, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("numel"), py::arg("thresholds"), py::arg("stream"),
        "sum_p sign(S_p), S = sequential fp32 sum of the thresholded task vectors (|tau| >= t kept); "
        "synchronises the stream to return it.");
  m.def("ties_merge_model", &api::ties_merge_model, nogil, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("thresholds"), py::arg("fallback_sign"), py::arg("lam"), py::arg("dis_mean"), py::arg("stream"),
        "The merge pass of model-scope TIES given fp32 thresholds and the model-wide fallback sign.");
}
#endif
