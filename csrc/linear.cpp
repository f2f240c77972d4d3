// linear on CPU: out = x @ weight^T (+ bias), the output columns split across the threads.
//
// MKL's own threading splits a (tokens x out_features) GEMM poorly when tokens is small (128 for one
// sequence): on 2 cores it reaches ~1.6-1.9x of one core (135-157 GFLOP/s measured at 128 x 768 x 3072).
// Here each thread computes a contiguous block of output columns with a single-threaded GEMM (MKL runs
// sequentially inside a parallel region): 156-167 GFLOP/s at the same shapes, distilbert-base at 1x128 ~10%
// faster end to end. From kSplitMaxTokens tokens on MKL's own threading is as good or better, so it is used.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {
namespace {

// Columns per block: a multiple of the widest vector (16 floats), so blocks start on cache lines.
constexpr int64_t kColumnAlign = 64;
constexpr int64_t kSplitMaxTokens = 256;

// o[r, :] = bias for every row of o (a thread's column block: row stride o.stride(0), unit column stride), by
// row memcpy; the GEMM then accumulates onto it (beta = 1). ATen's addmm would make the same broadcast copy
// through a generic strided copy on such a block, several times slower (160 us instead of ~20 us for one
// 128 x 1152 block).
void fill_rows(const at::Tensor& o, const at::Tensor& bias) {
  const int64_t row_bytes = o.size(1) * o.element_size(), stride_bytes = o.stride(0) * o.element_size();
  const auto* src = static_cast<const char*>(bias.const_data_ptr());
  auto* dst = static_cast<char*>(o.mutable_data_ptr());
  for (int64_t r = 0; r < o.size(0); ++r, dst += stride_bytes) std::memcpy(dst, src, row_bytes);
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_float(x, "x");
  check_same_dtype(weight, "weight", x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be (out_features, in_features=",
              x.size(1), "), got shape ", weight.sizes());
  const int64_t tokens = x.size(0), out_features = weight.size(0);
  if (bias.has_value()) {
    check_vector(*bias, "bias", out_features);
    check_same_dtype(*bias, "bias", x, "x");
  }
  auto out = cached_empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return out;
  if (x.size(1) == 0) return bias.has_value() ? out.copy_(bias->expand_as(out)) : out.zero_();
  // The GEMMs write into views of `out` from the worker threads: give them this thread's dispatch state
  // (inference mode included), below the autograd/inplace-or-view layer as a kernel runs.
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ThreadLocalState state;
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const auto bc = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || tokens > kSplitMaxTokens) {  // ATen's addmm: its bias copy is fast on whole rows
    return bc.has_value() ? at::addmm_out(out, *bc, xc, wc.t()) : at::mm_out(out, xc, wc.t());
  }
  const int64_t block = round_up((out_features + threads - 1) / threads, kColumnAlign);
  const int64_t n_blocks = (out_features + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(state);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * block, n = std::min(block, out_features - n0);
      auto o = out.narrow(1, n0, n);  // (tokens, n), row stride out_features
      const auto w = wc.narrow(0, n0, n);
      if (bc.has_value()) {
        fill_rows(o, bc->narrow(0, n0, n));
        at::addmm_out(o, o, xc, w.t());  // self is out: no copy; beta = 1 accumulates onto the bias rows
      } else {
        at::mm_out(o, xc, w.t());
      }
    }
  });
  return out;
}

}  // namespace

// Shared with the bf16 and int8 GEMMs (linear_bf16.cpp, linear_int8.cpp).
cpu::Activation parse_activation(c10::string_view activation) {
  if (activation == "none") return cpu::Activation::kNone;
  if (activation == "gelu") return cpu::Activation::kGelu;
  if (activation == "relu") return cpu::Activation::kRelu;
  TORCH_CHECK(false, "activation must be one of ('none', 'gelu', 'relu'), got '", std::string(activation), "'");
}

namespace {

// ---- packed weights -------------------------------------------------------------------------------------

at::Tensor pack_linear_weight_cpu(const at::Tensor& weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32 to be packed, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "weight must be (out_features, in_features), got shape ", weight.sizes());
  const int64_t panel = cpu::kernels().panel, n = weight.size(0), k = weight.size(1);
  const int64_t n_panels = (n + panel - 1) / panel;
  auto packed = at::zeros({n_panels, k, panel}, weight.options());
  const auto wc = weight.contiguous();
  const float* w = wc.const_data_ptr<float>();
  float* out = packed.mutable_data_ptr<float>();
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * panel, cols = std::min(panel, n - n0);
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t kk = 0; kk < k; ++kk) out[(p * k + kk) * panel + j] = w[(n0 + j) * k + kk];
    }
  });
  return packed;
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features,
                             const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_cpu(x, "x");
  check_cpu(packed_weight, "packed_weight");
  check_fp32(x, "x");
  check_fp32(packed_weight, "packed_weight");
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const int64_t panel = cpu::kernels().panel, tokens = x.size(0), k = x.size(1);
  const int64_t n_panels = (out_features + panel - 1) / panel;
  TORCH_CHECK(packed_weight.dim() == 3 && packed_weight.size(2) == panel,
              "packed_weight must be (n_panels, in_features, ", panel,
              ") as pack_linear_weight makes it on this CPU, got shape ", packed_weight.sizes());
  TORCH_CHECK(packed_weight.size(0) == n_panels && packed_weight.size(1) == k, "packed_weight must be (",
              n_panels, ", ", k, ", ", panel, ") for out_features=", out_features, " and in_features=", k,
              ", got shape ", packed_weight.sizes());
  TORCH_CHECK(packed_weight.is_contiguous(), "packed_weight must be contiguous, got strides ", packed_weight.strides());
  if (bias.has_value()) check_fp32_vector(*bias, "bias", out_features);
  const auto act = parse_activation(activation);
  auto out = cached_empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return out;
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  const auto& kern = cpu::kernels();
  const float* b = bc.has_value() ? bc->const_data_ptr<float>() : nullptr;
  float* c = out.mutable_data_ptr<float>();
  const float* a = xc.const_data_ptr<float>();
  const float* wp = packed_weight.const_data_ptr<float>();
  // Threads take contiguous runs of panels (output columns) and every row: each streams its own weights once.
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    kern.linear_panels(tokens, k, a, k, wp, begin, end, out_features, b, act, c, out_features);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
  m.impl("linear_packed", &linear_packed_cpu);
}

}  // namespace distilkernels
