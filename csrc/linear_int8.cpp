// int8 linear with per-token activation scales: out = activation(dequant(q(x) @ q(W)^T) + bias); x fp32 or bf16,
// out fp32 or bf16 (out_dtype, by default x's).
//
// The weight is quantized once per output channel (symmetric int8, scale = max|w[n]| / weight_max, 127 by
// default). Each call quantizes every row of x with its own scale (symmetric int8, max|x[r]| / 127) in one pass,
// multiplies in int8 with int32 accumulation, and dequantizes (x scale * weight scale) + bias + activation in the
// epilogue.
//
// Two weight layouts, and the product each one runs:
// - VNNI blocks (vnni=true): (n_blocks, in_features rounded up to 4, 64), groups of 4 rows of W^T per column. On a
//   CPU whose matrix unit takes int8 (AMX; could_pack(kChar)) brgemm packs them and each 64 x 64 output tile is
//   computed by our AMX loop (amx_tiles.h) where in_features is a multiple of 64, else by one s8 x s8 -> s32
//   brgemm call. Elsewhere we pack the same layout (pack_blocks_int8) and each tile is cpu::Kernels'
//   gemm_u8s8_block (AVX512-VNNI dot products) or gemm_s8_block (int16 multiply-adds), both exact on the full grid.
// - plain W^T (in_features, out_features): one at::_int_mm (oneDNN's int8 GEMM), where it is exact on the full
//   grid (VNNI), else an fp32 GEMM of the int8 values (int_product).
// The VNNI blocks go to the matrix unit unless DISTILKERNELS_MATRIX_UNITS is off (read on every call, as quant.py
// reads it on every packing); int8_vector_gemm() says which layout runs faster without it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "amx_tiles.h"
#include "brgemm_utils.h"
#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"
#include "env.h"

