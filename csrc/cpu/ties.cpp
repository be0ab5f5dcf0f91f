// TIES-Merging (specs/methods.md, "ties"; torch reference pymerge/ops/reference/ties.py).
//
// ties_merge (per tensor, mergekit's form): per model, the exact k_i largest
// |tau_i| (one sampled-window sweep over every model while reading theta_0
// once per block; see sparse_common.h), then one fused pass: trim, weight, elect, disjoint merge,
// normalize, lambda, + base, one rounding. See sparse_common.h.
//
// Model scope (the TIES paper's code), given the per-model thresholds t_i:
//   tau_hat_i = |tau_i| >= t_i ? tau_i : +0;  S = ((+0 + tau_hat_0) + tau_hat_1) + ...
// ties_sign_sum:    sum_p sign(S_p), an exact integer.
// ties_merge_model: g = sign(S), S == 0 -> sign(fallback); agree_i = g > 0 ? tau_hat_i > 0
//   : tau_hat_i < 0; total = ((+0 + [a_0] tau_hat_0) + ...); merged = total / fp32(max(1,
//   count)) ("dis-mean") or total ("dis-sum"); out = b + merged * lam.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/bindings.h"
#include "cpu/sparse_bind.h"
#include "cpu/sparse_common.h"

namespace pymerge {
namespace cpu {
namespace sparse {

namespace {

// tau_hat = |tau| >= t ? tau : +0 (NaN never kept, as the float compare).
inline float thresholded(float tau, float t) {
  const float a = f32_from_bits(f32_to_bits(tau) & 0x7FFFFFFFu);
  return masked(tau, mask_of(a >= t));
}

struct ThresholdRows {
  const float* t;

  struct State {};
  State start(int64_t) const { return {}; }

  void make(State&, int64_t i, int64_t, int64_t n, Scratch& s, float* __restrict row) const {
    const float* __restrict tau = s.tau;
    const float ti = t[i];
    for (int64_t j = 0; j < n; ++j) row[j] = thresholded(tau[j], ti);
  }
};

// The elect and disjoint-merge steps for one element of NM models: merged
// (before lambda) from the thresholded taus th. fb_pos: all ones when the
// fallback sign is positive.
template <int NM, bool kMean>
inline float model_scope_merged(const float (&th)[NM], uint32_t fb_pos) {
  float sum = 0.0f;
  for (int i = 0; i < NM; ++i) sum = sum + th[i];
  const uint32_t pos = mask_of(sum > 0.0f) | (mask_of(sum == 0.0f) & fb_pos);
  float acc = 0.0f;
  int32_t cnt = 0;
  for (int i = 0; i < NM; ++i) {
    const uint32_t agree = (pos & mask_of(th[i] > 0.0f)) | (~pos & mask_of(th[i] < 0.0f));
    acc = acc + masked(th[i], agree);
    cnt += int32_t(agree & 1u);
  }
  if (kMean) {
    if (NM <= 2)  // cnt is 0, 1 or 2, and x / 2 == x * 0.5 exactly (the same real number, rounded once)
      acc = acc * (cnt == 2 ? 0.5f : 1.0f);
    else  // cnt >= 0, so max(cnt, 1) is cnt + (cnt == 0): no branch, and the loop vectorises
      acc = acc / float(cnt + int32_t(cnt == 0));
  }
  return acc;
}

// pos[j]: the elected sign is +1. g = sign(S) with S == 0 -> sign(fallback);
// torch's sign(NaN) is 0, which (like g == 0) selects the negative entries.
inline void model_scope_sum(const float* rows, int64_t nm, Scratch& s, int64_t n) {
  float* __restrict acc = s.acc;
  for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
  for (int64_t i = 0; i < nm; ++i) {
    const float* __restrict r = rows + i * kBlock;
    for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + r[j];
  }
}

struct ModelCombine {
  int fallback;  // -1, 0, +1
  float lam;
  bool dis_mean;

  // The same operations, element by element, in one loop over the block for NM models.
  template <int NM, bool kMean>
  void fused(const float* rows, const float* __restrict b, float* __restrict out, int64_t n) const {
    const float* __restrict r[NM];
    for (int i = 0; i < NM; ++i) r[i] = rows + i * kBlock;
    const uint32_t fb_pos = mask_of(fallback > 0);
    for (int64_t j = 0; j < n; ++j) {
      float th[NM];
      for (int i = 0; i < NM; ++i) th[i] = r[i][j];
      out[j] = b[j] + model_scope_merged<NM, kMean>(th, fb_pos) * lam;
    }
  }

