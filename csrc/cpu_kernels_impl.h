// The fp32 inner loops, written once against a small vector vocabulary and compiled once per instruction
// set. No include guard on purpose: cpu_kernels.cpp includes this file three times, each time inside a
// `#pragma GCC target` region with DK_ISA_NS (namespace name) and DK_ISA_LEVEL (0 scalar, 1 AVX2+FMA,
// 2 AVX-512) defined. Vector types are GCC vector extensions (+, -, *, / work on them directly).

namespace distilkernels {
namespace cpu {
namespace DK_ISA_NS {

#define DK_INLINE inline __attribute__((always_inline))

// ---- scalar vocabulary (every instruction set uses it for loop tails) -----------------------------------

DK_INLINE float splat(float x, float) { return x; }
#if DK_ISA_LEVEL == 0
DK_INLINE float vfma(float a, float b, float c) { return a * b + c; }  // fmaf would be a libm call here
#else
DK_INLINE float vfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#endif
DK_INLINE float vmax(float a, float b) { return a > b ? a : b; }
DK_INLINE float vmin(float a, float b) { return a < b ? a : b; }
DK_INLINE float vround(float x) { return __builtin_rintf(x); }
DK_INLINE float vabs(float x) { return __builtin_fabsf(x); }
DK_INLINE float vselect_lt(float a, float b, float x, float y) { return a < b ? x : y; }
DK_INLINE float vrcp(float x) { return 1.0f / x; }
// 2^n for an integral n in [-127, 127] (n = -127 gives 0).
DK_INLINE float vpow2i(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}
DK_INLINE float hsum(float x) { return x; }
DK_INLINE float hmax(float x) { return x; }

// ---- vector vocabulary ----------------------------------------------------------------------------------

#if DK_ISA_LEVEL == 2
using V = __m512;
constexpr int64_t kW = 16;
DK_INLINE V vload(const float* p) { return _mm512_loadu_ps(p); }
DK_INLINE V vload_i32(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
DK_INLINE void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
DK_INLINE V splat(float x, V) { return _mm512_set1_ps(x); }
DK_INLINE V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
DK_INLINE V vmax(V a, V b) { return _mm512_max_ps(a, b); }
DK_INLINE V vmin(V a, V b) { return _mm512_min_ps(a, b); }
DK_INLINE V vround(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
DK_INLINE V vabs(V x) { return _mm512_abs_ps(x); }
DK_INLINE V vrcp(V x) {  // 14-bit estimate + one Newton step
  const V r = _mm512_rcp14_ps(x);
  return r * (_mm512_set1_ps(2.0f) - x * r);
}
DK_INLINE V vselect_lt(V a, V b, V x, V y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x); }
DK_INLINE V vpow2i(V n) {
  const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
}
DK_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
// The lanes of a row's last `count` (< kW) values, for masked loads and stores of a tail; 0 when count is 0.
DK_INLINE __mmask16 tail_lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }
DK_INLINE float hmax(V v) { return _mm512_reduce_max_ps(v); }
constexpr int kGemmRows = 12;  // 12 x 2 accumulators + 2 loads + 1 broadcast of 32 registers

#elif DK_ISA_LEVEL == 1
using V = __m256;
constexpr int64_t kW = 8;
DK_INLINE V vload(const float* p) { return _mm256_loadu_ps(p); }
DK_INLINE V vload_i32(const int32_t* p) { return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
DK_INLINE void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
DK_INLINE V splat(float x, V) { return _mm256_set1_ps(x); }
DK_INLINE V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
DK_INLINE V vmax(V a, V b) { return _mm256_max_ps(a, b); }
DK_INLINE V vmin(V a, V b) { return _mm256_min_ps(a, b); }
DK_INLINE V vround(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
DK_INLINE V vabs(V x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
DK_INLINE V vrcp(V x) {  // 12-bit estimate + one Newton step
  const V r = _mm256_rcp_ps(x);
  return r * (_mm256_set1_ps(2.0f) - x * r);
}
DK_INLINE V vselect_lt(V a, V b, V x, V y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
DK_INLINE V vpow2i(V n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}
DK_INLINE float hsum(V v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
DK_INLINE float hmax(V v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
constexpr int kGemmRows = 6;  // 6 x 2 accumulators + 2 loads + 1 broadcast of 16 registers

#else
using V = float;
constexpr int64_t kW = 1;
DK_INLINE V vload(const float* p) { return *p; }
DK_INLINE V vload_i32(const int32_t* p) { return static_cast<float>(*p); }
DK_INLINE void vstore(float* p, V v) { *p = v; }
constexpr int kGemmRows = 4;
#endif

// ---- math -----------------------------------------------------------------------------------------------

// 2^x for x <= 127, 0 below -127: 2^round(x) times a degree-7 Taylor polynomial of 2^f, |f| <= 0.5
// (truncation error < 1e-8 relative, below fp32 rounding).
template <class T>
DK_INLINE T exp2_approx(T x) {
  const T z = splat(0.0f, x);
  x = vmin(vmax(x, splat(-127.0f, z)), splat(127.0f, z));
  const T n = vround(x);
  const T f = x - n;
  T p = splat(1.5252733804059841e-05f, z);  // ln2^7 / 7!
  p = vfma(p, f, splat(1.5403530393381609e-04f, z));
  p = vfma(p, f, splat(1.3333558146428443e-03f, z));
  p = vfma(p, f, splat(9.6181291076284772e-03f, z));
  p = vfma(p, f, splat(5.5504108664821580e-02f, z));
  p = vfma(p, f, splat(2.4022650695910071e-01f, z));
  p = vfma(p, f, splat(6.9314718055994531e-01f, z));
  p = vfma(p, f, splat(1.0f, z));
  return p * vpow2i(n);
}

#if DK_ISA_LEVEL == 2
// 2^x as poly(f) * 2^floor(x), in the instructions AVX-512 has for it: vreduceps gives f = x - floor(x) in
// [0, 1) (imm 0x09: keep no fraction bits, round down, no precision exception) and vscalefps multiplies by
// 2^floor(x). Below x = -126 the result is 0 (the generic form gives 0 below -127) rather than a denormal:
// producing one costs a microcode assist (3x slower softmax on scores that spread past 2^126).
template <class Poly>
DK_INLINE V exp2_scalef(V x, Poly poly) {
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, splat(-126.0f, x), _CMP_GE_OQ), poly(_mm512_reduce_ps(x, 0x09)),
                                x);
}

// The same 2^x as exp2_approx's generic form in 9 instructions against 15: 2^f is a degree-6 relative
// least-squares fit on [0, 1] (relative error 1.9e-9 in exact arithmetic, <= 8.4e-8 evaluated in fp32: under
// 1.5 roundings, as the degree-7 form above). The GELU epilogue and the fp32 softmax both run it.
DK_INLINE V exp2_approx(V x) {
  return exp2_scalef(x, [](V f) {
    V p = splat(2.1702254890e-04f, f);
    p = vfma(p, f, splat(1.2439688435e-03f, f));
    p = vfma(p, f, splat(9.6788406372e-03f, f));
    p = vfma(p, f, splat(5.5483341217e-02f, f));
    p = vfma(p, f, splat(2.4022983015e-01f, f));
    p = vfma(p, f, splat(6.9314700365e-01f, f));
    return vfma(p, f, splat(1.0f, f));
  });
}
#endif

// Exact GELU, y * Phi(y) = y * (1 - erfc(y / sqrt2) / 2), with erfc(x) = exp(-x^2) * Q(t - 1/2) for x >= 0,
// t = 1 / (1 + x/2): Q is a weighted least-squares fit of erfc(x) * exp(x^2) on [0, 4.5] (erf abs error
// <= 3e-7, largest near 0 where gelu multiplies it by |y| / 2). Negative y use Phi(y) = erfc(|y| / sqrt2) / 2
// directly, so the tail keeps its relative accuracy. x = |y| / sqrt2 is clamped to [2^-60, 9.5]: from below so
// that x^2, exp2's input, is never a denormal number (denormals cost microcode assists: AVX-512's vreduceps
// takes one per denormal input, and repeated GELUs of small values ran 13x slower); from above at 9.1, where
// erfc(x) / 2 ~ 2^-125 and Phi(-|y|) is 0 to fp32's normal range (|y| > 12.9): past it exp2's input is set
// below -126, where exp2_approx gives exactly 0. (Clamped at 9.5 alone, x in [9.1, 9.4] gave denormal
// products exp2 * Q / 2, and lin1 outputs spread to |y| ~ 13 ran the epilogue 2-3x slower.)
template <class T>
DK_INLINE T gelu(T y) {
  const T z = splat(0.0f, y);
  const T half = splat(0.5f, z);
  const T ax = vmin(vmax(vabs(y) * splat(0.70710678118654752f, z), splat(0x1p-60f, z)), splat(9.1f, z));
  const T t = vrcp(vfma(half, ax, splat(1.0f, z))) - half;
  T q = splat(0.10158848762512207f, z);
  q = vfma(q, t, splat(-0.313117116689682f, z));
  q = vfma(q, t, splat(0.08804816007614136f, z));
  q = vfma(q, t, splat(0.6267610788345337f, z));
  q = vfma(q, t, splat(0.9671090841293335f, z));
  q = vfma(q, t, splat(0.8543526530265808f, z));
  q = vfma(q, t, splat(0.2553957998752594f, z));
  const T e = vselect_lt(ax, splat(9.1f, z), ax * ax * splat(-1.4426950408889634f, z), splat(-200.0f, z));
  const T half_erfc = exp2_approx(e) * q * half;
  return y * vselect_lt(y, z, half_erfc, splat(1.0f, z) - half_erfc);
}

// GELU for results rounded to bf16 right after (the AMX epilogue, bias_act_ in bf16), in 19 vector instructions
// with AVX-512 against gelu's 35. Phi(-|y|) = erfc(|y| / sqrt2) / 2 is taken as 1 / (2 P(|y|)^32), P of degree 5
// with constant term 1 (so that Phi(0) is 1/2 exactly, on both sides: gelu(y) = y / 2 for tiny y) and the others
// a minimax fit on [0, 6.5] of the error relative to max(Phi, 1e-4): relative error at most 5.7e-5 where
// Phi(-|y|) > 1e-5 (|y| < 4.26), 1.1e-2 where it is > 1e-8 (|y| < 5.6), 6% up to 6.5, absolute 4.2e-6 (fp32
// evaluation included). (A 32nd power lets a degree-5 P reach what a 16th power needed degree 7 for.) Past
// |y| = 6.5, Phi(-|y|) < 4.1e-11 is taken as 0 (|y| is clamped there: P^32 < 2^34 stays far from overflow and
// its reciprocal from denormals), as torch's fp32 GELU does past ~5.5 (its 1 + erf cancels). Against an fp64
// GELU, over every finite bf16 input: within one bf16 rounding (half an ulp) wherever |gelu(y)| >= 1e-4, and
// within the fit's relative error above plus half an ulp below that (torch's own bf16 GELU is off by up to 448
// half-ulps there with AVX-512, 15 under MKL's AVX2 code, which is within half an ulp at y = -4.47 where this is
// 1.06 half-ulps off).
// In the lin1 GEMM's epilogue (bf16, 1024 x 768 -> 3072, 2 threads) the GELU costs 15-20% over no activation.
constexpr float kGeluBf16Clamp = 6.5f;
template <class T>
DK_INLINE T gelu_bf16_p(T ax) {  // P(|y|)^32
  T p = splat(1.961581109e-05f, ax);
  p = vfma(p, ax, splat(-7.872033492e-05f, ax));
  p = vfma(p, ax, splat(1.388907228e-03f, ax));
  p = vfma(p, ax, splat(1.025773732e-02f, ax));
  p = vfma(p, ax, splat(2.493467558e-02f, ax));
  p = vfma(p, ax, splat(1.0f, ax));
  p = p * p;
  p = p * p;
  p = p * p;
  p = p * p;
  return p * p;
}
// y * Phi(y) = max(y, 0) - |y| Phi(-|y|) for either sign, in one rounding: one instruction fewer than
// selecting Phi(y) by the sign. |y| is the clamped one: past the clamp Phi(-|y|) is 0 and the result max(y, 0)
// (+inf at +inf, 0 at -inf where torch gives -inf * 0 = NaN; NaN at NaN, max's second operand).
template <class T>
DK_INLINE T gelu_bf16(T y) {
  const T z = splat(0.0f, y);
  const T clamp = splat(kGeluBf16Clamp, z);
  const T ax = vmin(vabs(y), clamp);  // NaN -> the clamp, where Phi(-|y|) is 0
  // Phi(-|y|), 0 past the clamp; 1/2 at y = 0 (exactly with AVX-512's estimate and Newton step, within an ulp
  // with AVX2's)
  const T h = vselect_lt(ax, clamp, splat(0.5f, z) * vrcp(gelu_bf16_p(ax)), z);
  return vfma(-ax, h, vmax(z, y));
}
#if DK_ISA_LEVEL == 2
DK_INLINE V gelu_bf16(V y) {  // the same, the select as a masked multiply
  const V clamp = splat(kGeluBf16Clamp, y);
  const V ax = _mm512_min_ps(_mm512_abs_ps(y), clamp);
  const V h = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(ax, clamp, _CMP_LT_OQ), splat(0.5f, y), vrcp(gelu_bf16_p(ax)));
  return _mm512_fnmadd_ps(ax, h, _mm512_max_ps(_mm512_setzero_ps(), y));
}
#endif

template <class T>
DK_INLINE T relu(T y) {
  return vmax(splat(0.0f, y), y);  // max(0, NaN) is NaN: the NaN operand is the second one
}

// ---- layer norm -----------------------------------------------------------------------------------------

// Four independent accumulator chains per sum: an add or FMA waits ~4 cycles for its input, so one chain over
// a 768-value row (48 vectors) spends most of its time waiting. With one chain per sum, add_layer_norm ran
// ~900 cycles per bf16 row of 768 on the AMX Xeon (1024 rows: 152 us at 2 threads).
//
// sum over the whole vectors of [0, vec_end) of value(i), four vectors per step.
template <class Value>
DK_INLINE float sum4(int64_t vec_end, Value value) {
  const V z = splat(0.0f, V());
  V a0 = z, a1 = z, a2 = z, a3 = z;
  int64_t i = 0;
  for (; i + 4 * kW <= vec_end; i += 4 * kW) {
    a0 = a0 + value(i);
    a1 = a1 + value(i + kW);
    a2 = a2 + value(i + 2 * kW);
    a3 = a3 + value(i + 3 * kW);
  }
  for (; i < vec_end; i += kW) a0 = a0 + value(i);
  return hsum((a0 + a1) + (a2 + a3));
}

// The centered sums of pass 2 over the whole vectors of [0, vec_end) of h(i): the deviations d = h - mean
// and their squares (the two-pass algorithm: no cancellation on rows with a large mean; the sum of the
// deviations corrects the rounding error of the first mean, the corrected two-pass algorithm).
template <class Value>
DK_INLINE void centered_sums4(int64_t vec_end, float mean, Value h, float& dev, float& sq) {
  const V z = splat(0.0f, V()), vm = splat(mean, z);
  V d0 = z, d1 = z, d2 = z, d3 = z, s0 = z, s1 = z, s2 = z, s3 = z;
  int64_t i = 0;
  for (; i + 4 * kW <= vec_end; i += 4 * kW) {
    const V e0 = h(i) - vm, e1 = h(i + kW) - vm, e2 = h(i + 2 * kW) - vm, e3 = h(i + 3 * kW) - vm;
    d0 = d0 + e0;
    d1 = d1 + e1;
    d2 = d2 + e2;
    d3 = d3 + e3;
    s0 = vfma(e0, e0, s0);
    s1 = vfma(e1, e1, s1);
    s2 = vfma(e2, e2, s2);
    s3 = vfma(e3, e3, s3);
  }
  for (; i < vec_end; i += kW) {
    const V e = h(i) - vm;
    d0 = d0 + e;
    s0 = vfma(e, e, s0);
  }
  dev = hsum((d0 + d1) + (d2 + d3));
  sq = hsum((s0 + s1) + (s2 + s3));
}

// mean and rstd of a row of n values from its first-pass mean and the centered sums.
DK_INLINE void finish_stats(float n, float dev, float sq, float eps, float& mean, float& rstd) {
  const float var = vmax(0.0f, (sq - dev * dev / n) / n);
  mean += dev / n;
  rstd = 1.0f / __builtin_sqrtf(var + eps);
}

void add_layer_norm_row(const float* x, const float* residual, const float* weight, const float* bias, float eps,
                        int64_t dim, float* h, float* out, float* mean_out, float* rstd_out) {
  const V z = splat(0.0f, V());
  const int64_t vec_end = dim - dim % kW;
  // Pass 1: h = x + residual, and its sum.
  float sum;
  if (residual != nullptr) {
    sum = sum4(vec_end, [&](int64_t i) {
      const V v = vload(x + i) + vload(residual + i);
      vstore(h + i, v);
      return v;
    });
    for (int64_t j = vec_end; j < dim; ++j) h[j] = x[j] + residual[j];
  } else {
    if (h != x) __builtin_memcpy(h, x, dim * sizeof(float));
    sum = sum4(vec_end, [&](int64_t i) { return vload(h + i); });
  }
  for (int64_t j = vec_end; j < dim; ++j) sum += h[j];
  const float n = static_cast<float>(dim);
  float mean = sum / n, dev, sq, rstd;
  // Pass 2: centered sums.
  centered_sums4(vec_end, mean, [&](int64_t i) { return vload(h + i); }, dev, sq);
  for (int64_t j = vec_end; j < dim; ++j) {
    dev += h[j] - mean;
    sq += (h[j] - mean) * (h[j] - mean);
  }
  finish_stats(n, dev, sq, eps, mean, rstd);
  // Pass 3: normalize and apply the affine weight.
  const V vmean = splat(mean, z), vrstd = splat(rstd, z);
  int64_t i = 0;
  for (; i < vec_end; i += kW)
    vstore(out + i, vfma((vload(h + i) - vmean) * vrstd, vload(weight + i), vload(bias + i)));
  for (; i < dim; ++i) out[i] = vfma((h[i] - mean) * rstd, weight[i], bias[i]);
  *mean_out = mean;
  *rstd_out = rstd;
}

// ---- bias + activation ----------------------------------------------------------------------------------

// store(i, value(i)) for every whole vector of [0, n), four per step: GELU is one long dependency chain per
// vector, and four independent chains in one loop body let the core overlap them (all four are computed before
// any is stored, so value may read what store writes); then tail(i) for each value past the last whole vector.
template <class Value, class Store, class Tail>
DK_INLINE void vector_loop4(int64_t n, Value value, Store store, Tail tail) {
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i + 4 * kW <= vec_end; i += 4 * kW) {
    const V y0 = value(i), y1 = value(i + kW), y2 = value(i + 2 * kW), y3 = value(i + 3 * kW);
    store(i, y0);
    store(i + kW, y1);
    store(i + 2 * kW, y2);
    store(i + 3 * kW, y3);
  }
  for (; i < vec_end; i += kW) store(i, value(i));
  for (; i < n; ++i) tail(i);
}

template <class Act>
DK_INLINE void bias_act_loop(float* x, const float* bias, int64_t n, Act act) {
  vector_loop4(
      n, [&](int64_t i) { return act(vload(x + i) + vload(bias + i)); }, [&](int64_t i, V y) { vstore(x + i, y); },
      [&](int64_t i) { x[i] = act(x[i] + bias[i]); });
}

void bias_act_row(float* x, const float* bias, int64_t n, Activation act) {
  switch (act) {
    case Activation::kGelu: return bias_act_loop(x, bias, n, [](auto y) { return gelu(y); });
    case Activation::kRelu: return bias_act_loop(x, bias, n, [](auto y) { return relu(y); });
    default: return bias_act_loop(x, bias, n, [](auto y) { return y; });
  }
}

// ---- attention pieces -----------------------------------------------------------------------------------

// Memory to fetch into L2 while a register tile computes: `lines` cache lines from `next` on, spread evenly
// over the tile's k loop (see linear_panels_impl). Empty by default.
struct Prefetch {
  const char* next = nullptr;
  int64_t lines = 0;
};

// Register-blocked c[kRows, kCols * kW] (+)= a[kRows, k] @ b[k, kCols * kW].
template <int kRows, int kCols>
DK_INLINE void gemm_tile(int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                         bool accumulate, Prefetch pf = {}) {
  V acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kCols; ++j) acc[r][j] = accumulate ? vload(c + r * ldc + j * kW) : splat(0.0f, V());
  // k in `chunks` runs of `step` iterations, each after a prefetch of `per` lines (one run when none).
  const int64_t step = pf.lines <= 0 ? k : k > pf.lines ? k / pf.lines : 1;
  const int64_t chunks = step > 0 ? (k + step - 1) / step : 0;
  const int64_t per = chunks > 0 ? (pf.lines + chunks - 1) / chunks : 0;
  for (int64_t p = 0; p < k;) {
    for (int64_t q = 0; q < per && pf.lines > 0; ++q, --pf.lines, pf.next += 64) __builtin_prefetch(pf.next, 0, 2);
    for (const int64_t end = p + step < k ? p + step : k; p < end; ++p) {
      V bv[kCols];
      for (int j = 0; j < kCols; ++j) bv[j] = vload(b + p * ldb + j * kW);
      for (int r = 0; r < kRows; ++r) {
        const V av = splat(a[r * lda + p], V());
        for (int j = 0; j < kCols; ++j) acc[r][j] = vfma(av, bv[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kCols; ++j) vstore(c + r * ldc + j * kW, acc[r][j]);
}

template <int kCols>
DK_INLINE void gemm_tile_rows(int rows, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                              int64_t ldc, bool accumulate, Prefetch pf = {}) {
  switch (rows) {
    case 1: return gemm_tile<1, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 2: return gemm_tile<2, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 3: return gemm_tile<3, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 4: return gemm_tile<4, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
#if DK_ISA_LEVEL >= 1
    case 5: return gemm_tile<5, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 6: return gemm_tile<6, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
#endif
#if DK_ISA_LEVEL >= 2
    case 7: return gemm_tile<7, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 8: return gemm_tile<8, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 9: return gemm_tile<9, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 10: return gemm_tile<10, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 11: return gemm_tile<11, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
    case 12: return gemm_tile<12, kCols>(k, a, lda, b, ldb, c, ldc, accumulate, pf);
#endif
    default: __builtin_unreachable();
  }
}

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  // Column panels of b (k x 2 vectors) stay in L1 while every row tile of a streams past them.
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW)
    for (int64_t i = 0; i < m; i += kGemmRows)
      gemm_tile_rows<2>(static_cast<int>(m - i < kGemmRows ? m - i : kGemmRows), k, a + i * lda, lda, b + j, ldb,
                        c + i * ldc + j, ldc, accumulate);
  for (; j < n; j += kW)
    for (int64_t i = 0; i < m; i += kGemmRows)
      gemm_tile_rows<1>(static_cast<int>(m - i < kGemmRows ? m - i : kGemmRows), k, a + i * lda, lda, b + j, ldb,
                        c + i * ldc + j, ldc, accumulate);
}

// ---- linear on packed weights ---------------------------------------------------------------------------
//
// c[m, n] = act(a[m, k] @ W^T + bias) with W (n, k) packed once into panels of kPanel columns:
// wp[p, kk, j] = W[p * kPanel + j, kk], zero past n. Each panel is the contiguous `b` operand of gemm_tile, so
// no GEMM call copies weights (MKL repacks them on every call: ~13% of a distilbert-base forward at 1 x 128).
// Blocking: a (kLinearMc x kLinearKc) block of `a` stays in L2 while every panel of the range passes it; bias
// and activation are applied to each register tile's rows right after their last k-block, while still in L1.

constexpr int64_t kPanel = 2 * kW;
// k blocks: at AVX-512, 256 keeps a tile's panel chunk (256 x 32 floats, 32 KB) in L1 beside its rows of a; at
// 768 it streamed from L2 for every row tile. Measured on the 2-core AMX Xeon (2 threads, 128 rows, us per call
// with weights in cache / from memory), 8-row tiles at k 768 -> 12-row tiles at k 256: q|k|v 1542/1631 ->
// 1438/1498, lin1 + GELU 2277/2232 -> 1996/2058, lin2 2073/2182 -> 1975/2009 (k 192 and 384 no better). AVX2's
// panels are half as wide; it keeps the blocking it was measured with.
constexpr int64_t kLinearKc = kW == 16 ? 256 : 768;
constexpr int64_t kLinearMc = 24 * kGemmRows;

template <class Act>
DK_INLINE void epilogue_rows(int64_t rows, int64_t cols, const float* bias, float* c, int64_t ldc, Act act) {
  const int64_t vec_end = cols - cols % kW;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    int64_t j = 0;
    if (bias != nullptr) {
      for (; j < vec_end; j += kW) vstore(row + j, act(vload(row + j) + vload(bias + j)));
      for (; j < cols; ++j) row[j] = act(row[j] + bias[j]);
    } else {
      for (; j < vec_end; j += kW) vstore(row + j, act(vload(row + j)));
      for (; j < cols; ++j) row[j] = act(row[j]);
    }
  }
}

template <class Act>
void linear_panels_impl(int64_t m, int64_t k, const float* a, int64_t lda, const float* wp, int64_t p0, int64_t p1,
                        int64_t n, const float* bias, float* c, int64_t ldc, Act act) {
  float edge[kLinearMc * kPanel];  // the last panel's rows when n is not a multiple of kPanel
  for (int64_t i0 = 0; i0 < m; i0 += kLinearMc) {
    const int64_t mc = m - i0 < kLinearMc ? m - i0 : kLinearMc;
    for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += kLinearKc) {  // k = 0 still runs once: out = act(bias)
      const int64_t kc = k - k0 < kLinearKc ? k - k0 : kLinearKc;
      const bool last = k0 + kc == k;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, cols = n - n0 < kPanel ? n - n0 : kPanel;
        const float* panel = wp + (p * k + k0) * kPanel;
        float* cp = cols == kPanel ? c + i0 * ldc + n0 : edge;
        const int64_t ldcp = cols == kPanel ? ldc : kPanel;
        // The weight chunk the loop reads next (the next panel, or the first one of the next k or row block)
        // is fetched into L2 while this one computes, a share of it per row tile: with few rows a forward
        // streams every weight from memory once, and without this the streaming did not overlap the
        // arithmetic (the 2-core AMX Xeon reads memory at ~11 GB/s per core: 170 MB of distilbert-base fp32
        // weights ~8 ms at 1 x 128 tokens, on top of ~27 ms of FMA peak).
        const bool next_panel = p + 1 < p1, next_k = !next_panel && k0 + kc < k;
        const bool next_rows = !next_panel && !next_k && i0 + mc < m;
        const int64_t k_next = next_panel ? k0 : next_k ? k0 + kLinearKc : 0;
        const int64_t next_lines = next_panel || next_k || next_rows
                                       ? ((k - k_next < kLinearKc ? k - k_next : kLinearKc) * kPanel * 4 + 63) / 64 : 0;
        const char* next = reinterpret_cast<const char*>(wp + ((next_panel ? p + 1 : p0) * k + k_next) * kPanel);
        const int64_t tiles = (mc + kGemmRows - 1) / kGemmRows, per_tile = (next_lines + tiles - 1) / tiles;
        for (int64_t i = 0; i < mc; i += kGemmRows) {
          const int rows = static_cast<int>(mc - i < kGemmRows ? mc - i : kGemmRows);
          const int64_t first = i / kGemmRows * per_tile, left = next_lines - first;
          const Prefetch pf{next + first * 64, left <= 0 ? 0 : left < per_tile ? left : per_tile};
          gemm_tile_rows<2>(rows, kc, a + (i0 + i) * lda + k0, lda, panel, kPanel, cp + i * ldcp, ldcp, k0 > 0, pf);
          if (last) epilogue_rows(rows, cols, bias == nullptr ? nullptr : bias + n0, cp + i * ldcp, ldcp, act);
        }
        if (cols < kPanel && last)
          for (int64_t i = 0; i < mc; ++i) __builtin_memcpy(c + (i0 + i) * ldc + n0, edge + i * kPanel, cols * sizeof(float));
      }
    }
  }
}

void linear_panels(int64_t m, int64_t k, const float* a, int64_t lda, const float* wp, int64_t p0, int64_t p1,
                   int64_t n, const float* bias, Activation act, float* c, int64_t ldc) {
  switch (act) {
    case Activation::kGelu:
      return linear_panels_impl(m, k, a, lda, wp, p0, p1, n, bias, c, ldc, [](auto y) { return gelu(y); });
    case Activation::kRelu:
      return linear_panels_impl(m, k, a, lda, wp, p0, p1, n, bias, c, ldc, [](auto y) { return relu(y); });
    default:
      return linear_panels_impl(m, k, a, lda, wp, p0, p1, n, bias, c, ldc, [](auto y) { return y; });
  }
}

// The largest f(row[j]) over j < n, f monotone (the identity, or a non-negative scale): vector maxes in two
// chains, each half as long (a row's maxes are one chain of dependent instructions otherwise), and on AVX-512 a
// row's tail of fewer than 16 values in one masked vector (its masked-off lanes keep the running max).
template <class F>
DK_INLINE float max_of(const float* row, int64_t n, F f) {
  const int64_t pair_end = n - n % (2 * kW), vec_end = n - n % kW;
  V vmx = splat(-__builtin_inff(), V()), vmx1 = vmx;
  int64_t j = 0;
  for (; j < pair_end; j += 2 * kW) {
    vmx = vmax(vmx, f(vload(row + j)));
    vmx1 = vmax(vmx1, f(vload(row + j + kW)));
  }
  for (; j < vec_end; j += kW) vmx = vmax(vmx, f(vload(row + j)));
  vmx = vmax(vmx, vmx1);
#if DK_ISA_LEVEL == 2
  const __mmask16 tail = tail_lanes(n - vec_end);
  if (tail != 0) {
    vmx = _mm512_mask_max_ps(vmx, tail, vmx, f(_mm512_maskz_loadu_ps(tail, row + j)));
    j = n;
  }
#endif
  float mx = hmax(vmx);
  for (; j < n; ++j) mx = vmax(mx, f(row[j]));
  return mx;
}

// The last pass of a softmax step over `rows` rows, given each row's new max and its block's sum of exps: alpha =
// 2^(old max - new max) (0 on a row's first block, its old max -inf), row_sum = row_sum * alpha + sum, row_max =
// the new max, and the row of acc scaled by alpha; keep_first: a row's first block leaves its acc untouched.
DK_INLINE void update_row_stats(int64_t rows, const float* new_max, const float* sums, float* row_max,
                                float* row_sum, float* acc, int64_t ldacc, int64_t acc_n, bool keep_first) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool first = row_max[r] == -__builtin_inff();
    const float alpha = exp2_approx(row_max[r] - new_max[r]);
    row_sum[r] = row_sum[r] * alpha + sums[r];
    row_max[r] = new_max[r];
    if (alpha != 1.0f && !(keep_first && first)) {
      const V valpha = splat(alpha, V());
      float* acc_row = acc + r * ldacc;
      for (int64_t d = 0; d < acc_n; d += kW) vstore(acc_row + d, vload(acc_row + d) * valpha);
    }
  }
}

void softmax_update(float* s, int64_t lds, int64_t m, int64_t n, float* row_max, float* row_sum, float* acc,
                    int64_t ldacc, int64_t acc_n) {
  const V z = splat(0.0f, V());
  const int64_t vec_end = n - n % kW;
#if DK_ISA_LEVEL == 2
  // A row's tail of fewer than 16 keys in one masked vector, as in softmax_update_bf16.
  const __mmask16 tail = tail_lanes(n - vec_end);
  const int64_t scalar_from = n;
#else
  const int64_t scalar_from = vec_end;
#endif
  // In passes over up to 64 rows at a time, as softmax_update_bf16 (the same arithmetic per row).
  constexpr int64_t kRows = 64;
  float new_max[kRows], sums[kRows];
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    const int64_t rows = m - i0 < kRows ? m - i0 : kRows;
    for (int64_t r = 0; r < rows; ++r)
      new_max[r] = vmax(row_max[i0 + r], max_of(s + (i0 + r) * lds, n, [](auto v) { return v; }));
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + (i0 + r) * lds;
      const V vnew = splat(new_max[r], z);
      V vsum = z;
      int64_t j = 0;
      for (; j < vec_end; j += kW) {
        const V p = exp2_approx(vload(row + j) - vnew);
        vstore(row + j, p);
        vsum = vsum + p;
      }
#if DK_ISA_LEVEL == 2
      if (tail != 0) {
        const V p = _mm512_maskz_mov_ps(tail, exp2_approx(_mm512_maskz_loadu_ps(tail, row + j) - vnew));
        _mm512_mask_storeu_ps(row + j, tail, p);
        vsum = vsum + p;
      }
#endif
      float sum = hsum(vsum);
      for (j = scalar_from; j < n; ++j) {
        row[j] = exp2_approx(row[j] - new_max[r]);
        sum += row[j];
      }
      sums[r] = sum;
    }
    update_row_stats(rows, new_max, sums, row_max + i0, row_sum + i0, acc + i0 * ldacc, ldacc, acc_n,
                     /*keep_first=*/false);
  }
}

