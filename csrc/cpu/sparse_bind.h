// Argument checks shared by the bindings of ties.cpp, dare.cpp and breadcrumbs.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/bindings.h"
#include "cpu/sparse_common.h"

namespace pymerge {
namespace bind {

// The checked buffers of one tensor's merge (base + N models, numel elements each).
class SparseArgs {
 public:
  SparseArgs(const std::string& op, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
             uintptr_t base_ptr, int base_dtype, int64_t numel)
      : op_(op), dtypes_(in_dtypes), base_(base_ptr), base_dtype_(base_dtype), numel_(numel) {
    const size_t n = in_ptrs.size();
    if (n == 0) throw py::value_error(op + ": at least one model tensor is needed");
    if (in_dtypes.size() != n)
      throw py::value_error(op + ": " + std::to_string(n) + " inputs, " + std::to_string(in_dtypes.size()) +
                            " dtypes");
    if (numel < 0) throw py::value_error(op + ": numel < 0");
    for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], op + ": input " + std::to_string(i));
    check_dtype(base_dtype, op + ": base");
    ptrs_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (numel > 0) check_ptr(in_ptrs[i], op + ": input " + std::to_string(i));
      ptrs_[i] = reinterpret_cast<const void*>(in_ptrs[i]);
    }
    if (numel > 0) check_ptr(base_ptr, op + ": base");
    in_ptrs_ = in_ptrs;
  }

  size_t n() const { return ptrs_.size(); }
  int64_t numel() const { return numel_; }

  // Per-model argument lists must have one entry per model.
  template <class T>
  void check_per_model(const std::vector<T>& v, const char* what) const {
    if (v.size() != n())
      throw py::value_error(op_ + ": " + std::to_string(v.size()) + " " + what + " for " + std::to_string(n()) +
                            " models");
  }

  // The output may alias an input exactly (every block is read before it is
  // written), never overlap it partially.
  void check_out(uintptr_t out_ptr, int out_dtype) const {
    check_dtype(out_dtype, op_ + ": out");
    if (numel_ == 0) return;
    check_ptr(out_ptr, op_ + ": out");
    for (size_t i = 0; i < n(); ++i)
      check_no_overlap(out_ptr, out_dtype, in_ptrs_[i], dtypes_[i], numel_, "input " + std::to_string(i));
    check_no_overlap(out_ptr, out_dtype, base_, base_dtype_, numel_, "base");
  }

  // Valid while this object lives.
  cpu::sparse::Inputs inputs() const {
    return cpu::sparse::Inputs{reinterpret_cast<const void*>(base_), base_dtype_, ptrs_.data(), dtypes_.data(),
                          int64_t(ptrs_.size()), numel_};
  }

 private:
  std::string op_;
  std::vector<const void*> ptrs_;
  std::vector<uintptr_t> in_ptrs_;
  std::vector<int> dtypes_;
  uintptr_t base_;
  int base_dtype_;
  int64_t numel_;
};

}  // namespace bind
}  // namespace pymerge
