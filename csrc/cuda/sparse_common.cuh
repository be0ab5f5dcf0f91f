// Exact selection on the GPU and the trim-merge machinery shared by
// ties.cu, breadcrumbs.cu, pcb.cu and histogram.cu.
//
// Selection (select_ranks): the key at a 0-based ascending rank of per-source
// 32-bit keys (|tau| bit patterns, order keys of fp32 values), computed on the
// fly from the inputs, without sorting: two passes of 16-bit digit
// histograms (high digit, then the low digit of the keys inside the chosen
// high bin), each followed by a one-block "locate" kernel. Results stay on
// the device (SelState), so a merge can follow without a host round trip.
//
// Histograms (digit_hist_kernel): 65536 bins do not fit in shared memory as
// 32-bit counters, so each block keeps 16-bit counters packed two per word
// (128 KiB) and flushes them into the global 64-bit histogram after every
// tile of kHistTile < 65536 elements, so a counter cannot overflow. Equal bins
// within a warp are merged first (__match_any_sync), so runs of equal keys
// (16-bit deltas, zeros) cost one shared atomic per warp. Only integer
// atomics: the counts do not depend on timing. Devices whose per-block
// shared memory is smaller split the bins over blockIdx.z.
//
// Exact-k trims (trim_merge): select.h's rule, k largest keys with ties at
// the threshold kept lower flat index first. When a threshold's run of equal
// keys is split, a counting pass gives each merge tile the number of equal
// keys before it (per-tile counts and an exclusive scan, both deterministic);
// the merge kernel then decides the one tile where the cut falls with a
// block-wide scan in flat index order. Everything else is decided per
// element from the threshold alone.
//
// Numerics: the fp32 op order of the torch reference (see csrc/cpu/
// sparse_common.h), every operation a rounded intrinsic (common.cuh), never
// contracted into an FMA.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cuda/bindings.cuh"
#include "cuda/common.cuh"