void scale(const float* x, float factor, int64_t n, float* y) {
  const V vf = splat(factor, V());
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) vstore(y + i, vload(x + i) * vf);
  for (; i < n; ++i) y[i] = x[i] * factor;
}

// In-register transposes of a square block of vectors: r[i] = row i in, column i out.
#if DK_ISA_LEVEL == 2
DK_INLINE __m512 unpack_pd(__m512 a, __m512 b, bool hi) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_castpd_ps(hi ? _mm512_unpackhi_pd(x, y) : _mm512_unpacklo_pd(x, y));
}
DK_INLINE void transpose_block(V r[16]) {
  V t[16];
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i] / t[2i+1]: columns 4L, 4L+1 / 4L+2, 4L+3 of rows 2i, 2i+1
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)  // lane L of r[4i + c]: column 4L + c of rows 4i..4i+3
    for (int c = 0; c < 4; ++c) r[4 * i + c] = unpack_pd(t[4 * i + c / 2], t[4 * i + 2 + c / 2], c % 2);
  for (int c = 0; c < 4; ++c) {  // 128-bit lanes regrouped twice: 0x88 takes lanes 0, 2 of each, 0xdd lanes 1, 3
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}
#elif DK_ISA_LEVEL == 1
DK_INLINE void transpose_block(V r[8]) {
  V t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 4; ++c) {
      const __m256d x = _mm256_castps_pd(t[4 * i + c / 2]), y = _mm256_castps_pd(t[4 * i + 2 + c / 2]);
      r[4 * i + c] = _mm256_castpd_ps(c % 2 ? _mm256_unpackhi_pd(x, y) : _mm256_unpacklo_pd(x, y));
    }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
  for (int c = 0; c < 8; ++c) r[c] = t[c];
}
#endif

