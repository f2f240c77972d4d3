// Shared pieces of the GEMMs that run on the CPU's matrix units through ATen's brgemm (oneDNN's micro-kernels:
// AMX tiles where the CPU has them): the output tiling and the weight-block layout.
//
// Layout of a weight packed for brgemm (pack_linear_bf16 / pack_linear_int8 with vnni=true): the weight
// (out_features, in_features) is cut into blocks of kBlockN output columns, zero past out_features; each block
// is W^T (in_features padded to the VNNI group, kBlockN) reordered by at::native::cpublas::pack into the VNNI
// layout brgemm reads: packed (n_blocks, padded in_features, kBlockN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>

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

// wt (in_features, out_features) of bf16 or int8 -> the packed layout above: (n_blocks, in_features rounded up to
// the VNNI group, kBlockN), zero past in_features and out_features.
inline at::Tensor pack_blocks(const at::Tensor& wt) {
  const auto dtype = wt.scalar_type();
  const int64_t k = wt.size(0), n = wt.size(1);
  const int64_t kp = (k + vnni_group(dtype) - 1) / vnni_group(dtype) * vnni_group(dtype);
  const int64_t n_blocks = (n + kBlockN - 1) / kBlockN;
  auto padded = at::zeros({kp, n_blocks * kBlockN}, wt.options());
  padded.narrow(0, 0, k).narrow(1, 0, n).copy_(wt);
  auto packed = at::empty({n_blocks, kp, kBlockN}, wt.options());
  const auto* src = static_cast<const char*>(padded.const_data_ptr());
  auto* dst = static_cast<char*>(packed.mutable_data_ptr());
  const int64_t size = wt.element_size();
  for (int64_t b = 0; b < n_blocks; ++b)
    at::native::cpublas::pack(kp, kBlockN, n_blocks * kBlockN, kBlockN, dtype, dtype, src + b * kBlockN * size,
                              dst + b * kp * kBlockN * size);
  return packed;
}

}  // namespace brgemm
}  // namespace distilkernels
