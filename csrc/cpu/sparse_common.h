// Shared machinery of the sparsifying merges: ties.cpp, dare.cpp, breadcrumbs.cpp.
//
// Every kernel here works on one tensor: a base theta_0 and N models theta_i
// (any mix of fp32 / fp16 / bf16), with tau_i = f32(theta_i) - f32(theta_0)
// formed on the fly, one block of kBlock elements at a time, never stored.
//
// - Selection (select_trims): per model, the exact "k largest |tau_i|" rule of
//   specs/methods.md (ties at the threshold: lower flat index first) via two
//   16-bit radix histogram sweeps. Each sweep reads theta_0 once per block and
//   histograms all models that need it. The per-chunk low histograms also give,
//   for free, how many threshold-equal keys precede each chunk, so the merge
//   pass applies the index tie-break without a further sweep.
// - Merge pass (MergePass): per block, each model's tau_hat row comes from a
//   Rows policy (trim masks, DARE's Philox mask), then a combiner turns the
//   rows into the fp32 result, rounded once to the output dtype.
// - Combiners: the TIES steps 2-6 (ties_combine) and the weighted sum
//   (linear_combine), in the torch reference's exact fp32 op order
//   (pymerge/ops/reference/ties.py, average.py); -ffp-contract=off keeps every
//   multiply and add separately rounded.
//
// Work is split into chunks [c*n/C, (c+1)*n/C) with C a function of n and the
// thread count only; every decision is a function of the flat element index,
// so results are identical for any thread count. Chunk bodies are compiled
// twice (baseline x86-64 and AVX2) and picked with average.cpp's choice.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/select.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_SPARSE_X86_CLONES 1
#endif

#if defined(__GNUC__)
#define PYMERGE_SPARSE_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_SPARSE_FLATTEN
#endif

namespace pymerge {
namespace cpu {

// average.cpp owns the process-wide instruction-set choice (and its test hook).
const char* kernel_isa();

namespace sparse {

// 1024 fp32 = 4 KiB per buffer: base, tau, scratch and a few model rows stay in L1/L2.
constexpr int64_t kBlock = 1024;
// A chunk (one thread's share) is at least 64K elements.
constexpr int64_t kMinChunk = int64_t(1) << 16;
constexpr int64_t kMaxChunks = 64;
// Bound on the per-chunk histograms of a selection sweep, all chunks together.
constexpr int64_t kHistBudgetBytes = int64_t(64) << 20;
constexpr int64_t kBins = int64_t(1) << 16;
// |x| keys: the bits of |x|; every NaN maps to one key above +inf, because torch's
// sort treats NaNs as equal and larger than everything.
constexpr uint32_t kInfKey = 0x7F800000u;
constexpr uint32_t kNanKey = 0x7F800001u;

// Histogram layout of the two sweeps: every slot (a model in sweep 1, a
// (model, high bin) pair in sweep 2) has kCopies interleaved histograms,
// element j counting in copy j % kCopies, stored bin-major (bin * kCopies +
// copy). Runs of equal keys, common in 16-bit deltas, would otherwise chain
// every increment on the one before; copies a multiple of 4 KiB apart would
// alias in the store-forwarding check and chain them again.
constexpr int64_t kCopies = 4;
// Sweep 2 counts keys outside the slot's bin in 16 rotating dummy bins after
// the copies, so no branch per element (hit rates near 50%, as with ties in
// 16-bit deltas, defeat prediction).
constexpr int64_t kDummies = 16;
constexpr int64_t kHighStride = kCopies * kBins;
constexpr int64_t kLowStride = kCopies * kBins + kDummies;

inline bool use_avx2() {
#ifdef PYMERGE_SPARSE_X86_CLONES
  return std::strcmp(kernel_isa(), "avx2") == 0;
#else
  return false;
#endif
}

// One tensor's inputs. Preconditions (checked by the bindings): n >= 1, valid
// dtype tags, every buffer holds numel elements.
struct Inputs {
  const void* base;
  int base_dtype;
  const void* const* models;
  const int* dtypes;
  int64_t n;
  int64_t numel;
};

// The chunks of one kernel call: one per thread, at least kMinChunk elements
// each; with hist_slots histograms per chunk (selection sweeps), few enough
// that they stay within kHistBudgetBytes.
inline int64_t chunk_count(int64_t numel, int64_t hist_slots = 0) {
  const int64_t by_size = (numel + kMinChunk - 1) / kMinChunk;
  int64_t c = std::min<int64_t>({int64_t(get_num_threads()), by_size, kMaxChunks});
  if (hist_slots > 0) c = std::min<int64_t>(c, kHistBudgetBytes / (hist_slots * kLowStride * 4));
  // A chunk stays below 2^31 elements, so uint32 histogram bins cannot overflow.
  return std::max<int64_t>({c, (numel >> 31) + 1, int64_t(1)});
}

inline int64_t chunk_begin(int64_t numel, int64_t chunks, int64_t c) { return c * numel / chunks; }

// ---- running chunk bodies in the clone for this CPU ---------------------------

template <class Pass>
PYMERGE_SPARSE_FLATTEN void run_chunk_generic(const Pass& p, int64_t c) {
  p.chunk(c);
}

#ifdef PYMERGE_SPARSE_X86_CLONES
// Elementwise IEEE operations and integer work only: wider vectors give the same bits.
template <class Pass>
__attribute__((target("avx2,f16c"), flatten)) void run_chunk_avx2(const Pass& p, int64_t c) {
  p.chunk(c);
}
#endif

template <class Pass>
void run_chunks(const Pass& p, int64_t chunks) {
  const bool avx2 = use_avx2();
  (void)avx2;
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
#ifdef PYMERGE_SPARSE_X86_CLONES
      if (avx2) {
        run_chunk_avx2(p, c);
        continue;
      }
#endif
      run_chunk_generic(p, c);
    }
  });
}