void transpose_rows(const float* const* rows, int64_t n, int64_t dim, float* dst, int64_t ld) {
  int64_t j0 = 0;
#if DK_ISA_LEVEL >= 1
  for (; j0 + kW <= n; j0 += kW) {
    int64_t d0 = 0;
    for (; d0 + kW <= dim; d0 += kW) {
      V r[kW];
      for (int i = 0; i < kW; ++i) r[i] = vload(rows[j0 + i] + d0);
      transpose_block(r);
      for (int c = 0; c < kW; ++c) vstore(dst + (d0 + c) * ld + j0, r[c]);
    }
    for (; d0 < dim; ++d0)
      for (int i = 0; i < kW; ++i) dst[d0 * ld + j0 + i] = rows[j0 + i][d0];
  }
#endif
  for (; j0 < n; ++j0)
    for (int64_t d = 0; d < dim; ++d) dst[d * ld + j0] = rows[j0][d];
}

// max |x[i]|, NaN where any x[i] is NaN (as torch's amax, the reference, gives it): the max instructions drop a
// NaN, so the values that are not below infinity (NaN, inf) are summed beside the max, which is then NaN exactly
// where a NaN was seen.
float absmax(const float* x, int64_t n) {
  const V z = splat(0.0f, V()), inf = splat(__builtin_inff(), V());
  const int64_t vec_end = n - n % kW;
  V m0 = z, m1 = z, odd0 = z, odd1 = z;  // two chains of each (one add's latency per pair of vectors)
  int64_t i = 0;
  for (; i + 2 * kW <= vec_end; i += 2 * kW) {
    const V a0 = vabs(vload(x + i)), a1 = vabs(vload(x + i + kW));
    m0 = vmax(m0, a0);
    m1 = vmax(m1, a1);
    odd0 = odd0 + vselect_lt(a0, inf, z, a0);
    odd1 = odd1 + vselect_lt(a1, inf, z, a1);
  }
  for (; i < vec_end; i += kW) {
    const V a = vabs(vload(x + i));
    m0 = vmax(m0, a);
    odd0 = odd0 + vselect_lt(a, inf, z, a);
  }
  float m = hmax(vmax(m0, m1)), odd_sum = hsum(odd0 + odd1);
  for (; i < n; ++i) {
    const float a = vabs(x[i]);
    m = vmax(m, a);
    odd_sum += vselect_lt(a, __builtin_inff(), 0.0f, a);
  }
  return odd_sum != odd_sum ? odd_sum : m;
}

