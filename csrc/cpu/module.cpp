// pybind11 module pymerge._C: the CPU kernels over raw buffers.
//
// Buffers are passed as integer addresses (tensor.data_ptr()) with a dtype
// tag; the Python layer checks device, shape and contiguity, the binding
// checks what it can see (counts, tags, overlap) and releases the GIL while a
// kernel runs.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"

namespace py = pybind11;

namespace pymerge {
namespace cpu {
// average.cpp
void weighted_sum(void* out, int out_dtype, const void* const* inputs, const int* in_dtypes,
                  int64_t n_models, const void* base, int base_dtype, int64_t numel,
                  const float* weights, float c);
void set_force_generic(bool on);
const char* kernel_isa();
}  // namespace cpu
}  // namespace pymerge

namespace {

using pymerge::dtype_size;
using pymerge::valid_dtype;

void check_dtype(int tag, const std::string& what) {
  if (!valid_dtype(tag))
    throw py::value_error(what + ": invalid dtype tag " + std::to_string(tag) +
                          " (0=float32, 1=float16, 2=bfloat16)");
}

void check_ptr(uintptr_t ptr, const std::string& what) {
  if (ptr == 0) throw py::value_error(what + ": null pointer");
}

// The output must not partially overlap an input: a block of the output is
// written after that block of every input is read, so only exact aliasing
// with the same element size is safe.
void check_no_overlap(uintptr_t out, int out_dtype, uintptr_t in, int in_dtype, int64_t numel,
                      const std::string& what) {
  const uintptr_t out_end = out + uintptr_t(numel) * dtype_size(out_dtype);
  const uintptr_t in_end = in + uintptr_t(numel) * dtype_size(in_dtype);
  const bool overlap = out < in_end && in < out_end;
  const bool same = out == in && dtype_size(out_dtype) == dtype_size(in_dtype);
  if (overlap && !same) throw py::value_error("output buffer overlaps " + what);
}

void weighted_sum(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                  const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype,
                  int64_t numel, const std::vector<float>& weights, float c) {
  const size_t n = in_ptrs.size();
  if (n == 0) throw py::value_error("weighted_sum: at least one input is needed");
  if (in_dtypes.size() != n || weights.size() != n)
    throw py::value_error("weighted_sum: " + std::to_string(n) + " inputs, " +
                          std::to_string(in_dtypes.size()) + " dtypes, " +
                          std::to_string(weights.size()) + " weights");
  if (numel < 0) throw py::value_error("weighted_sum: numel < 0");
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

  std::vector<const void*> inputs(n);
  for (size_t i = 0; i < n; ++i) inputs[i] = reinterpret_cast<const void*>(in_ptrs[i]);
  py::gil_scoped_release release;
  pymerge::cpu::weighted_sum(reinterpret_cast<void*>(out_ptr), out_dtype, inputs.data(),
                             in_dtypes.data(), int64_t(n), reinterpret_cast<const void*>(base_ptr),
                             base_dtype, numel, weights.data(), c);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymerge CPU kernels (raw-buffer interface; use pymerge.backends.cpu)";

  m.attr("FLOAT32") = int(pymerge::FLOAT32);
  m.attr("FLOAT16") = int(pymerge::FLOAT16);
  m.attr("BFLOAT16") = int(pymerge::BFLOAT16);

  m.def("weighted_sum", &weighted_sum, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"),
        py::arg("numel"), py::arg("weights"), py::arg("c"),
        "out = [base +] c * sum_i w_i * (x_i [- base]) in fp32, rounded once to out_dtype.\n"
        "Pointers are addresses of contiguous buffers of numel elements; base_ptr=0 means no "
        "base. weights and c are taken as fp32.");

  m.def("set_num_threads", &pymerge::set_num_threads, py::arg("k"),
        "Threads used by the kernels; k < 1 restores the default (hardware concurrency).");
  m.def("get_num_threads", &pymerge::get_num_threads);

  // Test helpers.
  m.def("_kernel_isa", &pymerge::cpu::kernel_isa, "Instruction-set clone the kernels run: avx2 or generic.");
  m.def("_set_force_generic", &pymerge::cpu::set_force_generic, py::arg("on"),
        "Run the baseline x86-64 clone even where AVX2 is available.");
  // The kernels' own (software) dtype conversions over raw buffers.
  m.def(
      "_convert_to_f32",
      [](int dtype, uintptr_t in_ptr, uintptr_t out_ptr, int64_t n) {
        check_dtype(dtype, "dtype");
        if (n <= 0) return;
        check_ptr(in_ptr, "in");
        check_ptr(out_ptr, "out");
        py::gil_scoped_release release;
        pymerge::convert_to_f32(dtype, reinterpret_cast<const void*>(in_ptr),
                                reinterpret_cast<float*>(out_ptr), size_t(n));
      },
      py::arg("dtype"), py::arg("in_ptr"), py::arg("out_ptr"), py::arg("n"));
  m.def(
      "_convert_f32_to",
      [](int dtype, uintptr_t in_ptr, uintptr_t out_ptr, int64_t n) {
        check_dtype(dtype, "dtype");
        if (n <= 0) return;
        check_ptr(in_ptr, "in");
        check_ptr(out_ptr, "out");
        py::gil_scoped_release release;
        pymerge::convert_from_f32(dtype, reinterpret_cast<const float*>(in_ptr),
                                  reinterpret_cast<void*>(out_ptr), size_t(n));
      },
      py::arg("dtype"), py::arg("in_ptr"), py::arg("out_ptr"), py::arg("n"));
}
