// Weighted sum of N model tensors, optionally as task vectors over a base
// (linear and task_arithmetic in specs/methods.md).
//
// Per element, in this exact fp32 order (the torch reference uses the same):
//   x_i = f32(theta_i) - f32(theta_0)   (with a base)   or   f32(theta_i)
//   acc = 0; for i in 0..N-1: acc = acc + (w_i * x_i)
//   out = f32(theta_0) + acc * c        (with a base)   or   acc * c
// rounded once (RNE) to the output dtype. Built with -ffp-contract=off so no
// multiply/add pair is fused.
//
// The data is walked in blocks of kBlock elements: the accumulator and the
// upcast base live in L1-sized stack buffers, each input is read once, and the
// per-dtype loops are plain enough for gcc to vectorise. Threads take pieces
// of kGrainBlocks blocks in turn (parallel_for_dynamic). On x86-64 an AVX2+F16C
// clone of the block loop is picked at run time (cpu/isa.h); the loop is
// memory-bound, so it has no AVX-512 clone.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream.h"
#include "cpu/bindings.h"
#include "cpu/isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define PYMERGE_FLATTEN __attribute__((flatten))
#else
#define PYMERGE_FLATTEN
#endif

namespace pymerge {
namespace cpu {

namespace {

// 2048 fp32 = 8 KiB per buffer: acc + base stay in L1 next to the streamed inputs.
constexpr int64_t kBlock = 2048;
// Pieces of 32 blocks (64K elements): enough work per piece to hide taking it.
constexpr int64_t kGrainBlocks = 32;

template <int T>
inline void load_block(float* __restrict dst, const void* src, int64_t off, int64_t n) {
  const auto* __restrict p = static_cast<const typename Dtype<T>::storage*>(src) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = Dtype<T>::load(p[j]);
}

// acc = (kFirst ? 0 : acc) + w_0 * x_0, then + w_1 * x_1, ... for kG models of
// dtype T in one pass (the accumulator stays in a register between models).
// The first model still adds to 0.0f, which turns a -0 product into +0,
// exactly as acc = zeros(); acc = acc + w*x does.
template <int T, bool kBase, bool kFirst, int kG>
inline void accumulate(float* __restrict acc, const float* __restrict b,
                       const void* const* srcs, const float* ws, int64_t off, int64_t n) {
  using S = typename Dtype<T>::storage;
  const S* p[kG];
  float w[kG];
  for (int g = 0; g < kG; ++g) {
    p[g] = static_cast<const S*>(srcs[g]) + off;
    w[g] = ws[g];
  }
  for (int64_t j = 0; j < n; ++j) {
    float s = kFirst ? 0.0f : acc[j];
    for (int g = 0; g < kG; ++g) {
      float x = Dtype<T>::load(p[g][j]);
      if constexpr (kBase) x = x - b[j];
      s = s + w[g] * x;
    }
    acc[j] = s;
  }
}

template <int T, bool kBase>
inline void finish(void* dst, int64_t off, const float* __restrict acc, const float* __restrict b,
                   int64_t n, float c) {
  auto* __restrict p = static_cast<typename Dtype<T>::storage*>(dst) + off;
  for (int64_t j = 0; j < n; ++j) {
    const float scaled = acc[j] * c;
    p[j] = Dtype<T>::store(kBase ? b[j] + scaled : scaled);
  }
}

struct Args {
  void* out;
  int out_dtype;
  const void* const* inputs;
  const int* in_dtypes;
  int64_t n_models;
  const void* base;
  int base_dtype;
  int64_t numel;
  const float* weights;
  float c;
  bool stream;  // output larger than the cache: written with streaming stores
};

#if defined(__x86_64__) && defined(__GNUC__)
#define PYMERGE_X86_CLONES 1
// Hardware fp16 conversions (F16C, RNE by immediate), used only inside the
// AVX2 clone. gcc 12 does not vectorise _Float16 conversions with F16C, hence
// the intrinsics. Same bits as the software path for every non-NaN value.
__attribute__((target("avx2,f16c"))) inline void fp16_block_to_f32(float* __restrict dst, const void* src,
                                                                 int64_t off, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(src) + off;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
  for (; j < n; ++j) dst[j] = _cvtsh_ss(p[j]);
}

__attribute__((target("avx2,f16c"))) inline void f32_block_to_fp16(void* dst, int64_t off,
                                                                 const float* __restrict src, int64_t n) {
  uint16_t* p = static_cast<uint16_t*>(dst) + off;
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), kRne));
  for (; j < n; ++j) p[j] = _cvtss_sh(src[j], kRne);
}
#endif