namespace distilkernels {

cpu::Activation parse_activation(c10::string_view activation);  // linear.cpp

// Whether the VNNI-block product runs on AVX512-VNNI dot products (cpu::Kernels' gemm_u8s8_block) now: the CPU
// has them and DISTILKERNELS_INT8_DOTS is not off (read on every call); else on the int16 multiply-adds.
bool int8_dots() {
  return cpu::kernels().gemm_u8s8_block != nullptr && env::switch_on("DISTILKERNELS_INT8_DOTS", true);
}

namespace {

// A (rows, cols) int8 matrix spanning [-127, 127]: element i is (i * step) % 255 - 127. Deterministic, so the
// checks below neither depend on nor advance torch's random generator.
at::Tensor int8_pattern(int64_t rows, int64_t cols, int64_t step) {
  auto t = at::empty({rows, cols}, at::kChar);
  int8_t* p = t.mutable_data_ptr<int8_t>();
  for (int64_t i = 0; i < rows * cols; ++i) p[i] = static_cast<int8_t>((i * step) % 255 - 127);
  return t;
}

// Whether at::_int_mm (oneDNN's s8 x s8 -> s32 GEMM) gives the exact integer product of int8 values spanning
// [-127, 127], checked once per process against int64 sums. Without VNNI (AVX2, AVX-512 without VNNI, or oneDNN
// capped below it by ONEDNN_MAX_CPU_ISA) oneDNN shifts the activations to u8 and sums pairs of u8 x s8 products
// in saturating 16-bit lanes: on the AMX Xeon under ONEDNN_MAX_CPU_ISA=AVX2, 128 x 768 x 768 products came out
// up to 1.4e5 off.
bool int_mm_exact_here() {
  static const bool exact = [] {
    constexpr int64_t m = 16, k = 64, n = 16;
    const auto a = int8_pattern(m, k, 37), b = int8_pattern(k, n, 53);
    at::Tensor c;
    try {
      c = at::_int_mm(a, b).contiguous();
    } catch (const std::exception&) {  // a torch build without it
      return false;
    }
    const int8_t* pa = a.const_data_ptr<int8_t>();
    const int8_t* pb = b.const_data_ptr<int8_t>();
    const int32_t* pc = c.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        int64_t sum = 0;
        for (int64_t p = 0; p < k; ++p) sum += int64_t{pa[i * k + p]} * pb[p * n + j];
        if (pc[i * n + j] != sum) return false;
      }
    return true;
  }();
  return exact;
}

// The plain layout's fallback product: both int8 operands widened to fp32, at::mm, rounded back to int32 (exact
// while partial sums stay below 2^24; see int_product).
at::Tensor fp32_product(const at::Tensor& xq, const at::Tensor& w) {
  return at::mm(xq.to(at::kFloat), w.to(at::kFloat)).to(at::kInt);
}

using brgemm::kBlockM;
using brgemm::kBlockN;

// wt (in_features, out_features) int8 -> the VNNI-block layout (n_blocks, kp, kBlockN), kp = in_features rounded
// up to 4, zero padded: block b holds w[kk, j] = wt[kk, b * kBlockN + j] at (kk / 4 * kBlockN + j) * 4 + kk % 4,
// the layout ATen's brgemm packing gives on AMX (at::native::cpublas::pack packs only there).
at::Tensor pack_blocks_int8(const at::Tensor& wt) {
  const int64_t k = wt.size(0), n = wt.size(1);
  const int64_t kp = round_up(k, 4), n_blocks = (n + kBlockN - 1) / kBlockN;
  auto padded = at::zeros({kp, n_blocks * kBlockN}, wt.options());
  padded.narrow(0, 0, k).narrow(1, 0, n).copy_(wt);
  // (kp / 4, 4, n_blocks, kBlockN) -> (n_blocks, kp / 4, kBlockN, 4)
  return padded.view({kp / 4, 4, n_blocks, kBlockN}).permute({2, 0, 3, 1}).contiguous().view({n_blocks, kp, kBlockN});
}

// The VNNI-block product without the matrix unit: for each 64 x 64 output tile, acc = the int32 product of the
// activations xq ((tokens, kp) int8, contiguous) and the weight block, then tile(nb, m0, rows, acc) (acc row
// stride kBlockN). xq is first shifted to u8 (int8_dots) or widened to int16, once per call.
template <class Tile>
void vector_tiles(const at::Tensor& xq, int64_t kp, const int8_t* wp, int64_t n_blocks, const Tile& tile) {
  const auto& kern = cpu::kernels();
  const int64_t tokens = xq.size(0);
  const bool dots = int8_dots();
  const auto a = dots ? at::bitwise_xor(xq, -128) : xq.to(at::kShort);  // a + 128 as u8 bits, or int16
  const auto* au8 = dots ? reinterpret_cast<const uint8_t*>(a.const_data_ptr<int8_t>()) : nullptr;
  const auto* a16 = dots ? nullptr : a.const_data_ptr<int16_t>();
  brgemm::for_each_tile(tokens, n_blocks, [&](int64_t nb, int64_t m0, int64_t rows) {
    alignas(64) int32_t acc[kBlockM * kBlockN];
    const int8_t* wb = wp + nb * kp * kBlockN;
    if (dots)
      kern.gemm_u8s8_block(rows, kp, au8 + m0 * kp, kp, wb, acc, kBlockN);
    else
      kern.gemm_s8_block(rows, kp, a16 + m0 * kp, kp, wb, acc, kBlockN);
    tile(nb, m0, rows, acc);
  });
}

// Whether at::_int_mm on the plain layout runs faster than vector_tiles (with the activations' conversion) on a
// (128, 768) x (768, 768) product (distilbert-base's attention output at 128 tokens), best of 3 calls each. Where
// the CPU has no VNNI, torch's int8 GEMM is a plain loop, not oneDNN's: on an AMD EPYC (Zen 5) with CPUID
// masked to AVX2 + FMA it ran 128 x 768 x 3072 in 145 ms against 4 ms for the fp32 GEMM.
bool int_mm_faster_than_ours() {
  const auto a = int8_pattern(128, 768, 37), b = int8_pattern(768, 768, 53);
  const auto blocks = pack_blocks_int8(b);
  const auto best_of_3 = [](const auto& fn) {
    fn();
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < 3; ++i) {
      const auto start = std::chrono::steady_clock::now();
      fn();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  };
  const double t_int_mm = best_of_3([&] { at::_int_mm(a, b); });
  const double t_ours = best_of_3([&] {
    vector_tiles(a, 768, blocks.const_data_ptr<int8_t>(), 768 / kBlockN,
                 [](int64_t, int64_t, int64_t, const int32_t*) {});
  });
  return t_int_mm < t_ours;
}

}  // namespace

