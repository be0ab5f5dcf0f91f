// permute_average (specs/methods.md, specs/alignment.md): a weighted sum of
// index-mapped weights, gathered tile by tile without a permuted copy.
//
// Per output element (r, c), in this exact fp32 order (as the torch reference):
//   acc = +0; acc = acc + (c_i * f32(W_i[P_i[r], Q_i[c]])) for each covered i in model order
//   with normalize_coverage: cov = +0; cov = cov + c_i for each covered i;
//                            out = cov == 0 ? +0 : acc / cov
// where model i covers (r, c) when P_i[r] != -1 and Q_i[c] != -1 (a missing
// map is the identity). The reference adds +0 for an uncovered model; acc and
// cov start at +0 and a round-to-nearest sum is never -0 unless both terms
// are, so skipping that addition gives the same bits.
//
// Work items are (output row, column tile): the source row P_i[r] of every
// model is contiguous; up to kRowCols columns it is upcast whole into a
// per-thread buffer (requested one output row ahead), which the tiles of the
// row gather from through int32 copies of the column maps (AVX2 gathers).
// A 1-D tensor is one row whose columns are mapped by the row maps.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

#if defined(__GNUC__)
#define PYMERGE_PERMUTE_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_PERMUTE_FLATTEN
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_PERMUTE_X86_CLONES 1
#include <immintrin.h>
#endif

namespace pymerge {
namespace cpu {

namespace permute {

namespace {

constexpr int64_t kTile = 1024;
constexpr int64_t kGrainElems = 1 << 15;

struct Model {
  const void* data;
  int dtype;
  int64_t rows;        // rows of W_i (1 for a 1-D tensor)
  int64_t cols;        // row stride of W_i
  const int64_t* pmap;  // [n_rows] or null (identity)
  const int64_t* qmap;  // [n_cols] or null (identity)
  float coeff;
  const int32_t* q32;   // qmap as int32 when the source rows are staged (set by permute_average)
};

// acc[j] += c_i * row[q[j]] over a tile, from a row staged as fp32.
using GatherAdd = void (*)(float* acc, const float* row, const int32_t* q, int64_t n, float ci);

struct Args {
  void* out;
  int out_dtype;
  int64_t n_rows;
  int64_t n_cols;
  int64_t n_tiles;  // column tiles per row
  const Model* models;
  int64_t n_models;
  bool normalize;
  GatherAdd gather_add;  // from staged rows
};

inline float select_f32(bool c, float a, float b) { return f32_from_bits(select_u32(c, f32_to_bits(a), f32_to_bits(b))); }

template <int T>
inline void add_contiguous(float* __restrict acc, const void* row, int64_t c0, int64_t n, float ci) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(row) + c0;
  for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + ci * Dtype<T>::load(p[j]);
}

// Gathers through q into a staging buffer (scalar: no 16-bit gathers), then
// adds in a vectorised sweep; -1 adds +0 (same bits as skipping, see the
// header) and its read index is clamped so that it never reads out of bounds.
// load(k): element k of the source row as fp32.
template <class Load>
inline void add_gathered(float* __restrict acc, float* __restrict cov, float* __restrict stage, bool with_cov,
                         const Load& load, const int64_t* __restrict q, int64_t n, float ci) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = q[j];
    stage[j] = load(k < 0 ? 0 : k);
  }
  for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + select_f32(q[j] >= 0, ci * stage[j], 0.0f);
  if (with_cov)
    for (int64_t j = 0; j < n; ++j) cov[j] = cov[j] + select_f32(q[j] >= 0, ci, 0.0f);
}

// A gathered source row of at most kRowCols elements is first upcast whole into
// a per-thread buffer, in one sequential sweep the hardware prefetcher follows,
// and the gathers then read that buffer from cache: gathering straight from a
// row in memory waits on a cache miss for every new line it touches. The row is
// kept while the next items read the same one (the tiles of one output row).
constexpr int64_t kRowCols = 16384;

inline bool row_staged(const Model& m) { return m.qmap && m.cols <= kRowCols; }

// acc[j] += c_i * rf[q[j]] for a tile gathered from a staged row through 32-bit
// indices; -1 adds +0 (see the header) after reading element 0.
inline void gather_add(float* __restrict acc, const float* __restrict rf, const int32_t* __restrict q, int64_t n,
                       float ci) {
  for (int64_t j = 0; j < n; ++j) {
    const int32_t k = q[j];
    const float v = rf[k < 0 ? 0 : k];
    acc[j] = acc[j] + select_f32(k >= 0, ci * v, 0.0f);
  }
}

#ifdef PYMERGE_PERMUTE_X86_CLONES
// The same with AVX2 gathers from cache: 1.7x the scalar loop's rate (the
// compiler does not emit gathers for the generic tuning).
__attribute__((target("avx2"))) void gather_add_avx2(float* __restrict acc, const float* __restrict rf,
                                                     const int32_t* __restrict q, int64_t n, float ci) {
  const __m256 c = _mm256_set1_ps(ci);
  const __m256i zero = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j));
    const __m256 missing = _mm256_castsi256_ps(_mm256_cmpgt_epi32(zero, k));
    const __m256 v = _mm256_i32gather_ps(rf, _mm256_max_epi32(k, zero), 4);
    const __m256 p = _mm256_andnot_ps(missing, _mm256_mul_ps(c, v));
    _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), p));
  }
  gather_add(acc + j, rf, q + j, n - j, ci);
}
#endif

