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

constexpr int64_t kBlock = 1024;
constexpr int64_t kGrain = int64_t(1) << 16;
constexpr int64_t kCopies = detail::kCopies;
constexpr int64_t kDummies = detail::kDummies;
constexpr int64_t kBins = detail::kBins;

// The digit histogram of keys produced a block at a time by fill(keys, begin, n)
// (a loop the compiler vectorises), counted as detail::histogram does: per
// chunk uint32 counters in kCopies interleaved copies; with a filter, groups of
// 16 keys without a hit are skipped by a vectorised test and the others count
// branch-free (misses in dummy bins).
template <class FillFn>
void histogram_into(int64_t* out, int64_t n, int shift, bool filter, uint32_t prefix, const FillFn& fill) {
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), (n + kGrain - 1) / kGrain));
  chunks = std::max<int64_t>(chunks, (n >> 31) + 1);
  constexpr int64_t kSize = kCopies * kBins + kDummies;
  std::vector<std::vector<uint32_t>> parts(static_cast<size_t>(chunks));
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) uint32_t keys[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<uint32_t> h(static_cast<size_t>(kSize), 0u);
      uint32_t* __restrict hp = h.data();
      const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
      for (int64_t off = b; off < e; off += kBlock) {
        const int64_t m = std::min(kBlock, e - off);
        fill(keys, off, m);
        if (!filter) {
          int64_t j = 0;
          for (; j + kCopies <= m; j += kCopies)
            for (int64_t l = 0; l < kCopies; ++l) ++hp[((keys[j + l] >> shift) & 0xFFFFu) * kCopies + l];
          for (; j < m; ++j) ++hp[((keys[j] >> shift) & 0xFFFFu) * kCopies];
          continue;
        }
        for (int64_t j0 = 0; j0 < m; j0 += 16) {
          const int64_t j1 = std::min(m, j0 + 16);
          uint32_t any = 0;
          for (int64_t j = j0; j < j1; ++j) any |= uint32_t((keys[j] >> 16) == prefix);
          if (!any) continue;
          for (int64_t j = j0; j < j1; ++j) {
            const uint32_t k = keys[j];
            const uint32_t hit = (k & 0xFFFFu) * uint32_t(kCopies) + uint32_t(j % kCopies);
            const uint32_t miss = uint32_t(kCopies * kBins + j % kDummies);
            ++hp[select_u32((k >> 16) == prefix, hit, miss)];
          }
        }
      }
      parts[static_cast<size_t>(c)] = std::move(h);
    }
  });
  for (int64_t j = 0; j < kBins; ++j) {
    int64_t t = 0;
    for (const auto& h : parts)
      for (int64_t l = 0; l < kCopies; ++l) t += h[static_cast<size_t>(j * kCopies + l)];
    out[j] = t;
  }
}

}  // namespace hist

void abs_tau_histogram(int64_t* out, const void* base, int base_dtype, const void* input, int in_dtype, int64_t n,
                       int shift, bool filter, uint32_t prefix) {
  dispatch_dtype(base_dtype, [&](auto tb) {
    dispatch_dtype(in_dtype, [&](auto ti) {
      constexpr int TB = decltype(tb)::value, TI = decltype(ti)::value;
      const auto* pb = static_cast<const typename Dtype<TB>::storage*>(base);
      const auto* pi = static_cast<const typename Dtype<TI>::storage*>(input);
      hist::histogram_into(out, n, shift, filter, prefix, [pb, pi](uint32_t* __restrict keys, int64_t off, int64_t m) {
        const auto* __restrict b = pb + off;
        const auto* __restrict x = pi + off;
        for (int64_t j = 0; j < m; ++j) keys[j] = hist::abs_key_nan(Dtype<TI>::load(x[j]) - Dtype<TB>::load(b[j]));
      });
    });
  });
}

void order_key_histogram(int64_t* out, const float* values, int64_t n, int shift, bool filter, uint32_t prefix) {
  hist::histogram_into(out, n, shift, filter, prefix, [values](uint32_t* __restrict keys, int64_t off, int64_t m) {
    const float* __restrict v = values + off;
    for (int64_t j = 0; j < m; ++j) keys[j] = hist::order_key_nan(v[j]);
  });
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
