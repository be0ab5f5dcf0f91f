// Whether a tensor holds only finite values: the engine checks every input for
// NaN/Inf, and torch.isfinite(t).all() allocates a bool tensor and runs at a
// fraction of memory bandwidth. A value is NaN or Inf exactly when its exponent
// bits are all ones, so the test is one AND and compare per element, OR-reduced
// in a loop the compiler vectorises.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/bindings.h"

namespace pymerge {
namespace cpu {
namespace {

namespace py = pybind11;

constexpr int64_t kGrain = int64_t(1) << 18;
constexpr int64_t kBlock = 4096;  // elements between early exits

template <typename U, U kExponent>
bool all_finite(const U* p, int64_t n) {
  // One flag per chunk: parallel_for hands each chunk to one thread.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), (n + kGrain - 1) / kGrain));
  std::vector<uint8_t> chunk_bad(static_cast<size_t>(chunks), 0);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * n / chunks, end = (c + 1) * n / chunks;
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t e = std::min(end, b + kBlock);
        U hit = 0;
        for (int64_t i = b; i < e; ++i) hit |= U((p[i] & kExponent) == kExponent);
        if (hit) {
          chunk_bad[static_cast<size_t>(c)] = 1;
          return;
        }
      }
    }
  });
  for (uint8_t b : chunk_bad)
    if (b) return false;
  return true;
}

bool all_finite_binding(uintptr_t ptr, int dtype, int64_t numel) {
  bind::check_dtype(dtype, "all_finite");
  if (numel <= 0) return true;
  bind::check_ptr(ptr, "all_finite");
  py::gil_scoped_release release;
  switch (dtype) {
    case FLOAT32: return all_finite<uint32_t, 0x7F800000u>(reinterpret_cast<const uint32_t*>(ptr), numel);
    case FLOAT16: return all_finite<uint16_t, 0x7C00u>(reinterpret_cast<const uint16_t*>(ptr), numel);
    default: return all_finite<uint16_t, 0x7F80u>(reinterpret_cast<const uint16_t*>(ptr), numel);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace pymerge

PYMERGE_BINDINGS(finite) {
  namespace py = pybind11;
  m.def("all_finite", &pymerge::cpu::all_finite_binding, py::arg("ptr"), py::arg("dtype"), py::arg("numel"),
        "True when none of the numel values at ptr is NaN or Inf (exponent bits all ones).");
}