  template <int NM>
  void fused_nm(const float* rows, const float* b, float* out, int64_t n) const {
    dis_mean ? fused<NM, true>(rows, b, out, n) : fused<NM, false>(rows, b, out, n);
  }

  void operator()(float* rows, int64_t nm, Scratch& s, float* __restrict out, int64_t n) const {
    switch (nm) {
      case 1: return fused_nm<1>(rows, s.b, out, n);
      case 2: return fused_nm<2>(rows, s.b, out, n);
      case 3: return fused_nm<3>(rows, s.b, out, n);
      case 4: return fused_nm<4>(rows, s.b, out, n);
      default: break;
    }
    model_scope_sum(rows, nm, s, n);
    float* __restrict acc = s.acc;
    uint32_t* __restrict pos = s.pos;
    const uint32_t fb_pos = mask_of(fallback > 0);
    for (int64_t j = 0; j < n; ++j) pos[j] = mask_of(acc[j] > 0.0f) | (mask_of(acc[j] == 0.0f) & fb_pos);
    int32_t* __restrict cnt = s.cnt;
    for (int64_t j = 0; j < n; ++j) {
      acc[j] = 0.0f;
      cnt[j] = 0;
    }
    for (int64_t i = 0; i < nm; ++i) {
      const float* __restrict r = rows + i * kBlock;
      for (int64_t j = 0; j < n; ++j) {
        const float th = r[j];
        const uint32_t agree = (pos[j] & mask_of(th > 0.0f)) | (~pos[j] & mask_of(th < 0.0f));
        acc[j] = acc[j] + masked(th, agree);
        cnt[j] += int32_t(agree & 1u);
      }
    }
    if (dis_mean)  // max(cnt, 1) as in model_scope_merged
      for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] / float(cnt[j] + int32_t(cnt[j] == 0));
    const float* __restrict b = s.b;
    for (int64_t j = 0; j < n; ++j) out[j] = b[j] + acc[j] * lam;
  }
};

// sum_p sign(S_p) per chunk.
// acc += tau_i where |tau_i| >= t, else +0, with tau_i = f32(theta_i) - b: ThresholdRows::make
// and one step of model_scope_sum in a single pass.
template <int T>
inline void add_threshold_row(float* __restrict acc, const float* __restrict b, const void* src, int64_t off,
                              int64_t n, float t) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + thresholded(Dtype<T>::load(p[j]) - b[j], t);
}

struct SignSumPass {
  const Inputs* in;
  const ThresholdRows* rows;
  int64_t chunks;
  int64_t* totals;

  void chunk(int64_t c) const {
    const int64_t nm = in->n;
    Scratch s;
    int64_t total = 0;
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    float* __restrict acc = s.acc;
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      load_any(in->base_dtype, s.b, in->base, off, n);
      // acc = ((0 + row_0) + row_1) + ..., each row added as it is made: the
      // order of model_scope_sum without a buffer per model.
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
      for (int64_t i = 0; i < nm; ++i) {
        dispatch_dtype(in->dtypes[i], [&](auto t) {
          add_threshold_row<decltype(t)::value>(acc, s.b, in->models[i], off, n, rows->t[i]);
        });
      }
      int32_t part = 0;  // |part| <= kBlock
      for (int64_t j = 0; j < n; ++j) part += int32_t(s.acc[j] > 0.0f) - int32_t(s.acc[j] < 0.0f);
      total += part;
    }
    totals[c] = total;
  }
};

// ties_merge_model when base, models and output share one dtype T and there are
// at most kMaxFusedModels models (the usual case): load, threshold, elect, merge
// and round in one loop per element, with no per-model rows in between. The same
// operations in the same order as MergePass with ThresholdRows and ModelCombine.
constexpr int kMaxFusedModels = 8;

// The thresholded task vectors of one element when base and models share one
// dtype T: tau_hat_i = thresholded(f32(theta_i) - b, t_i), b = f32(theta_0).
template <int T, int NM>
struct OneDtypeThresholds {
  using S = typename Dtype<T>::storage;
  const S* __restrict base;
  const S* __restrict m[NM];
  float t[NM];

  OneDtypeThresholds(const Inputs& in, const float* thresholds) : base(static_cast<const S*>(in.base)) {
    for (int i = 0; i < NM; ++i) {
      m[i] = static_cast<const S*>(in.models[i]);
      t[i] = thresholds[i];
    }
  }

