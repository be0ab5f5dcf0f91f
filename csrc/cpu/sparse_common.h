// Shared machinery of the sparsifying merges: ties.cpp, dare.cpp, breadcrumbs.cpp.
//
// Every kernel here works on one tensor: a base theta_0 and N models theta_i
// (any mix of fp32 / fp16 / bf16), with tau_i = f32(theta_i) - f32(theta_0)
// formed on the fly, one block of kBlock elements at a time, never stored.
//
// - Selection (select_trims): per model, the exact "k largest |tau_i|" rule of
//   specs/methods.md (ties at the threshold: lower flat index first). A sample
//   of each model's keys brackets the threshold in a key window; one sweep
//   (reading theta_0 once per block for all models) counts the keys at and
//   around the window per chunk and keeps the few inside it, which gives the
//   exact threshold and how many threshold-equal keys precede each chunk, so
//   the merge pass applies the index tie-break without a further sweep. A
//   request whose window missed falls back to two 16-bit radix histogram
//   sweeps (select_trims_radix).
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
// three times (baseline x86-64, AVX2, AVX-512; see cpu/isa.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream.h"
#include "common/select.h"
#include "cpu/isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_SPARSE_X86_CLONES 1
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define PYMERGE_SPARSE_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_SPARSE_FLATTEN
#endif

namespace pymerge {
namespace cpu {

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

// Chunks start on block boundaries, so a chunk's blocks line up with 32-bit
// words of bit-packed per-element data (DARE's stored masks).
inline int64_t chunk_begin(int64_t numel, int64_t chunks, int64_t c) {
  return c >= chunks ? numel : (c * numel / chunks) / kBlock * kBlock;
}

// ---- running chunk bodies in the clone for this CPU ---------------------------

template <class Pass>
PYMERGE_SPARSE_FLATTEN void run_chunk_generic(const Pass& p, int64_t c) {
  p.chunk(c);
}

#ifdef PYMERGE_SPARSE_X86_CLONES
// Elementwise IEEE operations and integer work only: wider vectors give the same bits.
template <class Pass>
PYMERGE_CLONE_AVX2 void run_chunk_avx2(const Pass& p, int64_t c) {
  p.chunk(c);
}

// The passes are arithmetic-bound on few cores, so 512-bit vectors pay.
template <class Pass>
PYMERGE_CLONE_AVX512 void run_chunk_avx512(const Pass& p, int64_t c) {
  p.chunk(c);
}
#endif

template <class Pass>
void run_chunks(const Pass& p, int64_t chunks) {
  void (*fn)(const Pass&, int64_t) = run_chunk_generic<Pass>;
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (use_avx512())
    fn = run_chunk_avx512<Pass>;
  else if (use_avx2())
    fn = run_chunk_avx2<Pass>;
#endif
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(p, c);
  });
}

// ---- block loads and stores -----------------------------------------------------

// The next block of the base and of every model, requested into L2 at the start
// of a block: the hardware prefetcher does not keep up with N + 1 interleaved
// streams. A macro, not a function: gcc takes a function of prefetches alone
// for one without effects and drops its calls.
#define PYMERGE_PREFETCH_NEXT_BLOCK(inputs, off, end)                                          \
  do {                                                                                         \
    const int64_t next_ = (off) + kBlock, n_next_ = std::min(kBlock, (end) - next_);           \
    for (int64_t i_ = -1; n_next_ > 0 && i_ < (inputs).n; ++i_) {                              \
      const int size_ = dtype_size(i_ < 0 ? (inputs).base_dtype : (inputs).dtypes[i_]);        \
      const char* p_ = static_cast<const char*>(i_ < 0 ? (inputs).base : (inputs).models[i_]); \
      p_ += next_ * size_;                                                                     \
      for (int64_t b_ = 0; b_ < n_next_ * size_; b_ += 64) __builtin_prefetch(p_ + b_, 0, 1);  \
    }                                                                                          \
  } while (0)

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

