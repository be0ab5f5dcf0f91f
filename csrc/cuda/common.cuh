// Device-side building blocks shared by the CUDA kernels.
//
// - fp32 arithmetic that is never contracted: fmul/fadd/fsub/fdiv are the
//   round-to-nearest intrinsics, so a*b+c stays two roundings (bit identity
//   with the torch reference) whatever --fmad says.
// - Loads and stores of f32/f16/bf16 (dtype tags of common/dtype.h) as fp32:
//   upcasts are exact, downcasts round to nearest-even (the hardware cvt.rn,
//   the same values as torch's .to(dtype)).
// - Packs: a thread handles kPack consecutive elements; when every buffer is
//   16-byte aligned a pack moves with 16-byte vector accesses (one for 16-bit
//   data, two for fp32), otherwise and at the tail element by element.
// - Grid-stride loops over packs, grids sized for the device's SMs.
// - Deterministic block reductions (fixed shuffle tree, then fixed order over
//   warps): the same inputs give the same bits on every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace pymerge {
namespace cuda {

constexpr int kThreads = 256;   // threads per block of the elementwise kernels
constexpr int kPack = 8;        // elements per thread per step: 16 bytes of 16-bit data
constexpr int kBlocksPerSm = 8; // 8 x 256 = 2048 resident threads per SM at most
constexpr int kMaxModels = 64;  // models per call (kernel arguments hold per-model values)

// ---- exact fp32 steps ------------------------------------------------------------

__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fsub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float fdiv(float a, float b) { return __fdiv_rn(a, b); }

// x where mask is all ones, +0 where it is zero (torch.where(keep, x, 0)).
__device__ __forceinline__ float masked(float x, uint32_t mask) { return __uint_as_float(__float_as_uint(x) & mask); }
__device__ __forceinline__ uint32_t mask_of(bool b) { return 0u - uint32_t(b); }

// ---- element loads and stores ----------------------------------------------------

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
__device__ __forceinline__ uint16_t f32_to_f16_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float load_elem(const void* p, int tag, int64_t i) {
  if (tag == FLOAT32) return __ldg(static_cast<const float*>(p) + i);
  const uint16_t h = __ldg(static_cast<const unsigned short*>(p) + i);
  return tag == FLOAT16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
}

__device__ __forceinline__ void store_elem(void* p, int tag, int64_t i, float v) {
  if (tag == FLOAT32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = tag == FLOAT16 ? f32_to_f16_bits(v) : f32_to_bf16_bits(v);
  }
}

// ---- packs of kPack elements -------------------------------------------------------

__device__ __forceinline__ void unpack16(const uint4 q, int tag, float (&v)[kPack]) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint16_t lo = uint16_t(w[j] & 0xFFFFu), hi = uint16_t(w[j] >> 16);
    if (tag == FLOAT16) {
      v[2 * j] = f16_bits_to_f32(lo);
      v[2 * j + 1] = f16_bits_to_f32(hi);
    } else {
      v[2 * j] = bf16_bits_to_f32(lo);
      v[2 * j + 1] = bf16_bits_to_f32(hi);
    }
  }
}

// v = elements i0 .. i0+kPack-1 of p (0 past n). vec: p is 16-byte aligned
// (i0 is a multiple of kPack, so the pack is too).
__device__ __forceinline__ void load_pack(const void* p, int tag, int64_t i0, int64_t n, bool vec,
                                          float (&v)[kPack]) {
  if (vec && i0 + kPack <= n) {
    if (tag == FLOAT32) {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i0);
      const float4 a = __ldg(q), b = __ldg(q + 1);
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
      unpack16(__ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i0)), tag, v);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kPack; ++j) v[j] = i0 + j < n ? load_elem(p, tag, i0 + j) : 0.0f;
}

__device__ __forceinline__ void store_pack(void* p, int tag, int64_t i0, int64_t n, bool vec,
                                           const float (&v)[kPack]) {
  if (vec && i0 + kPack <= n) {
    if (tag == FLOAT32) {
      float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i0);
      q[0] = make_float4(v[0], v[1], v[2], v[3]);
      q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = tag == FLOAT16 ? f32_to_f16_bits(v[2 * j]) : f32_to_bf16_bits(v[2 * j]);
        const uint32_t hi = tag == FLOAT16 ? f32_to_f16_bits(v[2 * j + 1]) : f32_to_bf16_bits(v[2 * j + 1]);
        w[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i0) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kPack; ++j)
    if (i0 + j < n) store_elem(p, tag, i0 + j, v[j]);
}

// ---- per-model kernel arguments -----------------------------------------------------

// The N model buffers of one call, passed by value (kernel parameter space).
struct Models {
  const void* ptr[kMaxModels];
  int8_t dtype[kMaxModels];
  int n;
};

// ---- launch geometry --------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t packs_of(int64_t n) { return (n + kPack - 1) / kPack; }

// Blocks for a grid-stride loop over `items` work items of one thread each:
// enough to fill every SM, no more than the work.
inline int grid_for(int64_t items, int sms, int threads = kThreads) {
  const int64_t need = (items + threads - 1) / threads;
  const int64_t cap = int64_t(sms) * kBlocksPerSm;
  const int64_t g = need < cap ? need : cap;
  return int(g < 1 ? 1 : g);
}

__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- deterministic reductions ---------------------------------------------------------

// Sum over the warp in a fixed butterfly order; every lane gets the same bits.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024): warps in a
// fixed tree, then the warp sums in order by thread 0. Returns the total in
// thread 0 (other threads: unspecified). `scratch` holds 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
    const int warps = int(blockDim.x >> 5);
    for (int w = 0; w < warps; ++w) s = __dadd_rn(s, scratch[w]);
  }
  return s;
}

// Neumaier-compensated running sum: adding block partials in a fixed order.
struct Neumaier {
  double s = 0.0, c = 0.0;
  __host__ __device__ void add(double v) {
    const double t = s + v;
    c += fabs(s) >= fabs(v) ? (s - t) + v : (v - t) + s;
    s = t;
  }
  // A non-finite sum is kept as it is (the compensation would be NaN).
  __host__ __device__ double value() const { return isfinite(s) ? s + c : s; }
};

}  // namespace cuda
}  // namespace pymerge