// ---- block loads and stores -----------------------------------------------------

template <int T>
inline void load_t(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

inline void load_any(int tag, float* __restrict dst, const void* src, int64_t off, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { load_t<decltype(t)::value>(dst, src, off, n); });
}

// tau = f32(theta_i) - b
template <int T>
inline void tau_t(float* __restrict tau, const float* __restrict b, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) tau[j] = Dtype<T>::load(p[j]) - b[j];
}

inline void tau_any(int tag, float* __restrict tau, const float* __restrict b, const void* src, int64_t off,
                    int64_t n) {
  dispatch_dtype(tag, [&](auto t) { tau_t<decltype(t)::value>(tau, b, src, off, n); });
}

template <int T>
inline void store_t(void* dst, int64_t off, const float* __restrict src, int64_t n) {
  auto* __restrict p = static_cast<typename Dtype<T>::storage*>(dst) + off;
  for (int64_t j = 0; j < n; ++j) p[j] = Dtype<T>::store(src[j]);
}

inline void store_any(int tag, void* dst, int64_t off, const float* __restrict src, int64_t n) {
  dispatch_dtype(tag, [&](auto t) { store_t<decltype(t)::value>(dst, off, src, n); });
}

inline uint32_t mag_key(float x) {
  const uint32_t k = f32_to_bits(x) & 0x7FFFFFFFu;
  return k < kNanKey ? k : kNanKey;
}

inline void mag_keys(uint32_t* __restrict keys, const float* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) keys[j] = mag_key(x[j]);
}

// x where mask is all ones, +0 where it is zero (torch.where(keep, x, 0)).
inline float masked(float x, uint32_t mask) { return f32_from_bits(f32_to_bits(x) & mask); }

inline uint32_t mask_of(bool b) { return 0u - uint32_t(b); }

// ---- exact top-k selection over |tau_i| -----------------------------------------

struct TrimRequest {
  int64_t model;
  int64_t k;  // keep the k largest |tau_model|
};

// One model's keep rule: TopK of select.h (exact k, index tie-break), or with
// `inclusive` every key >= the k-th largest; max_key then excludes NaN, as the
// reference's |tau| >= t does.
struct Trim {
  TopK top;
  uint32_t max_key = 0xFFFFFFFFu;
  std::vector<int64_t> offsets;  // per chunk: threshold-equal keys before it (ties split only)

  bool active() const { return !top.none && !top.all; }
};

// Sweep 1: histograms of the high 16 key bits of every listed model, per chunk.
struct HighPass {
  const Inputs* in;
  const std::vector<int64_t>* models;
  int64_t chunks;
  std::vector<std::vector<uint32_t>>* parts;

