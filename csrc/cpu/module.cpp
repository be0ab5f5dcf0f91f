// pybind11 module pymerge._C: the CPU kernels over raw buffers.
//
// Every op family registers its own bindings (PYMERGE_BINDINGS in its .cpp,
// see bindings.h); this file defines the module, the shared knobs and the
// test helpers, and runs the registered functions.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

namespace py = pybind11;
using pymerge::bind::check_dtype;
using pymerge::bind::check_ptr;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymerge CPU kernels (raw-buffer interface; use pymerge.backends.cpu)";

  m.attr("FLOAT32") = int(pymerge::FLOAT32);
  m.attr("FLOAT16") = int(pymerge::FLOAT16);
  m.attr("BFLOAT16") = int(pymerge::BFLOAT16);

  for (auto& [name, registrar] : pymerge::bind::registry()) registrar(m);

  m.def("set_num_threads", &pymerge::set_num_threads, py::arg("k"),
        "Threads used by the kernels; k < 1 restores the default (hardware concurrency).");
  m.def("get_num_threads", &pymerge::get_num_threads);

  // Test helpers.
  m.def(
      "_kernel_isa", [] { return std::string(pymerge::cpu::isa_name(pymerge::cpu::kernel_isa())); },
      "The widest instruction-set clone the kernels run: generic, avx2 or avx512 (see cpu/isa.h).");
  m.def(
      "_set_max_isa",
      [](const std::string& name) {
        namespace pc = pymerge::cpu;
        for (const auto isa : {pc::kGeneric, pc::kAvx2, pc::kAvx512})
          if (name == pc::isa_name(isa)) return std::string(pc::isa_name(pc::set_max_isa(isa)));
        throw py::value_error("_set_max_isa: expected generic, avx2 or avx512, got " + name);
      },
      py::arg("name"), "Run no clone above this level (avx512: no limit); returns the previous limit.");
  m.def(
      "_set_stream_min_bytes",
      [](int64_t n) { return pymerge::stream_min_bytes().exchange(n); },
      py::arg("n"), "Outputs of at least n bytes use streaming stores (0: all); returns the previous value.");
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
