// The fp32 inner loops of the CPU ops, one table per instruction set (see vec.h for how one is chosen).
// Every pointer is to fp32 data; ops convert bf16/fp16 rows to fp32 scratch around these calls.
#pragma once

#include <cstdint>

namespace distilkernels {
namespace cpu {

enum class Activation : int { kGelu = 0, kRelu = 1, kNone = 2 };

struct Kernels {
  // Vector width in floats: gemm's n must be a multiple of it.
  int64_t width;
  // Columns per packed weight panel of linear_panels (two vectors).
  int64_t panel;
  // h = x + residual (residual may be null; h may alias x or out); out = (h - mean) * rstd * weight + bias.
  //   x, residual, h, out: (dim,); weight, bias: (dim,)
  void (*add_layer_norm_row)(const float* x, const float* residual, const float* weight, const float* bias,
                             float eps, int64_t dim, float* h, float* out, float* mean, float* rstd);
  // In place: x = act(x + bias).  x, bias: (n,)
  void (*bias_act_row)(float* x, const float* bias, int64_t n, Activation act);
  // c = a @ b (+ c when accumulate).  a: (m, k) row stride lda; b: (k, n) row stride ldb; c: (m, n) row
  // stride ldc; n a multiple of `width`.
  void (*gemm)(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate);
  // c[:, panels p0..p1) = act(a @ W^T + bias) on weights packed by panels: wp (ceil(n / panel), k, panel) with
  // wp[p, kk, j] = W[p * panel + j, kk], zero past n.  a: (m, k) row stride lda; bias: (n,) or null;
  // c: (m, n) row stride ldc.
  void (*linear_panels)(int64_t m, int64_t k, const float* a, int64_t lda, const float* wp, int64_t p0, int64_t p1,
                        int64_t n, const float* bias, Activation act, float* c, int64_t ldc);
  // One online-softmax step over a block of scores in log2 units, per row i < m:
  //   row_max[i] and row_sum[i] (running max and sum of exp2) are updated, s[i, :n] becomes exp2(s - max),
  //   and acc[i, :acc_n] is rescaled by exp2(old max - new max).
  //   s: (m, n) stride lds; acc: (m, acc_n) stride ldacc, acc_n a multiple of `width`.
  void (*softmax_update)(float* s, int64_t lds, int64_t m, int64_t n, float* row_max, float* row_sum,
                         float* acc, int64_t ldacc, int64_t acc_n);
  // y = x * scale.  x, y: (n,), may alias.
  void (*scale)(const float* x, float scale, int64_t n, float* y);
  // max |x[i]| over (n,) (0 for n = 0).
  float (*absmax)(const float* x, int64_t n);
  // q[i] = int8(round_to_nearest_even(x[i] * inv)).  x: (n,) fp32 with |x[i] * inv| <= 127.5; q: (n,)
  void (*quantize_int8)(const float* x, int64_t n, float inv, int8_t* q);
  // In place: y = y * scale + bias.  y, bias: (n,)
  void (*scale_add)(float* y, float scale, const float* bias, int64_t n);
  // dst[d * ld + j] = rows[j][d] for j < n, d < dim: n rows, each given by a pointer, transposed.
  void (*transpose_rows)(const float* const* rows, int64_t n, int64_t dim, float* dst, int64_t ld);

