// int8 linear with per-token activation scales: out = activation(dequant(q(x) @ q(W)^T) + bias); x fp32 or bf16,
// out fp32 or bf16 (out_dtype, by default x's).
//
// The weight is quantized once per output channel (symmetric int8, scale = max|w[n]| / weight_max: 127, or 63
// where torch's int8 GEMM is exact only on weights that narrow, int_mm_weight_max). Each call
// quantizes every row of x with its own scale (symmetric int8, max|x[r]| / 127) in one pass, multiplies in
// int8 with int32 accumulation, and dequantizes (x scale * weight scale) + bias + activation in the epilogue.
//
// On a CPU whose matrix unit takes int8 (AMX; could_pack(kChar)) the weight is packed into brgemm's VNNI blocks
// (brgemm_utils.h) and each 64 x 64 output tile is computed by our AMX loop (amx_tiles.h) where in_features is a
// multiple of 64, else by one s8 x s8 -> s32 brgemm call. Elsewhere the weight is
// kept as plain W^T (in_features, out_features) int8 and the product is one at::_int_mm (oneDNN's int8 GEMM:
// VNNI where the CPU has it), followed by the same epilogue, where that GEMM is exact for the weight's range
// (int_product).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "brgemm_utils.h"
#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {

cpu::Activation parse_activation(c10::string_view activation);  // linear.cpp

namespace {

// Whether at::_int_mm (oneDNN's s8 x s8 -> s32 GEMM) gives the exact integer product of activations spanning
// [-127, 127] and weights spanning [-weight_max, weight_max], checked against int64 sums.
bool int_mm_exact_for(int weight_max) {
  constexpr int64_t m = 16, k = 64, n = 16;
  auto a = at::empty({m, k}, at::kChar), b = at::empty({k, n}, at::kChar);
  int8_t* pa = a.mutable_data_ptr<int8_t>();
  int8_t* pb = b.mutable_data_ptr<int8_t>();
  for (int64_t i = 0; i < m * k; ++i) pa[i] = static_cast<int8_t>((i * 37) % 255 - 127);
  for (int64_t i = 0; i < k * n; ++i) pb[i] = static_cast<int8_t>((i * 53) % (2 * weight_max + 1) - weight_max);
  at::Tensor c;
  try {
    c = at::_int_mm(a, b).contiguous();
  } catch (const std::exception&) {  // a torch build without it: the fp32 path
    return false;
  }
  const int32_t* pc = c.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t sum = 0;
      for (int64_t p = 0; p < k; ++p) sum += int64_t{pa[i * k + p]} * pb[p * n + j];
      if (pc[i * n + j] != sum) return false;
    }
  return true;
}

// The product int_product falls back to: both int8 operands widened to fp32, at::mm, rounded back to int32 (exact
// while partial sums stay below 2^24; see int_product).
at::Tensor fp32_product(const at::Tensor& xq, const at::Tensor& w) {
  return at::mm(xq.to(at::kFloat), w.to(at::kFloat)).to(at::kInt);
}

// Whether at::_int_mm runs faster than fp32_product on a (128, 768) x (768, 768) product (distilbert-base's
// attention output at 128 tokens), best of 3 calls each. Where the CPU has no VNNI, torch's int8 GEMM is a plain
// loop, not oneDNN's: on an AMD EPYC (Zen 5) with CPUID masked to AVX2 + FMA it ran 128 x 768 x 3072 in 145 ms
// against 4 ms for the fp32 GEMM (and 0.9 ms with VNNI), so a model quantized there ran 40x slower than in fp32.
// ONEDNN_MAX_CPU_ISA does not show this: torch still sees VNNI and calls oneDNN, whose AVX2 int8 GEMM then
// measured 0.60 ms at this shape against the fp32 path's 0.91 (0.24 against 0.25 at 64 x 512 x 512, too close a
// call to take).
bool int_mm_faster_than_fp32() {
  const auto a = at::randint(-127, 128, {128, 768}, at::kChar), b = at::randint(-127, 128, {768, 768}, at::kChar);
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
  try {
    const double t_int = best_of_3([&] { at::_int_mm(a, b); });
    const double t_fp32 = best_of_3([&] { fp32_product(a, b); });
    return t_int < t_fp32;
  } catch (const std::exception&) {  // a torch build without it
    return false;
  }
}

}  // namespace

// The widest symmetric weight range on which at::_int_mm is exact here, checked once per process:
// - 127 (full int8) where oneDNN's int8 GEMM has VNNI (or AMX);
// - 63 without VNNI (AVX2, AVX-512 without VNNI, or oneDNN capped below it by ONEDNN_MAX_CPU_ISA). oneDNN then
//   shifts the activations to u8 and sums pairs of u8 x s8 products in saturating 16-bit lanes: full-range
//   weights come out wrong (on the AMX Xeon under ONEDNN_MAX_CPU_ISA=AVX2, errors up to 1.4e5 on 128 x 768 x 768
//   products; our per-token int8 linear 2.7-7.7 off on outputs of ~10), while 2 * 255 * 63 = 32130 < 2^15 cannot
//   saturate. There it still ran 1.6x the fp32 GEMM's rate (0.38-0.40 TOPS against 0.24 TFLOP/s at 1024 x 768 x
//   3072 and 1024 x 3072 x 768, 2 threads);
// - 0 where neither is exact, or where at::_int_mm is slower than the fp32 GEMM (int_mm_faster_than_fp32): the
//   product runs as an fp32 GEMM of the int8 values (int_product).
int64_t int_mm_weight_max() {
  static const int64_t limit = !int_mm_faster_than_fp32() ? 0 : int_mm_exact_for(127) ? 127 : int_mm_exact_for(63) ? 63 : 0;
  return limit;
}

