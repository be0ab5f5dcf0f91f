// EMR-Merging on the GPU (specs/methods.md, "emr"; torch reference
// pymerge/ops/reference/emr.py): elect with bit-packed masks and the
// rescalers' per-tensor sums in one pass, task reconstruction in one pass,
// and the bit packing helpers.
//
// Elect, per element p (fp32, the reference's order):
//   tau_i = f32(theta_i) - f32(theta_0)
//   s = ((+0 + tau_0) + tau_1) + ...                  (sequential)
//   g = s > 0 ? +1 : -1        (zero_sign "zero": s < 0 ? -1 : 0 when s <= 0)
//   a_i = g * tau_i > 0        (strict; NaN never agrees)
//   e = max over agreeing i of |tau_i| (+0 if none); u = g * e (-0 when g = -1, e = 0)
// Each thread takes packs of 8 consecutive elements; the first kCache models'
// tau stay in registers between the steps, later ones are re-read (from L1/L2).
// Masks: a warp covers 32 packs = 8 words; each lane's 8 bits are a byte,
// shuffles assemble the words, one lane in four stores one.
//
// Per-tensor sums, deterministic: each thread adds its packs' fp64 partials
// (8 terms summed in a fixed order) into its own shared-memory slot; the block
// sums its slots with a fixed tree into a per-block partial, and a second
// kernel adds the block partials in block order with Neumaier compensation.
// The grid depends on numel only, so the bits do not depend on the device,
// the timing or the SM count. torch sums in another order: the results agree
// to a few fp64 ulps (relative 1e-13 is a safe bound for these non-negative
// terms), which is the spec's "fp64 or a fixed-order tree" contract.

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

