// Run-time choice of the instruction set for the CPU kernels' inner loops.
#pragma once

#include <string>

namespace distilkernels {
namespace vec {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

inline Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

inline std::string isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace vec
}  // namespace distilkernels
