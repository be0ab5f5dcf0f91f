// Row-wise slerp (specs/methods.md, "slerp").
//
// Row sums: with x = f32(a), y = f32(b) upcast to fp64, sum x*x, sum y*y,
// sum x*y (each product is exact in fp64). Rows are cut into segments of kSeg
// elements; a segment is summed in fixed lanes, and the segments of a row are
// added in order (common/sums.h), so the sums do not depend on the thread
// count, the instruction set or the path below.
//
// Coefficients (ca, cb): the reference's fp64 formulas on those sums, rounded
// to fp32. acos and sin are the C library's; they may differ from torch's in
// the last fp64 bit, which changes an fp32 coefficient only when it lies on an
// fp32 rounding boundary.
//
// Combine: out = (ca * x) + (cb * y) in fp32 (three rounded ops,
// -ffp-contract=off), rounded once to the output dtype.
//
// A row of at most kRowMax elements is done in one pass: the thread upcasts it
// into its own buffers, sums, and combines from the buffers (still in cache).
// Wider rows take two passes over the memory, each parallel over segments.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/sums.h"
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
constexpr int64_t kRowMax = 8 * kSeg;     // two fp32 rows of this size stay in L2
constexpr int64_t kGrainElems = 1 << 16;  // elements per thread at least
constexpr double kNormEps = 1e-8;
constexpr double kDotThreshold = 0.9995;

inline int64_t padded_len(int64_t n) { return (n + kSumLanes - 1) / kSumLanes * kSumLanes; }

template <int T>
inline void load_f32(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

inline void load_any(int tag, float* __restrict dst, const void* src, int64_t off, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { load_f32<decltype(t)::value>(dst, src, off, n); });
}

// The three sums of one segment of n elements; x and y hold zeros from n up to
// the next multiple of kSumLanes. One product per lane_sum: with all three in
// one loop gcc packs x and y into the same vector.
inline void segment_sums(const float* __restrict x, const float* __restrict y, int64_t n, double* out) {
  const int64_t np = padded_len(n);
  out[0] = lane_sum(np, [&](int64_t j) { return double(x[j]) * double(x[j]); });
  out[1] = lane_sum(np, [&](int64_t j) { return double(y[j]) * double(y[j]); });
  out[2] = lane_sum(np, [&](int64_t j) { return double(x[j]) * double(y[j]); });
}

// The reference's slerp_coefficients from one row's sums, op for op in fp64.
// Comparisons are written so that NaN takes the same branch as torch.where.
inline void row_coefficients(double aa, double bb, double ab, double t, float* ca, float* cb) {
  double na = std::sqrt(aa), nb = std::sqrt(bb);
  if (na <= kNormEps) na = 1.0;
  if (nb <= kNormEps) nb = 1.0;
  double dot = ab / (na * nb);
  if (dot < -1.0) dot = -1.0;
  if (dot > 1.0) dot = 1.0;
  if (std::fabs(dot) > kDotThreshold) {
    *ca = float(1.0 - t);
    *cb = float(t);
    return;
  }
  const double theta = std::acos(dot);
  const double sin_theta = std::sin(theta);
  *ca = float(std::sin((1.0 - t) * theta) / sin_theta);
  *cb = float(std::sin(t * theta) / sin_theta);
}

struct Args {
  const void* a;
  int a_dtype;
  const void* b;
  int b_dtype;
  int64_t rows;
  int64_t cols;
  double t;
  void* out;
  int out_dtype;
  // filled by the passes
  int64_t segs_per_row;
  double* seg_sums;  // [rows * segs_per_row, 3]
  float* ca;         // [rows]
  float* cb;         // [rows]
};