namespace pymerge {
namespace cuda {
namespace sparse {

constexpr int kMaxRequests = 2 * kMaxModels;  // breadcrumbs: two trims per model
constexpr int kBins = 65536;
constexpr uint32_t kInfKey = 0x7F800000u;
constexpr uint32_t kMagNanKey = 0x7F800001u;  // every NaN of |tau| (torch.sort: above inf)
constexpr uint32_t kTopKey = 0xFFFFFFFFu;     // NaN of the histogram ops and of order keys
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// ---- keys -------------------------------------------------------------------------

enum KeyKind {
  kMagKey = 0,     // |x| bits, NaN -> kMagNanKey (ties, breadcrumbs)
  kAbsKey = 1,     // |x| bits as they are (pcb clip bounds: the values are read back)
  kAbsNanKey = 2,  // |x| bits, NaN -> kTopKey (abs_tau_histogram)
};

template <int kKind>
__device__ __forceinline__ uint32_t abs_kind_key(float x) {
  const uint32_t k = __float_as_uint(x) & 0x7FFFFFFFu;
  if (kKind == kMagKey) return k < kMagNanKey ? k : kMagNanKey;
  if (kKind == kAbsNanKey) return x != x ? kTopKey : k;
  return k;
}

// Order key of an fp32 value: unsigned order == numeric order; -0 as +0, NaN -> kTopKey.
__device__ __forceinline__ uint32_t value_key(float x) {
  const uint32_t b = __float_as_uint(fadd(x, 0.0f));
  const uint32_t k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return x != x ? kTopKey : k;
}

__host__ __device__ __forceinline__ float value_from_key(uint32_t k) {
  if (k == kTopKey) return f32_from_bits(0x7FC00000u);
  return f32_from_bits((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Key sources: keys of kPack consecutive elements of source s, starting at i0
// (a multiple of kPack); elements past numel get key 0 and must be masked.

// |f32(theta_s) - f32(theta_0)| of model s.
template <int kKind>
struct TauKeys {
  Models models;
  const void* base;
  int base_dtype;
  int64_t numel;
  bool vec;

  __device__ __forceinline__ void pack(int s, int64_t i0, uint32_t (&k)[kPack]) const {
    float b[kPack], x[kPack];
    load_pack(base, base_dtype, i0, numel, vec, b);
    load_pack(models.ptr[s], models.dtype[s], i0, numel, vec, x);
#pragma unroll
    for (int j = 0; j < kPack; ++j) k[j] = abs_kind_key<kKind>(fsub(x[j], b[j]));
  }
};

// Order keys of row s of an fp32 [rows, numel] buffer.
struct RowKeys {
  const float* data;
  int64_t numel;
  bool vec;  // data 16-byte aligned and numel % 4 == 0: every row is aligned

  __device__ __forceinline__ void pack(int s, int64_t i0, uint32_t (&k)[kPack]) const {
    float x[kPack];
    load_pack(data + s * numel, FLOAT32, i0, numel, vec, x);
#pragma unroll
    for (int j = 0; j < kPack; ++j) k[j] = value_key(x[j]);
  }
};

// ---- block scan -------------------------------------------------------------------

// Exclusive prefix of v over the block in thread order (blockDim.x a multiple
// of 32); total = the block's sum. scratch: 32 values of shared memory. Every
// thread of the block must call it.
template <class T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = int(blockDim.x >> 5);
  T x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) scratch[lane] = w;
  }
  __syncthreads();
  total = scratch[warps - 1];
  return (warp ? scratch[warp - 1] : T(0)) + x - v;
}

// ---- digit histograms ---------------------------------------------------------------

constexpr int kHistThreads = 1024;
constexpr int kHistSteps = 7;  // packs per thread per tile
constexpr int64_t kHistTile = int64_t(kHistThreads) * kPack * kHistSteps;  // 57344 < 65536
constexpr uint32_t kNoBin = 0xFFFFFFFFu;

// Where the selection of one request stands (device memory).
struct SelState {
  uint32_t prefix;  // high digit of the key at the rank
  uint32_t key;     // the key at the rank
  int64_t below;    // keys below the high bin
  int64_t less;     // keys below the key
  int64_t equal;    // keys equal to the key
};

struct HistJob {
  unsigned long long* out;  // [slots][kBins], zeroed by the caller
  int64_t numel;
  int shift;                 // 16: high digit of every key; 0: low digit of the keys whose high digit is the prefix
  const SelState* prefixes;  // shift 0: slot s filters on prefixes[state_of[s]].prefix (nullptr: on `prefix`)
  uint32_t prefix;
  int parts;                        // the bins are split over blockIdx.z
  int8_t source[kMaxRequests];      // key source of each slot (blockIdx.y)
  int16_t state_of[kMaxRequests];
};

template <class Src>
__global__ void __launch_bounds__(kHistThreads, 1)
    digit_hist_kernel(const __grid_constant__ Src src, const __grid_constant__ HistJob job) {
  extern __shared__ uint32_t packed[];  // two 16-bit counters per word
  const int slot = int(blockIdx.y);
  const uint32_t part_bins = uint32_t(kBins / job.parts);
  const int words = int(part_bins / 2);
  const uint32_t bin0 = blockIdx.z * part_bins;
  const int s = job.source[slot];
  const bool filter = job.shift == 0;
  uint32_t prefix = 0;
  if (filter) prefix = job.prefixes ? job.prefixes[job.state_of[slot]].prefix : job.prefix;
  unsigned long long* out = job.out + int64_t(slot) * kBins + bin0;

  for (int w = threadIdx.x; w < words; w += blockDim.x) packed[w] = 0u;
  __syncthreads();
  const int64_t tiles = (job.numel + kHistTile - 1) / kHistTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int hit = 0;
    for (int step = 0; step < kHistSteps; ++step) {
      const int64_t i0 = t * kHistTile + (int64_t(step) * kHistThreads + threadIdx.x) * kPack;
      uint32_t k[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) k[j] = 0u;
      if (i0 < job.numel) src.pack(s, i0, k);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        uint32_t bin = kNoBin;
        if (i0 + j < job.numel && (!filter || (k[j] >> 16) == prefix)) {
          const uint32_t d = ((k[j] >> job.shift) & 0xFFFFu) - bin0;
          if (d < part_bins) bin = d;
        }
        // Every lane reaches this (no early exit above): one atomic per distinct bin in the warp.
        const unsigned peers = __match_any_sync(kFullMask, bin);
        if (bin != kNoBin && int(threadIdx.x & 31) == __ffs(peers) - 1) {
          atomicAdd(&packed[bin >> 1], uint32_t(__popc(peers)) << ((bin & 1u) * 16));
          hit = 1;
        }
      }
    }
    // Flush (and clear) before any counter can reach 65536.
    if (__syncthreads_or(hit)) {
      for (int w = threadIdx.x; w < words; w += blockDim.x) {
        const uint32_t v = packed[w];
        if (v) {
          packed[w] = 0u;
          if (v & 0xFFFFu) atomicAdd(out + 2 * w, (unsigned long long)(v & 0xFFFFu));
          if (v >> 16) atomicAdd(out + 2 * w + 1, (unsigned long long)(v >> 16));
        }
      }
      __syncthreads();
    }
  }
}

// Launches digit_hist_kernel over `slots` histograms; job.out must be zeroed.
template <class Src>
void launch_hist(const Src& src, HistJob job, int slots, cudaStream_t stream) {
  if (job.numel <= 0 || slots <= 0) return;
  int dev = 0, optin = 0;
  bind::check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  bind::check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                   "cudaDeviceGetAttribute");
  int parts = 1;
  while (parts < 64 && size_t(kBins / parts / 2) * sizeof(uint32_t) > size_t(optin)) parts *= 2;
  job.parts = parts;
  const size_t smem = size_t(kBins / parts / 2) * sizeof(uint32_t);
  bind::check_cuda(
      cudaFuncSetAttribute(digit_hist_kernel<Src>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
      "cudaFuncSetAttribute");
  // One block per SM fits (128 KiB each); one wave over all slots and parts,
  // so the blocks of different models read the same tiles at about the same
  // time and the base comes from L2 after the first.
  const int64_t tiles = (job.numel + kHistTile - 1) / kHistTile;
  const int64_t sms = bind::sm_count();
  int64_t per = (sms + int64_t(slots) * parts - 1) / (int64_t(slots) * parts);
  if (per > tiles) per = tiles;
  if (per < 1) per = 1;
  const dim3 grid{static_cast<unsigned>(per), static_cast<unsigned>(slots), static_cast<unsigned>(parts)};
  digit_hist_kernel<Src><<<grid, kHistThreads, smem, stream>>>(src, job);
  bind::check_launch("digit_hist_kernel");
}

// ---- locating a rank in a histogram ------------------------------------------------------

struct LocateJob {
  const unsigned long long* hist;  // [slots][kBins]
  SelState* state;
  int low;                         // 0: high digit (sets prefix, below); 1: low digit (key, less, equal)
  int16_t slot[kMaxRequests];      // histogram of each request (blockIdx.x)
  int16_t out[kMaxRequests];       // state index of each request
  int64_t rank[kMaxRequests];      // 0-based ascending rank among all keys of the source
};

constexpr int kLocateThreads = 1024;

template <int kUnused = 0>
__global__ void __launch_bounds__(kLocateThreads) locate_kernel(const __grid_constant__ LocateJob job) {
  __shared__ unsigned long long scratch[32];
  __shared__ unsigned long long found_bin, found_below;
  const int r = int(blockIdx.x);
  const unsigned long long* h = job.hist + int64_t(job.slot[r]) * kBins;
  SelState* st = job.state + job.out[r];
  const unsigned long long rank =
      (unsigned long long)(job.rank[r] - (job.low ? st->below : int64_t(0)));
  constexpr int per = kBins / kLocateThreads;
  const int b0 = int(threadIdx.x) * per;
  unsigned long long s = 0;
  for (int b = 0; b < per; ++b) s += h[b0 + b];
  if (threadIdx.x == 0) found_bin = found_below = 0;
  unsigned long long total;
  const unsigned long long excl = block_exclusive_scan(s, scratch, total);
  if (rank >= excl && rank < excl + s) {  // exactly one thread
    unsigned long long c = excl;
    for (int b = 0; b < per; ++b) {
      const unsigned long long hb = h[b0 + b];
      if (rank < c + hb) {
        found_bin = (unsigned long long)(b0 + b);
        found_below = c;
        break;
      }
      c += hb;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (job.low) {
      st->key = (st->prefix << 16) | uint32_t(found_bin);
      st->less = st->below + int64_t(found_below);
      st->equal = int64_t(h[found_bin]);
    } else {
      st->prefix = uint32_t(found_bin);
      st->below = int64_t(found_below);
    }
  }
}

struct SelRequest {
  int source;    // key source (model / row)
  int64_t rank;  // 0 <= rank < numel
  int out;       // index of its SelState
};

// state[req.out] = the key at req.rank of source req.source's keys, for every
// request (at most kMaxRequests). Stream-ordered; no host synchronisation.
template <class Src>
void select_ranks(const Src& src, int64_t numel, const std::vector<SelRequest>& reqs, SelState* state,
                  cudaStream_t stream) {
  if (reqs.empty() || numel <= 0) return;
  const int R = int(reqs.size());
  // Sweep 1: one high-digit histogram per distinct source.
  std::vector<int> sources;
  std::vector<int> slot_of(reqs.size());
  for (int r = 0; r < R; ++r) {
    int found = -1;
    for (size_t q = 0; q < sources.size(); ++q)
      if (sources[q] == reqs[r].source) found = int(q);
    if (found < 0) {
      found = int(sources.size());
      sources.push_back(reqs[r].source);
    }
    slot_of[r] = found;
  }
  const int S = int(sources.size());
  bind::DeviceBuffer high(size_t(S) * kBins * sizeof(unsigned long long), stream);
  bind::check_cuda(cudaMemsetAsync(high.as<void>(), 0, size_t(S) * kBins * sizeof(unsigned long long), stream),
                   "cudaMemsetAsync");
  HistJob hj{};
  hj.out = high.as<unsigned long long>();
  hj.numel = numel;
  hj.shift = 16;
  for (int q = 0; q < S; ++q) hj.source[q] = int8_t(sources[q]);
  launch_hist(src, hj, S, stream);

  LocateJob lj{};
  lj.hist = high.as<unsigned long long>();
  lj.state = state;
  lj.low = 0;
  for (int r = 0; r < R; ++r) {
    lj.slot[r] = int16_t(slot_of[r]);
    lj.out[r] = int16_t(reqs[r].out);
    lj.rank[r] = reqs[r].rank;
  }
  locate_kernel<><<<R, kLocateThreads, 0, stream>>>(lj);
  bind::check_launch("locate_kernel");

  // Sweep 2: one low-digit histogram per request, inside its high bin.
  bind::DeviceBuffer low(size_t(R) * kBins * sizeof(unsigned long long), stream);
  bind::check_cuda(cudaMemsetAsync(low.as<void>(), 0, size_t(R) * kBins * sizeof(unsigned long long), stream),
                   "cudaMemsetAsync");
  HistJob lo{};
  lo.out = low.as<unsigned long long>();
  lo.numel = numel;
  lo.shift = 0;
  lo.prefixes = state;
  for (int r = 0; r < R; ++r) {
    lo.source[r] = int8_t(reqs[r].source);
    lo.state_of[r] = int16_t(reqs[r].out);
  }
  launch_hist(src, lo, R, stream);

  lj.hist = low.as<unsigned long long>();
  lj.low = 1;
  for (int r = 0; r < R; ++r) lj.slot[r] = int16_t(r);
  locate_kernel<><<<R, kLocateThreads, 0, stream>>>(lj);
  bind::check_launch("locate_kernel");
}

// ---- trims and the fused merge -------------------------------------------------------------

constexpr int kMergeSteps = 4;
constexpr int64_t kMergeTile = int64_t(kMergeSteps) * kThreads * kPack;  // 8192 elements per block

enum TrimMode : int8_t { kTrimNone = 0, kTrimAll = 1, kTrimActive = 2 };
// Per-tile keep rules.
enum RuleKind : int8_t { kKeepNone = 0, kKeepAll = 1, kKeepGe = 2, kKeepGt = 3, kKeepStraddle = 4 };

// Requests r = 0..n_req-1 trim model r % n (breadcrumbs: r >= n are the dropped outliers).
struct TrimJob {
  Models models;
  const void* base;
  int base_dtype;
  void* out;
  int out_dtype;
  int64_t numel;
  int64_t tiles;
  bool vec;
  bool inclusive;  // keep every key >= the threshold (and <= inf), no index tie-break
  int n_req;
  int8_t mode[kMaxRequests];
  int64_t k[kMaxRequests];
  const SelState* state;  // [n_req]
  int* counts;            // [n_req][tiles]: threshold-equal keys per tile (split requests only)
  int64_t* offsets;       // [n_req][tiles + 1]: their exclusive prefix
};

struct Rule {
  int kind;
  uint32_t thr, maxk;
  int64_t take;  // split: threshold-equal keys to keep (the first ones in index order)
};

// The rule of request r before the tie-break: kKeepStraddle stands for "split".
__device__ __forceinline__ Rule rule_of(const TrimJob& job, int r) {
  Rule u{kKeepNone, 0u, kTopKey, 0};
  if (job.mode[r] == kTrimNone) return u;
  if (job.mode[r] == kTrimAll) {
    u.kind = kKeepAll;
    return u;
  }
  const SelState st = job.state[r];
  u.thr = st.key;
  u.kind = kKeepGe;
  if (job.inclusive) {
    u.maxk = kInfKey;  // |tau| >= t excludes NaN
    return u;
  }
  const int64_t greater = job.numel - st.less - st.equal;
  u.take = job.k[r] - greater;
  if (u.take < st.equal) u.kind = kKeepStraddle;
  return u;
}

__device__ __forceinline__ uint32_t valid_bits(int64_t i0, int64_t numel) {
  const int64_t left = numel - i0;
  return left >= kPack ? (1u << kPack) - 1u : (left <= 0 ? 0u : (1u << left) - 1u);
}

// Threshold-equal keys per merge tile, for every request whose run of equal
// keys is split (the others are skipped: a block-uniform test per request).
template <int kUnused = 0>
__global__ void __launch_bounds__(kThreads) count_equal_kernel(const __grid_constant__ TrimJob job) {
  __shared__ int scratch[32];
  TauKeys<kMagKey> src{job.models, job.base, job.base_dtype, job.numel, job.vec};
  for (int r = 0; r < job.n_req; ++r) {
    const Rule u = rule_of(job, r);
    if (u.kind != kKeepStraddle) continue;
    const int m = r % job.models.n;
    int c = 0;
    for (int step = 0; step < kMergeSteps; ++step) {
      const int64_t i0 = int64_t(blockIdx.x) * kMergeTile + (int64_t(step) * kThreads + threadIdx.x) * kPack;
      if (i0 >= job.numel) break;
      uint32_t k[kPack];
      src.pack(m, i0, k);
      const uint32_t valid = valid_bits(i0, job.numel);
#pragma unroll
      for (int j = 0; j < kPack; ++j) c += int(((valid >> j) & 1u) && k[j] == u.thr);
    }
    int total;
    block_exclusive_scan(c, scratch, total);
    if (threadIdx.x == 0) job.counts[int64_t(r) * job.tiles + blockIdx.x] = total;
  }
}

template <int kUnused = 0>
__global__ void __launch_bounds__(kLocateThreads) scan_counts_kernel(const __grid_constant__ TrimJob job) {
  __shared__ long long scratch[32];
  const int r = int(blockIdx.x);
  if (rule_of(job, r).kind != kKeepStraddle) return;
  const int* c = job.counts + int64_t(r) * job.tiles;
  int64_t* o = job.offsets + int64_t(r) * (job.tiles + 1);
  long long running = 0;
  for (int64_t t0 = 0; t0 < job.tiles; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const long long v = t < job.tiles ? c[t] : 0;
    long long total;
    const long long excl = block_exclusive_scan(v, scratch, total);
    if (t < job.tiles) o[t] = running + excl;
    running += total;
  }
  if (threadIdx.x == 0) o[job.tiles] = running;
}

// Per-block rules of the current tile.
struct TileRules {
  uint32_t thr[kMaxRequests];
  uint32_t maxk[kMaxRequests];
  int64_t take[kMaxRequests];
  int64_t seen[kMaxRequests];  // straddle: threshold-equal keys before the current step
  int8_t kind[kMaxRequests];
  long long scratch[32];
};

__device__ __forceinline__ void load_tile_rules(const TrimJob& job, TileRules& tr) {
  for (int r = threadIdx.x; r < job.n_req; r += blockDim.x) {
    Rule u = rule_of(job, r);
    int64_t seen = 0;
    if (u.kind == kKeepStraddle) {
      const int64_t* o = job.offsets + int64_t(r) * (job.tiles + 1) + blockIdx.x;
      const int64_t before = o[0], after = o[1];
      if (after <= u.take) {
        u.kind = kKeepGe;  // every equal key of this tile is among the first take
      } else if (before >= u.take) {
        u.kind = kKeepGt;  // none is
      } else {
        seen = before;
      }
    }
    tr.thr[r] = u.thr;
    tr.maxk[r] = u.maxk;
    tr.take[r] = u.take;
    tr.seen[r] = seen;
    tr.kind[r] = int8_t(u.kind);
  }
  __syncthreads();
}

// Keep bits (bit j: element i0 + j) of request r for this thread's pack, in
// flat index order across the block. Every thread of the block must call it
// with the same r (the straddle case scans over the block).
__device__ __forceinline__ uint32_t keep_bits(TileRules& tr, int r, const uint32_t (&key)[kPack], uint32_t valid) {
  const int kind = tr.kind[r];
  const uint32_t thr = tr.thr[r];
  uint32_t bits = 0;
  switch (kind) {
    case kKeepNone: return 0u;
    case kKeepAll: return (1u << kPack) - 1u;
    case kKeepGe: {
      const uint32_t mx = tr.maxk[r];
#pragma unroll
      for (int j = 0; j < kPack; ++j) bits |= uint32_t(key[j] >= thr && key[j] <= mx) << j;
      return bits;
    }
    case kKeepGt: {
#pragma unroll
      for (int j = 0; j < kPack; ++j) bits |= uint32_t(key[j] > thr) << j;
      return bits;
    }
    default: break;
  }
  uint32_t eq = 0;
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    eq |= uint32_t(key[j] == thr) << j;
    bits |= uint32_t(key[j] > thr) << j;
  }
  eq &= valid;
  __syncthreads();  // tr.seen[r] of the previous step is written
  const int64_t before = tr.seen[r];
  long long total;
  const long long excl = block_exclusive_scan((long long)__popc(eq), tr.scratch, total);
  int64_t rank = before + excl;
  const int64_t take = tr.take[r];
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    if ((eq >> j) & 1u) {
      bits |= uint32_t(rank < take) << j;
      ++rank;
    }
  }
  if (threadIdx.x == 0) tr.seen[r] = before + total;  // every thread read `before` before the scan's barriers
  return bits;
}

