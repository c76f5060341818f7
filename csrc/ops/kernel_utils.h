#pragma once
// Helpers for the per-instruction-set kernel files (*_kernel.cpp). Include only from those:
// everything here lives in namespace bpt::cpu::<CPU_CAPABILITY> so copies built with different flags
// never meet at link time.

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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

}  // namespace bpt::cpu::CPU_CAPABILITY