inline void store_combined(const Args& a, float* __restrict x, const float* __restrict y, float ca, float cb,
                           int64_t off, int64_t n) {
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

// One pass over rows [r0, r1), cols <= kRowMax. With ca/cb null the row is
// combined and stored; otherwise only its coefficients are written.
inline void rows_in_one_pass(const Args& a, int64_t r0, int64_t r1) {
  const int64_t cols = a.cols;
  const int64_t padded = padded_len(cols);
  const int64_t spr = (cols + kSeg - 1) / kSeg;
  std::vector<float> buf(size_t(2 * padded));
  float* __restrict x = buf.data();
  float* __restrict y = x + padded;
  double sums[3 * (kRowMax / kSeg)];
  for (int64_t r = r0; r < r1; ++r) {
    load_any(a.a_dtype, x, a.a, r * cols, cols);
    load_any(a.b_dtype, y, a.b, r * cols, cols);
    for (int64_t j = cols; j < padded; ++j) x[j] = y[j] = 0.0f;
    for (int64_t s = 0; s < spr; ++s)
      segment_sums(x + s * kSeg, y + s * kSeg, std::min(kSeg, cols - s * kSeg), sums + 3 * s);
    float ca, cb;
    row_coefficients(ordered_sum(sums, spr, 3), ordered_sum(sums + 1, spr, 3), ordered_sum(sums + 2, spr, 3), a.t,
                     &ca, &cb);
    if (a.ca) {
      a.ca[r] = ca;
      a.cb[r] = cb;
    } else {
      store_combined(a, x, y, ca, cb, r * cols, cols);
    }
  }
}

// Wide rows, pass 1: the sums of segments [s0, s1).
inline void sum_segments(const Args& a, int64_t s0, int64_t s1) {
  alignas(64) float x[kSeg];
  alignas(64) float y[kSeg];
  for (int64_t seg = s0; seg < s1; ++seg) {
    const int64_t r = seg / a.segs_per_row;
    const int64_t c0 = (seg % a.segs_per_row) * kSeg;
    const int64_t n = std::min(kSeg, a.cols - c0);
    load_any(a.a_dtype, x, a.a, r * a.cols + c0, n);
    load_any(a.b_dtype, y, a.b, r * a.cols + c0, n);
    for (int64_t j = n; j < padded_len(n); ++j) x[j] = y[j] = 0.0f;
    segment_sums(x, y, n, a.seg_sums + seg * 3);
  }
}

// Wide rows, pass 2: combine segments [s0, s1) with the rows' coefficients.
inline void combine_segments(const Args& a, int64_t s0, int64_t s1) {
  alignas(64) float x[kSeg];
  alignas(64) float y[kSeg];
  for (int64_t seg = s0; seg < s1; ++seg) {
    const int64_t r = seg / a.segs_per_row;
    const int64_t c0 = (seg % a.segs_per_row) * kSeg;
    const int64_t n = std::min(kSeg, a.cols - c0);
    load_any(a.a_dtype, x, a.a, r * a.cols + c0, n);
    load_any(a.b_dtype, y, a.b, r * a.cols + c0, n);
    store_combined(a, x, y, a.ca[r], a.cb[r], r * a.cols + c0, n);
  }
}

using RangeFn = void (*)(const Args&, int64_t, int64_t);

struct Kernels {
  RangeFn rows, sums, combine;
};

PYMERGE_SLERP_FLATTEN void rows_generic(const Args& a, int64_t r0, int64_t r1) { rows_in_one_pass(a, r0, r1); }
PYMERGE_SLERP_FLATTEN void sums_generic(const Args& a, int64_t s0, int64_t s1) { sum_segments(a, s0, s1); }
PYMERGE_SLERP_FLATTEN void combine_generic(const Args& a, int64_t s0, int64_t s1) { combine_segments(a, s0, s1); }

#ifdef PYMERGE_SLERP_X86_CLONES
// AVX-512 clones of the fp64 sums measured no faster than AVX2.
PYMERGE_CLONE_AVX2 void rows_avx2(const Args& a, int64_t r0, int64_t r1) { rows_in_one_pass(a, r0, r1); }
PYMERGE_CLONE_AVX2 void sums_avx2(const Args& a, int64_t s0, int64_t s1) { sum_segments(a, s0, s1); }
PYMERGE_CLONE_AVX2 void combine_avx2(const Args& a, int64_t s0, int64_t s1) { combine_segments(a, s0, s1); }
#endif

Kernels pick_kernels() {
#ifdef PYMERGE_SLERP_X86_CLONES
  if (use_avx2()) return {rows_avx2, sums_avx2, combine_avx2};
#endif
  return {rows_generic, sums_generic, combine_generic};
}

}  // namespace

