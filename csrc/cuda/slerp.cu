// Row-wise slerp on the GPU (specs/methods.md, "slerp"; torch reference
// pymerge/ops/reference/slerp.py), in two passes over the rows.
//
// Pass 1 (slerp_row_stats): per row, with x = f32(a), y = f32(b) upcast to
// fp64, the sums sum x*x, sum y*y, sum x*y (each product exact in fp64). A row
// is cut into segments of kSegElems elements, one block per segment: each
// thread sums its packs in order, the block adds its threads with a fixed
// tree, and a second kernel adds a row's segment partials in order with
// Neumaier compensation. The order is a function of the shape only, so the
// sums are reproducible bit for bit; torch sums in another order, so they
// may differ from the reference's in the last fp64 bits.
//
// The per-row coefficients (ca, cb) are computed from these sums by the Python
// layer with the reference's own fp64 torch formulas, on the same device.
// A last-bit difference in a sum moves an fp32 coefficient by at most one ulp,
// and only when the fp64 value lies within that difference of an fp32
// rounding boundary (rare); lerp rows (|dot| > 0.9995) take ca = 1 - t,
// cb = t and are bit-identical whatever the sums.
//
// Pass 2 (slerp_combine): out = (ca * x) + (cb * y), three rounded fp32 ops,
// rounded once to the output dtype.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

namespace pymerge {
namespace cuda {
namespace {

constexpr int kSlerpThreads = 256;
constexpr int64_t kSegElems = int64_t(kSlerpThreads) * kPack * 4;  // 8192 elements per segment

struct SlerpArgs {
  const void* a;
  int a_dtype;
  const void* b;
  int b_dtype;
  int64_t rows;
  int64_t cols;
  int64_t segs;       // segments per row
  double* partials;   // [rows * segs, 3]
  void* out;
  int out_dtype;
  const float* ca;
  const float* cb;
  bool vec;           // buffers 16-byte aligned and cols a multiple of kPack
};

__global__ void __launch_bounds__(kSlerpThreads) slerp_stats_kernel(const __grid_constant__ SlerpArgs a) {
  __shared__ double scratch[32];
  const int64_t items = a.rows * a.segs;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t r = item / a.segs;
    const int64_t c_begin = (item - r * a.segs) * kSegElems;
    const int64_t c_end = c_begin + kSegElems < a.cols ? c_begin + kSegElems : a.cols;
    const int64_t row0 = r * a.cols;
    double xx = 0.0, yy = 0.0, xy = 0.0;
    for (int64_t c = c_begin + int64_t(threadIdx.x) * kPack; c < c_end; c += int64_t(kSlerpThreads) * kPack) {
      float x[kPack], y[kPack];
      // Bounded by the row end: load_pack reads zeros past it.
      load_pack(a.a, a.a_dtype, row0 + c, row0 + c_end, a.vec, x);
      load_pack(a.b, a.b_dtype, row0 + c, row0 + c_end, a.vec, y);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const double dx = x[j], dy = y[j];
        xx = __dadd_rn(xx, __dmul_rn(dx, dx));
        yy = __dadd_rn(yy, __dmul_rn(dy, dy));
        xy = __dadd_rn(xy, __dmul_rn(dx, dy));
      }
    }
    const double sxx = block_sum(xx, scratch);
    const double syy = block_sum(yy, scratch);
    const double sxy = block_sum(xy, scratch);
    if (threadIdx.x == 0) {
      double* p = a.partials + item * 3;
      p[0] = sxx;
      p[1] = syy;
      p[2] = sxy;
    }
  }
}

// stats [3, rows]: each row's segment partials added in order (Neumaier).
__global__ void slerp_rows_kernel(const double* partials, int64_t rows, int64_t segs, double* stats) {
  for (int64_t r = global_thread(); r < rows; r += grid_threads()) {
    for (int q = 0; q < 3; ++q) {
      Neumaier acc;
      for (int64_t k = 0; k < segs; ++k) acc.add(partials[(r * segs + k) * 3 + q]);
      stats[q * rows + r] = acc.value();
    }
  }
}

__global__ void __launch_bounds__(kThreads) slerp_combine_kernel(const __grid_constant__ SlerpArgs a) {
  const int64_t ppr = packs_of(a.cols);
  const int64_t items = a.rows * ppr;
  for (int64_t k = global_thread(); k < items; k += grid_threads()) {
    const int64_t r = k / ppr;
    const int64_t c0 = (k - r * ppr) * kPack;
    const int64_t i0 = r * a.cols + c0;
    const int64_t end = r * a.cols + a.cols;
    float x[kPack], y[kPack], o[kPack];
    load_pack(a.a, a.a_dtype, i0, end, a.vec, x);
    load_pack(a.b, a.b_dtype, i0, end, a.vec, y);
    const float ca = __ldg(a.ca + r), cb = __ldg(a.cb + r);
#pragma unroll
    for (int j = 0; j < kPack; ++j) o[j] = fadd(fmul(ca, x[j]), fmul(cb, y[j]));
    store_pack(a.out, a.out_dtype, i0, end, a.vec, o);
  }
}

}  // namespace

