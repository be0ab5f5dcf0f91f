#include "cpu/isa.h"

#include <algorithm>
#include <atomic>

namespace pymerge {
namespace cpu {

namespace {

Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_supports also checks that the OS saves the vector state.
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return kGeneric;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  return kAvx2;
#else
  return kGeneric;
#endif
}

std::atomic<int> g_max_isa{kAvx512};

}  // namespace

Isa kernel_isa() {
  static const Isa best = cpu_isa();
  return Isa(std::min<int>(best, g_max_isa.load(std::memory_order_relaxed)));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    default: return "generic";
  }
}

Isa set_max_isa(Isa max) { return Isa(g_max_isa.exchange(max, std::memory_order_relaxed)); }

}  // namespace cpu
}  // namespace pymerge