// The keep rule from the key at the threshold rank, how many keys lie below it
// and how many equal it.
inline void finish_trim(Trim& t, uint32_t threshold, int64_t less, int64_t equal, int64_t k, int64_t numel,
                        bool inclusive) {
  t.top.threshold = threshold;
  t.top.count_equal = equal;
  t.top.take_equal = k - (numel - less - equal);
  if (inclusive) {
    t.top.take_equal = equal;
    t.max_key = kInfKey;
  }
}

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
      PYMERGE_PREFETCH_NEXT_BLOCK(*in, off, end);
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

// The keep rule of every request by two full radix sweeps (the fallback of
// select_trims below), for a merge pass walking the same `chunks`.
inline std::vector<Trim> select_trims_radix(const Inputs& in, const std::vector<TrimRequest>& reqs, int64_t chunks,
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
    finish_trim(t, (uint32_t(hb[r]) << 16) | uint32_t(lb), less, equal, k, numel, inclusive);
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

// ---- sampled selection ------------------------------------------------------------
//
// The radix sweeps above read every input twice before the merge pass reads it
// a third time. Instead, a sample of each model's keys brackets the threshold
// rank in a key window [lo, hi] around the sample's estimate mid; one sweep
// then counts, per chunk, the keys below / equal to lo, mid and hi, and stores
// the few keys strictly inside the window (other than mid). When the rank falls
// in the window, the exact threshold comes from the counts (lo, mid, hi) or an
// exact selection among the stored keys; otherwise (a sample that missed, or a
// window too full to store) that request falls back to the radix sweeps. The
// sample only decides how fast the answer comes, never the answer.

constexpr int64_t kSampleRun = 32;                      // consecutive elements per sample run
constexpr int64_t kSampleSize = int64_t(1) << 15;       // sampled keys per model
constexpr int64_t kSampleAll = 2 * kSampleSize;         // numel <= this: every key is in the sample

// Test hook: 1 forces the radix sweeps (the fallback), 0 picks automatically.
inline std::atomic<int>& select_mode() {
  static std::atomic<int> mode{0};
  return mode;
}

// Requests that fell back to the radix sweeps since load (a test counter).
inline std::atomic<int64_t>& select_fallbacks() {
  static std::atomic<int64_t> n{0};
  return n;
}

inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Keys of model m at the sample positions: every element for small tensors,
// else kSampleSize / kSampleRun runs, one at a fixed pseudo-random offset in
// each of as many equal strata of the tensor.
inline void sample_keys(const Inputs& in, int64_t m, std::vector<uint32_t>& out) {
  alignas(64) float b[kBlock];
  alignas(64) float tau[kBlock];
  alignas(64) uint32_t keys[kBlock];
  const int64_t numel = in.numel;
  out.clear();
  auto add = [&](int64_t off, int64_t n) {
    load_any(in.base_dtype, b, in.base, off, n);
    tau_any(in.dtypes[m], tau, b, in.models[m], off, n);
    mag_keys(keys, tau, n);
    out.insert(out.end(), keys, keys + n);
  };
  if (numel <= kSampleAll) {
    out.reserve(size_t(numel));
    for (int64_t off = 0; off < numel; off += kBlock) add(off, std::min(kBlock, numel - off));
    return;
  }
  const int64_t runs = kSampleSize / kSampleRun;
  out.reserve(size_t(kSampleSize));
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t lo = r * numel / runs, hi = (r + 1) * numel / runs;
    const int64_t span = hi - lo - kSampleRun + 1;  // >= 1: strata hold > 2 runs
    add(lo + int64_t(mix64(uint64_t(r)) % uint64_t(span)), kSampleRun);
  }
}

struct Window {
  int32_t lo, mid, hi;  // keys <= kNanKey < 2^31: signed compares order them
};

