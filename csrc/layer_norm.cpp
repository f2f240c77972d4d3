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

// One row: out = LayerNorm(x + residual) (residual may be null), mean/rstd of the row. fp32 rows through the fp32
// kernel (out holds x + residual between its sweeps); bf16 rows read and written as bf16, fp32 only in registers
// and the scratch row h; fp16 rows widened into h (and res) around the fp32 kernel. h: dim floats (bf16, fp16);
// res: dim floats (fp16 with a residual).
template <typename T>
void add_layer_norm_row(const cpu::Kernels& k, const T* x, const T* residual, const float* weight, const float* bias,
                        float eps, int64_t dim, T* out, float* mean, float* rstd, float* h, float* res) {
  if constexpr (std::is_same_v<T, float>) {
    k.add_layer_norm_row(x, residual, weight, bias, eps, dim, out, out, mean, rstd);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    k.add_layer_norm_row_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(residual),
                              weight, bias, eps, dim, h, reinterpret_cast<uint16_t*>(out), mean, rstd);
  } else {
    for (int64_t i = 0; i < dim; ++i) h[i] = static_cast<float>(x[i]);
    if (residual)
      for (int64_t i = 0; i < dim; ++i) res[i] = static_cast<float>(residual[i]);
    k.add_layer_norm_row(h, residual ? res : nullptr, weight, bias, eps, dim, h, h, mean, rstd);
    for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<T>(h[i]);
  }
}

// Rows of `dim` values: x/residual/out (rows, dim) contiguous; mean/rstd (rows,).
template <typename T>
void add_layer_norm_rows(const T* x, const T* residual, const float* weight, const float* bias, float eps,
                         int64_t rows, int64_t dim, T* out, float* mean, float* rstd) {
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<float> h(std::is_same_v<T, float> ? 0 : dim), res(std::is_same_v<T, at::Half> && residual ? dim : 0);
    for (int64_t r = begin; r < end; ++r)
      add_layer_norm_row(k, x + r * dim, residual ? residual + r * dim : nullptr, weight, bias, eps, dim,
                         out + r * dim, mean + r, rstd + r, h.data(), res.data());
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

// The (batch, seqlen) int64 or int32 indices `ids` into a table of `rows` rows, as a contiguous int64 tensor;
// every value in range (checked here: an index past the table would read beyond it).
at::Tensor checked_ids(const at::Tensor& ids, const char* name, int64_t batch, int64_t seqlen, int64_t rows,
                       const char* table) {
  check_cpu(ids, name);
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name, " must be int64 or int32, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == batch && ids.size(1) == seqlen, name, " must be (batch, seqlen) = (",
              batch, ", ", seqlen, "), got shape ", ids.sizes());
  at::Tensor c = ids.to(at::kLong).contiguous();
  const int64_t* v = c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK_INDEX(v[i] >= 0 && v[i] < rows, name, " holds ", v[i], ", out of range for the ", rows, " rows of ",
                      table);
  return c;
}

void check_table(const at::Tensor& t, const char* name, const at::Tensor& word, int64_t dim) {
  check_cpu(t, name);
  check_same_dtype(t, name, word, "word");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == dim, name, " must be (rows, dim) with dim = ", dim, ", got shape ",
              t.sizes());
}

// Row r of every table, summed in the order HF sums them ((word + token_type) + position) and normalized.
// (Fetching the scattered word rows ahead, 2-16 rows, measured no faster: at 8 x 128 tokens after a 1.2 GB read
// the op takes ~0.69 ms whatever the distance, ~0.16 ms with its data in cache.)
template <typename T>
void embed_rows(const T* word, const int64_t* ids, const T* position, const int64_t* pos_ids, const T* type,
                const int64_t* type_ids, const float* weight, const float* bias, float eps, int64_t rows, int64_t dim,
                T* out, float* mean, float* rstd) {
  const auto& k = cpu::kernels();
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<float> h(std::is_same_v<T, float> ? 0 : dim), res(std::is_same_v<T, at::Half> ? dim : 0);
    std::vector<T> sum(type != nullptr ? dim : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* w = word + ids[r] * dim;
      if (type != nullptr) {  // word + token_type, rounded to T as HF's sum is
        const T* t = type + type_ids[r] * dim;
        for (int64_t i = 0; i < dim; ++i) sum[i] = static_cast<T>(static_cast<float>(w[i]) + static_cast<float>(t[i]));
        w = sum.data();
      }
      add_layer_norm_row(k, w, position + pos_ids[r] * dim, weight, bias, eps, dim, out + r * dim, mean + r,
                         rstd + r, h.data(), res.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_layer_norm_cpu(
    const at::Tensor& word, const at::Tensor& input_ids, const at::Tensor& position, const at::Tensor& position_ids,
    const std::optional<at::Tensor>& token_type, const std::optional<at::Tensor>& token_type_ids,
    const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_cpu(word, "word");
  check_float(word, "word");
  TORCH_CHECK(word.dim() == 2 && word.size(1) > 0, "word must be (vocab, dim) with dim > 0, got shape ", word.sizes());
  const int64_t dim = word.size(1);
  check_table(position, "position", word, dim);
  TORCH_CHECK(token_type.has_value() == token_type_ids.has_value(),
              "token_type and token_type_ids must be given together");
  if (token_type.has_value()) check_table(*token_type, "token_type", word, dim);
  check_cpu(input_ids, "input_ids");
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be (batch, seqlen), got shape ", input_ids.sizes());
  const int64_t batch = input_ids.size(0), seqlen = input_ids.size(1);
  const at::Tensor ids = checked_ids(input_ids, "input_ids", batch, seqlen, word.size(0), "word");
  const at::Tensor pos_ids = checked_ids(position_ids, "position_ids", batch, seqlen, position.size(0), "position");
  const at::Tensor type_ids = token_type.has_value()
      ? checked_ids(*token_type_ids, "token_type_ids", batch, seqlen, token_type->size(0), "token_type")
      : at::Tensor();
  check_vector(weight, "weight", dim);
  check_vector(bias, "bias", dim);
  const at::Tensor w_c = word.contiguous(), p_c = position.contiguous();
  const at::Tensor t_c = token_type.has_value() ? token_type->contiguous() : at::Tensor();
  const Fp32Values w32(weight, dim), b32(bias, dim);
  at::Tensor out = cached_empty({batch, seqlen, dim}, word.options());
  at::Tensor mean = cached_empty({batch, seqlen}, word.options().dtype(at::kFloat));
  at::Tensor rstd = cached_empty({batch, seqlen}, word.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, word.scalar_type(), "embed_layer_norm", [&] {
    embed_rows<scalar_t>(w_c.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), p_c.const_data_ptr<scalar_t>(),
                         pos_ids.const_data_ptr<int64_t>(), t_c.defined() ? t_c.const_data_ptr<scalar_t>() : nullptr,
                         type_ids.defined() ? type_ids.const_data_ptr<int64_t>() : nullptr, w32.data(), b32.data(),
                         static_cast<float>(eps), batch * seqlen, dim, out.mutable_data_ptr<scalar_t>(),
                         mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
  });
  return {out, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("add_layer_norm", &add_layer_norm_cpu);
  m.impl("embed_layer_norm", &embed_layer_norm_cpu);
}

}  // namespace distilkernels