  void chunk(int64_t c) const {
    const int64_t nm = int64_t(models->size());
    std::vector<uint32_t> h(static_cast<size_t>(nm * kHighStride), 0u);
    alignas(64) float b[kBlock];
    alignas(64) float tau[kBlock];
    alignas(64) uint32_t keys[kBlock];
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      load_any(in->base_dtype, b, in->base, off, n);
      for (int64_t s = 0; s < nm; ++s) {
        const int64_t m = (*models)[size_t(s)];
        tau_any(in->dtypes[m], tau, b, in->models[m], off, n);
        mag_keys(keys, tau, n);
        uint32_t* __restrict hs = h.data() + s * kHighStride;
        int64_t j = 0;
        for (; j + kCopies <= n; j += kCopies)
          for (int64_t l = 0; l < kCopies; ++l) ++hs[(keys[j + l] >> 16) * kCopies + l];
        for (; j < n; ++j) ++hs[(keys[j] >> 16) * kCopies];
      }
    }
    (*parts)[size_t(c)] = std::move(h);
  }
};

// Sweep 2: histograms of the low 16 bits of the keys whose high bits equal a
// slot's prefix. A model may have several slots (breadcrumbs selects twice).
struct LowPass {
  struct Slot {
    int64_t index;
    uint32_t prefix;
  };
  const Inputs* in;
  const std::vector<int64_t>* models;
  const std::vector<std::vector<Slot>>* slots;  // per entry of models
  int64_t n_slots;
  int64_t chunks;
  std::vector<std::vector<uint32_t>>* parts;

  void chunk(int64_t c) const {
    std::vector<uint32_t> h(static_cast<size_t>(n_slots * kLowStride), 0u);
    alignas(64) float b[kBlock];
    alignas(64) float tau[kBlock];
    alignas(64) uint32_t keys[kBlock];
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      load_any(in->base_dtype, b, in->base, off, n);
      for (size_t s = 0; s < models->size(); ++s) {
        const int64_t m = (*models)[s];
        tau_any(in->dtypes[m], tau, b, in->models[m], off, n);
        mag_keys(keys, tau, n);
        for (const Slot& slot : (*slots)[s]) {
          uint32_t* __restrict hs = h.data() + slot.index * kLowStride;
          const uint32_t prefix = slot.prefix;
          // Groups of kDummies keys: a vectorised test skips the (usually
          // many) groups without a hit; a group with one counts branch-free.
          for (int64_t j0 = 0; j0 < n; j0 += kDummies) {
            const int64_t j1 = std::min(n, j0 + kDummies);
            uint32_t any = 0;
            for (int64_t j = j0; j < j1; ++j) any |= uint32_t((keys[j] >> 16) == prefix);
            if (!any) continue;
            for (int64_t j = j0; j < j1; ++j) {
              const uint32_t k = keys[j];
              const uint32_t hit = (k & 0xFFFFu) * uint32_t(kCopies) + uint32_t(j % kCopies);
              const uint32_t miss = uint32_t(kCopies * kBins + j % kDummies);
              ++hs[select_u32((k >> 16) == prefix, hit, miss)];
            }
          }
        }
      }
    }
    (*parts)[size_t(c)] = std::move(h);
  }
};

// The histogram of one slot over all chunks and copies.
inline std::vector<int64_t> sum_parts(const std::vector<std::vector<uint32_t>>& parts, int64_t slot,
                                      int64_t stride) {
  std::vector<int64_t> total(static_cast<size_t>(kBins), 0);
  for (const auto& p : parts) {
    const uint32_t* h = p.data() + slot * stride;
    for (int64_t j = 0; j < kBins; ++j)
      for (int64_t r = 0; r < kCopies; ++r) total[size_t(j)] += h[j * kCopies + r];
  }
  return total;
}