// One plain loop: the compiler vectorizes it for each instruction set this file is compiled for (round to
// nearest even, as the default rounding mode gives both rintf and the vector conversions).
void quantize_int8(const float* x, int64_t n, float inv, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(vround(x[i] * inv));
}

void scale_add(float* y, float factor, const float* bias, int64_t n) {
  const V vf = splat(factor, V());
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) vstore(y + i, vfma(vload(y + i), vf, vload(bias + i)));
  for (; i < n; ++i) y[i] = vfma(y[i], factor, bias[i]);
}

// ---- bf16 rows ------------------------------------------------------------------------------------------
//
// bf16 is the top half of an fp32: widening is a 16-bit shift; narrowing adds 0x7FFF plus the lowest kept bit
// (round to nearest, ties to even) and keeps NaN a quiet NaN, as c10::BFloat16 does.

DK_INLINE float load_bf16_1(const uint16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}
DK_INLINE void store_bf16_1(uint16_t* p, float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  *p = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

#if DK_ISA_LEVEL == 2
DK_INLINE V load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
DK_INLINE __m256i to_bf16_bits(V x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
DK_INLINE void store_bf16(uint16_t* p, V x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(x)); }
// The lanes of `lanes` only (a row's tail of fewer than 16 values).
DK_INLINE void store_bf16_lanes(uint16_t* p, V x, __mmask16 lanes) { _mm256_mask_storeu_epi16(p, lanes, to_bf16_bits(x)); }
#elif DK_ISA_LEVEL == 1
DK_INLINE V load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
DK_INLINE void store_bf16(uint16_t* p, V x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // packus works per 128-bit lane: (r0..3 r0..3 | r4..7 r4..7); qwords 0 and 2 hold r0..7 in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
DK_INLINE V load_bf16(const uint16_t* p) { return load_bf16_1(p); }
DK_INLINE void store_bf16(uint16_t* p, V x) { store_bf16_1(p, x); }
#endif

void widen_bf16(const uint16_t* x, int64_t n, float* y) {
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) vstore(y + i, load_bf16(x + i));
  for (; i < n; ++i) y[i] = load_bf16_1(x + i);
}

// The kernels with bf16 outputs come in two variants (bf16_variant, at the table, picks one at start-up):
// kNative stores through AVX512-BF16's conversions, vcvtneps2bf16 (one instruction against store_bf16's nine)
// and vcvtne2ps2bf16 (two vectors in one); only CPUs that have them run that variant. The same round to nearest
// even; the two differ only off the normal range: fp32 denormal inputs (below 2^-126) become zero, and a NaN
// keeps its sign (store_bf16 writes 0x7FC0 for every NaN). Inline assembly, so that no other code is compiled
// for AVX512-BF16.
template <bool kNative>
DK_INLINE void store_bf16_as(uint16_t* p, V x) {
#if DK_ISA_LEVEL == 2
  if constexpr (kNative) {
    __m256i r;
    asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(x));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
    return;
  }
#endif
  store_bf16(p, x);
}
// x0 then x1 (2 kW values).
template <bool kNative>
DK_INLINE void store2_bf16_as(uint16_t* p, V x0, V x1) {
#if DK_ISA_LEVEL == 2
  if constexpr (kNative) {
    __m512i r;  // x0 in the low 16 halves, x1 in the high ones
    asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(x1), "v"(x0));
    _mm512_storeu_si512(p, r);
    return;
  }