namespace {

using brgemm::kBlockM;
using brgemm::kBlockN;

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
  TORCH_CHECK(!vnni || brgemm::packs(at::kChar),
              "vnni=True needs a CPU whose matrix unit takes int8 (AMX); pack with vnni=False on this CPU");
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const auto scale = k > 0 ? (w.abs().amax({1}) / static_cast<double>(weight_max)).clamp_min(kMinScale).contiguous()
                           : at::full({n}, kMinScale, w.options());  // (n,)
  const auto q = at::round(w / scale.unsqueeze(1)).to(at::kChar);  // |q| <= weight_max
  return std::make_tuple(vnni ? brgemm::pack_blocks(q.t()) : q.t().contiguous(), scale);
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

// The plain layout's product q(x) @ W^T as int32: at::_int_mm where it is exact for this weight's range
// (int_mm_weight_max: a pass over the int8 weight where that is below 127); elsewhere an fp32 GEMM of the int8
// values, exact while partial sums stay below 2^24 (in_features <= 1040 always: 1040 * 127^2 < 2^24), and
// otherwise off by fp32 rounding of sums that large (relative 6e-8, far below the quantization's own error).
at::Tensor int_product(const at::Tensor& xq, const at::Tensor& w) {
  const int64_t limit = int_mm_weight_max();
  bool exact = limit == 127;
  if (!exact && limit > 0) {
    const auto range = at::aminmax(w);
    exact = std::get<0>(range).item<int8_t>() >= -limit && std::get<1>(range).item<int8_t>() <= limit;
  }
  if (exact) {
    // Row-major strides spelt out: a (rows, 1) or (1, cols) matrix is contiguous with either stride on its size-1
    // dimension (pack_linear_int8 of an (n, 1) weight gives (1, n) with strides (1, 1)), and at::_int_mm misread
    // that one: in_features 1 came out 2.4e5 off. Both are contiguous, so these are views of the same memory.
    const auto rows = [](const at::Tensor& t) { return t.as_strided(t.sizes(), {t.size(1), 1}); };
    return at::_int_mm(rows(xq), rows(w));
  }
  return fp32_product(xq, w);
}

void gemm_vnni(const int8_t* a, const float* x_scale, int64_t tokens, int64_t kp, const int8_t* wp,
               const float* w_scale, int64_t out_features, const float* bias, cpu::Activation act, const Out& c) {
  const int64_t n_blocks = (out_features + kBlockN - 1) / kBlockN;
  const int64_t block = kp * kBlockN;
  brgemm::for_each_tile(tokens, n_blocks, [&](int64_t nb, int64_t m0, int64_t rows) {
    alignas(64) int32_t acc[kBlockM * kBlockN];
    const int64_t n0 = nb * kBlockN, cols = std::min(kBlockN, out_features - n0);
    at::native::cpublas::brgemm(rows, kBlockN, kp, /*ld_a=*/kp, /*ld_b=*/kBlockN, /*ld_c=*/kBlockN,
                                /*add_C=*/false, a + m0 * kp, wp + nb * block, acc, /*is_vnni=*/true);
    epilogue(acc, kBlockN, rows, cols, x_scale + m0, w_scale + n0, bias + n0, act, c, m0, n0);
  });
}

void check_args(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& weight_scale,
                int64_t out_features, int64_t kp, bool vnni) {
  const int64_t k = x.size(1);
  if (vnni) {
    TORCH_CHECK(brgemm::packs(at::kChar), "packed_weight is in the matrix unit's VNNI layout, which this CPU "
                "cannot run: pack it with pack_linear_int8(weight, vnni=False)");
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
  if (vnni && k > 0 && kp % 64 == 0 && amx::enabled()) {
    const int8_t* wq = packed_weight.const_data_ptr<int8_t>();
    amx::gemm<amx::Kind::kInt8>(q, tokens, kp, wq, (out_features + kBlockN - 1) / kBlockN,
                                [&](int64_t nb, int64_t m0, int64_t rows, const void* acc) {
      const int64_t n0 = nb * kBlockN, cols = std::min(kBlockN, out_features - n0);
      epilogue(static_cast<const int32_t*>(acc), kBlockN, rows, cols, xs + m0, ws + n0, b + n0, act, c, m0, n0);
    }, /*heavy_epilogue=*/act == cpu::Activation::kGelu);
    return out;
  }
  if (vnni && k > 0) {
    gemm_vnni(q, xs, tokens, kp, packed_weight.const_data_ptr<int8_t>(), ws, out_features, b, act, c);
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