// How the int8 product runs without the matrix unit, decided once per process: "int_mm" where at::_int_mm is exact
// on the full grid and measures faster than ours (quant.py then packs the plain layout), else ours on the VNNI
// blocks: "dots" (AVX512-VNNI, gemm_u8s8_block) or "madd" (int16 multiply-adds, gemm_s8_block).
std::string int8_vector_gemm() {
  static const std::string chosen = int_mm_exact_here() && int_mm_faster_than_ours() ? "int_mm"
                                    : int8_dots()                                    ? "dots"
                                                                                     : "madd";
  return chosen;
}

namespace {

// A row whose max-abs is below this (all zeros, say) is quantized with this scale: its values round to 0.
constexpr float kMinScale = 1e-12f;

// q[i] = round(x[i] / scale) in [-127, 127], scale = max(max|x|, kMinScale * 127) / 127; returns scale.
float quantize_row(const float* x, int64_t n, int8_t* q) {
  const auto& kern = cpu::kernels();
  const float scale = std::max(kern.absmax(x, n) / 127.0f, kMinScale);
  if (scale != scale) {  // a NaN in the row: its scale is NaN, so is every output of the row, as in fp32
    std::fill(q, q + n, int8_t{0});
    return scale;
  }
  kern.quantize_int8(x, n, 1.0f / scale, q);
  return scale;
}

// quantize_row of a bf16 row, widened into `row` (n floats of scratch) first.
float quantize_row_bf16(const uint16_t* x, int64_t n, float* row, int8_t* q) {
  cpu::kernels().widen_bf16(x, n, row);
  return quantize_row(row, n, q);
}

std::tuple<at::Tensor, at::Tensor> pack_linear_int8_cpu(const at::Tensor& weight, bool vnni, int64_t weight_max) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight_max >= 1 && weight_max <= 127, "weight_max must be an integer in [1, 127], got ", weight_max);
  check_float(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be (out_features, in_features), got shape ", weight.sizes());
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const auto scale = k > 0 ? (w.abs().amax({1}) / static_cast<double>(weight_max)).clamp_min(kMinScale).contiguous()
                           : at::full({n}, kMinScale, w.options());  // (n,)
  const auto q = at::round(w / scale.unsqueeze(1)).to(at::kChar);  // |q| <= weight_max
  const auto wt = q.t();
  return std::make_tuple(!vnni ? wt.contiguous() : brgemm::packs(at::kChar) ? brgemm::pack_blocks(wt)
                                                                           : pack_blocks_int8(wt), scale);
}

// The output of a call: fp32 or bf16 rows of out_features values.
struct Out {
  float* f32;      // null when bf16
  uint16_t* bf16;  // null when fp32
  int64_t ld;
};

// out[r, :] = act(acc[r, :] * x_scale[r] * w_scale + bias) for a (rows, cols) int32 tile with row stride ld_acc,
// into out's rows from m0 and columns from n0.
void epilogue(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* x_scale,
              const float* w_scale, const float* bias, cpu::Activation act, const Out& out, int64_t m0, int64_t n0) {
  const auto& kern = cpu::kernels();
  if (out.bf16 != nullptr)
    kern.dequant_bias_act_bf16(acc, ld_acc, rows, cols, x_scale, w_scale, bias, act, out.bf16 + m0 * out.ld + n0,
                               out.ld);
  else
    kern.dequant_bias_act(acc, ld_acc, rows, cols, x_scale, w_scale, bias, act, out.f32 + m0 * out.ld + n0, out.ld);
}

