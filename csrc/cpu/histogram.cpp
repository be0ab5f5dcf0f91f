// 16-bit digit histograms of 32-bit selection keys, for model-scope statistics:
// the engine streams a whole model tensor by tensor and sums these histograms
// in pymerge.ops.selection.RadixSelect (two passes: high digit, then the low
// digit inside the chosen high bin).
//
// Keys (select.h): abs_key(f32(x) - f32(base)) for magnitudes of task-vector
// entries, order_key(v) for signed fp32 values with -0 counted as +0. NaN maps
// to key 0xFFFFFFFF, which no other value has in its high digit (0xFFFF), so
// the caller can refuse NaN from the high-digit histogram alone.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/select.h"
#include "cpu/bindings.h"

namespace pymerge {
namespace cpu {
namespace hist {

constexpr uint32_t kNanKey = 0xFFFFFFFFu;

inline uint32_t abs_key_nan(float x) { return select_u32(x != x, kNanKey, abs_key(x)); }

inline uint32_t order_key_nan(float x) { return select_u32(x != x, kNanKey, order_key(x + 0.0f)); }

template <class KeyFn>
void histogram_into(int64_t* out, int64_t n, int shift, bool filter, uint32_t prefix, const KeyFn& key_of) {
  const std::vector<int64_t> h = detail::histogram(n, key_of, shift, filter, prefix);
  std::memcpy(out, h.data(), sizeof(int64_t) * h.size());
}

}  // namespace hist

void abs_tau_histogram(int64_t* out, const void* base, int base_dtype, const void* input, int in_dtype, int64_t n,
                       int shift, bool filter, uint32_t prefix) {
  dispatch_dtype(base_dtype, [&](auto tb) {
    dispatch_dtype(in_dtype, [&](auto ti) {
      constexpr int TB = decltype(tb)::value, TI = decltype(ti)::value;
      const auto* pb = static_cast<const typename Dtype<TB>::storage*>(base);
      const auto* pi = static_cast<const typename Dtype<TI>::storage*>(input);
      hist::histogram_into(out, n, shift, filter, prefix, [pb, pi](int64_t j) {
        return hist::abs_key_nan(Dtype<TI>::load(pi[j]) - Dtype<TB>::load(pb[j]));
      });
    });
  });
}

void order_key_histogram(int64_t* out, const float* values, int64_t n, int shift, bool filter, uint32_t prefix) {
  hist::histogram_into(out, n, shift, filter, prefix, [values](int64_t j) { return hist::order_key_nan(values[j]); });
}

}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;

// shift 16: the high digit of every key; shift 0: the low digit of the keys
// whose high digit is prefix (prefix < 0 is refused: the low digit alone
// selects nothing).
void check_digit(int shift, int64_t prefix) {
  if (shift != 16 && shift != 0) throw py::value_error("shift must be 16 (high digit) or 0 (low digit)");
  if (shift == 16 && prefix >= 0) throw py::value_error("prefix applies to the low digit only (shift=0)");
  if (shift == 0 && (prefix < 0 || prefix > 0xFFFF))
    throw py::value_error("the low digit (shift=0) needs a prefix in [0, 65535]");
}

void abs_tau_histogram_binding(uintptr_t out_ptr, uintptr_t base_ptr, int base_dtype, uintptr_t in_ptr, int in_dtype,
                               int64_t numel, int shift, int64_t prefix) {
  check_dtype(base_dtype, "base");
  check_dtype(in_dtype, "input");
  check_digit(shift, prefix);
  if (numel < 0) throw py::value_error("abs_tau_histogram: numel < 0");
  check_ptr(out_ptr, "out");
  auto* out = mptr<int64_t>(out_ptr);
  if (numel == 0) {
    std::fill(out, out + 65536, int64_t(0));
    return;
  }
  check_ptr(base_ptr, "base");
  check_ptr(in_ptr, "input");
  py::gil_scoped_release release;
  pymerge::cpu::abs_tau_histogram(out, reinterpret_cast<const void*>(base_ptr), base_dtype,
                                  reinterpret_cast<const void*>(in_ptr), in_dtype, numel, shift, shift == 0,
                                  uint32_t(std::max<int64_t>(prefix, 0)));
}

void order_key_histogram_binding(uintptr_t out_ptr, uintptr_t values_ptr, int64_t numel, int shift, int64_t prefix) {
  check_digit(shift, prefix);
  if (numel < 0) throw py::value_error("order_key_histogram: numel < 0");
  check_ptr(out_ptr, "out");
  auto* out = mptr<int64_t>(out_ptr);
  if (numel == 0) {
    std::fill(out, out + 65536, int64_t(0));
    return;
  }
  check_ptr(values_ptr, "values");
  py::gil_scoped_release release;
  pymerge::cpu::order_key_histogram(out, cptr<float>(values_ptr), numel, shift, shift == 0,
                                    uint32_t(std::max<int64_t>(prefix, 0)));
}

}  // namespace

PYMERGE_BINDINGS(histogram) {
  m.def("abs_tau_histogram", &abs_tau_histogram_binding, py::arg("out_ptr"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("in_ptr"), py::arg("in_dtype"), py::arg("numel"), py::arg("shift"),
        py::arg("prefix"),
        "int64[65536] histogram at out_ptr of one 16-bit digit of abs_key(f32(x) - f32(base)); NaN -> key "
        "0xFFFFFFFF. shift=16: high digit; shift=0: low digit of the keys whose high digit == prefix "
        "(prefix=-1 with shift=16).");
  m.def("order_key_histogram", &order_key_histogram_binding, py::arg("out_ptr"), py::arg("values_ptr"),
        py::arg("numel"), py::arg("shift"), py::arg("prefix"),
        "int64[65536] histogram at out_ptr of one 16-bit digit of order_key(v) of fp32 values (-0 as +0, "
        "NaN -> key 0xFFFFFFFF); shift/prefix as abs_tau_histogram.");
}