// Combiners (the torch reference's fp32 op order; see csrc/cpu/sparse_common.h).
enum CombineKind { kLinear = 0, kTiesSum = 1, kTiesCount = 2 };

struct CombineArgs {
  float w[kMaxModels];
  float scale;  // linear: c; ties: lambda
  bool normalize;
};

// One element's accumulators. TIES elects the sign after all models, so both
// candidate sums (positive and negative entries) are accumulated in model
// order; the one of the elected sign is exactly the reference's masked sum.
template <int kCombine>
struct Acc {
  float s = 0.0f, pos = 0.0f, neg = 0.0f, wpos = 0.0f, wneg = 0.0f;
  int cnt = 0;

  __device__ __forceinline__ void add(float w, float th, bool normalize) {
    const float d = fmul(w, th);
    if (kCombine == kLinear) {
      s = fadd(s, d);
      return;
    }
    if (kCombine == kTiesSum) s = fadd(s, d);
    else cnt += int(d > 0.0f) - int(d < 0.0f);  // sign(NaN) = 0
    const uint32_t p = mask_of(d > 0.0f), n = mask_of(d < 0.0f);
    pos = fadd(pos, masked(d, p));
    neg = fadd(neg, masked(d, n));
    if (normalize) {
      wpos = fadd(wpos, masked(w, p));
      wneg = fadd(wneg, masked(w, n));
    }
  }