namespace api {

using namespace pymerge::cuda::bind;

int64_t slerp_segments(int64_t cols) { return cols <= 0 ? 0 : (cols + kSegElems - 1) / kSegElems; }

// partials: device fp64 [rows * slerp_segments(cols), 3] scratch; stats: device fp64 [3, rows].
void slerp_row_stats(uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype, int64_t rows, int64_t cols,
                     uintptr_t partials_ptr, uintptr_t stats_ptr, uintptr_t stream) {
  if (rows < 0 || cols < 0) fail("slerp_row_stats: negative size");
  check_dtype(a_dtype, "a");
  check_dtype(b_dtype, "b");
  if (rows == 0 || cols == 0) return;  // the Python layer zero-fills stats for empty rows
  check_ptr(a_ptr, "a");
  check_ptr(b_ptr, "b");
  check_ptr(partials_ptr, "partials");
  check_ptr(stats_ptr, "stats");
  SlerpArgs s{};
  s.a = reinterpret_cast<const void*>(a_ptr);
  s.a_dtype = a_dtype;
  s.b = reinterpret_cast<const void*>(b_ptr);
  s.b_dtype = b_dtype;
  s.rows = rows;
  s.cols = cols;
  s.segs = slerp_segments(cols);
  s.partials = mptr<double>(partials_ptr);
  s.vec = aligned16(s.a) && aligned16(s.b) && cols % kPack == 0;
  const cudaStream_t st = stream_from(stream);
  const int64_t items = rows * s.segs;
  const int64_t cap = int64_t(sm_count()) * kBlocksPerSm;
  slerp_stats_kernel<<<int(items < cap ? items : cap), kSlerpThreads, 0, st>>>(s);
  check_launch("slerp_stats_kernel");
  slerp_rows_kernel<<<grid_for(rows, sm_count()), kThreads, 0, st>>>(s.partials, rows, s.segs,
                                                                      mptr<double>(stats_ptr));
  check_launch("slerp_rows_kernel");
}

void slerp_combine(uintptr_t out_ptr, int out_dtype, uintptr_t a_ptr, int a_dtype, uintptr_t b_ptr, int b_dtype,
                   int64_t rows, int64_t cols, uintptr_t ca_ptr, uintptr_t cb_ptr, uintptr_t stream) {
  if (rows < 0 || cols < 0) fail("slerp_combine: negative size");
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
  SlerpArgs s{};
  s.a = reinterpret_cast<const void*>(a_ptr);
  s.a_dtype = a_dtype;
  s.b = reinterpret_cast<const void*>(b_ptr);
  s.b_dtype = b_dtype;
  s.rows = rows;
  s.cols = cols;
  s.out = reinterpret_cast<void*>(out_ptr);
  s.out_dtype = out_dtype;
  s.ca = cptr<float>(ca_ptr);
  s.cb = cptr<float>(cb_ptr);
  s.vec = aligned16(s.a) && aligned16(s.b) && aligned16(s.out) && cols % kPack == 0;
  slerp_combine_kernel<<<grid_for(rows * packs_of(cols), sm_count()), kThreads, 0, stream_from(stream)>>>(s);
  check_launch("slerp_combine_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(slerp) {
  namespace py = pybind11;
  namespace api = pymerge::cuda::api;
  m.def("slerp_segments", &api::slerp_segments, py::arg("cols"),
        "Segments per row of the slerp_row_stats partials scratch.");
  m.def("slerp_row_stats", &api::slerp_row_stats, py::arg("a_ptr"), py::arg("a_dtype"), py::arg("b_ptr"),
        py::arg("b_dtype"), py::arg("rows"), py::arg("cols"), py::arg("partials_ptr"), py::arg("stats_ptr"),
        py::arg("stream"),
        "Per row of two contiguous [rows, cols] buffers: fp64 sum x*x, sum y*y, sum x*y into stats [3, rows].");
  m.def("slerp_combine", &api::slerp_combine, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("a_ptr"),
        py::arg("a_dtype"), py::arg("b_ptr"), py::arg("b_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("ca_ptr"), py::arg("cb_ptr"), py::arg("stream"),
        "out[r, :] = ca[r] * x + cb[r] * y in fp32 (ca, cb: device fp32 [rows]), rounded once to out_dtype.");
}
#endif