// Appends the keys with lo < k < hi, k != mid to dst[u..]; returns the new u.
inline int64_t compact_window(const int32_t* __restrict k32, int64_t n, Window w, uint32_t* __restrict dst,
                              int64_t u) {
  const int32_t lo = w.lo, mid = w.mid, hi = w.hi;
  // Groups of 16: a vectorised test skips the groups without a key in the
  // window; a group with one stores branch-free.
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t j1 = std::min(n, j0 + 16);
    uint32_t any = 0;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t k = k32[j];
      any |= uint32_t((k > lo) & (k < hi) & (k != mid));
    }
    if (!any) continue;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t k = k32[j];
      dst[u] = uint32_t(k);
      u += int64_t((k > lo) & (k < hi) & (k != mid));
    }
  }
  return u;
}

#ifdef PYMERGE_SPARSE_X86_CLONES
__attribute__((target("avx2,bmi"))) inline int64_t compact_window_avx2(const int32_t* __restrict k32, int64_t n,
                                                                      Window w, uint32_t* __restrict dst, int64_t u) {
  const __m256i lo = _mm256_set1_epi32(w.lo), mid = _mm256_set1_epi32(w.mid), hi = _mm256_set1_epi32(w.hi);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k32 + j));
    const __m256i in = _mm256_andnot_si256(_mm256_cmpeq_epi32(k, mid),
                                           _mm256_and_si256(_mm256_cmpgt_epi32(k, lo), _mm256_cmpgt_epi32(hi, k)));
    uint32_t m = uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(in)));
    while (m) {
      dst[u++] = uint32_t(k32[j + _tzcnt_u32(m)]);
      m &= m - 1;
    }
  }
  return j < n ? compact_window(k32 + j, n - j, w, dst, u) : u;
}

// 16 keys per step, branch-free: the keys in the window are compressed to the
// front of a register and stored whole (the caller guarantees n words of room
// at dst + u), and u moves by their count. Not inlined: the AVX-512 headers'
// -Wmaybe-uninitialized false positive would come back in the caller.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,popcnt"), noinline)) inline int64_t compact_window_avx512(const int32_t* __restrict k32,
                                                                                          int64_t n, Window w,
                                                                                          uint32_t* __restrict dst,
                                                                                          int64_t u) {
  const __m512i lo = _mm512_set1_epi32(w.lo), mid = _mm512_set1_epi32(w.mid), hi = _mm512_set1_epi32(w.hi);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i k = _mm512_loadu_si512(k32 + j);
    const __mmask16 in = _mm512_mask_cmpneq_epi32_mask(
        _mm512_mask_cmplt_epi32_mask(_mm512_cmpgt_epi32_mask(k, lo), k, hi), k, mid);
    _mm512_storeu_si512(dst + u, _mm512_maskz_compress_epi32(in, k));
    u += __builtin_popcount(uint32_t(in));
  }
  return j < n ? compact_window(k32 + j, n - j, w, dst, u) : u;
}
#pragma GCC diagnostic pop
#endif

using CompactFn = int64_t (*)(const int32_t* k32, int64_t n, Window w, uint32_t* dst, int64_t u);

// The widest compaction clone for the kernel level (cpu/isa.h).
inline CompactFn compact_window_fn() {
#ifdef PYMERGE_SPARSE_X86_CLONES
  if (use_avx512()) return compact_window_avx512;
  if (use_avx2()) return compact_window_avx2;
#endif
  return compact_window;
}

// Per chunk and request: keys < lo, <= lo, < mid, <= mid, < hi, <= hi.
constexpr int kWinCounts = 6;

struct WindowPass {
  const Inputs* in;
  const std::vector<int64_t>* models;               // distinct models with a window
  const std::vector<std::vector<int64_t>>* of;      // per entry of models: its requests
  const std::vector<Window>* win;                   // per request
  int64_t n_req;
  int64_t chunks;
  int64_t* counts;                                  // [chunk][request][kWinCounts]
  std::vector<std::unique_ptr<uint32_t[]>>* cand;  // [chunk * n_req + request]
  int64_t* cand_n;                                  // same index; -1: overflowed
  int64_t* cand_cap;                                // per chunk