// The plain layout's product q(x) @ W^T as int32: at::_int_mm where it is exact (int_mm_exact_here); elsewhere an
// fp32 GEMM of the int8 values, exact while partial sums stay below 2^24 (in_features <= 1040 always:
// 1040 * 127^2 < 2^24), and otherwise off by fp32 rounding of sums that large (relative 6e-8, far below the
// quantization's own error). quant.py packs this layout where int8_vector_gemm() is "int_mm" and the matrix
// unit is not used.
at::Tensor int_product(const at::Tensor& xq, const at::Tensor& w) {
  if (int_mm_exact_here()) {
    // Row-major strides spelt out: a (rows, 1) or (1, cols) matrix is contiguous with either stride on its size-1
    // dimension (pack_linear_int8 of an (n, 1) weight gives (1, n) with strides (1, 1)), and at::_int_mm misread
    // that one: in_features 1 came out 2.4e5 off. Both are contiguous, so these are views of the same memory.
    const auto rows = [](const at::Tensor& t) { return t.as_strided(t.sizes(), {t.size(1), 1}); };
    return at::_int_mm(rows(xq), rows(w));
  }
  return fp32_product(xq, w);
}

// The VNNI-block product on the matrix unit through one s8 x s8 -> s32 brgemm call per 64 x 64 output tile, then
// tile(nb, m0, rows, acc) as vector_tiles calls it. a: (tokens, kp) int8.
template <class Tile>
void brgemm_tiles(const int8_t* a, int64_t tokens, int64_t kp, const int8_t* wp, int64_t n_blocks, const Tile& tile) {
  brgemm::for_each_tile(tokens, n_blocks, [&](int64_t nb, int64_t m0, int64_t rows) {
    alignas(64) int32_t acc[kBlockM * kBlockN];
    at::native::cpublas::brgemm(rows, kBlockN, kp, /*ld_a=*/kp, /*ld_b=*/kBlockN, /*ld_c=*/kBlockN,
                                /*add_C=*/false, a + m0 * kp, wp + nb * kp * kBlockN, acc, /*is_vnni=*/true);
    tile(nb, m0, rows, acc);
  });
}

void check_args(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& weight_scale,
                int64_t out_features, int64_t kp, bool vnni) {
  const int64_t k = x.size(1);
  if (vnni) {
    const int64_t n_blocks = (out_features + kBlockN - 1) / kBlockN;
    TORCH_CHECK(packed_weight.size(0) == n_blocks && packed_weight.size(1) == kp && packed_weight.size(2) == kBlockN,
                "packed_weight must be (", n_blocks, ", ", kp, ", ", kBlockN, ") for out_features=", out_features,
                " and in_features=", k, ", got shape ", packed_weight.sizes());
  } else {
    TORCH_CHECK(packed_weight.dim() == 2 && packed_weight.size(0) == k && packed_weight.size(1) == out_features,
                "packed_weight must be (in_features=", k, ", out_features=", out_features,
                ") from pack_linear_int8(weight, vnni=False), or 3-D from vnni=True; got shape ",
                packed_weight.sizes());
  }
  TORCH_CHECK(packed_weight.is_contiguous(), "packed_weight must be contiguous");
  check_cpu(weight_scale, "weight_scale");
  check_fp32(weight_scale, "weight_scale");
  TORCH_CHECK(weight_scale.dim() == 1 && weight_scale.size(0) == out_features,
              "weight_scale must be (out_features,) = (", out_features, ",), got shape ", weight_scale.sizes());
}

