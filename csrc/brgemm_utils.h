// Shared pieces of the GEMMs that run on the CPU's matrix units through ATen's brgemm (oneDNN's micro-kernels:
// AMX tiles where the CPU has them): the output tiling and the weight-block layout.
//
// Layout of a weight packed for brgemm (pack_linear_bf16 / pack_linear_int8 with vnni=true): the weight
// (out_features, in_features) is cut into blocks of kBlockN output columns, zero past out_features; each block
// is W^T (in_features padded to the VNNI group, kBlockN) reordered by at::native::cpublas::pack into the VNNI
// layout brgemm reads: packed (n_blocks, padded in_features, kBlockN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
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

// Calls tile(nb, m0, rows) for every output tile of a (tokens x n_blocks * kBlockN) GEMM on a packed weight,
// split over threads. Tile t = (n block, m block), m fastest: a thread's contiguous run of tiles streams each
// weight block once. (Prefetching the next weight block into L2 before its first tile, issued all at once or
// one block ahead, measured no faster: with 128 rows the weights stream from memory at ~10 GB/s per core either
// way, near the 11-13 GB/s a plain read of a large buffer reaches per core on the 2-core AMX Xeon.)
template <class Tile>
void for_each_tile(int64_t tokens, int64_t n_blocks, const Tile& tile) {
  const int64_t m_blocks = (tokens + kBlockM - 1) / kBlockM;
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    ReleaseGuard release;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / m_blocks, mb = t % m_blocks;
      tile(nb, mb * kBlockM, std::min(kBlockM, tokens - mb * kBlockM));
    }
  });
}

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
