#include "csrc/ops/cpu_capability.h"

#include <ATen/Version.h>

namespace bpt::cpu {

Capability capability() {
  static const Capability chosen = [] {
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return Capability::Avx512;
    if (name == "AVX2") return Capability::Avx2;
    return Capability::Default;
  }();
  return chosen;
}

}  // namespace bpt::cpu