// The keep rule of every request, for a merge pass walking the same `chunks`.
inline std::vector<Trim> select_trims(const Inputs& in, const std::vector<TrimRequest>& reqs, int64_t chunks,
                                      bool inclusive) {
  const int64_t numel = in.numel;
  std::vector<Trim> trims(reqs.size());
  std::vector<int64_t> hmodels;
  std::vector<int64_t> hslot(static_cast<size_t>(in.n), -1);
  for (size_t r = 0; r < reqs.size(); ++r) {
    const int64_t k = reqs[r].k, m = reqs[r].model;
    if (k <= 0 || numel <= 0) {
      trims[r].top.none = true;
    } else if (k >= numel) {
      trims[r].top.all = true;
    } else if (hslot[size_t(m)] < 0) {
      hslot[size_t(m)] = int64_t(hmodels.size());
      hmodels.push_back(m);
    }
  }
  if (hmodels.empty()) return trims;

  // Sweep 1: the high-16-bit bin of each threshold.
  std::vector<int64_t> hb(reqs.size(), 0), below_high(reqs.size(), 0);
  {
    std::vector<std::vector<uint32_t>> parts(static_cast<size_t>(chunks));
    run_chunks(HighPass{&in, &hmodels, chunks, &parts}, chunks);
    std::vector<std::vector<int64_t>> high(hmodels.size());
    for (size_t s = 0; s < hmodels.size(); ++s) high[s] = sum_parts(parts, int64_t(s), kHighStride);
    for (size_t r = 0; r < reqs.size(); ++r) {
      if (!trims[r].active()) continue;
      const auto [bin, below] = detail::locate(high[size_t(hslot[size_t(reqs[r].model)])], numel - reqs[r].k);
      hb[r] = bin;
      below_high[r] = below;
    }
  }

  // Sweep 2: one low histogram per distinct (model, high bin).
  std::vector<int64_t> lmodels;
  std::vector<int64_t> lmodel_of(static_cast<size_t>(in.n), -1);
  std::vector<std::vector<LowPass::Slot>> slots;
  std::vector<int64_t> lslot(reqs.size(), -1);
  int64_t n_slots = 0;
  for (size_t r = 0; r < reqs.size(); ++r) {
    if (!trims[r].active()) continue;
    const int64_t m = reqs[r].model;
    if (lmodel_of[size_t(m)] < 0) {
      lmodel_of[size_t(m)] = int64_t(lmodels.size());
      lmodels.push_back(m);
      slots.emplace_back();
    }
    auto& ms = slots[size_t(lmodel_of[size_t(m)])];
    for (const auto& s : ms)
      if (s.prefix == uint32_t(hb[r])) lslot[r] = s.index;
    if (lslot[r] < 0) {
      lslot[r] = n_slots++;
      ms.push_back({lslot[r], uint32_t(hb[r])});
    }
  }
  std::vector<std::vector<uint32_t>> parts(static_cast<size_t>(chunks));
  run_chunks(LowPass{&in, &lmodels, &slots, n_slots, chunks, &parts}, chunks);
  std::vector<std::vector<int64_t>> low(static_cast<size_t>(n_slots));
  for (int64_t s = 0; s < n_slots; ++s) low[size_t(s)] = sum_parts(parts, s, kLowStride);

  for (size_t r = 0; r < reqs.size(); ++r) {
    Trim& t = trims[r];
    if (!t.active()) continue;
    const int64_t k = reqs[r].k, rank = numel - k;
    const auto& h = low[size_t(lslot[r])];
    const auto [lb, below_low] = detail::locate(h, rank - below_high[r]);
    const int64_t less = below_high[r] + below_low, equal = h[size_t(lb)];
    t.top.threshold = (uint32_t(hb[r]) << 16) | uint32_t(lb);
    t.top.count_equal = equal;
    t.top.take_equal = k - (numel - less - equal);
    if (inclusive) {
      t.top.take_equal = equal;
      t.max_key = kInfKey;
    }
    if (t.top.ties_split()) {
      t.offsets.assign(size_t(chunks), 0);
      int64_t before = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        t.offsets[size_t(c)] = before;
        for (int64_t copy = 0; copy < kCopies; ++copy)
          before += parts[size_t(c)][size_t(lslot[r] * kLowStride + lb * kCopies + copy)];
      }
    }
  }
  return trims;
}

// Keep masks (all ones / zero) of one block of keys under a Trim; `seen` counts
// the threshold-equal keys met so far in index order (select.h's top_k_keeps).
// Only the block where the take_equal-th equal key falls is decided one by one.
inline void keep_block(const Trim& t, const uint32_t* __restrict keys, int64_t n, int64_t& seen,
                       uint32_t* __restrict mask) {
  const TopK& top = t.top;
  if (top.none || top.all) {
    const uint32_t v = top.all ? ~0u : 0u;
    for (int64_t j = 0; j < n; ++j) mask[j] = v;
    return;
  }
  const uint32_t thr = top.threshold;
  if (top.ties_split()) {
    int64_t eq = 0;
    for (int64_t j = 0; j < n; ++j) eq += keys[j] == thr;
    if (seen < top.take_equal && seen + eq > top.take_equal) {
      for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(top_k_keeps(top, keys[j], seen));
      return;
    }
    const bool take = seen < top.take_equal;  // all of this block's equal keys, or none
    seen += eq;
    if (!take) {
      for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(keys[j] > thr);
      return;
    }
  }
  const uint32_t mx = t.max_key;
  for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(keys[j] >= thr) & mask_of(keys[j] <= mx);
}

