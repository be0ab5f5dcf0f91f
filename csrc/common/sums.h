// Reproducible fp64 sums for the CPU kernels: the order of every addition is a
// function of the sizes only, never of the thread count or instruction set.
//
// A block of values is summed in kSumLanes fixed lanes (element j in lane
// j % kSumLanes: two AVX-512 or four AVX2 accumulators, not one serial chain
// of dependent adds), the lanes then halved in a fixed tree; the per-block
// sums are added in block order with Neumaier compensation.
#pragma once

#include <cmath>
#include <cstdint>

namespace pymerge {

constexpr int kSumLanes = 16;

// sum_j value(j) over j < np (a multiple of kSumLanes), in the lane order above.
template <class Value>
inline double lane_sum(int64_t np, const Value& value) {
  double l[kSumLanes] = {};
  for (int64_t j = 0; j < np; j += kSumLanes)
    for (int k = 0; k < kSumLanes; ++k) l[k] += double(value(j + k));
  for (int w = kSumLanes / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) l[k] = l[k] + l[k + w];
  return l[0];
}

// Neumaier-compensated sum of v[0], v[stride], ... in order; a non-finite
// running sum is returned as it is (the compensation would turn inf into NaN).
inline double ordered_sum(const double* v, int64_t count, int64_t stride) {
  double s = 0.0, c = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    const double x = v[k * stride];
    const double t = s + x;
    c += std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  return std::isfinite(s) ? s + c : s;
}

}  // namespace pymerge