  void chunk(int64_t c) const {
    alignas(64) float b[kBlock];
    alignas(64) float tau[kBlock];
    alignas(64) uint32_t keys[kBlock];
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    const int64_t cap = cand_cap[c];
    int64_t* cnt = counts + c * n_req * kWinCounts;
    const CompactFn compact = compact_window_fn();
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      PYMERGE_PREFETCH_NEXT_BLOCK(*in, off, end);
      load_any(in->base_dtype, b, in->base, off, n);
      for (size_t s = 0; s < models->size(); ++s) {
        const int64_t m = (*models)[s];
        tau_any(in->dtypes[m], tau, b, in->models[m], off, n);
        mag_keys(keys, tau, n);
        const int32_t* __restrict k32 = reinterpret_cast<const int32_t*>(keys);
        for (const int64_t r : (*of)[s]) {
          const Window w = (*win)[size_t(r)];
          const int32_t lo = w.lo, mid = w.mid, hi = w.hi;
          int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0;
          for (int64_t j = 0; j < n; ++j) {
            const int32_t k = k32[j];
            a0 += k < lo;
            a1 += k <= lo;
            a2 += k < mid;
            a3 += k <= mid;
            a4 += k < hi;
            a5 += k <= hi;
          }
          int64_t* cr = cnt + r * kWinCounts;
          cr[0] += a0;
          cr[1] += a1;
          cr[2] += a2;
          cr[3] += a3;
          cr[4] += a4;
          cr[5] += a5;
          int64_t& used = cand_n[c * n_req + r];
          if (used < 0) continue;
          if (a4 == a1) continue;  // no key strictly inside the window
          if (used + n > cap) {
            used = -1;
            continue;
          }
          used = compact(k32, n, w, (*cand)[size_t(c * n_req + r)].get(), used);
        }
      }
    }
  }
};