// ---- merge pass -------------------------------------------------------------------

// Per-thread block buffers of a merge pass.
struct Scratch {
  alignas(64) float b[kBlock];
  alignas(64) float tau[kBlock];
  alignas(64) float acc[kBlock];
  alignas(64) float div[kBlock];
  alignas(64) uint32_t pos[kBlock];
  alignas(64) int32_t cnt[kBlock];
  alignas(64) uint32_t words[kBlock];
  alignas(64) uint32_t mask[kBlock];
  alignas(64) uint32_t mask2[kBlock];
};

// rows: N rows of kBlock floats (tau_hat_i); on return out[j] is the fp32 result.
// Rows may be overwritten.

// linear_combine: acc = +0; acc = acc + w_i * tau_hat_i (i in order); out = b + acc * c.
struct LinearCombine {
  const float* w;
  float c;

  void operator()(float* rows, int64_t nm, Scratch& s, float* __restrict out, int64_t n) const {
    float* __restrict acc = s.acc;
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
    for (int64_t i = 0; i < nm; ++i) {
      const float wi = w[i];
      const float* __restrict r = rows + i * kBlock;
      for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] + wi * r[j];
    }
    const float* __restrict b = s.b;
    for (int64_t j = 0; j < n; ++j) out[j] = b[j] + acc[j] * c;
  }
};

// ties_combine (TIES steps 2-6):
//   d_i = w_i * tau_hat_i
//   S = ((+0 + d_0) + d_1) + ...  ("sum")   or   S = sum_i sign(d_i)  ("count")
//   majority = +1 if S >= 0 else -1; agree_i = sign(d_i) == majority (zeros never agree)
//   mixed = ((+0 + [agree_0] d_0) + ...) with +0 for disagreeing entries
//   normalize: div = ((+0 + [agree_0] w_0) + ...), div == 0 -> 1, mixed = mixed / div
//   out = b + mixed * lam
struct TiesCombine {
  const float* w;
  float lam;
  bool normalize;
  bool count;

  void operator()(float* rows, int64_t nm, Scratch& s, float* __restrict out, int64_t n) const {
    float* __restrict acc = s.acc;
    uint32_t* __restrict pos = s.pos;
    if (!count) {
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
      for (int64_t i = 0; i < nm; ++i) {
        const float wi = w[i];
        float* __restrict r = rows + i * kBlock;
        for (int64_t j = 0; j < n; ++j) {
          const float d = wi * r[j];
          r[j] = d;
          acc[j] = acc[j] + d;
        }
      }
      for (int64_t j = 0; j < n; ++j) pos[j] = mask_of(acc[j] >= 0.0f);  // NaN: majority -1
    } else {
      int32_t* __restrict cnt = s.cnt;
      for (int64_t j = 0; j < n; ++j) cnt[j] = 0;
      for (int64_t i = 0; i < nm; ++i) {
        const float wi = w[i];
        float* __restrict r = rows + i * kBlock;
        for (int64_t j = 0; j < n; ++j) {
          const float d = wi * r[j];
          r[j] = d;
          cnt[j] += int32_t(d > 0.0f) - int32_t(d < 0.0f);  // sign(NaN) = 0, as torch
        }
      }
      for (int64_t j = 0; j < n; ++j) pos[j] = mask_of(cnt[j] >= 0);
    }
    float* __restrict div = s.div;
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
    if (normalize)
      for (int64_t j = 0; j < n; ++j) div[j] = 0.0f;
    for (int64_t i = 0; i < nm; ++i) {
      const float* __restrict r = rows + i * kBlock;
      const uint32_t wbits = f32_to_bits(w[i]);
      if (normalize) {
        for (int64_t j = 0; j < n; ++j) {
          const float d = r[j];
          const uint32_t agree = (pos[j] & mask_of(d > 0.0f)) | (~pos[j] & mask_of(d < 0.0f));
          acc[j] = acc[j] + masked(d, agree);
          div[j] = div[j] + f32_from_bits(wbits & agree);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const float d = r[j];
          const uint32_t agree = (pos[j] & mask_of(d > 0.0f)) | (~pos[j] & mask_of(d < 0.0f));
          acc[j] = acc[j] + masked(d, agree);
        }
      }
    }
    if (normalize) {
      for (int64_t j = 0; j < n; ++j) {
        const float dv = f32_from_bits(select_u32(div[j] == 0.0f, f32_to_bits(1.0f), f32_to_bits(div[j])));
        acc[j] = acc[j] / dv;
      }
    }
    const float* __restrict b = s.b;
    for (int64_t j = 0; j < n; ++j) out[j] = b[j] + acc[j] * lam;
  }
};