  __device__ __forceinline__ float result(float b, float scale, bool normalize) const {
    if (kCombine == kLinear) return fadd(b, fmul(s, scale));
    const bool up = kCombine == kTiesSum ? s >= 0.0f : cnt >= 0;  // NaN sum: -1
    float mixed = up ? pos : neg;
    if (normalize) {
      const float div = up ? wpos : wneg;
      mixed = fdiv(mixed, div == 0.0f ? 1.0f : div);
    }
    return fadd(b, fmul(mixed, scale));
  }
};

// One tile of kMergeTile elements per block: trim every model (kHi: minus the
// outlier trim r = n + i), combine, round once.
template <int kCombine, bool kHi>
__global__ void __launch_bounds__(kThreads) trim_merge_kernel(const __grid_constant__ TrimJob job,
                                                               const __grid_constant__ CombineArgs ca) {
  __shared__ TileRules tr;
  load_tile_rules(job, tr);
  const int n = job.models.n;
  for (int step = 0; step < kMergeSteps; ++step) {
    // Threads past the end still run the loop: the straddle scans need them all.
    const int64_t i0 = int64_t(blockIdx.x) * kMergeTile + (int64_t(step) * kThreads + threadIdx.x) * kPack;
    const uint32_t valid = valid_bits(i0, job.numel);
    float b[kPack];
    load_pack(job.base, job.base_dtype, i0, job.numel, job.vec, b);
    Acc<kCombine> acc[kPack];
    for (int i = 0; i < n; ++i) {
      float x[kPack];
      load_pack(job.models.ptr[i], job.models.dtype[i], i0, job.numel, job.vec, x);
      uint32_t key[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        x[j] = fsub(x[j], b[j]);
        key[j] = abs_kind_key<kMagKey>(x[j]);
      }
      uint32_t keep = keep_bits(tr, i, key, valid);
      if (kHi) keep &= ~keep_bits(tr, n + i, key, valid);
      const float w = ca.w[i];
#pragma unroll
      for (int j = 0; j < kPack; ++j) acc[j].add(w, masked(x[j], mask_of((keep >> j) & 1u)), ca.normalize);
    }
    if (valid) {
      float o[kPack];
#pragma unroll
      for (int j = 0; j < kPack; ++j) o[j] = acc[j].result(b[j], ca.scale, ca.normalize);
      store_pack(job.out, job.out_dtype, i0, job.numel, job.vec, o);
    }
  }
}