#endif
  store_bf16(p, x0);
  store_bf16(p + kW, x1);
}

template <class Act>
DK_INLINE void bias_act_loop_bf16(uint16_t* x, const float* bias, int64_t n, Act act) {
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) store_bf16(x + i, act(load_bf16(x + i) + vload(bias + i)));
  for (; i < n; ++i) store_bf16_1(x + i, act(load_bf16_1(x + i) + bias[i]));
}

void bias_act_row_bf16(uint16_t* x, const float* bias, int64_t n, Activation act) {
  switch (act) {
    case Activation::kGelu: return bias_act_loop_bf16(x, bias, n, [](auto y) { return gelu_bf16(y); });
    case Activation::kRelu: return bias_act_loop_bf16(x, bias, n, [](auto y) { return relu(y); });
    default: return bias_act_loop_bf16(x, bias, n, [](auto y) { return y; });
  }
}

// The fp32 row kernel's three sweeps (sum, corrected centered sums, affine output) on h = x + residual widened
// to fp32 once, in the first sweep, into `h` (dim floats of scratch, 3 KiB of L1 at dim 768): the second and
// third sweeps read fp32 instead of widening both bf16 inputs again. kNative: see store_bf16_as.
template <bool kNative>
void add_layer_norm_row_bf16(const uint16_t* x, const uint16_t* residual, const float* weight, const float* bias,
                             float eps, int64_t dim, float* h, uint16_t* out, float* mean_out, float* rstd_out) {
  const V z = splat(0.0f, V());
  const int64_t vec_end = dim - dim % kW;
  float sum = sum4(vec_end, [&](int64_t i) {
    const V v = residual ? load_bf16(x + i) + load_bf16(residual + i) : load_bf16(x + i);
    vstore(h + i, v);
    return v;
  });
  for (int64_t i = vec_end; i < dim; ++i) {
    h[i] = residual ? load_bf16_1(x + i) + load_bf16_1(residual + i) : load_bf16_1(x + i);
    sum += h[i];
  }
  const float n = static_cast<float>(dim);
  float mean = sum / n, dev, sq, rstd;
  centered_sums4(vec_end, mean, [&](int64_t i) { return vload(h + i); }, dev, sq);
  for (int64_t i = vec_end; i < dim; ++i) {
    const float d = h[i] - mean;
    dev += d;
    sq += d * d;
  }
  finish_stats(n, dev, sq, eps, mean, rstd);
  const V vmean = splat(mean, z), vrstd = splat(rstd, z);
  vector_loop4(
      dim, [&](int64_t i) { return vfma((vload(h + i) - vmean) * vrstd, vload(weight + i), vload(bias + i)); },
      [&](int64_t i, V y) { store_bf16_as<kNative>(out + i, y); },
      [&](int64_t i) { store_bf16_1(out + i, vfma((h[i] - mean) * rstd, weight[i], bias[i])); });
  *mean_out = mean;
  *rstd_out = rstd;
}