// kF16c: fp16 goes through the hardware converters into a staging buffer and
// the fp32 loops run on that; otherwise the software conversions are inlined.
template <bool kBase, bool kF16c>
void run_range(const Args& a, int64_t begin, int64_t end) {
  alignas(64) float acc[kBlock];
  alignas(64) float b[kBlock];
  alignas(64) float stage[kF16c ? kBlock : 1];
  alignas(64) uint16_t half[kF16c ? kBlock : 1];
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = std::min(kBlock, end - off);
    if constexpr (kBase) {
      dispatch_dtype(a.base_dtype, [&](auto t) {
        constexpr int T = decltype(t)::value;
#ifdef PYMERGE_X86_CLONES
        if constexpr (kF16c && T == FLOAT16) {
          fp16_block_to_f32(b, a.base, off, n);
          return;
        }
#endif
        load_block<T>(b, a.base, off, n);
      });
    }
    // Runs of models with one dtype go through in groups of 4, 2 or 1.
    for (int64_t i = 0; i < a.n_models;) {
      const int tag = a.in_dtypes[i];
      int64_t run = 1;
      while (run < 4 && i + run < a.n_models && a.in_dtypes[i + run] == tag) ++run;
      const bool first = i == 0;
#ifdef PYMERGE_X86_CLONES
      if (kF16c && tag == FLOAT16) {
        fp16_block_to_f32(stage, a.inputs[i], off, n);
        const void* staged = stage;
        if (first)
          accumulate<FLOAT32, kBase, true, 1>(acc, b, &staged, a.weights + i, 0, n);
        else
          accumulate<FLOAT32, kBase, false, 1>(acc, b, &staged, a.weights + i, 0, n);
        i += 1;
        continue;
      }
#endif
      const int group = run >= 4 ? 4 : run >= 2 ? 2 : 1;
      const void* const* srcs = a.inputs + i;
      const float* ws = a.weights + i;
      dispatch_dtype(tag, [&](auto t) {
        constexpr int T = decltype(t)::value;
        auto go = [&](auto g) {
          constexpr int G = decltype(g)::value;
          if (first)
            accumulate<T, kBase, true, G>(acc, b, srcs, ws, off, n);
          else
            accumulate<T, kBase, false, G>(acc, b, srcs, ws, off, n);
        };
        if (group == 4)
          go(std::integral_constant<int, 4>{});
        else if (group == 2)
          go(std::integral_constant<int, 2>{});
        else
          go(std::integral_constant<int, 1>{});
      });
      i += group;
    }
#ifdef PYMERGE_X86_CLONES
    if (kF16c && a.stream) {
      // Round into the (cache-resident) staging block, then stream it out.
      const int64_t size = int64_t(dtype_size(a.out_dtype));
      const void* rounded = stage;
      if (a.out_dtype == FLOAT16) {
        finish<FLOAT32, kBase>(stage, 0, acc, b, n, a.c);
        f32_block_to_fp16(half, 0, stage, n);
        rounded = half;
      } else {
        dispatch_dtype(a.out_dtype, [&](auto t) { finish<decltype(t)::value, kBase>(stage, 0, acc, b, n, a.c); });
      }
      stream_copy(static_cast<char*>(a.out) + off * size, rounded, n * size);
      continue;
    }
    if (kF16c && a.out_dtype == FLOAT16) {
      finish<FLOAT32, kBase>(stage, 0, acc, b, n, a.c);
      f32_block_to_fp16(a.out, off, stage, n);
      continue;
    }
#endif
    dispatch_dtype(a.out_dtype, [&](auto t) { finish<decltype(t)::value, kBase>(a.out, off, acc, b, n, a.c); });
  }
#ifdef PYMERGE_X86_CLONES
  if (kF16c && a.stream) stream_fence();
#endif
}

// One copy of the block loop per instruction set, chosen at run time: the
// build targets baseline x86-64, but the conversions and the fp32 arithmetic
// are elementwise IEEE operations, so wider vectors give the same bits
// (-ffp-contract=off keeps FMA out even where the target has it).
// `flatten` inlines the whole loop nest, so every loop is compiled for the
// clone's target.
using RangeFn = void (*)(const Args&, int64_t, int64_t);