// The whole per-tensor trim merge: selection of every active request, the
// tie-break counts where a run of equal keys is split, then the fused merge.
// job: everything but tiles/state/counts/offsets. Requests with mode
// kTrimActive need 0 < k < numel.
template <int kCombine, bool kHi>
void trim_merge(TrimJob job, const CombineArgs& ca, cudaStream_t stream) {
  if (job.numel <= 0) return;
  job.tiles = (job.numel + kMergeTile - 1) / kMergeTile;
  std::vector<SelRequest> reqs;
  bool any = false;
  for (int r = 0; r < job.n_req; ++r) any = any || job.mode[r] == kTrimActive;
  const size_t R = size_t(job.n_req);
  bind::DeviceBuffer state(any ? R * sizeof(SelState) : 0, stream);
  bind::DeviceBuffer counts(any ? R * size_t(job.tiles) * sizeof(int) : 0, stream);
  bind::DeviceBuffer offsets(any ? R * size_t(job.tiles + 1) * sizeof(int64_t) : 0, stream);
  SelState* states = state.as<SelState>();
  job.state = states;
  job.counts = counts.as<int>();
  job.offsets = offsets.as<int64_t>();
  if (any) {
    // The states of inactive requests are never read.
    for (int r = 0; r < job.n_req; ++r)
      if (job.mode[r] == kTrimActive) reqs.push_back(SelRequest{r % job.models.n, job.numel - job.k[r], r});
    TauKeys<kMagKey> src{job.models, job.base, job.base_dtype, job.numel, job.vec};
    select_ranks(src, job.numel, reqs, states, stream);
    if (!job.inclusive) {
      count_equal_kernel<><<<static_cast<unsigned>(job.tiles), kThreads, 0, stream>>>(job);
      bind::check_launch("count_equal_kernel");
      scan_counts_kernel<><<<job.n_req, kLocateThreads, 0, stream>>>(job);
      bind::check_launch("scan_counts_kernel");
    }
  }
  trim_merge_kernel<kCombine, kHi><<<unsigned(job.tiles), kThreads, 0, stream>>>(job, ca);
  bind::check_launch("trim_merge_kernel");
}

}  // namespace sparse
}  // namespace cuda
}  // namespace pymerge