template <bool kNative>
void scale_to_bf16(const float* x, float factor, int64_t n, uint16_t* y) {
  const V vf = splat(factor, V());
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) store_bf16_as<kNative>(y + i, vload(x + i) * vf);
  for (; i < n; ++i) store_bf16_1(y + i, x[i] * factor);
}

// One call per output tile (a call per row cost as much as the arithmetic at 64 columns); four vectors per step,
// as in bias_act_loop.
template <bool kNative, class Act>
DK_INLINE void bias_act_to_bf16_loop(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                                     const float* bias, uint16_t* out, int64_t ld_out, Act act) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = acc + r * ld_acc;
    uint16_t* y = out + r * ld_out;
    vector_loop4(
        cols, [&](int64_t i) { return act(vload(x + i) + vload(bias + i)); },
        [&](int64_t i, V v) { store_bf16_as<kNative>(y + i, v); },
        [&](int64_t i) { store_bf16_1(y + i, act(x[i] + bias[i])); });
  }
}

template <bool kNative>
void bias_act_to_bf16(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                      Activation act, uint16_t* out, int64_t ld_out) {
  switch (act) {
    case Activation::kGelu:
      return bias_act_to_bf16_loop<kNative>(acc, ld_acc, rows, cols, bias, out, ld_out,
                                            [](auto y) { return gelu_bf16(y); });
    case Activation::kRelu:
      return bias_act_to_bf16_loop<kNative>(acc, ld_acc, rows, cols, bias, out, ld_out,
                                            [](auto y) { return relu(y); });
    default:
      return bias_act_to_bf16_loop<kNative>(acc, ld_acc, rows, cols, bias, out, ld_out, [](auto y) { return y; });
  }
}

// Store(y_row, i, v) / StoreOne(y_row, i, value): how a row of the output takes a vector / one value.
template <class Out, class Act, class Store, class StoreOne>
DK_INLINE void dequant_bias_act_loop(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                                     const float* row_scale, const float* col_scale, const float* bias, Out* out,
                                     int64_t ld_out, Act act, Store store, StoreOne store_one) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* x = acc + r * ld_acc;
    Out* y = out + r * ld_out;
    const float rs = row_scale[r];
    const V vrs = splat(rs, V());
    vector_loop4(
        cols, [&](int64_t i) { return act(vload_i32(x + i) * (vrs * vload(col_scale + i)) + vload(bias + i)); },
        [&](int64_t i, V v) { store(y, i, v); },
        [&](int64_t i) { store_one(y, i, act(static_cast<float>(x[i]) * (rs * col_scale[i]) + bias[i])); });
  }
}

template <class Out, class Store, class StoreOne>
DK_INLINE void dequant_bias_act_as(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols,
                                   const float* row_scale, const float* col_scale, const float* bias, Activation act,
                                   Out* out, int64_t ld_out, Store store, StoreOne store_one) {
  switch (act) {
    case Activation::kGelu:
      return dequant_bias_act_loop(acc, ld_acc, rows, cols, row_scale, col_scale, bias, out, ld_out,
                                   [](auto y) { return gelu(y); }, store, store_one);
    case Activation::kRelu:
      return dequant_bias_act_loop(acc, ld_acc, rows, cols, row_scale, col_scale, bias, out, ld_out,
                                   [](auto y) { return relu(y); }, store, store_one);
    default:
      return dequant_bias_act_loop(acc, ld_acc, rows, cols, row_scale, col_scale, bias, out, ld_out,
                                   [](auto y) { return y; }, store, store_one);
  }
}

void dequant_bias_act(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* row_scale,
                      const float* col_scale, const float* bias, Activation act, float* out, int64_t ld_out) {
  dequant_bias_act_as(acc, ld_acc, rows, cols, row_scale, col_scale, bias, act, out, ld_out,
                      [](float* y, int64_t i, V v) { vstore(y + i, v); },
                      [](float* y, int64_t i, float v) { y[i] = v; });
}

// kNative: see store_bf16_as.
template <bool kNative>
void dequant_bias_act_bf16(const int32_t* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* row_scale,
                           const float* col_scale, const float* bias, Activation act, uint16_t* out, int64_t ld_out) {
  dequant_bias_act_as(acc, ld_acc, rows, cols, row_scale, col_scale, bias, act, out, ld_out,
                      [](uint16_t* y, int64_t i, V v) { store_bf16_as<kNative>(y + i, v); },
                      [](uint16_t* y, int64_t i, float v) { store_bf16_1(y + i, v); });
}

// fp32 x as hi + lo for the bf16x3 GEMM (linear_bf16x3): hi = bf16(x) (nearest even), lo = bf16(x - hi); x - hi
// is exact in fp32, so hi + lo is x to within 2^-17 relative (lo's own rounding). A non-finite x - hi (x inf or
// NaN, or hi overflowed) gives lo = 0, so hi carries the inf or NaN alone.
template <bool kNative>
void split_bf16x3(const float* x, int64_t n, int64_t seg, uint16_t* out) {
  uint16_t* hi = out;
  uint16_t* lo = out + seg;
  const V inf = splat(__builtin_inff(), V()), z = splat(0.0f, V());
  const int64_t vec_end = n - n % kW;
  int64_t i = 0;
  for (; i < vec_end; i += kW) {
    const V v = vload(x + i);
    store_bf16_as<kNative>(hi + i, v);
    const V d = v - load_bf16(hi + i);
    store_bf16_as<kNative>(lo + i, vselect_lt(vabs(d), inf, d, z));
  }
  for (; i < n; ++i) {
    store_bf16_1(hi + i, x[i]);
    const float d = x[i] - load_bf16_1(hi + i);
    store_bf16_1(lo + i, vabs(d) < __builtin_inff() ? d : 0.0f);
  }
  for (int64_t j = n; j < seg; ++j) hi[j] = lo[j] = 0;
}

template <bool kAccumulate, class Act>
DK_INLINE void bias_act_to_f32_loop(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                                    float* out, int64_t ld_out, Act act) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = acc + r * ld_acc;
    float* y = out + r * ld_out;
    if constexpr (kAccumulate) {
      vector_loop4(
          cols, [&](int64_t i) { return act(vload(y + i) + vload(x + i) + vload(bias + i)); },
          [&](int64_t i, V v) { vstore(y + i, v); }, [&](int64_t i) { y[i] = act(y[i] + x[i] + bias[i]); });
    } else {
      vector_loop4(
          cols, [&](int64_t i) { return act(vload(x + i) + vload(bias + i)); },
          [&](int64_t i, V v) { vstore(y + i, v); }, [&](int64_t i) { y[i] = act(x[i] + bias[i]); });
    }
  }
}

template <bool kAccumulate>
void bias_act_to_f32_as(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                        Activation act, float* out, int64_t ld_out) {
  switch (act) {
    case Activation::kGelu:
      return bias_act_to_f32_loop<kAccumulate>(acc, ld_acc, rows, cols, bias, out, ld_out,
                                               [](auto y) { return gelu(y); });
    case Activation::kRelu:
      return bias_act_to_f32_loop<kAccumulate>(acc, ld_acc, rows, cols, bias, out, ld_out,
                                               [](auto y) { return relu(y); });
    default:
      return bias_act_to_f32_loop<kAccumulate>(acc, ld_acc, rows, cols, bias, out, ld_out, [](auto y) { return y; });
  }
}

void bias_act_to_f32(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias,
                     Activation act, float* out, int64_t ld_out, bool accumulate) {
  return accumulate ? bias_act_to_f32_as<true>(acc, ld_acc, rows, cols, bias, act, out, ld_out)
                    : bias_act_to_f32_as<false>(acc, ld_acc, rows, cols, bias, act, out, ld_out);
}

