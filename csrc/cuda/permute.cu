// permute_average on the GPU (specs/methods.md, specs/alignment.md; torch
// reference pymerge/ops/reference/permute.py): a weighted sum of index-mapped
// weights, gathered directly from the models, no permuted copy.
//
// Per output element (r, c), in the reference's exact fp32 order:
//   acc = +0; acc = acc + (c_i * f32(W_i[P_i[r], Q_i[c]])) for each covered i in model order
//   normalize_coverage: cov = +0; cov = cov + c_i for each covered i;
//                       out = cov == 0 ? +0 : acc / cov
// Model i covers (r, c) when P_i[r] != -1 and Q_i[c] != -1 (a null map is the
// identity). The reference adds +0 for an uncovered model; acc starts at +0
// and a round-to-nearest sum is -0 only when both terms are, so skipping that
// addition gives the same bits. A 1-D tensor is one row whose columns are
// mapped by the row maps (the Python layer arranges that).
//
// A thread makes 8 consecutive output columns of one row: the output store
// and the column-map reads are coalesced, the gathered reads land in the one
// source row P_i[r], which L1/L2 keep while the neighbouring threads read it.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

namespace pymerge {
namespace cuda {
namespace {

struct PermArgs {
  const void* ptr[kMaxModels];
  const int64_t* pmap[kMaxModels];  // [n_rows] or null
  const int64_t* qmap[kMaxModels];  // [n_cols] or null
  int64_t rows[kMaxModels];         // rows of W_i (1 for a 1-D tensor)
  int64_t cols[kMaxModels];         // row length (stride) of W_i
  float coeff[kMaxModels];
  int8_t dtype[kMaxModels];
  int n;
  void* out;
  int out_dtype;
  int64_t n_rows;
  int64_t n_cols;
  bool normalize;
  bool vec_out;
};

__global__ void __launch_bounds__(kThreads) permute_average_kernel(const __grid_constant__ PermArgs a) {
  const int64_t packs_per_row = packs_of(a.n_cols);
  const int64_t items = a.n_rows * packs_per_row;
  for (int64_t k = global_thread(); k < items; k += grid_threads()) {
    const int64_t r = k / packs_per_row;
    const int64_t c0 = (k - r * packs_per_row) * kPack;
    const int m = a.n_cols - c0 < kPack ? int(a.n_cols - c0) : kPack;
    float acc[kPack], cov[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) acc[j] = cov[j] = 0.0f;
    for (int i = 0; i < a.n; ++i) {
      const int64_t src_row = a.pmap[i] ? __ldg(a.pmap[i] + r) : r;
      if (src_row < 0) continue;  // the whole row is uncovered by model i
      const int64_t base = src_row * a.cols[i];
      const float ci = a.coeff[i];
      const int tag = a.dtype[i];
      int64_t q[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) q[j] = j < m ? (a.qmap[i] ? __ldg(a.qmap[i] + c0 + j) : c0 + j) : -1;
      float x[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) x[j] = q[j] >= 0 ? load_elem(a.ptr[i], tag, base + q[j]) : 0.0f;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (q[j] >= 0) {
          acc[j] = fadd(acc[j], fmul(ci, x[j]));
          cov[j] = fadd(cov[j], ci);
        }
      }
    }
    float o[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) o[j] = a.normalize ? (cov[j] == 0.0f ? 0.0f : fdiv(acc[j], cov[j])) : acc[j];
    // A row's packs are contiguous in the output; vector stores need the row start aligned too.
    store_pack(a.out, a.out_dtype, r * a.n_cols + c0, (r * a.n_cols + c0) + m, a.vec_out, o);
  }
}

}  // namespace

namespace api {

using namespace pymerge::cuda::bind;

// in_rows / in_cols: each model's shape ([1, n] for 1-D tensors); row_maps /
// col_maps: device int64 addresses, 0 for the identity.
void permute_average(uintptr_t out_ptr, int out_dtype, int64_t n_rows, int64_t n_cols,
                     const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                     const std::vector<int64_t>& in_rows, const std::vector<int64_t>& in_cols,
                     const std::vector<uintptr_t>& row_maps, const std::vector<uintptr_t>& col_maps,
                     const std::vector<float>& coeffs, bool normalize, uintptr_t stream) {
  const size_t n = in_ptrs.size();
  if (n == 0) fail("permute_average: at least one model is needed");
  if (n > size_t(kMaxModels)) fail("permute_average: at most " + std::to_string(kMaxModels) + " models per call");
  if (in_dtypes.size() != n || in_rows.size() != n || in_cols.size() != n || row_maps.size() != n ||
      col_maps.size() != n || coeffs.size() != n)
    fail("permute_average: per-model argument lists differ in length");
  if (n_rows < 0 || n_cols < 0) fail("permute_average: negative output size");
  check_dtype(out_dtype, "out");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "model " + std::to_string(i));
  if (n_rows == 0 || n_cols == 0) return;
  check_ptr(out_ptr, "out");
  PermArgs a{};
  for (size_t i = 0; i < n; ++i) {
    if (in_rows[i] < 0 || in_cols[i] < 0) fail("permute_average: negative model size");
    // The Python layer guarantees in-range maps; without a map the sizes must match.
    if (!row_maps[i] && in_rows[i] != n_rows) fail("permute_average: identity row map with a different row count");
    if (!col_maps[i] && in_cols[i] != n_cols) fail("permute_average: identity column map with a different length");
    if (in_rows[i] * in_cols[i] > 0) check_ptr(in_ptrs[i], "model " + std::to_string(i));
    a.ptr[i] = reinterpret_cast<const void*>(in_ptrs[i]);
    a.pmap[i] = cptr<int64_t>(row_maps[i]);
    a.qmap[i] = cptr<int64_t>(col_maps[i]);
    a.rows[i] = in_rows[i];
    a.cols[i] = in_cols[i];
    a.coeff[i] = coeffs[i];
    a.dtype[i] = int8_t(in_dtypes[i]);
  }
  a.n = int(n);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.n_rows = n_rows;
  a.n_cols = n_cols;
  a.normalize = normalize;
  a.vec_out = aligned16(a.out) && n_cols % kPack == 0;
  const int64_t items = n_rows * packs_of(n_cols);
  permute_average_kernel<<<grid_for(items, sm_count()), kThreads, 0, stream_from(stream)>>>(a);
  check_launch("permute_average_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(permute) {
  namespace py = pybind11;
  m.def("permute_average", &pymerge::cuda::api::permute_average, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("n_rows"), py::arg("n_cols"), py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("in_rows"),
        py::arg("in_cols"), py::arg("row_maps"), py::arg("col_maps"), py::arg("coeffs"), py::arg("normalize"),
        py::arg("stream"),
        "out[r, c] = sum_i c_i * W_i[P_i[r], Q_i[c]] over covered models (maps: device int64, 0 = identity), "
        "optionally divided by the covered coefficients' sum; one rounding to out_dtype.");
}
#endif