template <int T>
inline void upcast_row(float* __restrict dst, const void* row, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(row);
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

inline void run_items(const Args& a, int64_t item0, int64_t item1) {
  alignas(64) float acc[kTile];
  alignas(64) float cov[kTile];
  alignas(64) float stage[kTile];  // gathers from rows in memory
  // Per model: where its staged row starts in rows_f (-1: not staged) and which source row it holds.
  std::vector<int64_t> at(size_t(a.n_models), -1), held(size_t(a.n_models), -1);
  int64_t staged_cols = 0;
  for (int64_t i = 0; i < a.n_models; ++i)
    if (row_staged(a.models[i])) {
      at[size_t(i)] = staged_cols;
      staged_cols += a.models[i].cols;
    }
  std::vector<float> rows_f(static_cast<size_t>(staged_cols));
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t r = item / a.n_tiles;
    const int64_t c0 = (item % a.n_tiles) * kTile;
    const int64_t n = std::min(kTile, a.n_cols - c0);
    // The staged source rows of the next output row are requested ahead of their
    // upcast: rows sit at random places, and a row of a few KiB is over before
    // the hardware prefetcher has followed it. Into L2, not L1: a few dozen lines
    // at once into L1 stalled on its miss buffers (16M bf16, k = 2, one thread:
    // 28 ms against 21.5). (Written here, not in a helper: gcc takes a function of
    // prefetches alone for one without effects and drops its calls.)
    if (c0 == 0 && r + 1 < a.n_rows)
      for (int64_t i = 0; i < a.n_models; ++i) {
        const Model& m = a.models[i];
        const int64_t pr = m.pmap ? m.pmap[r + 1] : r + 1;
        if (at[size_t(i)] < 0 || pr < 0) continue;
        const int64_t bytes = m.cols * int64_t(dtype_size(m.dtype));
        const char* next = static_cast<const char*>(m.data) + pr * bytes;
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(next + b, 0, 1);
      }
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
    if (a.normalize)
      for (int64_t j = 0; j < n; ++j) cov[j] = 0.0f;
    for (int64_t i = 0; i < a.n_models; ++i) {
      const Model& m = a.models[i];
      const int64_t pr = m.pmap ? m.pmap[r] : r;
      // An uncovered row, or a model without columns (all of its Q is -1).
      if (pr < 0 || m.cols == 0) continue;
      const float ci = m.coeff;
      dispatch_dtype(m.dtype, [&](auto t) {
        constexpr int T = decltype(t)::value;
        const auto* row = static_cast<const typename Dtype<T>::storage*>(m.data) + pr * m.cols;
        if (at[size_t(i)] >= 0) {
          float* rf = rows_f.data() + at[size_t(i)];
          if (held[size_t(i)] != pr) {
            upcast_row<T>(rf, row, m.cols);
            held[size_t(i)] = pr;
          }
          a.gather_add(acc, rf, m.q32 + c0, n, ci);
          if (a.normalize)
            for (int64_t j = 0; j < n; ++j) cov[j] = cov[j] + select_f32(m.q32[c0 + j] >= 0, ci, 0.0f);
        } else if (m.qmap) {
          add_gathered(acc, cov, stage, a.normalize, [row](int64_t k) { return Dtype<T>::load(row[k]); },
                       m.qmap + c0, n, ci);
        } else {
          add_contiguous<T>(acc, row, c0, n, ci);
          if (a.normalize)
            for (int64_t j = 0; j < n; ++j) cov[j] = cov[j] + ci;
        }
      });
    }
    if (a.normalize)
      for (int64_t j = 0; j < n; ++j) acc[j] = select_f32(cov[j] == 0.0f, 0.0f, acc[j] / cov[j]);
    dispatch_dtype(a.out_dtype, [&](auto t) {
      constexpr int T = decltype(t)::value;
      auto* __restrict o = static_cast<typename Dtype<T>::storage*>(a.out) + r * a.n_cols + c0;
      for (int64_t j = 0; j < n; ++j) o[j] = Dtype<T>::store(acc[j]);
    });
  }
}

using ItemFn = void (*)(const Args&, int64_t, int64_t);

PYMERGE_PERMUTE_FLATTEN void items_generic(const Args& a, int64_t i0, int64_t i1) { run_items(a, i0, i1); }

#ifdef PYMERGE_PERMUTE_X86_CLONES
PYMERGE_CLONE_AVX2 void items_avx2(const Args& a, int64_t i0, int64_t i1) {
  run_items(a, i0, i1);
}
#endif

}  // namespace

