// Row-wise slerp (specs/methods.md, "slerp"), in two passes over the rows.
//
// Pass 1 (slerp_row_stats): per row, with x = f32(a), y = f32(b) upcast to
// fp64, the sums sum x*x, sum y*y, sum x*y (each product is exact in fp64).
// Rows are cut into segments of kSeg elements; a segment is summed in kLanes
// fixed lanes combined by a fixed tree, and the segments of a row are added in
// order with Neumaier compensation, so the sums do not depend on the thread
// count or the instruction set.
//
// The per-row coefficients (ca, cb) are computed from these sums by the
// Python layer with the reference's own fp64 torch formulas, then:
// Pass 2 (slerp_combine): out = (ca * x) + (cb * y) in fp32 (three rounded
// ops, -ffp-contract=off), rounded once to the output dtype.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

#if defined(__GNUC__)
#define PYMERGE_SLERP_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_SLERP_FLATTEN
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_SLERP_X86_CLONES 1
#endif

namespace pymerge {
namespace cpu {

namespace slerp {

namespace {

constexpr int64_t kSeg = 2048;
constexpr int64_t kGrainElems = 1 << 16;  // elements per thread at least
constexpr int kLanes = 8;

template <int T>
inline void load_f32(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

inline void load_any(int tag, float* __restrict dst, const void* src, int64_t off, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { load_f32<decltype(t)::value>(dst, src, off, n); });
}

inline double combine_lanes(const double* l) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// sum u*v in fp64 over kLanes fixed lanes (element j in lane j % kLanes),
// combined by combine_lanes; n is a multiple of kLanes. One product per loop:
// with all three in one loop gcc packs x and y into the same vector.
inline double lane_sum(const float* __restrict u, const float* __restrict v, int64_t n) {
  double acc[kLanes] = {};
  for (int64_t j = 0; j < n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += double(u[j + l]) * double(v[j + l]);
  return combine_lanes(acc);
}

struct Args {
  const void* a;
  int a_dtype;
  const void* b;
  int b_dtype;
  int64_t rows;
  int64_t cols;
  int64_t segs_per_row;
  // pass 1
  double* seg_sums;  // [n_segments, 3]
  // pass 2
  void* out;
  int out_dtype;
  const float* ca;
  const float* cb;
};

inline void stats_segments(const Args& a, int64_t s0, int64_t s1) {
  alignas(64) float x[kSeg];
  alignas(64) float y[kSeg];
  for (int64_t seg = s0; seg < s1; ++seg) {
    const int64_t r = seg / a.segs_per_row;
    const int64_t c0 = (seg % a.segs_per_row) * kSeg;
    const int64_t n = std::min(kSeg, a.cols - c0);
    const int64_t np = (n + kLanes - 1) / kLanes * kLanes;
    load_any(a.a_dtype, x, a.a, r * a.cols + c0, n);
    load_any(a.b_dtype, y, a.b, r * a.cols + c0, n);
    for (int64_t j = n; j < np; ++j) x[j] = y[j] = 0.0f;
    double* out = a.seg_sums + seg * 3;
    out[0] = lane_sum(x, x, np);
    out[1] = lane_sum(y, y, np);
    out[2] = lane_sum(x, y, np);
  }
}

inline void combine_segments(const Args& a, int64_t s0, int64_t s1) {
  alignas(64) float x[kSeg];
  alignas(64) float y[kSeg];
  for (int64_t seg = s0; seg < s1; ++seg) {
    const int64_t r = seg / a.segs_per_row;
    const int64_t off = r * a.cols + (seg % a.segs_per_row) * kSeg;
    const int64_t n = std::min(kSeg, a.cols - (seg % a.segs_per_row) * kSeg);
    load_any(a.a_dtype, x, a.a, off, n);
    load_any(a.b_dtype, y, a.b, off, n);
    const float ca = a.ca[r], cb = a.cb[r];
    for (int64_t j = 0; j < n; ++j) {
      const float p = ca * x[j];
      x[j] = p + cb * y[j];
    }
    dispatch_dtype(a.out_dtype, [&](auto t) {
      constexpr int T = decltype(t)::value;
      auto* __restrict o = static_cast<typename Dtype<T>::storage*>(a.out) + off;
      for (int64_t j = 0; j < n; ++j) o[j] = Dtype<T>::store(x[j]);
    });
  }
}

using SegFn = void (*)(const Args&, int64_t, int64_t);

PYMERGE_SLERP_FLATTEN void stats_generic(const Args& a, int64_t s0, int64_t s1) { stats_segments(a, s0, s1); }
PYMERGE_SLERP_FLATTEN void combine_generic(const Args& a, int64_t s0, int64_t s1) { combine_segments(a, s0, s1); }

#ifdef PYMERGE_SLERP_X86_CLONES
PYMERGE_CLONE_AVX2 void stats_avx2(const Args& a, int64_t s0, int64_t s1) { stats_segments(a, s0, s1); }
PYMERGE_CLONE_AVX2 void combine_avx2(const Args& a, int64_t s0, int64_t s1) { combine_segments(a, s0, s1); }
#endif

void run_segments(const Args& a, SegFn fn) {
  const int64_t n_seg = a.rows * a.segs_per_row;
  const int64_t seg_len = std::min(kSeg, a.cols);
  parallel_for(n_seg, std::max<int64_t>(1, kGrainElems / seg_len), [&](int64_t s0, int64_t s1) { fn(a, s0, s1); });
}

}  // namespace

// stats: [3, rows] fp64 (sum x*x, sum y*y, sum x*y per row). rows, cols >= 1.
void row_stats(Args a, double* stats) {
  a.segs_per_row = (a.cols + kSeg - 1) / kSeg;
  std::vector<double> seg_sums(size_t(a.rows * a.segs_per_row * 3));
  a.seg_sums = seg_sums.data();
  SegFn fn = stats_generic;
#ifdef PYMERGE_SLERP_X86_CLONES
  if (use_avx2()) fn = stats_avx2;  // an AVX-512 clone of the fp64 sums measured slower
#endif
  run_segments(a, fn);
  const int64_t spr = a.segs_per_row;
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int q = 0; q < 3; ++q) {
      // Neumaier over the row's segments; a non-finite sum is kept as it is.
      double s = 0.0, c = 0.0;
      for (int64_t k = 0; k < spr; ++k) {
        const double v = seg_sums[size_t(((r * spr + k) * 3) + q)];
        const double t = s + v;
        c += std::fabs(s) >= std::fabs(v) ? (s - t) + v : (v - t) + s;
        s = t;
      }
      stats[q * a.rows + r] = std::isfinite(s) ? s + c : s;
    }
  }
}

void combine(Args a) {
  a.segs_per_row = (a.cols + kSeg - 1) / kSeg;
  SegFn fn = combine_generic;
#ifdef PYMERGE_SLERP_X86_CLONES
  if (use_avx2()) fn = combine_avx2;
#endif
  run_segments(a, fn);
}

}  // namespace slerp
}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;
namespace sl = pymerge::cpu::slerp;

