// Model Breadcrumbs (specs/methods.md, "breadcrumbs, breadcrumbs_ties"; torch
// reference pymerge/ops/reference/breadcrumbs.py).
//
// Per model, rank |tau_i| descending with equal values in flat index order and
// keep ranks [n_top, n_top + n_keep): that is the exact top-(n_top + n_keep)
// set minus the exact top-n_top set, two selections with the index tie-break
// at both ends. Both come out of the same selection sweep (sparse_common.h).
// Then linear_combine or the TIES steps 2-6, one rounding to the output dtype.

#include <cstdint>
#include <vector>

#include "cpu/bindings.h"
#include "cpu/sparse_bind.h"
#include "cpu/sparse_common.h"

namespace pymerge {
namespace cpu {
namespace sparse {

void breadcrumbs_merge(const Inputs& in, void* out, int out_dtype, const std::vector<int64_t>& n_top,
                       const std::vector<int64_t>& n_keep, const std::vector<float>& weights, bool ties, float scale,
                       bool normalize, bool count) {
  if (in.numel <= 0) return;
  const int64_t chunks = chunk_count(in.numel, 2 * in.n);
  // Requests 0..N-1: the kept end (top n_top + n_keep); N..2N-1: the dropped outliers.
  std::vector<TrimRequest> reqs;
  for (int64_t i = 0; i < in.n; ++i) {
    // n_keep == 0 keeps nothing, whatever n_top is.
    const int64_t keep = n_keep[size_t(i)];
    reqs.push_back({i, keep > 0 ? n_top[size_t(i)] + keep : 0});
  }
  for (int64_t i = 0; i < in.n; ++i) reqs.push_back({i, n_keep[size_t(i)] > 0 ? n_top[size_t(i)] : 0});
  const std::vector<Trim> trims = select_trims(in, reqs, chunks, false);
  const TrimRows rows{trims.data(), trims.data() + in.n, in.n};
  if (ties)
    merge(in, out, out_dtype, rows, TiesCombine{weights.data(), scale, normalize, count}, chunks);
  else
    merge(in, out, out_dtype, rows, LinearCombine{weights.data(), scale}, chunks);
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

void breadcrumbs_merge_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                               const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                               const std::vector<int64_t>& n_top, const std::vector<int64_t>& n_keep,
                               const std::vector<float>& weights, bool combine_ties, float scale, bool normalize,
                               bool consensus_count) {
  const SparseArgs args("breadcrumbs_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(n_top, "n_top");
  args.check_per_model(n_keep, "n_keep");
  args.check_per_model(weights, "weights");
  for (size_t i = 0; i < n_top.size(); ++i)
    if (n_top[i] < 0 || n_keep[i] < 0 || n_top[i] > numel - n_keep[i])
      throw py::value_error("breadcrumbs_merge: need 0 <= n_top, 0 <= n_keep, n_top + n_keep <= numel");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  py::gil_scoped_release release;
  pymerge::cpu::sparse::breadcrumbs_merge(args.inputs(), reinterpret_cast<void*>(out_ptr), out_dtype, n_top, n_keep,
                                          weights, combine_ties, scale, normalize, consensus_count);
}

}  // namespace

PYMERGE_BINDINGS(breadcrumbs) {
  m.def("breadcrumbs_merge", &breadcrumbs_merge_binding, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("n_top"), py::arg("n_keep"), py::arg("weights"), py::arg("combine_ties"), py::arg("scale"),
        py::arg("normalize"), py::arg("consensus_count"),
        "Breadcrumbs: keep ranks [n_top[i], n_top[i] + n_keep[i]) of |x_i - base| descending (equal values "
        "lower index first), then linear_combine (scale = c) or the TIES steps 2-6 (scale = lambda); one "
        "rounding to out_dtype.");
}