namespace pymerge {
namespace cuda {
namespace {

constexpr int kEmrThreads = 128;
constexpr int kCache = 8;            // models whose tau stays in registers
constexpr int kMaxEmrBlocks = 2048;  // fixed partition of the reduction

int emr_blocks(int64_t numel) {
  const int64_t need = (packs_of(numel) + kEmrThreads - 1) / kEmrThreads;
  return int(need < 1 ? 1 : (need > kMaxEmrBlocks ? kMaxEmrBlocks : need));
}

struct ElectArgs {
  Models models;
  const void* base;
  int base_dtype;
  void* u;
  int u_dtype;
  uint32_t* masks;  // [n, words]
  int64_t words;
  double* partials;  // [blocks, 2n]: sum |tau_i| then sum a_i |u|
  int64_t numel;
  bool zero_sign;
  bool vec;
};

template <int kTag>
__device__ __forceinline__ void tau_row(const ElectArgs& a, int i, int64_t i0, const float (&b)[kPack],
                                        float (&t)[kPack]) {
  load_pack(a.models.ptr[i], kTag >= 0 ? kTag : int(a.models.dtype[i]), i0, a.numel, a.vec, t);
#pragma unroll
  for (int j = 0; j < kPack; ++j) t[j] = fsub(t[j], b[j]);
}

// Elements past numel never agree (their bits are the zero padding).
__device__ __forceinline__ uint32_t agree_bits(const float (&t)[kPack], const float (&g)[kPack], int valid) {
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kPack; ++j) bits |= uint32_t(fmul(g[j], t[j]) > 0.0f && j < valid) << j;
  return bits;
}

// Fixed-order fp64 sum of a pack's 8 terms.
__device__ __forceinline__ double pack_sum(const double (&v)[kPack]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

__device__ __forceinline__ double abs_sum(const float (&t)[kPack]) {
  double v[kPack];
#pragma unroll
  for (int j = 0; j < kPack; ++j) v[j] = fabs(double(t[j]));
  return pack_sum(v);
}

__device__ __forceinline__ double masked_abs_sum(const float (&u)[kPack], uint32_t bits) {
  double v[kPack];
#pragma unroll
  for (int j = 0; j < kPack; ++j) v[j] = (bits >> j) & 1u ? fabs(double(u[j])) : 0.0;
  return pack_sum(v);
}

// One warp-step: lanes take packs p0 + lane; the byte of each lane goes to
// word (p0 + lane) / 4 at bit 8 * (lane % 4).
__device__ __forceinline__ void store_mask_byte(uint32_t* plane, int64_t words, int64_t p, uint32_t byte) {
  const int lane = threadIdx.x & 31;
  uint32_t w = byte << (8 * (lane & 3));
  w |= __shfl_xor_sync(0xFFFFFFFFu, w, 1);
  w |= __shfl_xor_sync(0xFFFFFFFFu, w, 2);
  const int64_t word = p >> 2;
  if ((lane & 3) == 0 && word < words) plane[word] = w;
}

template <int kTag>
__global__ void __launch_bounds__(kEmrThreads) emr_elect_kernel(const __grid_constant__ ElectArgs a) {
  extern __shared__ double slots[];  // [2n][kEmrThreads], one column per thread
  const int n = a.models.n;
  const int tid = threadIdx.x;
  for (int q = 0; q < 2 * n; ++q) slots[q * kEmrThreads + tid] = 0.0;

  const int64_t n_packs = packs_of(a.numel);
  const int64_t stride = grid_threads();
  // Warp-uniform loop: every lane runs every step (the mask shuffles need all 32).
  for (int64_t p0 = global_thread() & ~int64_t(31); p0 < n_packs; p0 += stride) {
    const int64_t p = p0 + (tid & 31);
    const bool live = p < n_packs;
    const int64_t i0 = p * kPack;
    const int valid = live ? int(a.numel - i0 < kPack ? a.numel - i0 : kPack) : 0;
    float b[kPack];
    if (live) {
      load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    } else {
#pragma unroll
      for (int j = 0; j < kPack; ++j) b[j] = 0.0f;
    }

    float cache[kCache][kPack];
    float s[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) s[j] = 0.0f;
    // Step 1: s and sum |tau_i|. All cached loads are issued before the first
    // use, so they are in flight together.
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      if (i < n && live) {
        load_pack(a.models.ptr[i], kTag >= 0 ? kTag : int(a.models.dtype[i]), i0, a.numel, a.vec, cache[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kPack; ++j) cache[i][j] = 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      if (i < n) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          cache[i][j] = live ? fsub(cache[i][j], b[j]) : 0.0f;
          s[j] = fadd(s[j], cache[i][j]);
        }
        slots[i * kEmrThreads + tid] += abs_sum(cache[i]);
      }
    }
    for (int i = kCache; i < n; ++i) {
      float t[kPack] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (live) tau_row<kTag>(a, i, i0, b, t);
#pragma unroll
      for (int j = 0; j < kPack; ++j) s[j] = fadd(s[j], t[j]);
      slots[i * kEmrThreads + tid] += abs_sum(t);
    }
    float g[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      g[j] = s[j] > 0.0f ? 1.0f : (a.zero_sign && !(s[j] < 0.0f) ? 0.0f : -1.0f);

    // Step 2: agreement bits (stored as the mask planes) and e = max |tau| over agreeing models.
    float e[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) e[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      if (i < n) {
        const uint32_t bits = agree_bits(cache[i], g, valid);
#pragma unroll
        for (int j = 0; j < kPack; ++j)
          if ((bits >> j) & 1u) e[j] = fmaxf(e[j], fabsf(cache[i][j]));
        store_mask_byte(a.masks + i * a.words, a.words, p, bits);
      }
    }
    for (int i = kCache; i < n; ++i) {
      float t[kPack] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (live) tau_row<kTag>(a, i, i0, b, t);
      const uint32_t bits = agree_bits(t, g, valid);
#pragma unroll
      for (int j = 0; j < kPack; ++j)
        if ((bits >> j) & 1u) e[j] = fmaxf(e[j], fabsf(t[j]));
      store_mask_byte(a.masks + i * a.words, a.words, p, bits);
    }
    float u[kPack];
#pragma unroll
    for (int j = 0; j < kPack; ++j) u[j] = fmul(g[j], e[j]);
    if (live) store_pack(a.u, a.u_dtype, i0, a.numel, a.vec, u);

    // Step 3: sum over agreeing elements of |u| (fp32 u, before rounding).
#pragma unroll
    for (int i = 0; i < kCache; ++i)
      if (i < n) slots[(n + i) * kEmrThreads + tid] += masked_abs_sum(u, agree_bits(cache[i], g, valid));
    for (int i = kCache; i < n; ++i) {
      float t[kPack] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (live) tau_row<kTag>(a, i, i0, b, t);
      slots[(n + i) * kEmrThreads + tid] += masked_abs_sum(u, agree_bits(t, g, valid));
    }
  }

  // Block partials: each slot row summed over the block's threads in a fixed tree.
  __shared__ double scratch[32];
  for (int q = 0; q < 2 * n; ++q) {
    const double total = block_sum(slots[q * kEmrThreads + tid], scratch);
    if (tid == 0) a.partials[int64_t(blockIdx.x) * 2 * n + q] = total;
  }
}

// sums[q] = the block partials of column q added in block order (Neumaier).
__global__ void emr_sums_kernel(const double* partials, int blocks, int cols, double* sums) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= cols) return;
  Neumaier acc;
  for (int k = 0; k < blocks; ++k) acc.add(partials[int64_t(k) * cols + q]);
  sums[q] = acc.value();
}

struct ReconArgs {
  const void* base;
  int base_dtype;
  const void* u;
  int u_dtype;
  const uint32_t* words;
  void* out;
  int out_dtype;
  int64_t numel;
  float lam;
  bool vec;
};

// out = f32(base) + (M ? f32(lam) * f32(u) : +0), one rounding to out_dtype.
__global__ void __launch_bounds__(kThreads) emr_reconstruct_kernel(const __grid_constant__ ReconArgs a) {
  const int64_t n_packs = packs_of(a.numel);
  for (int64_t p = global_thread(); p < n_packs; p += grid_threads()) {
    const int64_t i0 = p * kPack;
    float b[kPack], u[kPack], o[kPack];
    load_pack(a.base, a.base_dtype, i0, a.numel, a.vec, b);
    load_pack(a.u, a.u_dtype, i0, a.numel, a.vec, u);
    const uint32_t bits = __ldg(a.words + (p >> 2)) >> (8 * (p & 3));
#pragma unroll
    for (int j = 0; j < kPack; ++j) o[j] = fadd(b[j], masked(fmul(a.lam, u[j]), mask_of((bits >> j) & 1u)));
    store_pack(a.out, a.out_dtype, i0, a.numel, a.vec, o);
  }
}

// One thread per word: bits of mask[r, 32w .. 32w+31] (bytes 0/1), zero-padded.
__global__ void __launch_bounds__(kThreads) pack_bits_kernel(const uint8_t* mask, int64_t rows, int64_t n,
                                                             int64_t words, uint32_t* out) {
  const int64_t total = rows * words;
  for (int64_t k = global_thread(); k < total; k += grid_threads()) {
    const int64_t r = k / words, w = k % words;
    const uint8_t* src = mask + r * n + w * 32;
    const int64_t m = n - w * 32 < 32 ? n - w * 32 : 32;
    uint32_t v = 0;
    if (m == 32 && (reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
      const uint4 q0 = __ldg(reinterpret_cast<const uint4*>(src));
      const uint4 q1 = __ldg(reinterpret_cast<const uint4*>(src) + 1);
      const uint32_t q[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int j = 0; j < 4; ++j) v |= uint32_t(((q[c] >> (8 * j)) & 0xFFu) != 0) << (4 * c + j);
    } else {
      for (int64_t j = 0; j < m; ++j) v |= uint32_t(__ldg(src + j) != 0) << j;
    }
    out[k] = v;
  }
}

// One thread per word: writes its (up to) 32 bools.
__global__ void __launch_bounds__(kThreads) unpack_bits_kernel(const uint32_t* words_in, int64_t rows, int64_t n,
                                                               int64_t words, uint8_t* out) {
  const int64_t total = rows * words;
  for (int64_t k = global_thread(); k < total; k += grid_threads()) {
    const int64_t r = k / words, w = k % words;
    const uint32_t v = __ldg(words_in + k);
    uint8_t* dst = out + r * n + w * 32;
    const int64_t m = n - w * 32 < 32 ? n - w * 32 : 32;
    if (m == 32 && (reinterpret_cast<uintptr_t>(dst) & 15u) == 0) {
      uint32_t q[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        q[c] = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) q[c] |= ((v >> (4 * c + j)) & 1u) << (8 * j);
      }
      reinterpret_cast<uint4*>(dst)[0] = make_uint4(q[0], q[1], q[2], q[3]);
      reinterpret_cast<uint4*>(dst)[1] = make_uint4(q[4], q[5], q[6], q[7]);
    } else {
      for (int64_t j = 0; j < m; ++j) dst[j] = uint8_t((v >> j) & 1u);
    }
  }
}

template <int kTag>
void launch_elect(const ElectArgs& a, int blocks, size_t smem, cudaStream_t stream) {
  bind::check_cuda(cudaFuncSetAttribute(emr_elect_kernel<kTag>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)),
                   "cudaFuncSetAttribute(emr_elect_kernel)");
  emr_elect_kernel<kTag><<<blocks, kEmrThreads, smem, stream>>>(a);
  bind::check_launch("emr_elect_kernel");
}

}  // namespace

