// The instruction-set clones of the CPU kernels.
//
// Hot loops are compiled once per level (baseline x86-64; AVX2 + F16C; AVX-512
// F/BW/VL/DQ) and a call runs the widest clone its kernel family has at or below
// kernel_isa(): the widest level this CPU and OS support, which a test hook can
// lower so that every clone gets checked. The clones give the same bits: they
// differ only in vector width, over elementwise IEEE operations and integer work.
#pragma once

namespace pymerge {
namespace cpu {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa kernel_isa();
const char* isa_name(Isa isa);

// Test hook: no clone above max runs. Returns the previous limit.
Isa set_max_isa(Isa max);

inline bool use_avx2() { return kernel_isa() >= kAvx2; }
inline bool use_avx512() { return kernel_isa() >= kAvx512; }

}  // namespace cpu
}  // namespace pymerge

// Attributes of a clone's entry point: the target, and flatten so that the
// whole loop nest below it is compiled for that target.
#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_CLONE_AVX2 __attribute__((target("avx2,f16c"), flatten))
#define PYMERGE_CLONE_AVX512 \
  __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"), flatten))
#endif