at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& weight_scale,
                           int64_t out_features, const c10::optional<at::Tensor>& bias, c10::string_view activation,
                           c10::optional<at::ScalarType> out_dtype) {
  check_cpu(x, "x");
  check_cpu(packed_weight, "packed_weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const auto out_type = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kBFloat16, "out_dtype must be float32 or bfloat16, got ",
              out_type);
  TORCH_CHECK(packed_weight.scalar_type() == at::kChar, "packed_weight must be int8, got ",
              packed_weight.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const int64_t tokens = x.size(0), k = x.size(1);
  const bool vnni = packed_weight.dim() == 3;
  const int64_t kp = vnni ? round_up(k, brgemm::vnni_group(at::kChar)) : k;
  check_args(x, packed_weight, weight_scale, out_features, kp, vnni);
  if (bias.has_value()) check_fp32_vector(*bias, "bias", out_features);
  const Fp32Values bias_f(bias, out_features);
  const auto act = parse_activation(activation);
  auto out = cached_empty({tokens, out_features}, x.options().dtype(out_type));
  if (tokens == 0 || out_features == 0) return out;
  // Per-token quantization, one pass per row; VNNI's zero padding of in_features stays zero.
  const auto xc = x.contiguous();
  auto xq = (kp == k ? at::empty({tokens, kp}, x.options().dtype(at::kChar))
                     : at::zeros({tokens, kp}, x.options().dtype(at::kChar)));
  auto x_scale = at::empty({tokens}, x.options().dtype(at::kFloat));
  auto* q = xq.mutable_data_ptr<int8_t>();
  auto* xs = x_scale.mutable_data_ptr<float>();
  if (xc.scalar_type() == at::kFloat) {
    const float* src = xc.const_data_ptr<float>();
    at::parallel_for(0, tokens, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) xs[r] = quantize_row(src + r * k, k, q + r * kp);
    });
  } else {
    const auto* src = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
    at::parallel_for(0, tokens, row_grain(k), [&](int64_t begin, int64_t end) {
      std::vector<float> row(k);
      for (int64_t r = begin; r < end; ++r) xs[r] = quantize_row_bf16(src + r * k, k, row.data(), q + r * kp);
    });
  }
  const Fp32Values scale_f(weight_scale, out_features);  // a strided or expanded scale read as its values
  const float* ws = scale_f.data();
  const float* b = bias_f.data();
  const Out c = out_type == at::kFloat
                    ? Out{out.mutable_data_ptr<float>(), nullptr, out_features}
                    : Out{nullptr, reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>()), out_features};
  if (vnni && k > 0) {
    const int8_t* wp = packed_weight.const_data_ptr<int8_t>();
    const int64_t n_blocks = (out_features + kBlockN - 1) / kBlockN;
    // One 64 x 64 int32 tile of the product (row stride kBlockN) -> its rows of out, whichever kernel made it.
    const auto store_tile = [&](int64_t nb, int64_t m0, int64_t rows, const int32_t* acc) {
      const int64_t n0 = nb * kBlockN, cols = std::min(kBlockN, out_features - n0);
      epilogue(acc, kBlockN, rows, cols, xs + m0, ws + n0, b + n0, act, c, m0, n0);
    };
    if (!brgemm::packs(at::kChar) || !env::switch_on("DISTILKERNELS_MATRIX_UNITS", true))
      vector_tiles(xq, kp, wp, n_blocks, store_tile);
    else if (kp % 64 == 0 && amx::enabled())
      amx::gemm<amx::Kind::kInt8>(
          q, tokens, kp, wp, n_blocks,
          [&](int64_t nb, int64_t m0, int64_t rows, const void* acc) {
            store_tile(nb, m0, rows, static_cast<const int32_t*>(acc));
          },
          /*heavy_epilogue=*/act == cpu::Activation::kGelu);
    else
      brgemm_tiles(q, tokens, kp, wp, n_blocks, store_tile);
    return out;
  }
  const auto acc = k > 0 ? int_product(xq, packed_weight) : at::zeros({tokens, out_features}, xq.options().dtype(at::kInt));
  const int32_t* a = acc.const_data_ptr<int32_t>();
  at::parallel_for(0, tokens, row_grain(out_features), [&](int64_t begin, int64_t end) {
    epilogue(a + begin * out_features, out_features, end - begin, out_features, xs + begin, ws, b, act, c, begin, 0);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("pack_linear_int8", &pack_linear_int8_cpu);
  m.impl("linear_int8", &linear_int8_cpu);
}

}  // namespace distilkernels