void check_shape(int64_t rows, int64_t cols, const char* what) {
  if (rows < 0 || cols < 0) throw py::value_error(std::string(what) + ": negative size");
}

void row_stats_binding(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, int64_t rows, int64_t cols,
                       uintptr_t stats_ptr) {
  check_shape(rows, cols, "slerp_row_stats");
  check_dtype(a_dtype, "a");
  check_dtype(b_dtype, "b");
  if (rows == 0) return;
  check_ptr(stats_ptr, "stats");
  if (cols == 0) {
    std::fill(mptr<double>(stats_ptr), mptr<double>(stats_ptr) + 3 * rows, 0.0);
    return;
  }
  check_ptr(a_ptr, "a");
  check_ptr(b_ptr, "b");
  sl::Args a{};
  a.a = reinterpret_cast<const void*>(a_ptr);
  a.a_dtype = a_dtype;
  a.b = reinterpret_cast<const void*>(b_ptr);
  a.b_dtype = b_dtype;
  a.rows = rows;
  a.cols = cols;
  py::gil_scoped_release release;
  sl::row_stats(a, mptr<double>(stats_ptr));
}

void combine_binding(uintptr_t out_ptr, int out_dtype, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
                     int64_t rows, int64_t cols, uintptr_t ca_ptr, uintptr_t cb_ptr) {
  check_shape(rows, cols, "slerp_combine");
  check_dtype(out_dtype, "out");
  check_dtype(a_dtype, "a");
  check_dtype(b_dtype, "b");
  if (rows == 0 || cols == 0) return;
  check_ptr(out_ptr, "out");
  check_ptr(a_ptr, "a");
  check_ptr(b_ptr, "b");
  check_ptr(ca_ptr, "ca");
  check_ptr(cb_ptr, "cb");
  check_no_overlap(out_ptr, out_dtype, a_ptr, a_dtype, rows * cols, "a");
  check_no_overlap(out_ptr, out_dtype, b_ptr, b_dtype, rows * cols, "b");
  sl::Args a{};
  a.a = reinterpret_cast<const void*>(a_ptr);
  a.a_dtype = a_dtype;
  a.b = reinterpret_cast<const void*>(b_ptr);
  a.b_dtype = b_dtype;
  a.rows = rows;
  a.cols = cols;
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.ca = cptr<float>(ca_ptr);
  a.cb = cptr<float>(cb_ptr);
  py::gil_scoped_release release;
  sl::combine(a);
}

}  // namespace

PYMERGE_BINDINGS(slerp) {
  m.def("slerp_row_stats", &row_stats_binding, py::arg("a_ptr"), py::arg("a_dtype"), py::arg("b_ptr"),
        py::arg("b_dtype"), py::arg("rows"), py::arg("cols"), py::arg("stats_ptr"),
        "Per row of two contiguous [rows, cols] buffers: fp64 sum x*x, sum y*y, sum x*y into stats [3, rows].");
  m.def("slerp_combine", &combine_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("a_ptr"),
        py::arg("a_dtype"), py::arg("b_ptr"), py::arg("b_dtype"), py::arg("rows"), py::arg("cols"), py::arg("ca_ptr"),
        py::arg("cb_ptr"),
        "out[r, :] = ca[r] * x + cb[r] * y in fp32 (ca, cb: fp32 [rows]), rounded once to out_dtype.");
}