  // bf16 rows (raw bits), fp32 only in registers: loads widen exactly, stores round to nearest even with NaN
  // -> 0x7FC0, bit for bit what c10::BFloat16 does.
  // In place: x = act(x + bias).  x: (n,) bf16; bias: (n,) fp32
  void (*bias_act_row_bf16)(uint16_t* x, const float* bias, int64_t n, Activation act);
  // y = x, widened exactly.  x: (n,) bf16; y: (n,) fp32
  void (*widen_bf16)(const uint16_t* x, int64_t n, float* y);
  // out = (h - mean) * rstd * weight + bias with h = x + residual (residual may be null) summed in fp32 into h
  // (scratch).  x, residual, out: (dim,) bf16; h: (dim,) fp32 scratch; weight, bias: (dim,) fp32
  void (*add_layer_norm_row_bf16)(const uint16_t* x, const uint16_t* residual, const float* weight,
                                  const float* bias, float eps, int64_t dim, float* h, uint16_t* out, float* mean,
                                  float* rstd);
  // y = bf16(x * scale).  x: (n,) fp32; y: (n,) bf16
  void (*scale_to_bf16)(const float* x, float scale, int64_t n, uint16_t* y);
  // softmax_update on raw scores s * scale (scaled in registers, s is read only), writing the probabilities
  // as bf16 to p[i, :n] (stride ldp) and zeros to p[i, n:n_pad); row_max, row_sum (of the fp32 values) and
  // acc as in softmax_update, except that rows seeing their first block (row_max -inf on entry) leave acc
  // untouched: the caller writes those rows afresh. The probabilities' exp2 is accurate to bf16's needs
  // (exp2_bf16 in cpu_kernels_impl.h), not to fp32's.
  void (*softmax_update_bf16)(const float* s, int64_t lds, int64_t m, int64_t n, int64_t n_pad, float scale,
                              float* row_max, float* row_sum, float* acc, int64_t ldacc, int64_t acc_n,
                              uint16_t* p, int64_t ldp);
  // A GEMM's bf16 epilogue: out[r, j] = bf16(act(acc[r, j] + bias[j])) for r < rows, j < cols.
  //   acc: (rows, cols) fp32 row stride ld_acc; bias: (cols,); out: (rows, cols) bf16 row stride ld_out.
  void (*bias_act_to_bf16)(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                           Activation act, uint16_t* out, int64_t ld_out);
  // An int8 GEMM's epilogue: out[r, j] = act(float(acc[r, j]) * (row_scale[r] * col_scale[j]) + bias[j]).
  //   acc: (rows, cols) int32 row stride ld_acc; row_scale: (rows,); col_scale, bias: (cols,); out: (rows, cols)
  //   row stride ld_out.
  void (*dequant_bias_act)(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* row_scale,
                           const float* col_scale, const float* bias, Activation act, float* out, int64_t ld_out);
  // The same, rounded to bf16 (as bias_act_to_bf16 rounds): out (rows, cols) bf16 row stride ld_out.
  void (*dequant_bias_act_bf16)(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                                const float* row_scale, const float* col_scale, const float* bias, Activation act,
                                uint16_t* out, int64_t ld_out);
  // fp32 x as bf16 hi + lo for the bf16x3 GEMM: out[0, n) = hi = bf16(x), out[seg, seg + n) = lo = bf16(x - hi)
  // (0 where x - hi is not finite); zeros in [n, seg) of each segment.
  //   x: (n,) fp32; out: (2 seg,) bf16; seg >= n
  void (*split_bf16x3)(const float* x, int64_t n, int64_t seg, uint16_t* out);
  // A GEMM's fp32 epilogue: out[r, j] = act(acc[r, j] + bias[j]), or act(out[r, j] + acc[r, j] + bias[j]) where
  // `accumulate` (acc and out as bias_act_to_bf16's, out fp32).
  void (*bias_act_to_f32)(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                          Activation act, float* out, int64_t ld_out, bool accumulate);
  // An int8 GEMM's product on CPUs without int8 dot products (VNNI), exact in int32:
  //   acc[r, j] = sum_kk a[r, kk] * w[kk, j] for r < rows, j < 64.
  //   a: (rows, kp) int16 holding int8 values, row stride lda; wb: one 64-column block of the int8 VNNI layout,
  //   w[kk, j] at wb[(kk / 4 * 64 + j) * 4 + kk % 4]; kp a multiple of 4; acc: (rows, 64) int32 row stride ld_acc.
  void (*gemm_s8_block)(int64_t rows, int64_t kp, const int16_t* a, int64_t lda, const int8_t* wb, int32_t* acc,
                        int64_t ld_acc);
  // The same product on AVX512-VNNI dot products (null where the CPU or the table has none): a given as
  // au8 = a + 128, uint8 (rows, kp) row stride lda; acc as gemm_s8_block's.
  void (*gemm_u8s8_block)(int64_t rows, int64_t kp, const uint8_t* au8, int64_t lda, const int8_t* wb,
                          int32_t* acc, int64_t ld_acc);
};

const Kernels& kernels();

}  // namespace cpu
}  // namespace distilkernels
