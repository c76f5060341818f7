#pragma once
// Helpers for the per-instruction-set kernel files (*_kernel.cpp). Include only from those:
// everything here lives in namespace bpt::cpu::<CPU_CAPABILITY> so copies built with different flags
// never meet at link time.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>

namespace bpt::cpu::CPU_CAPABILITY {

// A row of `n` values as opmath (fp32 for bf16/fp16, itself otherwise): points at `src`
// when no conversion is needed, else converts into `buf`.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
inline const opmath_t* load_opmath(const scalar_t* src, opmath_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

template <typename scalar_t, typename opmath_t>
inline void store_opmath(const opmath_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Runs body(next) once per ATen worker thread, where next() hands out the tasks 0 .. n-1, each
// to whichever thread asks first, then -1: dynamic scheduling, for tasks of unequal cost
// (causal blocks) or threads of unequal speed (shared cores). body sets up its per-thread
// scratch once, then loops `for (int64_t t; (t = next()) >= 0;)`.
template <typename Body>
void parallel_tasks(int64_t n, const Body& body) {
  std::atomic<int64_t> counter{0};
  const auto next = [&counter, n]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) body(next);
  });
}

}  // namespace bpt::cpu::CPU_CAPABILITY