// Coefficients of every row into a.ca, a.cb; then, unless only_coefficients,
// the combined rows into a.out. rows, cols >= 1.
void run(Args a, bool only_coefficients) {
  const Kernels k = pick_kernels();
  std::vector<float> coef;
  if (!only_coefficients) a.ca = a.cb = nullptr;
  if (a.cols <= kRowMax) {
    parallel_for(a.rows, std::max<int64_t>(1, kGrainElems / a.cols), [&](int64_t r0, int64_t r1) { k.rows(a, r0, r1); });
    return;
  }
  if (!only_coefficients) {
    coef.resize(size_t(2 * a.rows));
    a.ca = coef.data();
    a.cb = a.ca + a.rows;
  }
  a.segs_per_row = (a.cols + kSeg - 1) / kSeg;
  const int64_t n_seg = a.rows * a.segs_per_row;
  std::vector<double> seg_sums(size_t(n_seg * 3));
  a.seg_sums = seg_sums.data();
  const int64_t grain = kGrainElems / kSeg;
  parallel_for(n_seg, grain, [&](int64_t s0, int64_t s1) { k.sums(a, s0, s1); });
  for (int64_t r = 0; r < a.rows; ++r) {
    const double* s = a.seg_sums + r * a.segs_per_row * 3;
    row_coefficients(ordered_sum(s, a.segs_per_row, 3), ordered_sum(s + 1, a.segs_per_row, 3),
                     ordered_sum(s + 2, a.segs_per_row, 3), a.t, &a.ca[r], &a.cb[r]);
  }
  if (!only_coefficients) parallel_for(n_seg, grain, [&](int64_t s0, int64_t s1) { k.combine(a, s0, s1); });
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

sl::Args inputs(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, int64_t rows, int64_t cols, double t,
                const char* what) {
  if (rows < 0 || cols < 0) throw py::value_error(std::string(what) + ": negative size");
  if (!std::isfinite(t)) throw py::value_error(std::string(what) + ": t is not finite");
  check_dtype(a_dtype, "a");
  check_dtype(b_dtype, "b");
  if (rows > 0 && cols > 0) {
    check_ptr(a_ptr, "a");
    check_ptr(b_ptr, "b");
  }
  sl::Args a{};
  a.a = reinterpret_cast<const void*>(a_ptr);
  a.a_dtype = a_dtype;
  a.b = reinterpret_cast<const void*>(b_ptr);
  a.b_dtype = b_dtype;
  a.rows = rows;
  a.cols = cols;
  a.t = t;
  return a;
}

void slerp_binding(uintptr_t out_ptr, int out_dtype, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
                   int64_t rows, int64_t cols, double t) {
  sl::Args a = inputs(a_ptr, a_dtype, b_ptr, b_dtype, rows, cols, t, "slerp");
  check_dtype(out_dtype, "out");
  if (rows == 0 || cols == 0) return;
  check_ptr(out_ptr, "out");
  check_no_overlap(out_ptr, out_dtype, a_ptr, a_dtype, rows * cols, "a");
  check_no_overlap(out_ptr, out_dtype, b_ptr, b_dtype, rows * cols, "b");
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  py::gil_scoped_release release;
  sl::run(a, false);
}

void coefficients_binding(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, int64_t rows, int64_t cols,
                          double t, uintptr_t ca_ptr, uintptr_t cb_ptr) {
  sl::Args a = inputs(a_ptr, a_dtype, b_ptr, b_dtype, rows, cols, t, "slerp_coefficients");
  if (rows == 0) return;
  check_ptr(ca_ptr, "ca");
  check_ptr(cb_ptr, "cb");
  a.ca = mptr<float>(ca_ptr);
  a.cb = mptr<float>(cb_ptr);
  if (cols == 0) {  // zero rows: dot = 0, theta = pi/2
    py::gil_scoped_release release;
    for (int64_t r = 0; r < rows; ++r) sl::row_coefficients(0.0, 0.0, 0.0, t, &a.ca[r], &a.cb[r]);
    return;
  }
  py::gil_scoped_release release;
  sl::run(a, true);
}

}  // namespace

PYMERGE_BINDINGS(slerp) {
  m.def("slerp", &slerp_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("a_ptr"), py::arg("a_dtype"),
        py::arg("b_ptr"), py::arg("b_dtype"), py::arg("rows"), py::arg("cols"), py::arg("t"),
        "Row-wise slerp of two contiguous [rows, cols] buffers into out, rounded once to out_dtype.");
  m.def("slerp_coefficients", &coefficients_binding, py::arg("a_ptr"), py::arg("a_dtype"), py::arg("b_ptr"),
        py::arg("b_dtype"), py::arg("rows"), py::arg("cols"), py::arg("t"), py::arg("ca_ptr"), py::arg("cb_ptr"),
        "The per-row fp32 coefficients (ca, cb) of slerp, [rows] each: out = (ca * x) + (cb * y).");
}