// For every block: upcast the base, build each model's tau_hat row with
// rows.make(...), combine, round once to out_dtype.
//   Rows::State Rows::start(int64_t chunk) const;
//   void Rows::make(State&, int64_t model, int64_t off, int64_t n, Scratch&, float* row) const;
//     (s.tau holds tau_model for the block; row receives tau_hat_model)
template <class Rows, class Combine>
struct MergePass {
  const Inputs* in;
  void* out;
  int out_dtype;
  const Rows* rows;
  const Combine* combine;
  int64_t chunks;

  void chunk(int64_t c) const {
    const int64_t nm = in->n;
    std::vector<float> rowbuf(static_cast<size_t>(nm * kBlock));
    Scratch s;
    alignas(64) float result[kBlock];
    auto state = rows->start(c);
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      load_any(in->base_dtype, s.b, in->base, off, n);
      for (int64_t i = 0; i < nm; ++i) {
        tau_any(in->dtypes[i], s.tau, s.b, in->models[i], off, n);
        rows->make(state, i, off, n, s, rowbuf.data() + i * kBlock);
      }
      (*combine)(rowbuf.data(), nm, s, result, n);
      store_any(out_dtype, out, off, result, n);
    }
  }
};

template <class Rows, class Combine>
void merge(const Inputs& in, void* out, int out_dtype, const Rows& rows, const Combine& combine, int64_t chunks) {
  run_chunks(MergePass<Rows, Combine>{&in, out, out_dtype, &rows, &combine, chunks}, chunks);
}

// Rows of the magnitude trims: model i keeps what lo[i] keeps and hi[i] (when
// given: breadcrumbs' dropped outliers) does not.
struct TrimRows {
  const Trim* lo;
  const Trim* hi;  // nullptr: no outlier drop
  int64_t nm;

  struct State {
    std::vector<int64_t> seen_lo, seen_hi;
  };

  State start(int64_t c) const {
    State st{std::vector<int64_t>(size_t(nm), 0), std::vector<int64_t>(size_t(nm), 0)};
    for (int64_t i = 0; i < nm; ++i) {
      if (!lo[i].offsets.empty()) st.seen_lo[size_t(i)] = lo[i].offsets[size_t(c)];
      if (hi && !hi[i].offsets.empty()) st.seen_hi[size_t(i)] = hi[i].offsets[size_t(c)];
    }
    return st;
  }

  void make(State& st, int64_t i, int64_t, int64_t n, Scratch& s, float* __restrict row) const {
    const float* __restrict tau = s.tau;
    const Trim& l = lo[i];
    if (l.top.none) {
      for (int64_t j = 0; j < n; ++j) row[j] = 0.0f;
      return;
    }
    uint32_t* __restrict keys = s.words;
    mag_keys(keys, tau, n);
    uint32_t* __restrict mask = s.mask;
    keep_block(l, keys, n, st.seen_lo[size_t(i)], mask);
    if (hi && !hi[i].top.none) {
      uint32_t* __restrict drop = s.mask2;
      keep_block(hi[i], keys, n, st.seen_hi[size_t(i)], drop);
      for (int64_t j = 0; j < n; ++j) mask[j] &= ~drop[j];
    }
    for (int64_t j = 0; j < n; ++j) row[j] = masked(tau[j], mask[j]);
  }
};

}  // namespace sparse
}  // namespace cpu
}  // namespace pymerge