// ---- binding helpers --------------------------------------------------------------------------

namespace pymerge {
namespace cuda {
namespace sparse {

// The checked buffers of one tensor's merge (base + N models, numel elements
// each, device addresses), as kernel arguments.
class SparseArgs {
 public:
  SparseArgs(const std::string& op, const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes,
             uintptr_t base_ptr, int base_dtype, int64_t numel)
      : op_(op), in_ptrs_(in_ptrs), dtypes_(in_dtypes), base_(base_ptr), base_dtype_(base_dtype), numel_(numel) {
    const size_t n = in_ptrs.size();
    if (n == 0) throw std::invalid_argument(op + ": at least one model tensor is needed");
    if (n > size_t(kMaxModels))
      throw std::invalid_argument(op + ": at most " + std::to_string(kMaxModels) + " models per call, got " +
                            std::to_string(n));
    if (in_dtypes.size() != n)
      throw std::invalid_argument(op + ": " + std::to_string(n) + " inputs, " + std::to_string(in_dtypes.size()) +
                            " dtypes");
    if (numel < 0) throw std::invalid_argument(op + ": numel < 0");
    for (size_t i = 0; i < n; ++i) bind::check_dtype(in_dtypes[i], op + ": input " + std::to_string(i));
    bind::check_dtype(base_dtype, op + ": base");
    if (numel > 0) {
      for (size_t i = 0; i < n; ++i) bind::check_ptr(in_ptrs[i], op + ": input " + std::to_string(i));
      bind::check_ptr(base_ptr, op + ": base");
    }
  }