// The keep rule of every request, for a merge pass walking the same `chunks`.
inline std::vector<Trim> select_trims(const Inputs& in, const std::vector<TrimRequest>& reqs, int64_t chunks,
                                      bool inclusive) {
  const int64_t numel = in.numel;
  const int64_t n_req = int64_t(reqs.size());
  std::vector<Trim> trims(reqs.size());
  std::vector<int64_t> models;
  std::vector<std::vector<int64_t>> of;
  std::vector<int64_t> slot(static_cast<size_t>(in.n), -1);
  for (int64_t r = 0; r < n_req; ++r) {
    const int64_t k = reqs[size_t(r)].k, m = reqs[size_t(r)].model;
    if (k <= 0 || numel <= 0) {
      trims[size_t(r)].top.none = true;
    } else if (k >= numel) {
      trims[size_t(r)].top.all = true;
    } else {
      if (slot[size_t(m)] < 0) {
        slot[size_t(m)] = int64_t(models.size());
        models.push_back(m);
        of.emplace_back();
      }
      of[size_t(slot[size_t(m)])].push_back(r);
    }
  }
  if (models.empty()) return trims;
  if (select_mode().load(std::memory_order_relaxed) == 1) return select_trims_radix(in, reqs, chunks, inclusive);

  // Windows from each model's sample.
  std::vector<Window> win(reqs.size(), Window{0, 0, 0});
  parallel_for(int64_t(models.size()), 1, [&](int64_t s0, int64_t s1) {
    std::vector<uint32_t> sample;
    for (int64_t s = s0; s < s1; ++s) {
      sample_keys(in, models[size_t(s)], sample);
      const int64_t S = int64_t(sample.size());
      for (const int64_t r : of[size_t(s)]) {
        const int64_t rank = numel - reqs[size_t(r)].k;
        int64_t c, d;
        if (S == numel) {
          c = rank;
          d = 0;
        } else {
          const double q = double(rank) / double(numel);
          c = std::min<int64_t>(S - 1, int64_t(q * double(S)));
          d = int64_t(6.0 * std::sqrt(double(S) * q * (1.0 - q))) + 64;
        }
        auto at = [&](int64_t i0, int64_t i1, int64_t i) {
          std::nth_element(sample.begin() + i0, sample.begin() + i, sample.begin() + i1);
          return sample[size_t(i)];
        };
        Window w;
        w.mid = int32_t(at(0, S, c));
        w.lo = d == 0 ? w.mid : (c - d >= 0 ? int32_t(at(0, c, c - d)) : 0);
        w.hi = d == 0 ? w.mid : (c + d < S ? int32_t(at(c + 1, S, c + d)) : int32_t(0x7FFFFFFF));
        win[size_t(r)] = w;
      }
    }
  });

  // One sweep: counts and the keys inside the windows.
  std::vector<int64_t> counts(size_t(chunks * n_req * kWinCounts), 0);
  std::vector<std::unique_ptr<uint32_t[]>> cand(size_t(chunks * n_req));
  std::vector<int64_t> cand_n(size_t(chunks * n_req), 0), cand_cap(size_t(chunks), 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t len = chunk_begin(numel, chunks, c + 1) - chunk_begin(numel, chunks, c);
    cand_cap[size_t(c)] = len / 16 + 2 * kBlock;
    for (int64_t r = 0; r < n_req; ++r)
      if (trims[size_t(r)].active()) cand[size_t(c * n_req + r)].reset(new uint32_t[size_t(cand_cap[size_t(c)])]);
  }
  run_chunks(WindowPass{&in, &models, &of, &win, n_req, chunks, counts.data(), &cand, cand_n.data(), cand_cap.data()},
             chunks);

  // Resolve each request from its counts (and stored keys); list the misses.
  std::vector<char> miss(reqs.size(), 0);
  parallel_for(n_req, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Trim& t = trims[size_t(r)];
      if (!t.active()) continue;
      const int64_t k = reqs[size_t(r)].k, rank = numel - k;
      int64_t tot[kWinCounts] = {0, 0, 0, 0, 0, 0};
      bool overflow = false;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int i = 0; i < kWinCounts; ++i) tot[i] += counts[size_t((c * n_req + r) * kWinCounts + i)];
        overflow |= cand_n[size_t(c * n_req + r)] < 0;
      }
      const Window w = win[size_t(r)];
      // Per-chunk counts of keys equal to the threshold, for the index tie-break.
      std::vector<int64_t> eq(size_t(chunks), 0);
      uint32_t thr;
      int64_t less, equal;
      auto from_counts = [&](int lt, int le, int32_t key) {
        thr = uint32_t(key);
        less = tot[lt];
        equal = tot[le] - tot[lt];
        for (int64_t c = 0; c < chunks; ++c)
          eq[size_t(c)] = counts[size_t((c * n_req + r) * kWinCounts + le)] - counts[size_t((c * n_req + r) * kWinCounts + lt)];
      };
      auto from_keys = [&](int64_t below, int32_t a, int32_t b) {
        std::vector<uint32_t> g;
        for (int64_t c = 0; c < chunks; ++c) {
          const uint32_t* p = cand[size_t(c * n_req + r)].get();
          for (int64_t j = 0, e = cand_n[size_t(c * n_req + r)]; j < e; ++j)
            if (int32_t(p[j]) > a && int32_t(p[j]) < b) g.push_back(p[j]);
        }
        const int64_t rr = rank - below;
        std::nth_element(g.begin(), g.begin() + rr, g.end());
        thr = g[size_t(rr)];
        int64_t lt = 0, et = 0;
        for (const uint32_t x : g) {
          lt += x < thr;
          et += x == thr;
        }
        less = below + lt;
        equal = et;
        for (int64_t c = 0; c < chunks; ++c) {
          const uint32_t* p = cand[size_t(c * n_req + r)].get();
          int64_t e = 0;
          for (int64_t j = 0, m = cand_n[size_t(c * n_req + r)]; j < m; ++j) e += p[j] == thr;
          eq[size_t(c)] = e;
        }
      };
      if (rank < tot[0] || rank >= tot[5]) {
        miss[size_t(r)] = 1;
        continue;
      } else if (rank < tot[1]) {
        from_counts(0, 1, w.lo);
      } else if (rank < tot[2]) {
        if (overflow) {
          miss[size_t(r)] = 1;
          continue;
        }
        from_keys(tot[1], w.lo, w.mid);
      } else if (rank < tot[3]) {
        from_counts(2, 3, w.mid);
      } else if (rank < tot[4]) {
        if (overflow) {
          miss[size_t(r)] = 1;
          continue;
        }
        from_keys(tot[3], w.mid, w.hi);
      } else {
        from_counts(4, 5, w.hi);
      }
      finish_trim(t, thr, less, equal, k, numel, inclusive);
      if (t.top.ties_split()) {
        t.offsets.assign(size_t(chunks), 0);
        int64_t before = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          t.offsets[size_t(c)] = before;
          before += eq[size_t(c)];
        }
      }
    }
  });

  std::vector<TrimRequest> missed;
  std::vector<int64_t> where;
  for (int64_t r = 0; r < n_req; ++r)
    if (miss[size_t(r)]) {
      missed.push_back(reqs[size_t(r)]);
      where.push_back(r);
    }
  if (!missed.empty()) {
    select_fallbacks().fetch_add(int64_t(missed.size()), std::memory_order_relaxed);
    const std::vector<Trim> fixed = select_trims_radix(in, missed, chunks, inclusive);
    for (size_t i = 0; i < missed.size(); ++i) trims[size_t(where[i])] = fixed[i];
  }
  return trims;
}