// Preconditions (checked by the Python layer): maps validated, n_rows, n_cols >= 1.
void permute_average(void* out, int out_dtype, int64_t n_rows, int64_t n_cols, const Model* models,
                     int64_t n_models, bool normalize) {
  // Column maps of staged models as int32 (their entries are below kRowCols).
  std::vector<Model> staged(models, models + n_models);
  std::vector<int32_t> q32;
  for (const Model& m : staged)
    if (row_staged(m)) q32.resize(q32.size() + size_t(n_cols));
  int32_t* next = q32.data();
  for (Model& m : staged)
    if (row_staged(m)) {
      for (int64_t j = 0; j < n_cols; ++j) next[j] = int32_t(m.qmap[j]);
      m.q32 = next;
      next += n_cols;
    }
  Args a{out, out_dtype, n_rows, n_cols, (n_cols + kTile - 1) / kTile, staged.data(), n_models, normalize, gather_add};
  ItemFn fn = items_generic;
#ifdef PYMERGE_PERMUTE_X86_CLONES
  if (use_avx2()) {
    fn = items_avx2;
    a.gather_add = gather_add_avx2;
  }
#endif
  const int64_t tile_len = std::min(kTile, n_cols);
  parallel_for(n_rows * a.n_tiles, std::max<int64_t>(1, kGrainElems / tile_len),
               [&](int64_t i0, int64_t i1) { fn(a, i0, i1); });
}

}  // namespace permute
}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;
namespace pm = pymerge::cpu::permute;

void permute_average_binding(uintptr_t out_ptr, int out_dtype, int64_t n_rows, int64_t n_cols,
                             const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                             const std::vector<int64_t>& in_rows, const std::vector<int64_t>& in_cols,
                             const std::vector<uintptr_t>& row_maps, const std::vector<uintptr_t>& col_maps,
                             const std::vector<float>& coeffs, bool normalize) {
  const size_t n = in_ptrs.size();
  if (n == 0) throw py::value_error("permute_average: at least one input is needed");
  if (in_dtypes.size() != n || in_rows.size() != n || in_cols.size() != n || row_maps.size() != n ||
      col_maps.size() != n || coeffs.size() != n)
    throw py::value_error("permute_average: per-model argument lists differ in length");
  if (n_rows < 0 || n_cols < 0) throw py::value_error("permute_average: negative output size");
  check_dtype(out_dtype, "out");
  std::vector<pm::Model> models(n);
  const uintptr_t out_end = out_ptr + uintptr_t(n_rows * n_cols) * pymerge::dtype_size(out_dtype);
  for (size_t i = 0; i < n; ++i) {
    const std::string what = "input " + std::to_string(i);
    check_dtype(in_dtypes[i], what);
    if (in_rows[i] < 0 || in_cols[i] < 0) throw py::value_error(what + ": negative size");
    const int64_t numel = in_rows[i] * in_cols[i];
    if (numel > 0) check_ptr(in_ptrs[i], what);
    // No identity map onto a model of another size (the Python layer checks the index ranges).
    if (!row_maps[i] && in_rows[i] != n_rows) throw py::value_error(what + ": identity row map with other size");
    if (!col_maps[i] && in_cols[i] != n_cols) throw py::value_error(what + ": identity column map with other size");
    const uintptr_t in_end = in_ptrs[i] + uintptr_t(numel) * pymerge::dtype_size(in_dtypes[i]);
    if (n_rows * n_cols > 0 && numel > 0 && out_ptr < in_end && in_ptrs[i] < out_end)
      throw py::value_error("output buffer overlaps " + what);
    models[i] = pm::Model{reinterpret_cast<const void*>(in_ptrs[i]), in_dtypes[i], in_rows[i], in_cols[i],
                          reinterpret_cast<const int64_t*>(row_maps[i]), reinterpret_cast<const int64_t*>(col_maps[i]),
                          coeffs[i], nullptr};
  }
  if (n_rows == 0 || n_cols == 0) return;
  check_ptr(out_ptr, "out");
  py::gil_scoped_release release;
  pm::permute_average(reinterpret_cast<void*>(out_ptr), out_dtype, n_rows, n_cols, models.data(), int64_t(n),
                      normalize);
}

}  // namespace

PYMERGE_BINDINGS(permute) {
  m.def("permute_average", &permute_average_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("in_rows"), py::arg("in_cols"),
        py::arg("row_maps"), py::arg("col_maps"), py::arg("coeffs"), py::arg("normalize"),
        "out[r, c] = sum_i c_i * W_i[P_i[r], Q_i[c]] in fp32 (optionally / sum of the covering c_i), rounded "
        "once to out_dtype. W_i: contiguous [in_rows, in_cols]; maps: addresses of int64 [n_rows] / [n_cols] "
        "index arrays (entries in [-1, size-1]) or 0 for the identity.");
}