namespace api {

using namespace pymerge::cuda::bind;

int64_t n_words(int64_t n) { return (n + 31) / 32; }

// Blocks (rows of the partials buffer) emr_elect uses for numel elements.
int emr_elect_blocks(int64_t numel) { return emr_blocks(numel); }

// partials: device fp64 [emr_elect_blocks(numel), 2n] scratch; sums: device fp64 [2n]
// (sum |tau_i| for i < n, then sum a_i |u|).
void emr_elect(uintptr_t base_ptr, int base_dtype, const std::vector<uintptr_t>& in_ptrs,
               const std::vector<int>& in_dtypes, int64_t numel, bool zero_sign, uintptr_t u_ptr, int u_dtype,
               uintptr_t masks_ptr, uintptr_t partials_ptr, uintptr_t sums_ptr, uintptr_t stream) {
  const size_t n = in_ptrs.size();
  if (n == 0) fail("emr_elect: at least one model is needed");
  if (n > size_t(kMaxModels)) fail("emr_elect: at most " + std::to_string(kMaxModels) + " models per call");
  if (in_dtypes.size() != n) fail("emr_elect: in_ptrs and in_dtypes differ in length");
  if (numel < 0) fail("emr_elect: numel < 0");
  check_dtype(base_dtype, "base");
  check_dtype(u_dtype, "u");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "model " + std::to_string(i));
  if (numel == 0) return;
  check_ptr(base_ptr, "base");
  check_ptr(u_ptr, "u");
  check_ptr(masks_ptr, "masks");
  check_ptr(partials_ptr, "partials");
  check_ptr(sums_ptr, "sums");
  ElectArgs a{};
  bool vec = aligned16(reinterpret_cast<void*>(base_ptr)) && aligned16(reinterpret_cast<void*>(u_ptr));
  int common = in_dtypes[0];
  for (size_t i = 0; i < n; ++i) {
    check_ptr(in_ptrs[i], "model " + std::to_string(i));
    check_no_overlap(u_ptr, u_dtype, in_ptrs[i], in_dtypes[i], numel, "model " + std::to_string(i));
    a.models.ptr[i] = reinterpret_cast<const void*>(in_ptrs[i]);
    a.models.dtype[i] = int8_t(in_dtypes[i]);
    vec = vec && aligned16(a.models.ptr[i]);
    if (in_dtypes[i] != common) common = -1;
  }
  check_no_overlap(u_ptr, u_dtype, base_ptr, base_dtype, numel, "base");
  a.models.n = int(n);
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_dtype;
  a.u = reinterpret_cast<void*>(u_ptr);
  a.u_dtype = u_dtype;
  a.masks = mptr<uint32_t>(masks_ptr);
  a.words = n_words(numel);
  a.partials = mptr<double>(partials_ptr);
  a.numel = numel;
  a.zero_sign = zero_sign;
  a.vec = vec;
  const int blocks = emr_blocks(numel);
  const size_t smem = size_t(2 * n) * kEmrThreads * sizeof(double);
  const cudaStream_t s = stream_from(stream);
  switch (common) {
    case FLOAT32: launch_elect<FLOAT32>(a, blocks, smem, s); break;
    case FLOAT16: launch_elect<FLOAT16>(a, blocks, smem, s); break;
    case BFLOAT16: launch_elect<BFLOAT16>(a, blocks, smem, s); break;
    default: launch_elect<-1>(a, blocks, smem, s); break;
  }
  const int cols = int(2 * n);
  emr_sums_kernel<<<1, 128, 0, s>>>(a.partials, blocks, cols, mptr<double>(sums_ptr));
  check_launch("emr_sums_kernel");
}

