// Argument checks (each failure names the argument and what was expected) and small helpers shared by the CPU ops.
// The wording is distilkernels/_checks.py's, which runs the same checks before dispatch on every backend; a raw
// torch.ops.distilkernels.* call gets them here, as RuntimeError.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace distilkernels {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has ", ref.scalar_type(), ": dtypes must match");
}

// The fp32-only ops (the packed GEMM, int8 row scaling).
inline void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

// A (size,) parameter vector such as a LayerNorm weight.
inline void check_vector(const at::Tensor& t, const char* name, int64_t size) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, name, " must be a 1-D tensor of size ", size, ", got shape ",
              t.sizes());
}

inline void check_fp32_vector(const at::Tensor& t, const char* name, int64_t size) {
  check_vector(t, name, size);
  check_fp32(t, name);
}

// The fp32 values of a parameter vector checked by check_vector (fp32, fp16 or bf16), for the kernels' fp32
// arguments: the tensor's own data when it is contiguous fp32, else a converted copy, or n zeros when there is
// no tensor. Not a tensor op: a bf16 LayerNorm weight or bias went through Tensor::to() on every call, with the
// dispatcher and an allocation (bf16 add_layer_norm at 128 x 768 rows: 23.5 -> 21.5 us per call without it).
class Fp32Values {
 public:
  Fp32Values(const c10::optional<at::Tensor>& t, int64_t n) {
    if (t.has_value() && t->scalar_type() == at::kFloat && t->is_contiguous()) {
      data_ = t->const_data_ptr<float>();
      return;
    }
    copy_.assign(n, 0.0f);
    if (t.has_value()) {
      const int64_t stride = t->stride(0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t->scalar_type(), "Fp32Values", [&] {
        const scalar_t* src = t->const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) copy_[i] = static_cast<float>(src[i * stride]);
      });
    }
    data_ = copy_.data();
  }
  const float* data() const { return data_; }

 private:
  std::vector<float> copy_;
  const float* data_ = nullptr;
};

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// at::parallel_for grain for loops over rows of `cols` values: ~16K values per task, so small inputs stay on
// one thread.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1)); }

}  // namespace distilkernels
