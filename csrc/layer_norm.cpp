// add_layer_norm on CPU: residual add, fp32 statistics and normalization in one pass per row, the row kept
// in L1 between its three sweeps (sum, centered sum of squares, affine output). bf16 rows are read and written
// as bf16, the row's fp32 sum held in a per-thread scratch row between the sweeps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {
namespace {

// Rows of `dim` values: x/residual/out (rows, dim) contiguous; mean/rstd (rows,).
template <typename T>
void add_layer_norm_rows(const T* x, const T* residual, const float* weight, const float* bias, float eps,
                         int64_t rows, int64_t dim, T* out, float* mean, float* rstd) {
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t r = begin; r < end; ++r) {
        float* o = out + r * dim;  // the output row holds x + residual between the sweeps
        k.add_layer_norm_row(x + r * dim, residual ? residual + r * dim : nullptr, weight, bias, eps, dim, o, o,
                             mean + r, rstd + r);
      }
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {  // bf16 in and out, fp32 only in registers
      const auto* xb = reinterpret_cast<const uint16_t*>(x);
      const auto* rb = reinterpret_cast<const uint16_t*>(residual);
      auto* ob = reinterpret_cast<uint16_t*>(out);
      std::vector<float> h(dim);
      for (int64_t r = begin; r < end; ++r)
        k.add_layer_norm_row_bf16(xb + r * dim, rb ? rb + r * dim : nullptr, weight, bias, eps, dim, h.data(),
                                  ob + r * dim, mean + r, rstd + r);
    } else {  // fp16: each row widened to fp32 scratch around the fp32 kernel
      std::vector<float> h(dim), res(residual ? dim : 0);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < dim; ++i) h[i] = static_cast<float>(x[r * dim + i]);
        if (residual)
          for (int64_t i = 0; i < dim; ++i) res[i] = static_cast<float>(residual[r * dim + i]);
        k.add_layer_norm_row(h.data(), residual ? res.data() : nullptr, weight, bias, eps, dim, h.data(), h.data(),
                             mean + r, rstd + r);
        for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = static_cast<T>(h[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& residual,
                                                                  const at::Tensor& weight, const at::Tensor& bias,
                                                                  double eps) {
  check_cpu(x, "x");
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must be (..., dim) with dim > 0, got shape ", x.sizes());
  const int64_t dim = x.size(-1);
  if (residual.has_value()) {
    check_cpu(*residual, "residual");
    check_same_dtype(*residual, "residual", x, "x");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
  }
  check_vector(weight, "weight", dim);
  check_vector(bias, "bias", dim);

  const at::Tensor x_c = x.contiguous();
  const at::Tensor res_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const Fp32Values w32(weight, dim), b32(bias, dim);
  at::Tensor out = cached_empty(x_c.sizes(), x_c.options());
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = cached_empty(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = cached_empty(stats_shape, x.options().dtype(at::kFloat));
  const int64_t rows = x_c.numel() / dim;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_layer_norm", [&] {
    add_layer_norm_rows<scalar_t>(x_c.const_data_ptr<scalar_t>(),
                                  res_c.defined() ? res_c.const_data_ptr<scalar_t>() : nullptr,
                                  w32.data(), b32.data(), static_cast<float>(eps),
                                  rows, dim, out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                                  rstd.mutable_data_ptr<float>());
  });
  return {out, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) { m.impl("add_layer_norm", &add_layer_norm_cpu); }

}  // namespace distilkernels
