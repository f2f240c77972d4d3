// fp32 linear on MKL's packed-weight GEMM: out = activation(x @ weight^T + bias).
//
// The x86 torch CPU build links MKL and exports its packed-GEMM API (cblas_sgemm_pack / cblas_sgemm_compute);
// torch's inductor freezing runs fp32 linears on it. The weight is packed once into MKL's internal layout
// and a call is one cblas_sgemm_compute (MKL's own threading, sized by torch.set_num_threads) followed by one
// pass per row that adds the bias and applies the activation, or, with row_chunk > 0 and at least row_chunk rows
// per thread, one such pair per thread and chunk of row_chunk rows. On the 2-core AMX Xeon, distilbert-base fp32
// at 1 x 128 ran in 37.3 ms on it against 41.0 ms on oneDNN's prepacked linear (gemms.py measures which kernel,
// and which row_chunk, a shape takes on the CPU at hand).
//
// The symbols are declared weak: where torch was built without MKL they resolve to null and mkl_packs() is
// false. The weight is packed for a row count m (the header records it) and used for any number of rows
// (tests/ops/test_linear.py checks 1..1100 rows on packings for 128 and 1024 rows against fp64, and gemms.py checks
// the kernel against our own before it enters the contest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

extern "C" {
// MKL's CBLAS enum values (mkl_cblas.h): row-major 101, no-transpose 111, transpose 112, packed 151, B 162.
size_t cblas_sgemm_pack_get_size(int identifier, int64_t m, int64_t n, int64_t k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* src, int64_t ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int64_t transa, int64_t transb, int64_t m, int64_t n, int64_t k,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                         int64_t ldc) __attribute__((weak));
}

namespace distilkernels {

cpu::Activation parse_activation(c10::string_view activation);  // linear.cpp

bool mkl_packs() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kMatrixB = 162;
// The row count a weight is packed for (pack_linear_mkl's `rows`): MKL's packing serves any row count, but it
// is laid out, and its compute threaded, for the count it was made for (gemms._MKL_PACK_ROWS has the measurements
// behind the count the library packs for).
constexpr int64_t kMaxPackRows = 1 << 20;
// With row_chunk > 0 and at least row_chunk rows per thread, the threads split the rows instead of MKL
// splitting the work: each thread streams every weight (twice the weight traffic of MKL's own split), but its
// rows' output chunks stay in its cache for the bias/activation pass instead of a second pass over the whole
// output. Which pays depends on the CPU's caches, so gemms.py measures both per shape (kernels "mkl" and
// "mkl_rows"). The residual add + LayerNorm after the attention output and lin2 in this epilogue too
// (bit-identical to the two ops) measured no gain in distilbert-base on the 2-core AMX Xeon (the C++ block loop,
// interleaved: 0.995x at 1 x 128, 0.997x at 8 x 128): the separate add_layer_norm right after the GEMM finds its
// rows in cache already.
}  // namespace

// The packed weight is one 1-D fp32 tensor: a header of kHeader floats, then MKL's packing, 64 bytes in like the
// tensor's own start. The header holds (out_features, in_features) as int32, so a call can check the packing
// is of its shape (MKL pads its layout: sizes alone do not tell), and the address the packing was made at: MKL's
// packing must not be moved, and a copy of it (clone, deepcopy, opcheck's copies) crashed MKL's compute with
// SIGFPE, so a call on a packing that is not at its address raises instead.
constexpr int64_t kHeader = 16;
struct Header {
  int32_t out_features, in_features;
  uintptr_t address;
  int64_t rows;  // the row count it was packed for
};
static_assert(sizeof(Header) <= kHeader * sizeof(float), "the header fits before MKL's packing");

int64_t mkl_packed_floats(int64_t n, int64_t k, int64_t rows) {
  TORCH_CHECK(mkl_packs(), "MKL's packed GEMM is not in this torch build");
  TORCH_CHECK(rows >= 1 && rows <= kMaxPackRows, "rows (the row count to pack for) must be in 1..", kMaxPackRows,
              ", got ", rows);
  return kHeader + static_cast<int64_t>((cblas_sgemm_pack_get_size(kMatrixB, rows, n, k) + sizeof(float) - 1) /
                                        sizeof(float));
}