// The keep rule of a Trim over one block as a key range [kmin, kmax], when one
// range decides the whole block (always, unless the block holds the
// take_equal-th threshold-equal key); advances `seen` as keep_block does.
// Returns false (seen untouched) when the block needs keep_block.
inline bool block_rule(const Trim& t, const uint32_t* __restrict keys, int64_t n, int64_t& seen, uint32_t& kmin,
                       uint32_t& kmax) {
  const TopK& top = t.top;
  if (top.none) {  // an empty range
    kmin = 1;
    kmax = 0;
    return true;
  }
  if (top.all) {
    kmin = 0;
    kmax = 0xFFFFFFFFu;
    return true;
  }
  const uint32_t thr = top.threshold;
  kmax = t.max_key;
  kmin = thr;
  if (!top.ties_split()) return true;
  if (seen >= top.take_equal) {  // every equal key from here on is left
    kmin = thr + 1;
    return true;
  }
  int64_t eq = 0;
  for (int64_t j = 0; j < n; ++j) eq += keys[j] == thr;
  if (seen + eq > top.take_equal) return false;
  seen += eq;  // all of this block's equal keys are taken
  return true;
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

  // The same operations in one loop over the block for NM models.
  template <int NM>
  void fused(const float* rows, const float* __restrict b, float* __restrict out, int64_t n) const {
    const float* __restrict r[NM];
    float wi[NM];
    for (int i = 0; i < NM; ++i) {
      r[i] = rows + i * kBlock;
      wi[i] = w[i];
    }
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int i = 0; i < NM; ++i) acc = acc + wi[i] * r[i][j];
      out[j] = b[j] + acc * c;
    }
  }

  void operator()(float* rows, int64_t nm, Scratch& s, float* __restrict out, int64_t n) const {
    switch (nm) {
      case 2: return fused<2>(rows, s.b, out, n);
      case 3: return fused<3>(rows, s.b, out, n);
      case 4: return fused<4>(rows, s.b, out, n);
      default: break;
    }
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

  // The same operations, element by element, in one loop over the block for NM models.
  template <int NM, bool kCount, bool kNorm>
  void fused(const float* rows, const float* __restrict b, float* __restrict out, int64_t n) const {
    const float* __restrict r[NM];
    float wi[NM];
    uint32_t wbits[NM];
    for (int i = 0; i < NM; ++i) {
      r[i] = rows + i * kBlock;
      wi[i] = w[i];
      wbits[i] = f32_to_bits(w[i]);
    }
    for (int64_t j = 0; j < n; ++j) {
      float d[NM];
      float sum = 0.0f;
      int32_t cnt = 0;
      for (int i = 0; i < NM; ++i) {
        d[i] = wi[i] * r[i][j];
        if (kCount)
          cnt += int32_t(d[i] > 0.0f) - int32_t(d[i] < 0.0f);
        else
          sum = sum + d[i];
      }
      const uint32_t p = kCount ? mask_of(cnt >= 0) : mask_of(sum >= 0.0f);
      float acc = 0.0f, dv = 0.0f;
      for (int i = 0; i < NM; ++i) {
        const uint32_t agree = (p & mask_of(d[i] > 0.0f)) | (~p & mask_of(d[i] < 0.0f));
        acc = acc + masked(d[i], agree);
        if (kNorm) dv = dv + f32_from_bits(wbits[i] & agree);
      }
      if (kNorm) acc = acc / f32_from_bits(select_u32(dv == 0.0f, f32_to_bits(1.0f), f32_to_bits(dv)));
      out[j] = b[j] + acc * lam;
    }
  }

  template <int NM>
  void fused_nm(const float* rows, const float* b, float* out, int64_t n) const {
    if (count)
      normalize ? fused<NM, true, true>(rows, b, out, n) : fused<NM, true, false>(rows, b, out, n);
    else
      normalize ? fused<NM, false, true>(rows, b, out, n) : fused<NM, false, false>(rows, b, out, n);
  }

  void operator()(float* rows, int64_t nm, Scratch& s, float* __restrict out, int64_t n) const {
    switch (nm) {
      case 2: return fused_nm<2>(rows, s.b, out, n);
      case 3: return fused_nm<3>(rows, s.b, out, n);
      case 4: return fused_nm<4>(rows, s.b, out, n);
      default: break;
    }
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

  bool stream;  // output larger than the cache: written with streaming stores

  void chunk(int64_t c) const {
    const int64_t nm = in->n;
    std::vector<float> rowbuf(static_cast<size_t>(nm * kBlock));
    Scratch s;
    alignas(64) float result[kBlock];
    alignas(64) float staged[kBlock];  // the rounded block, when streamed
    auto state = rows->start(c);
    const int64_t begin = chunk_begin(in->numel, chunks, c), end = chunk_begin(in->numel, chunks, c + 1);
    for (int64_t off = begin; off < end; off += kBlock) {
      const int64_t n = std::min(kBlock, end - off);
      PYMERGE_PREFETCH_NEXT_BLOCK(*in, off, end);
      load_any(in->base_dtype, s.b, in->base, off, n);
      for (int64_t i = 0; i < nm; ++i) {
        tau_any(in->dtypes[i], s.tau, s.b, in->models[i], off, n);
        rows->make(state, i, off, n, s, rowbuf.data() + i * kBlock);
      }
      (*combine)(rowbuf.data(), nm, s, result, n);
#ifdef PYMERGE_STREAM_STORES
      if (stream) {
        const int64_t size = int64_t(dtype_size(out_dtype));
        store_any(out_dtype, staged, 0, result, n);
        stream_copy(static_cast<char*>(out) + off * size, staged, n * size);
        continue;
      }
#endif
      store_any(out_dtype, out, off, result, n);
    }
#ifdef PYMERGE_STREAM_STORES
    if (stream) stream_fence();
#endif
  }
};

template <class Rows, class Combine>
void merge(const Inputs& in, void* out, int out_dtype, const Rows& rows, const Combine& combine, int64_t chunks) {
  const bool stream = use_avx2() && stream_output(in.numel, int64_t(dtype_size(out_dtype)));
  run_chunks(MergePass<Rows, Combine>{&in, out, out_dtype, &rows, &combine, chunks, stream}, chunks);
}

// row = tau where lo keeps it, else +0, in one pass from tau (no key buffer), with
// the threshold-equal keys counted on the way while the index tie-break is open.
// Returns false, with `seen` unchanged, for the one block where the tie-break
// flips from taking equal keys to leaving them: the caller redoes that block key
// by key.
inline bool trim_fused(const Trim& l, const float* __restrict tau, int64_t n, int64_t& seen,
                       float* __restrict row) {
  const TopK& top = l.top;
  if (top.all) {
    for (int64_t j = 0; j < n; ++j) row[j] = tau[j];
    return true;
  }
  const uint32_t thr = top.threshold, kmax = l.max_key;
  const bool open = top.ties_split() && seen < top.take_equal;
  const uint32_t kmin = top.ties_split() && !open ? thr + 1 : thr;
  if (!open) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t k = mag_key(tau[j]);
      row[j] = masked(tau[j], mask_of(k >= kmin) & mask_of(k <= kmax));
    }
    return true;
  }
  int32_t eq = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t k = mag_key(tau[j]);
    eq += int32_t(k == thr);
    row[j] = masked(tau[j], mask_of(k >= kmin) & mask_of(k <= kmax));
  }
  if (seen + eq > top.take_equal) return false;
  seen += eq;  // all of this block's equal keys are taken
  return true;
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
    const bool drop = hi && !hi[i].top.none;
    if (!drop && trim_fused(l, tau, n, st.seen_lo[size_t(i)], row)) return;
    uint32_t* __restrict keys = s.words;
    mag_keys(keys, tau, n);
    uint32_t lo_min, lo_max, hi_min = 0, hi_max = 0;
    // Usually the whole block follows one rule (keys in [min, max] kept or
    // dropped): one fused pass. Only the block where the index tie-break
    // changes from taking equal keys to leaving them goes element by element.
    const bool lo_fast = block_rule(l, keys, n, st.seen_lo[size_t(i)], lo_min, lo_max);
    const bool hi_fast = !drop || block_rule(hi[i], keys, n, st.seen_hi[size_t(i)], hi_min, hi_max);
    if (lo_fast && hi_fast) {
      if (drop) {
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t k = keys[j];
          const uint32_t keep = mask_of(k >= lo_min) & mask_of(k <= lo_max) & ~(mask_of(k >= hi_min) & mask_of(k <= hi_max));
          row[j] = masked(tau[j], keep);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t k = keys[j];
          row[j] = masked(tau[j], mask_of(k >= lo_min) & mask_of(k <= lo_max));
        }
      }
      return;
    }
    uint32_t* __restrict mask = s.mask;
    if (lo_fast) {
      for (int64_t j = 0; j < n; ++j) mask[j] = mask_of(keys[j] >= lo_min) & mask_of(keys[j] <= lo_max);
    } else {
      keep_block(l, keys, n, st.seen_lo[size_t(i)], mask);
    }
    if (drop) {
      if (hi_fast) {
        for (int64_t j = 0; j < n; ++j) mask[j] &= ~(mask_of(keys[j] >= hi_min) & mask_of(keys[j] <= hi_max));
      } else {
        uint32_t* __restrict dm = s.mask2;
        keep_block(hi[i], keys, n, st.seen_hi[size_t(i)], dm);
        for (int64_t j = 0; j < n; ++j) mask[j] &= ~dm[j];
      }
    }
    for (int64_t j = 0; j < n; ++j) row[j] = masked(tau[j], mask[j]);
  }
};

}  // namespace sparse
}  // namespace cpu
}  // namespace pymerge