  size_t n() const { return in_ptrs_.size(); }
  int64_t numel() const { return numel_; }

  template <class T>
  void check_per_model(const std::vector<T>& v, const char* what) const {
    if (v.size() != n())
      throw std::invalid_argument(op_ + ": " + std::to_string(v.size()) + " " + what + " for " +
                                  std::to_string(n()) + " models");
  }

  // The output may alias an input exactly (each element is read before it is
  // written, by the same thread), never overlap it partially.
  void check_out(uintptr_t out_ptr, int out_dtype) const {
    bind::check_dtype(out_dtype, op_ + ": out");
    if (numel_ == 0) return;
    bind::check_ptr(out_ptr, op_ + ": out");
    for (size_t i = 0; i < n(); ++i)
      bind::check_no_overlap(out_ptr, out_dtype, in_ptrs_[i], dtypes_[i], numel_, "input " + std::to_string(i));
    bind::check_no_overlap(out_ptr, out_dtype, base_, base_dtype_, numel_, "base");
  }

  Models models() const {
    Models m{};
    for (size_t i = 0; i < n(); ++i) {
      m.ptr[i] = reinterpret_cast<const void*>(in_ptrs_[i]);
      m.dtype[i] = int8_t(dtypes_[i]);
    }
    m.n = int(n());
    return m;
  }

