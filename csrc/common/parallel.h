// parallel_for over std::thread with a process-wide thread-count knob.
//
// std::thread rather than OpenMP: torch ships its own libgomp, and a second
// OpenMP runtime in the same process fights it over threads.
//
// Chunking is a pure function of (n, grain, thread count): chunk t of k covers
// [t*n/k, (t+1)*n/k). Kernels are elementwise or reduce per chunk in a fixed
// order, so results do not depend on scheduling.
#pragma once

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace pymerge {

namespace detail {
// 0 means "not set": use the hardware default. Function-local static in an
// inline function: one instance for the whole extension module.
inline std::atomic<int>& num_threads_setting() {
  static std::atomic<int> value{0};
  return value;
}
}  // namespace detail

inline int default_num_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

inline int get_num_threads() {
  const int v = detail::num_threads_setting().load(std::memory_order_relaxed);
  return v > 0 ? v : default_num_threads();
}

// k < 1 restores the default (hardware concurrency).
inline void set_num_threads(int k) {
  detail::num_threads_setting().store(k > 0 ? k : 0, std::memory_order_relaxed);
}

namespace detail {
// Runs work(t) for t = 1 .. k-1 on new threads and work(0) on the calling one,
// then joins them. Workers run under the caller's floating-point environment
// (rounding mode, flush-to-zero), so the thread count cannot change results.
// Returns how many of the k ran: when the system cannot start another thread,
// work(t) for t >= the returned count was never called. work must not throw.
template <class Work>
int64_t run_workers(int64_t k, const Work& work) {
  std::fenv_t env;
  std::fegetenv(&env);
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(k - 1));
  int64_t started = 1;
  for (; started < k; ++started) {
    try {
      workers.emplace_back([&, t = started] {
        std::fesetenv(&env);
        work(t);
      });
    } catch (...) {
      break;
    }
  }
  work(int64_t(0));
  for (auto& w : workers) w.join();
  return started;
}
}  // namespace detail

// Calls fn(begin, end) over [0, n) in at most get_num_threads() contiguous
// chunks of at least `grain` items; with a single chunk it runs inline on the
// calling thread. Exceptions from any chunk are rethrown (the first by chunk
// index) after every chunk has finished.
template <class Fn>
void parallel_for(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t k = std::min<int64_t>(get_num_threads(), max_chunks);
  if (k <= 1) {
    fn(int64_t(0), n);
    return;
  }
  auto chunk_begin = [n, k](int64_t t) { return t * n / k; };
  std::vector<std::exception_ptr> errors(static_cast<size_t>(k));
  auto run_chunk = [&](int64_t t) {
    try {
      fn(chunk_begin(t), chunk_begin(t + 1));
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  // Chunks whose thread could not be started run on the caller.
  for (int64_t t = detail::run_workers(k, run_chunk); t < k; ++t) run_chunk(t);
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// For elementwise work only (the result of an item never depends on which call
// covers it): fn(begin, end) over pieces of `grain` items that up to
// get_num_threads() threads take in turn until none is left. A thread that is
// slowed down (a busy core, a descheduled vCPU) then holds up one piece, not a
// fixed share of the work. Exceptions: the first one thrown is rethrown after
// every thread has stopped; pieces not yet taken are skipped.
template <class Fn>
void parallel_for_dynamic(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t pieces = (n + grain - 1) / grain;
  const int64_t k = std::min<int64_t>(get_num_threads(), pieces);
  if (k <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::atomic_flag error_set = ATOMIC_FLAG_INIT;
  auto work = [&] {
    for (int64_t p; !failed.load(std::memory_order_relaxed) && (p = next.fetch_add(1)) < pieces;) {
      try {
        fn(p * grain, std::min(n, (p + 1) * grain));
      } catch (...) {
        if (!error_set.test_and_set()) error = std::current_exception();
        failed.store(true);
      }
    }
  };
  // Threads that could not be started leave their pieces to the others.
  detail::run_workers(k, [&](int64_t) { work(); });
  if (error) std::rethrow_exception(error);
}

}  // namespace pymerge
