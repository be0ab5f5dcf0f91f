// Shared pieces of the pybind11 bindings of pymerge._C.
//
// Each op family's .cpp registers its own bindings with PYMERGE_BINDINGS(name)
// { ... }; module.cpp runs every registered function when the module loads, so
// adding a family never touches another family's file.
//
// Buffers cross the boundary as integer addresses (tensor.data_ptr()) with a
// dtype tag; the Python layer (pymerge/backends/cpu) checks device, shape and
// contiguity, the bindings check what they can see and release the GIL.

#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace pymerge {
namespace bind {

namespace py = pybind11;

using Registrar = void (*)(py::module_&);

inline std::vector<std::pair<const char*, Registrar>>& registry() {
  static std::vector<std::pair<const char*, Registrar>> r;
  return r;
}

struct Register {
  Register(const char* name, Registrar f) { registry().emplace_back(name, f); }
};

inline void check_dtype(int tag, const std::string& what) {
  if (!valid_dtype(tag))
    throw py::value_error(what + ": invalid dtype tag " + std::to_string(tag) +
                          " (0=float32, 1=float16, 2=bfloat16)");
}

inline void check_ptr(uintptr_t ptr, const std::string& what) {
  if (ptr == 0) throw py::value_error(what + ": null pointer");
}

// The output must not partially overlap an input: kernels write a block of the
// output after reading that block of every input, so only exact aliasing with
// the same element size is safe.
inline void check_no_overlap(uintptr_t out, int out_dtype, uintptr_t in, int in_dtype, int64_t numel,
                             const std::string& what) {
  const uintptr_t out_end = out + uintptr_t(numel) * dtype_size(out_dtype);
  const uintptr_t in_end = in + uintptr_t(numel) * dtype_size(in_dtype);
  const bool overlap = out < in_end && in < out_end;
  const bool same = out == in && dtype_size(out_dtype) == dtype_size(in_dtype);
  if (overlap && !same) throw py::value_error("output buffer overlaps " + what);
}

template <class T>
inline const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <class T>
inline T* mptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace bind
}  // namespace pymerge

#define PYMERGE_BINDINGS(name)                                                   \
  static void pymerge_bind_##name(pybind11::module_& m);                         \
  static ::pymerge::bind::Register pymerge_register_##name(#name, pymerge_bind_##name); \
  static void pymerge_bind_##name(pybind11::module_& m)