  // th at element p; returns b.
  float at(int64_t p, float (&th)[NM]) const {
    const float b = Dtype<T>::load(base[p]);
    for (int i = 0; i < NM; ++i) th[i] = thresholded(Dtype<T>::load(m[i][p]) - b, t[i]);
    return b;
  }
};

template <int T, int NM, bool kMean>
struct ModelScopeFusedPass {
  using S = typename Dtype<T>::storage;
  const Inputs* in;
  void* out;
  const float* t;
  uint32_t fb_pos;
  float lam;
  int64_t chunks;
  bool stream;

  void chunk(int64_t c) const {
    const OneDtypeThresholds<T, NM> x(*in, t);
    S* const o = static_cast<S*>(out);
    alignas(64) S staged[kBlock];  // the rounded block, when streamed
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      S* __restrict dst = stream ? staged : o + off;
      for (int64_t j = 0; j < n; ++j) {
        float th[NM];
        const float b = x.at(off + j, th);
        dst[j] = Dtype<T>::store(b + model_scope_merged<NM, kMean>(th, fb_pos) * lam);
      }
#ifdef PYMERGE_STREAM_STORES
      if (stream) stream_copy(o + off, staged, n * int64_t(sizeof(S)));
#endif
    }
#ifdef PYMERGE_STREAM_STORES
    if (stream) stream_fence();
#endif
  }
};

// ties_sign_sum in one loop per element when base and models share one dtype T
// and there are at most kMaxFusedModels models: the sum S in the same order as
// SignSumPass, without the block of partial sums.
template <int T, int NM>
struct SignSumFusedPass {
  const Inputs* in;
  const float* t;
  int64_t chunks;
  int64_t* totals;

  void chunk(int64_t c) const {
    const OneDtypeThresholds<T, NM> x(*in, t);
    int64_t total = 0;
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      int32_t part = 0;  // |part| <= kBlock
      for (int64_t j = 0; j < n; ++j) {
        float th[NM];
        x.at(off + j, th);
        float sum = 0.0f;
        for (int i = 0; i < NM; ++i) sum = sum + th[i];
        part += int32_t(sum > 0.0f) - int32_t(sum < 0.0f);
      }
      total += part;
    }
    totals[c] = total;
  }
};

// Calls run(dtype tag, model count) when base and models share one dtype and
// there are 1 to kMaxFusedModels models; false otherwise.
template <class Run>
bool with_one_dtype(const Inputs& in, const Run& run) {
  return dispatch_one_dtype<kMaxFusedModels>(in.base_dtype, in.dtypes, in.n, run);
}

// Runs ModelScopeFusedPass where it applies; false otherwise.
bool ties_merge_model_fused(const Inputs& in, void* out, int out_dtype, const float* t, int fallback, float lam,
                            bool dis_mean, int64_t chunks) {
  if (in.base_dtype != out_dtype) return false;
  const uint32_t fb_pos = mask_of(fallback > 0);
  const bool stream = use_avx2() && stream_output(in.numel, int64_t(dtype_size(out_dtype)));
  return with_one_dtype(in, [&](auto tag, auto nm) {
    auto run = [&](auto mean) {
      run_chunks(ModelScopeFusedPass<decltype(tag)::value, decltype(nm)::value, decltype(mean)::value>{
                     &in, out, t, fb_pos, lam, chunks, stream},
                 chunks);
    };
    dis_mean ? run(std::true_type{}) : run(std::false_type{});
  });
}

}  // namespace

void ties_merge(const Inputs& in, void* out, int out_dtype, const std::vector<int64_t>& ks,
                const std::vector<float>& weights, float lam, bool normalize, bool count, bool inclusive) {
  if (in.numel <= 0) return;
  const int64_t chunks = chunk_count(in.numel, in.n);
  std::vector<TrimRequest> reqs;
  for (int64_t i = 0; i < in.n; ++i) reqs.push_back({i, ks[size_t(i)]});
  const std::vector<Trim> trims = select_trims(in, reqs, chunks, inclusive);
  const TrimRows rows{trims.data(), nullptr, in.n};
  const TiesCombine combine{weights.data(), lam, normalize, count};
  merge(in, out, out_dtype, rows, combine, chunks);
}

