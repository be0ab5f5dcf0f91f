// Non-temporal stores for outputs larger than the last-level cache.
//
// A plain store first reads the destination line into the cache (read for
// ownership), so a kernel writing a large output moves its bytes twice; a
// streaming store writes the line without reading it. Worth it only when the
// output would not stay in the cache anyway. Kernels round a block into a
// cache-resident staging buffer, stream_copy it out, and stream_fence() before
// their thread finishes. x86-64 with AVX2 only; elsewhere kernels store plainly.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYMERGE_STREAM_STORES 1
#endif

namespace pymerge {

// Outputs of at least this many bytes are streamed (about half a server L3).
// Settable (a test hook: 0 streams every output).
inline std::atomic<int64_t>& stream_min_bytes() {
  static std::atomic<int64_t> value{int64_t(16) << 20};
  return value;
}

inline bool stream_output(int64_t numel, int64_t elem_size) {
  return numel * elem_size >= stream_min_bytes().load(std::memory_order_relaxed);
}

#ifdef PYMERGE_STREAM_STORES
// Copies a staging block to dst with streaming stores for its 32-byte-aligned interior.
__attribute__((target("avx2"))) inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, int64_t(-reinterpret_cast<uintptr_t>(d) & 31));
  std::memcpy(d, s, size_t(head));
  int64_t j = head;
  for (; j + 32 <= bytes; j += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + j), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j)));
  std::memcpy(d + j, s + j, size_t(bytes - j));
}

inline void stream_fence() { _mm_sfence(); }
#endif

}  // namespace pymerge