namespace {

at::Tensor pack_linear_mkl_cpu(const at::Tensor& weight, int64_t rows) {
  check_cpu(weight, "weight");
  TORCH_CHECK(mkl_packs(), "pack_linear_mkl needs torch built with MKL (its packed GEMM); this build has none");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32 to be packed, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0 && weight.size(0) <= INT32_MAX &&
                  weight.size(1) <= INT32_MAX,
              "weight must be (out_features, in_features), both > 0, got shape ", weight.sizes());
  const int64_t n = weight.size(0), k = weight.size(1);
  const auto wc = weight.contiguous();
  // MKL's packed data must not move once packed: the tensor is used where it is allocated (64-byte aligned).
  // Not zeroed: MKL sizes its packing for the largest layout it may write (2.2-4.9x the weight at DistilBERT's
  // shapes) and writes ~1.1x, so the untouched pages of a fresh allocation never become resident (at::zeros made
  // the fp32 packings of distilbert-base take 414 MB of memory for 162 MB of weights).
  auto packed = at::empty({mkl_packed_floats(n, k, rows)}, weight.options());  // (checks rows)
  float* p = packed.mutable_data_ptr<float>();
  const Header header{static_cast<int32_t>(n), static_cast<int32_t>(k), reinterpret_cast<uintptr_t>(p), rows};
  std::memcpy(p, &header, sizeof(header));
  cblas_sgemm_pack(kRowMajor, kMatrixB, kTrans, rows, n, k, 1.0f, wc.const_data_ptr<float>(), k, p + kHeader);
  return packed;
}

at::Tensor linear_mkl_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features,
                          const c10::optional<at::Tensor>& bias, c10::string_view activation, int64_t row_chunk) {
  check_cpu(x, "x");
  check_cpu(packed_weight, "packed_weight");
  check_fp32(x, "x");
  check_fp32(packed_weight, "packed_weight");
  TORCH_CHECK(mkl_packs(), "linear_mkl needs torch built with MKL (its packed GEMM); this build has none");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x must be (tokens, in_features) with in_features > 0, got shape ",
              x.sizes());
  TORCH_CHECK(out_features > 0, "out_features must be > 0, got ", out_features);
  TORCH_CHECK(row_chunk >= 0, "row_chunk must be >= 0 (0: MKL's own threading over all rows), got ", row_chunk);
  const int64_t tokens = x.size(0), k = x.size(1);
  Header header{-1, -1, 0, 0};
  if (packed_weight.dim() == 1 && packed_weight.is_contiguous() && packed_weight.size(0) >= kHeader)
    std::memcpy(&header, packed_weight.const_data_ptr<float>(), sizeof(header));
  // The size MKL's packing of this shape takes, for the row count the header names; -1 where no header of ours is
  // there to name one
  const int64_t floats = header.rows >= 1 && header.rows <= kMaxPackRows
                             ? mkl_packed_floats(out_features, k, header.rows) : -1;
  TORCH_CHECK(header.out_features == out_features && header.in_features == k && packed_weight.size(0) == floats,
              "packed_weight must be pack_linear_mkl(weight) of a (", out_features, ", ", k,
              ") weight (1-D, contiguous, ", floats >= 0 ? std::to_string(floats) : std::string("MKL's"),
              " floats); got shape ",
              packed_weight.sizes(), header.out_features >= 0 ? " packed from a (" + std::to_string(header.out_features) +
              ", " + std::to_string(header.in_features) + ") weight" : std::string());
  TORCH_CHECK(header.address == reinterpret_cast<uintptr_t>(packed_weight.const_data_ptr()),
              "packed_weight must be the tensor pack_linear_mkl returned: MKL's packing cannot be moved or copied "
              "(pack the weight again)");
  if (bias.has_value()) check_fp32_vector(*bias, "bias", out_features);
  const auto act = parse_activation(activation);
  auto out = cached_empty({tokens, out_features}, x.options());
  if (tokens == 0) return out;
  const auto xc = x.contiguous();
  float* c = out.mutable_data_ptr<float>();
  const float* a = xc.const_data_ptr<float>();
  const float* w = packed_weight.const_data_ptr<float>() + kHeader;
  const bool has_epilogue = bias.has_value() || act != cpu::Activation::kNone;
  const Fp32Values b(bias, out_features);
  const auto& kern = cpu::kernels();
  auto epilogue = [&](int64_t r0, int64_t r1) {  // rows [r0, r1): bias + activation
    for (int64_t r = r0; r < r1; ++r) kern.bias_act_row(c + r * out_features, b.data(), out_features, act);
  };
  const int64_t threads = at::get_num_threads();
  if (row_chunk > 0 && threads > 1 && tokens >= row_chunk * threads) {
    // Each thread takes its own rows and runs MKL single-threaded on them (MKL inside a parallel region), in
    // chunks of row_chunk whose epilogue runs while the chunk is still in this core's cache.
    at::parallel_for(0, tokens, (tokens + threads - 1) / threads, [&](int64_t begin, int64_t end) {
      for (int64_t r0 = begin; r0 < end; r0 += row_chunk) {
        const int64_t rows = std::min(row_chunk, end - r0);
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, out_features, k, a + r0 * k, k, w, out_features,
                            0.0f, c + r0 * out_features, out_features);
        if (has_epilogue) epilogue(r0, r0 + rows);
      }
    });
    return out;
  }
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, tokens, out_features, k, a, k, w, out_features, 0.0f, c,
                      out_features);
  if (has_epilogue) at::parallel_for(0, tokens, row_grain(out_features), epilogue);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("pack_linear_mkl", &pack_linear_mkl_cpu);
  m.impl("linear_mkl", &linear_mkl_cpu);
}

}  // namespace distilkernels