// 2^x for the probabilities of softmax_update_bf16, which are rounded to bf16 (relative error up to 2^-8)
// right after: 2^floor(x) times a degree-5 minimax fit of 2^f on f = x - floor(x) in [0, 1). Relative error
// <= 7.5e-8 in exact arithmetic, <= 1.5e-7 evaluated in fp32: ~10^4 times below the bf16 rounding, and the
// row sums built from these values (the logsumexp) stay at a few fp32 roundings. The degree-7 exp2_approx
// keeps the fp32 paths at full precision.
template <class T>
DK_INLINE T exp2_bf16_poly(T f) {
  T p = splat(1.877576695e-03f, f);
  p = vfma(p, f, splat(8.989340626e-03f, f));
  p = vfma(p, f, splat(5.582631752e-02f, f));
  p = vfma(p, f, splat(2.401536107e-01f, f));
  p = vfma(p, f, splat(6.931530833e-01f, f));
  return vfma(p, f, splat(9.999999404e-01f, f));
}
DK_INLINE float vfloor(float x) { return __builtin_floorf(x); }
#if DK_ISA_LEVEL == 1
DK_INLINE V vfloor(V x) { return _mm256_floor_ps(x); }
#endif
// Inputs below -127 give 0 (x is s * scale - row max, so <= 0 up to an ulp).
template <class T>
DK_INLINE T exp2_bf16(T x) {
  x = vmax(x, splat(-127.0f, x));
  const T n = vfloor(x);
  return exp2_bf16_poly(x - n) * vpow2i(n);
}
#if DK_ISA_LEVEL == 2
DK_INLINE V exp2_bf16(V x) { return exp2_scalef(x, [](V f) { return exp2_bf16_poly(f); }); }
#endif

// kNative: see store_bf16_as (its reading fp32 denormals as zero concerns values below 2^-126, far below any
// probability that matters).
template <bool kNative>
void softmax_update_bf16(const float* s, int64_t lds, int64_t m, int64_t n, int64_t n_pad, float scale,
                         float* row_max, float* row_sum, float* acc, int64_t ldacc, int64_t acc_n, uint16_t* p,
                         int64_t ldp) {
  const V z = splat(0.0f, V());
  const V vscale = splat(scale, z);
  const int64_t pair_end = n - n % (2 * kW), vec_end = n - n % kW;
  // max(s * scale) is scale * max(s) for scale >= 0 (rounding is monotonic): the multiply leaves the loop.
  const bool pos = scale >= 0.0f;
#if DK_ISA_LEVEL == 2
  // A row's tail of fewer than 16 keys in one masked vector (scalar exps cost as much as the rest of a 90-key
  // row), as in max_of: the masked-off lanes give 0 in the exp pass.
  const __mmask16 tail = tail_lanes(n - vec_end);
  const int64_t scalar_from = n;
#else
  const int64_t scalar_from = vec_end;
#endif
  // In passes over up to 64 rows at a time (each row's max, then each row's exps and sum, then the running
  // statistics), not row by row: a row's steps form one chain of dependent reductions (its max, then its sum),
  // and the rows of a pass are independent, so the core overlaps one row's chain with the next row's.
  constexpr int64_t kRows = 64;
  float new_max[kRows], sums[kRows];
  for (int64_t i0 = 0; i0 < m; i0 += kRows) {
    const int64_t rows = m - i0 < kRows ? m - i0 : kRows;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = s + (i0 + r) * lds;
      const float mx = pos ? max_of(row, n, [](auto v) { return v; }) * scale
                           : max_of(row, n, [scale](auto v) { return v * splat(scale, v); });
      new_max[r] = vmax(row_max[i0 + r], mx);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = s + (i0 + r) * lds;
      uint16_t* prow = p + (i0 + r) * ldp;
      const V vneg = splat(-new_max[r], z);
      V sum0 = z, sum1 = z;
      int64_t j = 0;
      for (; j < pair_end; j += 2 * kW) {  // x = s * scale - max in one rounding
        const V e0 = exp2_bf16(vfma(vload(row + j), vscale, vneg));
        const V e1 = exp2_bf16(vfma(vload(row + j + kW), vscale, vneg));
        store2_bf16_as<kNative>(prow + j, e0, e1);
        sum0 = sum0 + e0;
        sum1 = sum1 + e1;
      }
      for (; j < vec_end; j += kW) {
        const V e = exp2_bf16(vfma(vload(row + j), vscale, vneg));
        store_bf16(prow + j, e);
        sum0 = sum0 + e;
      }
#if DK_ISA_LEVEL == 2
      if (tail != 0) {
        const V e = _mm512_maskz_mov_ps(tail, exp2_bf16(vfma(_mm512_maskz_loadu_ps(tail, row + j), vscale, vneg)));
        store_bf16_lanes(prow + j, e, tail);
        sum0 = sum0 + e;
      }
#endif
      float sum = hsum(sum0 + sum1);
      for (j = scalar_from; j < n; ++j) {
        const float e = exp2_bf16(vfma(row[j], scale, -new_max[r]));
        store_bf16_1(prow + j, e);
        sum += e;
      }
      for (j = n; j < n_pad; ++j) prow[j] = 0;
      sums[r] = sum;
    }
    update_row_stats(rows, new_max, sums, row_max + i0, row_sum + i0, acc + i0 * ldacc, ldacc, acc_n,
                     /*keep_first=*/true);
  }
}

// ---- int8 product without int8 dot-product instructions ---------------------------------------------------
//
// gemm_s8_block: acc (rows, 64) int32 = a (rows, kp) @ one 64-column block of the int8 VNNI layout, w[kk, j] at
// wb[(kk / 4 * 64 + j) * 4 + kk % 4] (pack_blocks_int8, linear_int8.cpp). One weight vector is a group of 4 rows
// of a run of columns widened to int16: two 32-bit lanes per column, (w[4g, j], w[4g + 1, j]) and
// (w[4g + 2, j], w[4g + 3, j]). A row's 4 values of `a` (int16, widened once per call) are broadcast as one 64-bit
// pair of pairs, and vpmaddwd sums each lane's two products in int32, exactly (|sum| <= 2 * 128^2); a column's two
// lanes are added once, after the k loop. The int32 sums are exact while kp * 127^2 < 2^31 (kp < 133000), as for
// any int8 GEMM that accumulates in int32. Unlike the u8 x s8 pair sums of vpmaddubsw (oneDNN's int8 GEMM without
// VNNI), nothing saturates, so weights keep the full [-127, 127] grid.
//
// Its bound: each multiply-add (16 products at AVX2) costs one vpmaddwd and one vpaddd, and every 6 x 2 register
// tile (AVX2) adds 2 widening loads and 6 broadcasts per group: ~32 vector ops per 192 products on the four FP
// pipes of a Zen core, against the FMA's 16 products per op (two pipes). On the Zen 4 EPYC (1 thread, 128 x 768 x
// 3072) AVX2 ran 79-80 GMAC/s with 6-row tiles (4 rows: 71-74, 5: 75) against 54 for our fp32 kernel at its FMA
// peak; AVX-512 (8 x 2 tiles) 93-94. The empty asm in s8_tile keeps each accumulator in place: without it GCC 12
// summed into the product's register and copied the sum back, 8 moves per 8 multiply-adds (and spilled at 6 rows).

constexpr int64_t kS8Block = 64;

#if DK_ISA_LEVEL >= 1
#if DK_ISA_LEVEL == 2
using VI = __m512i;
constexpr int kS8Cols = 8;  // columns per vector
constexpr int kS8Rows = 8;  // 8 x 2 accumulators + 2 weight vectors + broadcasts and products of 32 registers (12
                            // rows measured no faster)
