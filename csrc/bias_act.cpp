// bias_act_ on CPU: x = act(x + bias) in place, act = exact (erf) GELU or ReLU, vectorized erf. bf16 rows are
// read and written as bf16, fp32 held in registers only.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu_kernels.h"

namespace distilkernels {
namespace {

// x: (rows, hidden_dim) contiguous, updated in place; bias: (hidden_dim,) fp32.
template <typename T>
void bias_act_rows(T* x, const float* bias, int64_t rows, int64_t hidden_dim, cpu::Activation act) {
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(hidden_dim), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t r = begin; r < end; ++r) k.bias_act_row(x + r * hidden_dim, bias, hidden_dim, act);
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {  // bf16 in and out, fp32 only in registers
      auto* xb = reinterpret_cast<uint16_t*>(x);
      for (int64_t r = begin; r < end; ++r) k.bias_act_row_bf16(xb + r * hidden_dim, bias, hidden_dim, act);
    } else {  // fp16: each row widened to fp32 scratch around the fp32 kernel
      std::vector<float> row(hidden_dim);
      for (int64_t r = begin; r < end; ++r) {
        T* xr = x + r * hidden_dim;
        for (int64_t i = 0; i < hidden_dim; ++i) row[i] = static_cast<float>(xr[i]);
        k.bias_act_row(row.data(), bias, hidden_dim, act);
        for (int64_t i = 0; i < hidden_dim; ++i) xr[i] = static_cast<T>(row[i]);
      }
    }
  });
}

void bias_act_cpu(const at::Tensor& x, const at::Tensor& bias, c10::string_view activation) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be (..., hidden_dim) with hidden_dim > 0, got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous (it is updated in place), got strides ", x.strides());
  check_vector(bias, "bias", x.size(-1));
  check_same_dtype(bias, "bias", x, "x");
  cpu::Activation act;
  if (activation == "gelu")
    act = cpu::Activation::kGelu;
  else if (activation == "relu")
    act = cpu::Activation::kRelu;
  else
    TORCH_CHECK(false, "activation must be one of ('gelu', 'relu'), got '", std::string(activation), "'");

  const int64_t hidden_dim = x.size(-1);
  const Fp32Values b32(bias, hidden_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_act_", [&] {
    bias_act_rows<scalar_t>(x.mutable_data_ptr<scalar_t>(), b32.data(), x.numel() / hidden_dim,
                            hidden_dim, act);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) { m.impl("bias_act_", &bias_act_cpu); }

}  // namespace distilkernels
