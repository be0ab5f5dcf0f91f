// Weighted sum of N model tensors, optionally as task vectors over a base
// (linear and task_arithmetic in specs/methods.md), on the GPU.
//
// Per element, in this exact fp32 order (the torch reference's, see
// pymerge/ops/reference/average.py), every step one rounded IEEE op:
//   x_i = f32(theta_i) - f32(theta_0)   (with a base)   or   f32(theta_i)
//   acc = +0; for i in 0..N-1: acc = acc + (w_i * x_i)
//   out = f32(theta_0) + acc * c        (with a base)   or   acc * c
// rounded once (RNE) to the output dtype.
//
// One pass: each thread takes packs of 8 consecutive elements (16-byte loads
// when aligned), reads the base and every model once, keeps the accumulator
// in registers and writes the output once. When all models share a dtype the
// loads are specialised for it, so the compiler can keep several in flight.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

namespace pymerge {
namespace cuda {
namespace {

struct WsArgs {
  Models models;
  float w[kMaxModels];
  const void* base;  // nullptr: no base
  int base_dtype;
  void* out;
  int out_dtype;
  int64_t numel;
  float c;
  bool vec;
};

// kTag: the dtype of every model, or -1 when they differ (read per model).
template <int kTag, bool kBase>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const __grid_constant__ WsArgs a) {
  const int64_t n_packs = packs_of(a.numel);
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    float b[kPack];
    if (kBase) load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    float acc[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) acc[j] = 0.0f;
#pragma unroll 4
    for (int i = 0; i < a.models.n; ++i) {
      float x[kPack];
      load_pack(a.models.ptr[i], kTag >= 0 ? kTag : int(a.models.dtype[i]), i0, a.numel, a.vec, x);
      const float wi = a.w[i];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float xi = kBase ? fsub(x[j], b[j]) : x[j];
        acc[j] = fadd(acc[j], fmul(wi, xi));
      }
    }
    float o[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      const float scaled = fmul(acc[j], a.c);
      o[j] = kBase ? fadd(b[j], scaled) : scaled;
    }
    store_pack(a.out, a.out_dtype, i0, a.numel, a.vec, o);
  }
}

template <bool kBase>
void launch(const WsArgs& a, int tag, cudaStream_t stream) {
  const int grid = grid_for(packs_of(a.numel), bind::sm_count());
  switch (tag) {
    case FLOAT32: weighted_sum_kernel<FLOAT32, kBase><<<grid, kThreads, 0, stream>>>(a); break;
    case FLOAT16: weighted_sum_kernel<FLOAT16, kBase><<<grid, kThreads, 0, stream>>>(a); break;
    case BFLOAT16: weighted_sum_kernel<BFLOAT16, kBase><<<grid, kThreads, 0, stream>>>(a); break;
    default: weighted_sum_kernel<-1, kBase><<<grid, kThreads, 0, stream>>>(a); break;
  }
  bind::check_launch("weighted_sum_kernel");
}

}  // namespace
}  // namespace cuda
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace pymerge {
namespace cuda {
namespace api {

using namespace pymerge::cuda::bind;
namespace pc = pymerge::cuda;

// Checks the arguments and launches on `stream`; used by the binding below.
void weighted_sum(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                          const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                          const std::vector<float>& weights, float c, uintptr_t stream) {
  const size_t n = in_ptrs.size();
  if (n == 0) fail("weighted_sum: at least one input is needed");
  if (n > size_t(pc::kMaxModels))
    fail("weighted_sum: at most " + std::to_string(pc::kMaxModels) + " models per call, got " +
                          std::to_string(n));
  if (in_dtypes.size() != n || weights.size() != n)
    fail("weighted_sum: " + std::to_string(n) + " inputs, " + std::to_string(in_dtypes.size()) +
                          " dtypes, " + std::to_string(weights.size()) + " weights");
  if (numel < 0) fail("weighted_sum: numel < 0");
  check_dtype(out_dtype, "out");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "input " + std::to_string(i));
  if (base_ptr != 0) check_dtype(base_dtype, "base");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  for (size_t i = 0; i < n; ++i) {
    check_ptr(in_ptrs[i], "input " + std::to_string(i));
    check_no_overlap(out_ptr, out_dtype, in_ptrs[i], in_dtypes[i], numel, "input " + std::to_string(i));
  }
  if (base_ptr != 0) check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");

  pc::WsArgs a{};
  bool vec = pc::aligned16(reinterpret_cast<void*>(out_ptr));
  int common = in_dtypes[0];
  for (size_t i = 0; i < n; ++i) {
    a.models.ptr[i] = reinterpret_cast<const void*>(in_ptrs[i]);
    a.models.dtype[i] = int8_t(in_dtypes[i]);
    a.w[i] = weights[i];
    vec = vec && pc::aligned16(a.models.ptr[i]);
    if (in_dtypes[i] != common) common = -1;
  }
  a.models.n = int(n);
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_ptr ? base_dtype : 0;
  if (base_ptr) vec = vec && pc::aligned16(a.base);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.numel = numel;
  a.c = c;
  a.vec = vec;
  if (base_ptr)
    pc::launch<true>(a, common, stream_from(stream));
  else
    pc::launch<false>(a, common, stream_from(stream));
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(average) {
  namespace py = pybind11;
  m.def("weighted_sum", &pymerge::cuda::api::weighted_sum, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("weights"),
        py::arg("c"), py::arg("stream"),
        "out = [base +] c * sum_i w_i * (x_i [- base]) in fp32, rounded once to out_dtype, on `stream`.\n"
        "Pointers are device addresses of contiguous buffers of numel elements; base_ptr=0 means no base.");
}
#endif