void emr_reconstruct(uintptr_t out_ptr, int out_dtype, uintptr_t base_ptr, int base_dtype, uintptr_t u_ptr,
                     int u_dtype, uintptr_t words_ptr, int64_t numel, float lam, uintptr_t stream) {
  check_dtype(out_dtype, "out");
  check_dtype(base_dtype, "base");
  check_dtype(u_dtype, "u");
  if (numel < 0) fail("emr_reconstruct: numel < 0");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  check_ptr(base_ptr, "base");
  check_ptr(u_ptr, "u");
  check_ptr(words_ptr, "mask words");
  check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");
  check_no_overlap(out_ptr, out_dtype, u_ptr, u_dtype, numel, "u");
  ReconArgs a{};
  a.base = reinterpret_cast<const void*>(base_ptr);
  a.base_dtype = base_dtype;
  a.u = reinterpret_cast<const void*>(u_ptr);
  a.u_dtype = u_dtype;
  a.words = cptr<uint32_t>(words_ptr);
  a.out = reinterpret_cast<void*>(out_ptr);
  a.out_dtype = out_dtype;
  a.numel = numel;
  a.lam = lam;
  a.vec = aligned16(a.base) && aligned16(a.u) && aligned16(a.out);
  emr_reconstruct_kernel<<<grid_for(packs_of(numel), sm_count()), kThreads, 0, stream_from(stream)>>>(a);
  check_launch("emr_reconstruct_kernel");
}

