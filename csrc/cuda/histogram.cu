// 16-bit digit histograms of 32-bit selection keys on the GPU, for model-scope
// statistics (same results as csrc/cpu/histogram.cpp and the torch versions in
// pymerge/ops/selection.py): the engine streams a whole model tensor by
// tensor and sums these histograms in RadixSelect (high digit, then the low
// digit inside the chosen high bin).
//
// Keys: abs_key(f32(x) - f32(base)) for magnitudes of task-vector entries,
// order keys of fp32 values with -0 counted as +0; NaN -> 0xFFFFFFFF.
// The counting is digit_hist_kernel of sparse_common.cuh: shared-memory
// 16-bit counters flushed into the int64 output with integer atomics.

#include <cstdint>
#include <string>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"
#include "cuda/sparse_common.cuh"

namespace pymerge {
namespace cuda {
namespace api {
namespace {

namespace pc = pymerge::cuda;
namespace ps = pymerge::cuda::sparse;
using namespace pymerge::cuda::bind;

// shift 16: the high digit of every key; shift 0: the low digit of the keys
// whose high digit is prefix (prefix < 0 is refused: the low digit alone
// selects nothing).
void check_digit(int shift, int64_t prefix) {
  if (shift != 16 && shift != 0) fail("shift must be 16 (high digit) or 0 (low digit)");
  if (shift == 16 && prefix >= 0) fail("prefix applies to the low digit only (shift=0)");
  if (shift == 0 && (prefix < 0 || prefix > 0xFFFF))
    fail("the low digit (shift=0) needs a prefix in [0, 65535]");
}

ps::HistJob job_for(uintptr_t out_ptr, int64_t numel, int shift, int64_t prefix) {
  ps::HistJob job{};
  job.out = mptr<unsigned long long>(out_ptr);
  job.numel = numel;
  job.shift = shift;
  job.prefix = uint32_t(prefix < 0 ? 0 : prefix);
  return job;
}

void zero_out(uintptr_t out_ptr, cudaStream_t st) {
  check_cuda(cudaMemsetAsync(mptr<void>(out_ptr), 0, size_t(ps::kBins) * sizeof(int64_t), st), "cudaMemsetAsync");
}

}  // namespace

// Check the arguments and launch on `stream`; used by the bindings below.
void abs_tau_histogram(uintptr_t out_ptr, uintptr_t base_ptr, int base_dtype, uintptr_t in_ptr, int in_dtype,
                               int64_t numel, int shift, int64_t prefix, uintptr_t stream) {
  check_dtype(base_dtype, "base");
  check_dtype(in_dtype, "input");
  check_digit(shift, prefix);
  if (numel < 0) fail("abs_tau_histogram: numel < 0");
  check_ptr(out_ptr, "out");
  const cudaStream_t st = stream_from(stream);
  zero_out(out_ptr, st);
  if (numel == 0) return;
  check_ptr(base_ptr, "base");
  check_ptr(in_ptr, "input");
  ps::TauKeys<ps::kAbsNanKey> src{};
  src.models.ptr[0] = cptr<void>(in_ptr);
  src.models.dtype[0] = int8_t(in_dtype);
  src.models.n = 1;
  src.base = cptr<void>(base_ptr);
  src.base_dtype = base_dtype;
  src.numel = numel;
  src.vec = pc::aligned16(src.base) && pc::aligned16(src.models.ptr[0]);
  ps::launch_hist(src, job_for(out_ptr, numel, shift, prefix), 1, st);
}

void order_key_histogram(uintptr_t out_ptr, uintptr_t values_ptr, int64_t numel, int shift, int64_t prefix,
                                 uintptr_t stream) {
  check_digit(shift, prefix);
  if (numel < 0) fail("order_key_histogram: numel < 0");
  check_ptr(out_ptr, "out");
  const cudaStream_t st = stream_from(stream);
  zero_out(out_ptr, st);
  if (numel == 0) return;
  check_ptr(values_ptr, "values");
  ps::RowKeys src{cptr<float>(values_ptr), numel, pc::aligned16(cptr<void>(values_ptr))};
  ps::launch_hist(src, job_for(out_ptr, numel, shift, prefix), 1, st);
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(histogram) {
  namespace py = pybind11;
  m.def("abs_tau_histogram", &pymerge::cuda::api::abs_tau_histogram, py::arg("out_ptr"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("in_ptr"), py::arg("in_dtype"), py::arg("numel"), py::arg("shift"),
        py::arg("prefix"), py::arg("stream"),
        "int64[65536] histogram at device address out_ptr of one 16-bit digit of abs_key(f32(x) - f32(base)); "
        "NaN -> key 0xFFFFFFFF. shift=16: high digit; shift=0: low digit of the keys whose high digit == "
        "prefix (prefix=-1 with shift=16).");
  m.def("order_key_histogram", &pymerge::cuda::api::order_key_histogram, py::arg("out_ptr"), py::arg("values_ptr"),
        py::arg("numel"), py::arg("shift"), py::arg("prefix"), py::arg("stream"),
        "int64[65536] histogram at device address out_ptr of one 16-bit digit of order_key(v) of fp32 values "
        "(-0 as +0, NaN -> key 0xFFFFFFFF); shift/prefix as abs_tau_histogram.");
}
#endif
