// Storage dtypes of the kernels and their exact conversions to and from fp32.
//
// The tags match pymerge/backends (FLOAT32=0, FLOAT16=1, BFLOAT16=2). Loads are
// exact; stores round to nearest, ties to even, like torch's `.to(dtype)`.
//
// The conversions are branch-free bit manipulation instead of _Float16 or
// hardware F16C: without -mf16c gcc turns every _Float16 conversion into a
// libgcc call, which cannot be vectorised, while these compile to SIMD code on
// baseline x86-64 and are bit-identical (tested over all 16-bit patterns).
// They never produce or depend on fp32 subnormal intermediates, so they give
// the same bits with flush-to-zero / denormals-are-zero enabled.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define PYMERGE_HD __host__ __device__ __forceinline__
#else
#define PYMERGE_HD inline
#endif

namespace pymerge {

enum DType : int { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2 };

inline bool valid_dtype(int tag) { return tag == FLOAT32 || tag == FLOAT16 || tag == BFLOAT16; }

inline std::size_t dtype_size(int tag) { return tag == FLOAT32 ? 4 : 2; }

inline const char* dtype_name(int tag) {
  switch (tag) {
    case FLOAT32: return "float32";
    case FLOAT16: return "float16";
    case BFLOAT16: return "bfloat16";
    default: return "invalid";
  }
}

PYMERGE_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PYMERGE_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Branch-free select. A plain ?: on values computed with fp operations lets
// gcc sink those operations into branches, and under the default
// -ftrapping-math it will not if-convert them back, which blocks vectorisation.
PYMERGE_HD uint32_t select_u32(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(cond);
  return (a & m) | (b & ~m);
}

// ---- bfloat16 -------------------------------------------------------------

PYMERGE_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

PYMERGE_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest, ties to even;
  // a carry into the exponent is the correct rounding up to the next binade or inf.
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // NaN: keep sign and top payload, force the quiet bit (rounding could turn it into inf).
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(is_nan ? quiet_nan : rounded);
}

// ---- float16 (IEEE binary16) ----------------------------------------------

PYMERGE_HD float fp16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  // Normal, inf and NaN: move exponent/mantissa into fp32 position with the
  // exponent biased up by 224, then scale by 2^-112 (exact; inf/NaN stay so).
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: place the mantissa under the exponent of 0.5 and subtract 0.5 (exact).
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = select_u32(two_w < (1u << 27), f32_to_bits(denormalized), f32_to_bits(normalized));
  return f32_from_bits(sign | bits);
}

PYMERGE_HD uint16_t f32_to_fp16(float f) {
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scale up then down: values too large for fp16 become inf, and the
  // magnitude is pre-scaled for the rounding addition below.
  float base = (f32_from_bits(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  // Add a power of two chosen so that the fp32 addition rounds (RNE) exactly
  // at the fp16 mantissa's last place; the floor of the bias handles subnormals.
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select_u32(bias < 0x71000000u, 0x71000000u, bias);
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  // NaN: keep the top payload bits, force the quiet bit.
  const uint32_t nan = 0x7E00u | ((w >> 13) & 0x01FFu);
  return uint16_t((sign >> 16) | select_u32(shl1_w > 0xFF000000u, nan, nonsign));
}

// ---- compile-time dispatch --------------------------------------------------

template <int Tag>
struct Dtype;

template <>
struct Dtype<FLOAT32> {
  using storage = float;
  static PYMERGE_HD float load(float v) { return v; }
  static PYMERGE_HD float store(float v) { return v; }
};

template <>
struct Dtype<FLOAT16> {
  using storage = uint16_t;
  static PYMERGE_HD float load(uint16_t v) { return fp16_to_f32(v); }
  static PYMERGE_HD uint16_t store(float v) { return f32_to_fp16(v); }
};

template <>
struct Dtype<BFLOAT16> {
  using storage = uint16_t;
  static PYMERGE_HD float load(uint16_t v) { return bf16_to_f32(v); }
  static PYMERGE_HD uint16_t store(float v) { return f32_to_bf16(v); }
};

// Calls fn(std::integral_constant<int, Tag>{}) for a runtime tag; returns false
// for an unknown tag.
template <class Fn>
inline bool dispatch_dtype(int tag, Fn&& fn) {
  switch (tag) {
    case FLOAT32: fn(std::integral_constant<int, FLOAT32>{}); return true;
    case FLOAT16: fn(std::integral_constant<int, FLOAT16>{}); return true;
    case BFLOAT16: fn(std::integral_constant<int, BFLOAT16>{}); return true;
    default: return false;
  }
}

// Calls fn(std::integral_constant<int, n>{}) for a runtime count n in [1, kMax]
// (a kernel specialised for its number of models); n above kMax is taken as kMax.
template <int kMax, int N = 1, class Fn>
inline void dispatch_count(int64_t n, Fn&& fn) {
  if constexpr (N >= kMax) {
    fn(std::integral_constant<int, kMax>{});
  } else {
    if (n <= N)
      fn(std::integral_constant<int, N>{});
    else
      dispatch_count<kMax, N + 1>(n, fn);
  }
}

// Kernels specialised for one dtype and their number of models: calls
// fn(dtype tag, model count), both as integral_constants, when all n dtypes
// equal `tag` and 1 <= n <= kMax; returns false (calling nothing) otherwise.
template <int kMax, class Fn>
inline bool dispatch_one_dtype(int tag, const int* dtypes, int64_t n, Fn&& fn) {
  if (n < 1 || n > kMax) return false;
  for (int64_t i = 0; i < n; ++i)
    if (dtypes[i] != tag) return false;
  return dispatch_dtype(tag, [&](auto t) { dispatch_count<kMax>(n, [&](auto nm) { fn(t, nm); }); });
}

// Bulk conversions (used by tests and by kernels that stage whole buffers).
inline void convert_to_f32(int tag, const void* src, float* dst, std::size_t n) {
  dispatch_dtype(tag, [&](auto t) {
    constexpr int T = decltype(t)::value;
    const auto* p = static_cast<const typename Dtype<T>::storage*>(src);
    for (std::size_t i = 0; i < n; ++i) dst[i] = Dtype<T>::load(p[i]);
  });
}

inline void convert_from_f32(int tag, const float* src, void* dst, std::size_t n) {
  dispatch_dtype(tag, [&](auto t) {
    constexpr int T = decltype(t)::value;
    auto* p = static_cast<typename Dtype<T>::storage*>(dst);
    for (std::size_t i = 0; i < n; ++i) p[i] = Dtype<T>::store(src[i]);
  });
}

}  // namespace pymerge
