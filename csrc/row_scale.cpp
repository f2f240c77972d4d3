// Per-row scaling around a per-tensor int8 GEMM, for per-token activation quantization (distilkernels.quant):
// normalize_rows gives every row a max-abs of 1 before the GEMM quantizes the whole matrix with one scale, and
// scale_rows_ multiplies each output row back by its row's scale (adding the bias) after it. The GEMM is
// linear, so only the rounding grid changes: each token gets its own.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {
namespace {

// Rows with a smaller max-abs (all zeros, say) are divided by this instead.
constexpr float kMinScale = 1e-12f;

void check_matrix(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_fp32(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, cols), got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_cpu(const at::Tensor& x) {
  check_matrix(x, "x");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  at::Tensor out = cached_empty({rows, cols}, xc.options());
  at::Tensor scale = cached_empty({rows}, xc.options());
  const float* src = xc.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  float* s = scale.mutable_data_ptr<float>();
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      s[r] = std::max(k.absmax(src + r * cols, cols), kMinScale);
      k.scale(src + r * cols, 1.0f / s[r], cols, dst + r * cols);
    }
  });
  return {out, scale};
}

void scale_rows_cpu(const at::Tensor& y, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  check_matrix(y, "y");
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous (it is updated in place), got strides ", y.strides());
  const int64_t rows = y.size(0), cols = y.size(1);
  check_fp32_vector(scale, "scale", rows);
  at::Tensor bc;
  if (bias.has_value()) {
    check_fp32_vector(*bias, "bias", cols);
    bc = bias->contiguous();
  }
  const at::Tensor sc = scale.contiguous();
  float* data = y.mutable_data_ptr<float>();
  const float* s = sc.const_data_ptr<float>();
  const float* b = bc.defined() ? bc.const_data_ptr<float>() : nullptr;
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (b != nullptr)
        k.scale_add(data + r * cols, s[r], b, cols);
      else
        k.scale(data + r * cols, s[r], cols, data + r * cols);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("normalize_rows", &normalize_rows_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
}

}  // namespace distilkernels
