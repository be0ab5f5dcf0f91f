// Counter-based random numbers of DARE (specs/methods.md, "dare_linear, dare_ties"):
// Philox 4x32-10 (Salmon et al., Random123; the generator of cuRAND and of
// Triton's tl.randint), FNV-1a 64 of the tensor name, and the key derivation.
//
//   key64 = fnv1a64(utf8(name)) ^ (seed * 0x9E3779B97F4A7C15) ^ ((i + 1) * 0xC2B2AE3D27D4EB4F)
//   key   = (low 32 bits, high 32 bits) of key64;   counter = (p lo32, p hi32, 0, 0)
//   u_p   = (word0 >> 8) * 2^-24;                   keep_p  = u_p < fp32(density)
//
// The counter is the flat element index, so a mask does not depend on tiling,
// thread count or backend. Header-only; PYMERGE_HD makes every function
// callable from CUDA device code as well.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"  // PYMERGE_HD

namespace pymerge {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001B3ull;
constexpr uint64_t kSeedMult = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kIndexMult = 0xC2B2AE3D27D4EB4Full;

struct Key {
  uint32_t k0;
  uint32_t k1;
};

struct Block {
  uint32_t x[4];
};

PYMERGE_HD void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = uint64_t(a) * uint64_t(m);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

// One round: (hi0, lo0) = M0 * x0, (hi1, lo1) = M1 * x2,
// x = (hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0).
PYMERGE_HD void single_round(uint32_t& x0, uint32_t& x1, uint32_t& x2, uint32_t& x3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(x0, kM0, hi0, lo0);
  mulhilo(x2, kM1, hi1, lo1);
  x0 = hi1 ^ x1 ^ k0;
  x1 = lo1;
  x2 = hi0 ^ x3 ^ k1;
  x3 = lo0;
}

PYMERGE_HD Block philox4x32_10(Block c, Key key) {
  uint32_t x0 = c.x[0], x1 = c.x[1], x2 = c.x[2], x3 = c.x[3];
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < kRounds; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    single_round(x0, x1, x2, x3, k0, k1);
  }
  return Block{{x0, x1, x2, x3}};
}

// The first output word for counter (c0, c1, 0, 0): the only word DARE uses.
// Written out (no Block) so that loops over consecutive counters vectorise.
PYMERGE_HD uint32_t word0(uint32_t c0, uint32_t c1, Key key) {
  uint32_t x0 = c0, x1 = c1, x2 = 0, x3 = 0;
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler rejects the pragma under -Werror
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    single_round(x0, x1, x2, x3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  return x0;
}

// Element `index` of a tensor: counter (index lo32, index hi32, 0, 0).
PYMERGE_HD uint32_t word0(uint64_t index, Key key) { return word0(uint32_t(index), uint32_t(index >> 32), key); }

PYMERGE_HD uint64_t fnv1a64(const unsigned char* data, std::size_t n) {
  uint64_t h = kFnvOffset;
  for (std::size_t i = 0; i < n; ++i) h = (h ^ uint64_t(data[i])) * kFnvPrime;
  return h;
}

PYMERGE_HD uint64_t dare_key64(uint64_t name_hash, uint64_t seed, uint64_t model_index) {
  return name_hash ^ (seed * kSeedMult) ^ ((model_index + 1) * kIndexMult);
}

PYMERGE_HD Key dare_key(uint64_t name_hash, uint64_t seed, uint64_t model_index) {
  const uint64_t k = dare_key64(name_hash, seed, model_index);
  return Key{uint32_t(k), uint32_t(k >> 32)};
}

// u = (word0 >> 8) * 2^-24: a 24-bit integer scaled by a power of two, exact in fp32.
PYMERGE_HD float uniform(uint32_t w0) { return float(w0 >> 8) * 0x1.0p-24f; }

PYMERGE_HD bool keep(uint32_t w0, float density) { return uniform(w0) < density; }

}  // namespace philox
}  // namespace pymerge
