// Model Breadcrumbs on the GPU (specs/methods.md, "breadcrumbs,
// breadcrumbs_ties"; torch reference pymerge/ops/reference/breadcrumbs.py;
// same results as csrc/cpu/breadcrumbs.cpp).
//
// Per model, rank |tau_i| descending with equal values in flat index order and
// keep ranks [n_top, n_top + n_keep): the exact top-(n_top + n_keep) set minus
// the exact top-n_top set, two exact-k trims with the index tie-break at both
// ends (requests i and N + i of sparse_common.cuh's trim_merge, selected in
// the same two radix sweeps). Then the weighted sum or the TIES steps 2-6 in
// the same fused pass, one rounding to the output dtype.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"
#include "cuda/sparse_common.cuh"

namespace pymerge {
namespace cuda {
namespace api {

namespace ps = pymerge::cuda::sparse;
using namespace pymerge::cuda::bind;
using ps::SparseArgs;

// Checks the arguments and launches on `stream`; used by the binding below.
void breadcrumbs_merge(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                       const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                       const std::vector<int64_t>& n_top, const std::vector<int64_t>& n_keep,
                       const std::vector<float>& weights, bool combine_ties, float scale, bool normalize,
                       bool consensus_count, uintptr_t stream) {
  const SparseArgs args("breadcrumbs_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(n_top, "n_top");
  args.check_per_model(n_keep, "n_keep");
  args.check_per_model(weights, "weights");
  for (size_t i = 0; i < n_top.size(); ++i)
    if (n_top[i] < 0 || n_keep[i] < 0 || n_top[i] > numel - n_keep[i])
      fail("breadcrumbs_merge: need 0 <= n_top, 0 <= n_keep, n_top + n_keep <= numel");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  const int n = int(args.n());
  ps::TrimJob job = args.trim_job(out_ptr, out_dtype);
  job.n_req = 2 * n;
  ps::CombineArgs ca{};
  for (int i = 0; i < n; ++i) {
    // Request i: the kept end (top n_top + n_keep); request n + i: the dropped
    // outliers (top n_top). n_keep == 0 keeps nothing, whatever n_top is.
    const int64_t keep = n_keep[size_t(i)];
    const int64_t lo = keep > 0 ? n_top[size_t(i)] + keep : 0, hi = keep > 0 ? n_top[size_t(i)] : 0;
    job.mode[i] = ps::trim_mode(lo, numel);
    job.k[i] = lo;
    job.mode[n + i] = ps::trim_mode(hi, numel);
    job.k[n + i] = hi;
    ca.w[i] = weights[size_t(i)];
  }
  ca.scale = scale;
  ca.normalize = normalize;
  const cudaStream_t st = stream_from(stream);
  if (!combine_ties)
    ps::trim_merge<ps::kLinear, true>(job, ca, st);
  else if (consensus_count)
    ps::trim_merge<ps::kTiesCount, true>(job, ca, st);
  else
    ps::trim_merge<ps::kTiesSum, true>(job, ca, st);
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(breadcrumbs) {
  namespace py = pybind11;
  m.def("breadcrumbs_merge", &pymerge::cuda::api::breadcrumbs_merge, py::call_guard<py::gil_scoped_release>(),
        py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("n_top"), py::arg("n_keep"), py::arg("weights"), py::arg("combine_ties"), py::arg("scale"),
        py::arg("normalize"), py::arg("consensus_count"), py::arg("stream"),
        "Breadcrumbs on `stream`: keep ranks [n_top[i], n_top[i] + n_keep[i]) of |x_i - base| descending "
        "(equal values lower index first), then linear_combine (scale = c) or the TIES steps 2-6 "
        "(scale = lambda); one rounding to out_dtype.");
}
#endif
