#pragma once
// CPU kernels are compiled once per instruction set (DEFAULT, AVX2, AVX512), each copy in
// namespace bpt::cpu::<CPU_CAPABILITY> (see bpt_add_cpu_kernels in CMakeLists.txt), so the
// default build needs no -march flag. At run time the copy matching ATen's own choice is
// used: at::get_cpu_capability(), which honours the ATEN_CPU_CAPABILITY variable.
//
// Declare a kernel once, inside namespace bpt::cpu:
//   using rms_norm_fn = void(const at::Tensor&, ...);
//   BPT_CPU_KERNEL(rms_norm_fn, rms_norm_forward)
// then call rms_norm_forward_kernel()(args...).

namespace bpt::cpu {

enum class Capability { Default, Avx2, Avx512 };

// Read once per process.
Capability capability();

template <typename Fn>
Fn* pick_kernel(Fn* default_fn, Fn* avx2_fn, Fn* avx512_fn) {
  switch (capability()) {
    case Capability::Avx512: return avx512_fn;
    case Capability::Avx2: return avx2_fn;
    default: return default_fn;
  }
}

}  // namespace bpt::cpu

#define BPT_CPU_KERNEL(fn_type, name)                                       \
  namespace DEFAULT { fn_type name; }                                       \
  namespace AVX2 { fn_type name; }                                          \
  namespace AVX512 { fn_type name; }                                        \
  inline fn_type* name##_kernel() {                                         \
    static fn_type* const chosen = pick_kernel<fn_type>(DEFAULT::name, AVX2::name, AVX512::name); \
    return chosen;                                                          \
  }
