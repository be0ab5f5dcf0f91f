// pybind11 module pymerge._C_cuda: the CUDA kernels over raw device buffers.
//
// Every op family registers its own bindings (PYMERGE_CUDA_BINDINGS in its
// .cu, see bindings.cuh); this file defines the module, a few device queries
// used by the Python layer and the tests, and runs the registered functions.
// Importing needs no GPU: nothing here touches the device until called.

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "cuda/bindings.cuh"

#if PYMERGE_CUDA_WITH_BINDINGS

namespace py = pybind11;
using pymerge::cuda::bind::check_cuda;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pymerge CUDA kernels (raw-buffer interface; use pymerge.backends.cuda)";

  m.attr("FLOAT32") = int(pymerge::FLOAT32);
  m.attr("FLOAT16") = int(pymerge::FLOAT16);
  m.attr("BFLOAT16") = int(pymerge::BFLOAT16);
  m.attr("CUDART_VERSION") = int(CUDART_VERSION);

  for (auto& [name, registrar] : pymerge::cuda::bind::registry()) registrar(m);

  m.def(
      "device_count",
      [] {
        int n = 0;
        // No driver or no device is "0 devices", not an error.
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
          (void)cudaGetLastError();
          return 0;
        }
        return n;
      },
      "CUDA devices this module's runtime sees (0 without a driver or a GPU).");
  m.def(
      "driver_version",
      [] {
        int v = 0;
        if (cudaDriverGetVersion(&v) != cudaSuccess) {
          (void)cudaGetLastError();
          return 0;
        }
        return v;
      },
      "The installed driver's CUDA version (e.g. 13000), 0 without a driver.");
  m.def(
      "sm_count", [] { return pymerge::cuda::bind::sm_count(); },
      "Multiprocessors of the current device.");
  m.def(
      "_synchronize",
      [](uintptr_t stream) {
        py::gil_scoped_release release;
        check_cuda(cudaStreamSynchronize(pymerge::cuda::bind::stream_from(stream)), "cudaStreamSynchronize");
      },
      py::arg("stream"), "Test helper: wait for the stream and raise any asynchronous kernel error.");
}
#endif  // PYMERGE_CUDA_WITH_BINDINGS
