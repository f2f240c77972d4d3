// Compiles the fp32 inner loops (cpu_kernels_impl.h) once per instruction set and picks one table at run
// time. Only headers without inline code of their own are included inside the target regions, so no
// function of another library is ever compiled for an instruction set the CPU may lack.
#include "cpu_kernels.h"

#include <immintrin.h>

#include <cstdint>

#include "vec.h"

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define DK_ISA_NS avx512
#define DK_ISA_LEVEL 2
#include "cpu_kernels_impl.h"
#undef DK_ISA_LEVEL
#undef DK_ISA_NS
#pragma GCC pop_options
#pragma GCC diagnostic pop

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DK_ISA_NS avx2
#define DK_ISA_LEVEL 1
#include "cpu_kernels_impl.h"
#undef DK_ISA_LEVEL
#undef DK_ISA_NS
#pragma GCC pop_options

#define DK_ISA_NS scalar
#define DK_ISA_LEVEL 0
#include "cpu_kernels_impl.h"
#undef DK_ISA_LEVEL
#undef DK_ISA_NS

namespace distilkernels {
namespace cpu {

const Kernels& kernels() {
  switch (vec::isa()) {
    case vec::Isa::kAvx512: return avx512::table;
    case vec::Isa::kAvx2: return avx2::table;
    default: return scalar::table;
  }
}

}  // namespace cpu
}  // namespace distilkernels