  const void* base() const { return reinterpret_cast<const void*>(base_); }
  int base_dtype() const { return base_dtype_; }

  // Every input (and out, when given) 16-byte aligned: packs move as vectors.
  bool vec(uintptr_t out_ptr = 0) const {
    bool v = aligned16(base()) && (out_ptr == 0 || aligned16(reinterpret_cast<const void*>(out_ptr)));
    for (uintptr_t p : in_ptrs_) v = v && aligned16(reinterpret_cast<const void*>(p));
    return v;
  }

  // A TrimJob over these inputs writing out (requests still to be filled in).
  TrimJob trim_job(uintptr_t out_ptr, int out_dtype) const {
    TrimJob j{};
    j.models = models();
    j.base = base();
    j.base_dtype = base_dtype_;
    j.out = reinterpret_cast<void*>(out_ptr);
    j.out_dtype = out_dtype;
    j.numel = numel_;
    j.vec = vec(out_ptr);
    return j;
  }

 private:
  std::string op_;
  std::vector<uintptr_t> in_ptrs_;
  std::vector<int> dtypes_;
  uintptr_t base_;
  int base_dtype_;
  int64_t numel_;
};

// A request's trim mode for "keep the k largest" of numel keys.
inline int8_t trim_mode(int64_t k, int64_t numel) {
  if (k <= 0 || numel <= 0) return kTrimNone;
  if (k >= numel) return kTrimAll;
  return kTrimActive;
}

}  // namespace sparse
}  // namespace cuda
}  // namespace pymerge