DK_INLINE VI s8_weights(const int8_t* w) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
DK_INLINE VI s8_broadcast(const int16_t* a) {
  long long v;
  __builtin_memcpy(&v, a, sizeof(v));
  return _mm512_set1_epi64(v);
}
DK_INLINE VI s8_madd(VI acc, VI a, VI w) { return _mm512_add_epi32(_mm512_madd_epi16(a, w), acc); }
DK_INLINE VI s8_zero() { return _mm512_setzero_si512(); }
// lo, hi: pair sums of 8 columns each, two lanes per column -> the 16 columns' sums, in order.
DK_INLINE void s8_store(int32_t* out, VI lo, VI hi) {
  const VI even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const VI odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  _mm512_storeu_si512(out, _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi),
                                            _mm512_permutex2var_epi32(lo, odd, hi)));
}
#else
using VI = __m256i;
constexpr int kS8Cols = 4;
constexpr int kS8Rows = 6;  // 6 x 2 accumulators + 2 weight vectors + 1 broadcast + 1 product of 16 registers
DK_INLINE VI s8_weights(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
DK_INLINE VI s8_broadcast(const int16_t* a) {
  long long v;
  __builtin_memcpy(&v, a, sizeof(v));
  return _mm256_set1_epi64x(v);
}
DK_INLINE VI s8_madd(VI acc, VI a, VI w) { return _mm256_add_epi32(_mm256_madd_epi16(a, w), acc); }
DK_INLINE VI s8_zero() { return _mm256_setzero_si256(); }
// lo, hi: pair sums of 4 columns each -> the 8 columns' sums, in order (hadd interleaves the halves' 64-bit runs).
DK_INLINE void s8_store(int32_t* out, VI lo, VI hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8));
}
#endif

// acc[r, 0 .. 2 kS8Cols) for r < kRows over `groups` groups of 4 rows of k; w: the block's bytes from the first
// of these columns on.
template <int kRows>
DK_INLINE void s8_tile(int64_t groups, const int16_t* a, int64_t lda, const int8_t* w, int32_t* acc, int64_t ld) {
  VI c[kRows][2];
  for (int r = 0; r < kRows; ++r) c[r][0] = c[r][1] = s8_zero();
  for (int64_t g = 0; g < groups; ++g, w += 4 * kS8Block) {
    const VI w0 = s8_weights(w), w1 = s8_weights(w + 4 * kS8Cols);
    for (int r = 0; r < kRows; ++r) {
      const VI av = s8_broadcast(a + r * lda + 4 * g);
      c[r][0] = s8_madd(c[r][0], av, w0);
      c[r][1] = s8_madd(c[r][1], av, w1);
      asm("" : "+v"(c[r][0]), "+v"(c[r][1]));  // each accumulator stays in its register (see above)
    }
  }
  for (int r = 0; r < kRows; ++r) s8_store(acc + r * ld, c[r][0], c[r][1]);
}

template <int kRows = kS8Rows>
DK_INLINE void s8_tile_rows(int rows, int64_t groups, const int16_t* a, int64_t lda, const int8_t* w, int32_t* acc,
                            int64_t ld) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return s8_tile_rows<kRows - 1>(rows, groups, a, lda, w, acc, ld);
  }
  s8_tile<kRows>(groups, a, lda, w, acc, ld);
}
#endif

#if DK_ISA_LEVEL == 2
// gemm_u8s8_block: the same product on AVX512-VNNI, from a + 128 as u8 (au8, (rows, kp)): vpdpbusd sums each
// lane's 4 u8 x s8 products into int32 (no 16-bit intermediate, nothing saturates), and a lane of the VNNI layout
// is exactly one column's 4 rows of k, so a group's 64 columns are 4 vectors read as they lie. The +128 shift is
// taken out once per call: acc = au8 @ w - 128 * colsum(w), the column sums from one more vpdpbusd pass with
// all-128 activations. Both terms wrap modulo 2^32 alike, so the difference is exact wherever the true product fits
// in int32, even past kp = 66000 where au8 @ w alone would not. vpdpbusd is emitted as asm, as the bf16
// conversions above, so the region's target needs no VNNI.
// On the Zen 4 EPYC (128 x 768 x 3072, quantization and epilogue included): 205 GMAC/s on 1 thread (the int16
// multiply-adds 90); on 2 threads 0.75 ms against 0.81 for torch's _int_mm, which reorders W on every call.
DK_INLINE __m512i dpbusd(__m512i acc, __m512i a_u8, __m512i w_s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a_u8), "v"(w_s8));
  return acc;
}

constexpr int kU8Rows = 6;  // 6 x 4 accumulators + 4 weight vectors + 1 broadcast of 32 registers

template <int kRows>
DK_INLINE void u8_tile(int64_t groups, const uint8_t* a, int64_t lda, const int8_t* w, const __m512i* shift,
                       int32_t* acc, int64_t ld) {
  __m512i c[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g, w += 4 * kS8Block) {
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(w + 64 * j);
    for (int r = 0; r < kRows; ++r) {
      int32_t quad;
      __builtin_memcpy(&quad, a + r * lda + 4 * g, sizeof(quad));
      const __m512i av = _mm512_set1_epi32(quad);
      for (int j = 0; j < 4; ++j) c[r][j] = dpbusd(c[r][j], av, wv[j]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(acc + r * ld + 16 * j, _mm512_sub_epi32(c[r][j], shift[j]));
}

template <int kRows = kU8Rows>
DK_INLINE void u8_tile_rows(int rows, int64_t groups, const uint8_t* a, int64_t lda, const int8_t* w,
                            const __m512i* shift, int32_t* acc, int64_t ld) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return u8_tile_rows<kRows - 1>(rows, groups, a, lda, w, shift, acc, ld);
  }
  u8_tile<kRows>(groups, a, lda, w, shift, acc, ld);
}

void gemm_u8s8_block(int64_t rows, int64_t kp, const uint8_t* au8, int64_t lda, const int8_t* wb, int32_t* acc,
                     int64_t ld_acc) {
  const int64_t groups = kp / 4;
  __m512i shift[4];  // 128 * the column sums
  for (int j = 0; j < 4; ++j) shift[j] = _mm512_setzero_si512();
  const __m512i all_128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = 0; g < groups; ++g)
    for (int j = 0; j < 4; ++j)
      shift[j] = dpbusd(shift[j], all_128, _mm512_loadu_si512(wb + g * 4 * kS8Block + 64 * j));
  for (int64_t i = 0; i < rows; i += kU8Rows)
    u8_tile_rows(static_cast<int>(rows - i < kU8Rows ? rows - i : kU8Rows), groups, au8 + i * lda, lda, wb, shift,
                 acc + i * ld_acc, ld_acc);
}
#endif

void gemm_s8_block(int64_t rows, int64_t kp, const int16_t* a, int64_t lda, const int8_t* wb, int32_t* acc,
                   int64_t ld_acc) {
#if DK_ISA_LEVEL >= 1
  // Column runs outer: a run's weights (kp x 2 kS8Cols bytes) are read again by every row tile from L1/L2.
  for (int64_t j = 0; j < kS8Block; j += 2 * kS8Cols)
    for (int64_t i = 0; i < rows; i += kS8Rows)
      s8_tile_rows(static_cast<int>(rows - i < kS8Rows ? rows - i : kS8Rows), kp / 4, a + i * lda, lda, wb + 4 * j,
                   acc + i * ld_acc + j, ld_acc);
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kS8Block; ++j) {
      int32_t sum = 0;
      for (int64_t kk = 0; kk < kp; ++kk) sum += int32_t{a[r * lda + kk]} * wb[(kk / 4 * kS8Block + j) * 4 + kk % 4];
      acc[r * ld_acc + j] = sum;
    }
#endif
}

#if DK_ISA_LEVEL == 2
// The kernel where the CPU has AVX512-VNNI, else null (the int16 multiply-adds run).
template <class Fn>
Fn vnni_variant(Fn kernel) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") ? kernel : nullptr;
}
#endif

// native where the CPU has AVX512-BF16 (every CPU with AMX tiles), else emulated.
template <class Fn>
Fn bf16_variant(Fn native, Fn emulated) {
#if DK_ISA_LEVEL == 2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16")) return native;
#endif
  return emulated;
}

const Kernels table = {kW,
                       kPanel,
                       add_layer_norm_row,
                       bias_act_row,
                       gemm,
                       linear_panels,
                       softmax_update,
                       scale,
                       absmax,
                       quantize_int8,
                       scale_add,
                       transpose_rows,
                       bias_act_row_bf16,
                       widen_bf16,
                       bf16_variant(add_layer_norm_row_bf16<true>, add_layer_norm_row_bf16<false>),
                       bf16_variant(scale_to_bf16<true>, scale_to_bf16<false>),
                       bf16_variant(softmax_update_bf16<true>, softmax_update_bf16<false>),
                       bf16_variant(bias_act_to_bf16<true>, bias_act_to_bf16<false>),
                       dequant_bias_act,
                       bf16_variant(dequant_bias_act_bf16<true>, dequant_bias_act_bf16<false>),
                       bf16_variant(split_bf16x3<true>, split_bf16x3<false>),
                       bias_act_to_f32,
                       gemm_s8_block,
#if DK_ISA_LEVEL == 2
                       vnni_variant(gemm_u8s8_block)};
#else
                       nullptr};
#endif

#undef DK_INLINE

}  // namespace DK_ISA_NS
}  // namespace cpu
}  // namespace distilkernels