int64_t ties_sign_sum(const Inputs& in, const std::vector<float>& thresholds) {
  if (in.numel <= 0) return 0;
  const int64_t chunks = chunk_count(in.numel);
  std::vector<int64_t> totals(static_cast<size_t>(chunks), 0);
  const bool fused = with_one_dtype(in, [&](auto tag, auto nm) {
    run_chunks(SignSumFusedPass<decltype(tag)::value, decltype(nm)::value>{&in, thresholds.data(), chunks,
                                                                             totals.data()},
               chunks);
  });
  if (!fused) {
    const ThresholdRows rows{thresholds.data()};
    run_chunks(SignSumPass{&in, &rows, chunks, totals.data()}, chunks);
  }
  int64_t total = 0;
  for (int64_t t : totals) total += t;
  return total;
}

void ties_merge_model(const Inputs& in, void* out, int out_dtype, const std::vector<float>& thresholds,
                      int fallback, float lam, bool dis_mean) {
  if (in.numel <= 0) return;
  const int64_t chunks = chunk_count(in.numel);
  if (ties_merge_model_fused(in, out, out_dtype, thresholds.data(), fallback, lam, dis_mean, chunks)) return;
  const ThresholdRows rows{thresholds.data()};
  const ModelCombine combine{fallback, lam, dis_mean};
  merge(in, out, out_dtype, rows, combine, chunks);
}

}  // namespace sparse
}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using pymerge::bind::SparseArgs;

void ties_merge_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                        const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype, int64_t numel,
                        const std::vector<int64_t>& ks, const std::vector<float>& weights, float lam,
                        bool normalize, bool consensus_count, bool inclusive) {
  const SparseArgs args("ties_merge", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(ks, "ks");
  args.check_per_model(weights, "weights");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  py::gil_scoped_release release;
  pymerge::cpu::sparse::ties_merge(args.inputs(), reinterpret_cast<void*>(out_ptr), out_dtype, ks, weights, lam,
                                   normalize, consensus_count, inclusive);
}

int64_t ties_sign_sum_binding(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
                              uintptr_t base_ptr, int base_dtype, int64_t numel,
                              const std::vector<float>& thresholds) {
  const SparseArgs args("ties_sign_sum", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(thresholds, "thresholds");
  if (numel == 0) return 0;
  py::gil_scoped_release release;
  return pymerge::cpu::sparse::ties_sign_sum(args.inputs(), thresholds);
}

void ties_merge_model_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                              const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype,
                              int64_t numel, const std::vector<float>& thresholds, int fallback_sign, float lam,
                              bool dis_mean) {
  const SparseArgs args("ties_merge_model", in_ptrs, in_dtypes, base_ptr, base_dtype, numel);
  args.check_per_model(thresholds, "thresholds");
  args.check_out(out_ptr, out_dtype);
  if (numel == 0) return;
  const int fb = (fallback_sign > 0) - (fallback_sign < 0);
  py::gil_scoped_release release;
  pymerge::cpu::sparse::ties_merge_model(args.inputs(), reinterpret_cast<void*>(out_ptr), out_dtype, thresholds, fb,
                                         lam, dis_mean);
}

}  // namespace

PYMERGE_BINDINGS(ties) {
  m.def("ties_merge", &ties_merge_binding, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"), py::arg("ks"),
        py::arg("weights"), py::arg("lam"), py::arg("normalize"), py::arg("consensus_count"),
        py::arg("inclusive"),
        "Per-tensor TIES: keep the ks[i] largest |x_i - base| (exact count, lower index first among "
        "equals; inclusive: every value >= the ks[i]-th largest), then TIES steps 2-6 in fp32, one "
        "rounding to out_dtype. weights and lam are taken as fp32.");
  m.def("ties_sign_sum", &ties_sign_sum_binding, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("numel"), py::arg("thresholds"),
        "sum_p sign(S_p), S = sequential fp32 sum of the thresholded task vectors (|tau| >= t kept).");
  m.def("ties_merge_model", &ties_merge_model_binding, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("thresholds"), py::arg("fallback_sign"), py::arg("lam"), py::arg("dis_mean"),
        "The merge pass of model-scope TIES given fp32 thresholds and the model-wide fallback sign.");
  // Test hook of the magnitude trims (ties, breadcrumbs).
  m.def(
      "_sparse_select_mode",
      [](int mode) {
        auto& m = pymerge::cpu::sparse::select_mode();
        const int before = m.load();
        if (mode >= 0) m.store(mode);
        return before;
      },
      py::arg("mode"),
      "Selection of the trim thresholds: 0 sampled window with radix fallback, 1 radix sweeps only; -1 "
      "leaves it. Returns the previous mode.");
  m.def("_sparse_select_fallbacks", [] { return pymerge::cpu::sparse::select_fallbacks().load(); },
        "How many trim requests the sampled selection handed to the radix sweeps since load.");
}
