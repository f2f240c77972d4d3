// Run-time choice of the instruction set for the CPU kernels' inner loops.
//
// The one mechanism: csrc/cpu_kernels.cpp compiles csrc/cpu_kernels_impl.h three times, inside
// `#pragma GCC target` regions for AVX-512, AVX2+FMA and baseline x86-64, each into its own namespace, and
// fills one `Kernels` table per instruction set. `kernels()` hands out the table for `isa()`, chosen once
// from the CPU's flags. DISTILKERNELS_ISA=avx512|avx2|scalar (read once, env.h) caps the choice, to test the slower paths.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "env.h"

namespace distilkernels {
namespace vec {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  Isa best = Isa::kScalar;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = Isa::kAvx2;
#endif
  // A cap, never a raise: avx512 on an AVX2 CPU stays AVX2.
  const std::string cap = env::choice("DISTILKERNELS_ISA", {"avx512", "avx2", "scalar"});
  if (cap == "scalar") return Isa::kScalar;
  if (cap == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
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