PYMERGE_FLATTEN void range_generic(const Args& a, int64_t begin, int64_t end) {
  if (a.base != nullptr)
    run_range<true, false>(a, begin, end);
  else
    run_range<false, false>(a, begin, end);
}

#ifdef PYMERGE_X86_CLONES
PYMERGE_CLONE_AVX2 void range_avx2(const Args& a, int64_t begin, int64_t end) {
  if (a.base != nullptr)
    run_range<true, true>(a, begin, end);
  else
    run_range<false, true>(a, begin, end);
}
#endif

RangeFn range_fn() {
#ifdef PYMERGE_X86_CLONES
  if (use_avx2()) return range_avx2;
#endif
  return range_generic;
}

}  // namespace

// Preconditions (checked by the binding): n_models >= 1, valid dtype tags,
// buffers of numel elements each; out does not partially overlap an input.
void weighted_sum(void* out, int out_dtype, const void* const* inputs, const int* in_dtypes,
                  int64_t n_models, const void* base, int base_dtype, int64_t numel,
                  const float* weights, float c) {
  if (numel <= 0 || n_models <= 0) return;
  const RangeFn fn = range_fn();
  const bool stream = stream_output(numel, int64_t(dtype_size(out_dtype)));
  const Args a{out, out_dtype, inputs, in_dtypes, n_models, base, base_dtype, numel, weights, c, stream};
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  parallel_for_dynamic(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    fn(a, b0 * kBlock, std::min(b1 * kBlock, numel));
  });
}

}  // namespace cpu
}  // namespace pymerge

// ---------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------

namespace {

namespace py = pybind11;
using namespace pymerge::bind;

void weighted_sum_binding(uintptr_t out_ptr, int out_dtype, const std::vector<uintptr_t>& in_ptrs,
                  const std::vector<int>& in_dtypes, uintptr_t base_ptr, int base_dtype,
                  int64_t numel, const std::vector<float>& weights, float c) {
  const size_t n = in_ptrs.size();
  if (n == 0) throw py::value_error("weighted_sum: at least one input is needed");
  if (in_dtypes.size() != n || weights.size() != n)
    throw py::value_error("weighted_sum: " + std::to_string(n) + " inputs, " +
                          std::to_string(in_dtypes.size()) + " dtypes, " +
                          std::to_string(weights.size()) + " weights");
  if (numel < 0) throw py::value_error("weighted_sum: numel < 0");
  check_dtype(out_dtype, "out");
  for (size_t i = 0; i < n; ++i) check_dtype(in_dtypes[i], "input " + std::to_string(i));
  if (base_ptr != 0) check_dtype(base_dtype, "base");
  if (numel == 0) return;
  check_ptr(out_ptr, "out");
  for (size_t i = 0; i < n; ++i) {
    check_ptr(in_ptrs[i], "input " + std::to_string(i));
    check_no_overlap(out_ptr, out_dtype, in_ptrs[i], in_dtypes[i], numel, "input " + std::to_string(i));
  }
  if (base_ptr != 0) check_no_overlap(out_ptr, out_dtype, base_ptr, base_dtype, numel, "base");

  std::vector<const void*> inputs(n);
  for (size_t i = 0; i < n; ++i) inputs[i] = reinterpret_cast<const void*>(in_ptrs[i]);
  py::gil_scoped_release release;
  pymerge::cpu::weighted_sum(reinterpret_cast<void*>(out_ptr), out_dtype, inputs.data(),
                             in_dtypes.data(), int64_t(n), reinterpret_cast<const void*>(base_ptr),
                             base_dtype, numel, weights.data(), c);
}

}  // namespace

PYMERGE_BINDINGS(average) {
  m.def("weighted_sum", &weighted_sum_binding, py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptr"), py::arg("base_dtype"),
        py::arg("numel"), py::arg("weights"), py::arg("c"),
        "out = [base +] c * sum_i w_i * (x_i [- base]) in fp32, rounded once to out_dtype.\n"
        "Pointers are addresses of contiguous buffers of numel elements; base_ptr=0 means no "
        "base. weights and c are taken as fp32.");
}