void pack_bits(uintptr_t mask_ptr, int64_t rows, int64_t n, uintptr_t words_ptr, uintptr_t stream) {
  if (rows < 0 || n < 0) fail("pack_bits: negative size");
  const int64_t words = n_words(n);
  if (rows == 0 || words == 0) return;
  check_ptr(mask_ptr, "mask");
  check_ptr(words_ptr, "words");
  pack_bits_kernel<<<grid_for(rows * words, sm_count()), kThreads, 0, stream_from(stream)>>>(
      cptr<uint8_t>(mask_ptr), rows, n, words, mptr<uint32_t>(words_ptr));
  check_launch("pack_bits_kernel");
}

void unpack_bits(uintptr_t words_ptr, int64_t rows, int64_t n, uintptr_t out_ptr, uintptr_t stream) {
  if (rows < 0 || n < 0) fail("unpack_bits: negative size");
  const int64_t words = n_words(n);
  if (rows == 0 || words == 0) return;
  check_ptr(words_ptr, "words");
  check_ptr(out_ptr, "out");
  unpack_bits_kernel<<<grid_for(rows * words, sm_count()), kThreads, 0, stream_from(stream)>>>(
      cptr<uint32_t>(words_ptr), rows, n, words, mptr<uint8_t>(out_ptr));
  check_launch("unpack_bits_kernel");
}

}  // namespace api
}  // namespace cuda
}  // namespace pymerge

#if PYMERGE_CUDA_WITH_BINDINGS
PYMERGE_CUDA_BINDINGS(emr) {
  namespace py = pybind11;
  namespace api = pymerge::cuda::api;
  m.def("emr_elect_blocks", &api::emr_elect_blocks, py::arg("numel"),
        "Rows of the fp64 partials scratch emr_elect needs (2 * n_models columns).");
  m.def("emr_elect", &api::emr_elect, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("in_ptrs"),
        py::arg("in_dtypes"), py::arg("numel"), py::arg("zero_sign"), py::arg("u_ptr"), py::arg("u_dtype"),
        py::arg("masks_ptr"), py::arg("partials_ptr"), py::arg("sums_ptr"), py::arg("stream"),
        "u (u_dtype), the bit-planes int32 [n, ceil(numel/32)] and the fp64 sums [2n] (sum |tau_i|, then "
        "sum of |u| over model i's mask) of one tensor.");
  m.def("emr_reconstruct", &api::emr_reconstruct, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("base_ptr"),
        py::arg("base_dtype"), py::arg("u_ptr"), py::arg("u_dtype"), py::arg("words_ptr"), py::arg("numel"),
        py::arg("lam"), py::arg("stream"), "out = base + (M ? lam * u : +0) in fp32, rounded once to out_dtype.");
  m.def("pack_bits", &api::pack_bits, py::arg("mask_ptr"), py::arg("rows"), py::arg("n"), py::arg("words_ptr"),
        py::arg("stream"), "bool [rows, n] -> int32 words [rows, ceil(n/32)], bit j of word w = element 32w+j.");
  m.def("unpack_bits", &api::unpack_bits, py::arg("words_ptr"), py::arg("rows"), py::arg("n"), py::arg("out_ptr"),
        py::arg("stream"), "int32 words [rows, ceil(n/32)] -> bool [rows, n].");
}
#endif
