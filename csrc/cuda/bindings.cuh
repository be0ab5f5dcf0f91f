// Shared pieces of the pybind11 bindings of pymerge._C_cuda.
//
// Same registry idea as csrc/cpu/bindings.h: each op family's .cu registers
// its bindings with PYMERGE_CUDA_BINDINGS(family) { m.def(...); }; module.cu
// runs every registered function when the module loads.
//
// The pybind11 glue needs pybind11 and Python headers; the CI compile check
// (.ci/compile_cuda.sh) has neither, so the glue is compiled only where they
// are found (PYMERGE_CUDA_WITH_BINDINGS; setup.py defines
// PYMERGE_CUDA_EXTENSION and passes their include paths). Everything else -
// kernels, launchers, argument checks - compiles either way: each family .cu
// keeps its m.def(...) calls inside `#if PYMERGE_CUDA_WITH_BINDINGS`.
// Argument errors are std::invalid_argument (pybind11 raises ValueError),
// CUDA errors std::runtime_error (RuntimeError).
//
// Buffers cross the boundary as integer device addresses (tensor.data_ptr())
// with a dtype tag (common/dtype.h: 0=f32, 1=f16, 2=bf16), plus the integer
// torch.cuda.current_stream().cuda_stream; kernels are launched on that
// stream and never synchronise it. No torch C++ API: plain pybind11 and the
// CUDA runtime (linked statically), so the module builds against a CPU-only
// torch and imports on a machine without a GPU.
//
// The Python layer (pymerge/backends/cuda) checks devices, shapes and
// contiguity and makes the right device current; the bindings check what they
// can see (dtype tags, null pointers, sizes) and every CUDA return code.

#pragma once

#include <cuda_runtime.h>

#if defined(PYMERGE_CUDA_EXTENSION) || \
    (defined(__has_include) && __has_include(<pybind11/pybind11.h>) && __has_include(<Python.h>))
#define PYMERGE_CUDA_WITH_BINDINGS 1
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#else
#define PYMERGE_CUDA_WITH_BINDINGS 0
#endif

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace pymerge {
namespace cuda {
namespace bind {

#if PYMERGE_CUDA_WITH_BINDINGS
namespace py = pybind11;

using Registrar = void (*)(py::module_&);

inline std::vector<std::pair<const char*, Registrar>>& registry() {
  static std::vector<std::pair<const char*, Registrar>> r;
  return r;
}

struct Register {
  Register(const char* name, Registrar f) { registry().emplace_back(name, f); }
};
#endif

inline void fail(const std::string& what) { throw std::invalid_argument(what); }

inline void check_dtype(int tag, const std::string& what) {
  if (!valid_dtype(tag))
    throw std::invalid_argument(what + ": invalid dtype tag " + std::to_string(tag) +
                          " (0=float32, 1=float16, 2=bfloat16)");
}

inline void check_ptr(uintptr_t ptr, const std::string& what) {
  if (ptr == 0) throw std::invalid_argument(what + ": null pointer");
}

// Throws std::runtime_error (a Python RuntimeError) naming the failed call.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("pymerge CUDA: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// After every launch: a bad configuration shows up here (not at the next sync).
// cudaGetLastError also clears a non-sticky error, so it is not reported twice.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// torch.cuda.current_stream().cuda_stream (0 is the legacy default stream).
inline cudaStream_t stream_from(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The output must not partially overlap an input (see csrc/cpu/bindings.h).
inline void check_no_overlap(uintptr_t out, int out_dtype, uintptr_t in, int in_dtype, int64_t numel,
                             const std::string& what) {
  const uintptr_t out_end = out + uintptr_t(numel) * dtype_size(out_dtype);
  const uintptr_t in_end = in + uintptr_t(numel) * dtype_size(in_dtype);
  const bool overlap = out < in_end && in < out_end;
  const bool same = out == in && dtype_size(out_dtype) == dtype_size(in_dtype);
  if (overlap && !same) throw std::invalid_argument("output buffer overlaps " + what);
}

// Multiprocessors of the current device (cached per device): grids are sized
// from it so that every SM has work. Bindings that release the GIL may call
// this from several threads at once, hence the atomics.
inline int sm_count() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  static std::atomic<int> cached[64];  // zero-initialised (static storage)
  if (dev >= 0 && dev < 64) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (n <= 0) n = 1;
  if (dev >= 0 && dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// A device scratch buffer freed on scope exit. cudaMallocAsync/cudaFreeAsync
// keep it stream-ordered, so no synchronisation is needed around it.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) check_cuda(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

template <class T>
inline const T* cptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <class T>
inline T* mptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace bind
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
#define PYMERGE_CUDA_BINDINGS(name)                                                             \
  static void pymerge_cuda_bind_##name(pybind11::module_& m);                                   \
  static ::pymerge::cuda::bind::Register pymerge_cuda_register_##name(#name, pymerge_cuda_bind_##name); \
  static void pymerge_cuda_bind_##name(pybind11::module_& m)
#endif
