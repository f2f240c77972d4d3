// Shared pieces of the GEMMs that run on the CPU's matrix units through ATen's brgemm (oneDNN's micro-kernels:
// AMX tiles where the CPU has them): the output tiling, the weight-block layout, and the fp32 -> bf16 store of
// an epilogue.
//
// Layout of a weight packed for brgemm (pack_linear_bf16 / pack_linear_int8 with vnni=true): the weight
// (out_features, in_features) is cut into blocks of kBlockN output columns, zero past out_features; each block
// is W^T (in_features padded to the VNNI group, kBlockN) reordered by at::native::cpublas::pack into the VNNI
// layout brgemm reads: packed (n_blocks, padded in_features, kBlockN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "vec.h"

namespace distilkernels {
namespace brgemm {

// Output tiles of kBlockM x kBlockN: 64 x 64 measured 1.65-2.0 TFLOP/s in bf16 on AMX at every DistilBERT
// shape, 32-row tiles 20-40% slower (shared/AMX_NOTES.md).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

// Whether this CPU runs brgemm on a packed (VNNI) weight of `dtype` (kBFloat16 or kChar): oneDNN packs only
// where the matrix unit exists (AMX); elsewhere the callers take their fallback GEMM.
inline bool packs(at::ScalarType dtype) { return at::native::cpublas::could_pack(dtype); }

// Rows of the weight's K dimension that one VNNI group holds: 2 for bf16, 4 for int8.
inline int64_t vnni_group(at::ScalarType dtype) { return dtype == at::kBFloat16 ? 2 : 4; }

// Releases this thread's AMX tile configuration once its tiles are done, as ATen's brgemm asks.
struct ReleaseGuard {
  ~ReleaseGuard() { at::native::cpublas::brgemm_release(); }
};

// Rounds fp32 to bf16 (nearest even; NaN stays NaN) on 32-bit integer lanes, which the compiler vectorizes
// for the target of the function it is inlined into.
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_bf16_avx512(const float* src, int64_t n, c10::BFloat16* dst) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = to_bf16_bits(src[i]);
}

__attribute__((target("avx2"))) inline void store_bf16_avx2(const float* src, int64_t n, c10::BFloat16* dst) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = to_bf16_bits(src[i]);
}

// dst[i] = bf16(src[i]) for i < n, vectorized for this CPU's instruction set (vec::isa()).
inline void store_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  switch (vec::isa()) {
    case vec::Isa::kAvx512: return store_bf16_avx512(src, n, dst);
    case vec::Isa::kAvx2: return store_bf16_avx2(src, n, dst);
    default: {
      auto* d = reinterpret_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = to_bf16_bits(src[i]);
    }
  }
}

}  // namespace brgemm
}  // namespace distilkernels
