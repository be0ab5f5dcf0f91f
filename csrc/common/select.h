// Exact selection without sorting: the key at a given rank by two passes of
// 16-bit radix histograms over 32-bit float keys, and the exact-k rule of
// specs/methods.md (ties at the threshold broken by the lower flat index).
//
// Keys: order_key(x) orders all floats as numbers (-0 < +0 is NOT kept: the
// caller passes +0 for zeros); abs_key(x) orders |x| (both zeros equal). The
// keys are produced by a callable key_of(i), so a kernel can select over
// values it computes on the fly (e.g. |theta_i - theta_0|) without storing them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"

namespace pymerge {

// f32_from_bits comes from dtype.h (a second definition here broke every file
// that includes both headers).
inline uint32_t f32_bits(float x) { return f32_to_bits(x); }

// Unsigned order of the keys == numeric order of the floats (NaN excluded).
inline uint32_t order_key(float x) {
  const uint32_t b = f32_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float from_order_key(uint32_t k) { return f32_from_bits((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

// Unsigned order of the keys == order of |x|; -0 and +0 share key 0.
inline uint32_t abs_key(float x) { return f32_bits(x) & 0x7FFFFFFFu; }

// The key found at a rank, with how many keys lie below it and how many equal it.
struct KeyRank {
  uint32_t key = 0;
  int64_t less = 0;
  int64_t equal = 0;
};

namespace detail {

constexpr int kRadixBits = 16;
constexpr int64_t kBins = int64_t(1) << kRadixBits;
constexpr int64_t kSelectGrain = 1 << 15;

// Histogram of (key >> shift) & 0xFFFF over keys whose high bits match `prefix`
// (when filter is set), summed over deterministic chunks.
//
// Per chunk: uint32 counters (a chunk is < 2^31 keys), kCopies interleaved
// copies (key i counts in copy i % kCopies) so that runs of equal keys do not
// chain every increment on the previous one, and with a filter the keys that
// miss count in rotating dummy bins instead of taking a branch.
constexpr int64_t kCopies = 4;
constexpr int64_t kDummies = 16;

template <class KeyFn>
std::vector<int64_t> histogram(int64_t n, const KeyFn& key_of, int shift, bool filter, uint32_t prefix) {
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), (n + kSelectGrain - 1) / kSelectGrain));
  chunks = std::max<int64_t>(chunks, (n >> 31) + 1);
  constexpr int64_t kSize = kCopies * kBins + kDummies;
  std::vector<std::vector<uint32_t>> parts(static_cast<size_t>(chunks));
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<uint32_t> h(static_cast<size_t>(kSize), 0u);
      uint32_t* __restrict hp = h.data();
      const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
      if (!filter) {
        int64_t i = b;
        for (; i + kCopies <= e; i += kCopies)
          for (int64_t l = 0; l < kCopies; ++l) ++hp[((key_of(i + l) >> shift) & 0xFFFFu) * kCopies + l];
        for (; i < e; ++i) ++hp[((key_of(i) >> shift) & 0xFFFFu) * kCopies];
      } else {
        for (int64_t i = b; i < e; ++i) {
          const uint32_t k = key_of(i);
          const uint32_t hit = ((k >> shift) & 0xFFFFu) * uint32_t(kCopies) + uint32_t(i % kCopies);
          const uint32_t miss = uint32_t(kCopies * kBins + i % kDummies);
          const uint32_t m = 0u - uint32_t((k >> kRadixBits) == prefix);
          ++hp[(hit & m) | (miss & ~m)];
        }
      }
      parts[static_cast<size_t>(c)] = std::move(h);
    }
  });
  std::vector<int64_t> total(static_cast<size_t>(kBins), 0);
  for (const auto& h : parts)
    for (int64_t j = 0; j < kBins; ++j)
      for (int64_t l = 0; l < kCopies; ++l) total[static_cast<size_t>(j)] += h[static_cast<size_t>(j * kCopies + l)];
  return total;
}

// (bin, count below the bin) holding 0-based rank `rank` of a histogram.
inline std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& h, int64_t rank) {
  int64_t below = 0;
  for (int64_t j = 0; j < kBins; ++j) {
    const int64_t c = h[static_cast<size_t>(j)];
    if (rank < below + c) return {j, below};
    below += c;
  }
  return {kBins - 1, below};  // unreachable for a valid rank
}

}  // namespace detail

// The key at 0-based ascending rank `rank` (0 <= rank < n) of key_of(0..n-1).
template <class KeyFn>
KeyRank key_at_rank(int64_t n, int64_t rank, const KeyFn& key_of) {
  KeyRank r;
  if (n <= 0) return r;
  rank = std::min(std::max<int64_t>(rank, 0), n - 1);
  const auto high = detail::histogram(n, key_of, detail::kRadixBits, false, 0);
  const auto [hb, below_high] = detail::locate(high, rank);
  const auto low = detail::histogram(n, key_of, 0, true, uint32_t(hb));
  const auto [lb, below_low] = detail::locate(low, rank - below_high);
  r.key = (uint32_t(hb) << detail::kRadixBits) | uint32_t(lb);
  r.less = below_high + below_low;
  r.equal = low[static_cast<size_t>(lb)];
  return r;
}

// Which elements the "k largest, exactly k, lower index first at the threshold"
// rule keeps: every key > threshold, and the first take_equal keys == threshold
// in index order (all of them when take_equal == count_equal).
struct TopK {
  bool none = false;  // k <= 0
  bool all = false;   // k >= n
  uint32_t threshold = 0;
  int64_t take_equal = 0;
  int64_t count_equal = 0;

  bool ties_split() const { return !none && !all && take_equal < count_equal; }
};

template <class KeyFn>
TopK select_top_k(int64_t n, int64_t k, const KeyFn& key_of) {
  TopK t;
  if (k <= 0 || n <= 0) {
    t.none = true;
    return t;
  }
  if (k >= n) {
    t.all = true;
    return t;
  }
  const KeyRank r = key_at_rank(n, n - k, key_of);
  const int64_t greater = n - r.less - r.equal;
  t.threshold = r.key;
  t.count_equal = r.equal;
  t.take_equal = k - greater;
  return t;
}

// For a pass that walks [0, n) in chunks [c*n/chunks, (c+1)*n/chunks): the
// number of keys equal to the threshold before each chunk, so each chunk can
// apply the index tie-break on its own. Only needed when top.ties_split().
template <class KeyFn>
std::vector<int64_t> equal_offsets(int64_t n, int64_t chunks, const TopK& top, const KeyFn& key_of) {
  std::vector<int64_t> counts(static_cast<size_t>(chunks) + 1, 0);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t cnt = 0;
      for (int64_t i = c * n / chunks, e = (c + 1) * n / chunks; i < e; ++i) cnt += key_of(i) == top.threshold;
      counts[static_cast<size_t>(c) + 1] = cnt;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) counts[static_cast<size_t>(c) + 1] += counts[static_cast<size_t>(c)];
  counts.pop_back();
  return counts;
}

// Keep-decision for one element, walking a chunk in index order: `seen` is the
// number of threshold-equal keys met so far (start it at equal_offsets()[c]).
inline bool top_k_keeps(const TopK& top, uint32_t key, int64_t& seen) {
  if (top.none) return false;
  if (top.all || key > top.threshold) return true;
  if (key != top.threshold) return false;
  return seen++ < top.take_equal;
}

}  // namespace pymerge
