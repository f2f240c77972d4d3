// bf16 linear on weights packed once: out = activation(x @ weight^T + bias), bf16 in and out, fp32 accumulate.
//
// On a CPU whose matrix unit takes bf16 (AMX; at::native::cpublas::could_pack(kBFloat16)), the weight is packed
// into brgemm's VNNI blocks (brgemm_utils.h) and every 64 x 64 output tile is computed over the whole in_features
// into an fp32 tile, whose epilogue adds the bias, applies the activation and rounds to bf16 once. The tile is
// computed by our AMX loop (amx_tiles.h) where in_features is a multiple of 32, else by one brgemm call.
// Elsewhere (no AMX: an AVX-512-BF16 or AVX2-only CPU) the weight is kept as plain W^T (in_features,
// out_features) and the product is one call of brgemm's non-VNNI fallback over the whole matrix (per tile it
// would pay that GEMM's set-up once per tile), followed by the same epilogue.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "amx_tiles.h"
#include "brgemm_utils.h"
#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {

cpu::Activation parse_activation(c10::string_view activation);  // linear.cpp

// Whether our AMX tile loops run now (the CPU has the tiles, Linux granted them, DISTILKERNELS_AMX is not off).
bool amx_tiles_enabled() { return amx::enabled(); }

namespace {

using brgemm::kBlockM;
using brgemm::kBlockN;

// The weight argument of pack_linear_bf16 and pack_linear_bf16x3.
void check_pack_weight(const at::Tensor& weight, bool vnni) {
  check_cpu(weight, "weight");
  check_float(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "weight must be (out_features, in_features), got shape ", weight.sizes());
  TORCH_CHECK(!vnni || brgemm::packs(at::kBFloat16),
              "vnni=True needs a CPU whose matrix unit takes bf16 (AMX); pack with vnni=False on this CPU");
}

// weight (out_features, in_features), checked, in linear_bf16's layout.
at::Tensor pack_bf16(const at::Tensor& weight, bool vnni) {
  const auto wt = weight.to(at::kBFloat16).t();  // (in_features, out_features)
  return vnni ? brgemm::pack_blocks(wt) : wt.contiguous();
}

at::Tensor pack_linear_bf16_cpu(const at::Tensor& weight, bool vnni) {
  check_pack_weight(weight, vnni);
  return pack_bf16(weight, vnni);
}

// out[r, :] = bf16(act(acc[r, :] + bias)) for a (rows, cols) fp32 tile with row stride ld_acc.
void epilogue(const float* acc, int64_t ld_acc, int64_t rows, int64_t cols, const float* bias, cpu::Activation act,
              at::BFloat16* out, int64_t ld_out) {
  cpu::kernels().bias_act_to_bf16(acc, ld_acc, rows, cols, bias, act, reinterpret_cast<uint16_t*>(out), ld_out);
}

// The GEMMs below hand each piece of the fp32 product to store(acc, ld_acc, m0, rows, n0, cols): output rows
// [m0, m0 + rows) by columns [n0, n0 + cols), at acc with row stride ld_acc; it writes them out.
// `repeat` (bf16x3; 0 everywhere else): after the whole product, x's first `repeat` columns multiply the
// weight's last `repeat` rows again, into the same accumulators.

template <class Store>
void gemm_vnni(const at::BFloat16* a, int64_t tokens, int64_t k, int64_t repeat, const at::BFloat16* wp,
               int64_t out_features, const Store& store) {
  const int64_t n_blocks = (out_features + kBlockN - 1) / kBlockN;
  const int64_t block = k * kBlockN;
  brgemm::for_each_tile(tokens, n_blocks, [&](int64_t nb, int64_t m0, int64_t rows) {
    alignas(64) float acc[kBlockM * kBlockN];
    const int64_t n0 = nb * kBlockN;
    at::native::cpublas::brgemm(rows, kBlockN, k, /*ld_a=*/k, /*ld_b=*/kBlockN, /*ld_c=*/kBlockN,
                                /*add_C=*/false, a + m0 * k, wp + nb * block, acc, /*is_vnni=*/true);
    if (repeat > 0)  // a VNNI row holds 2 k of 64 columns: the weight's k row r starts at r * kBlockN
      at::native::cpublas::brgemm(rows, kBlockN, repeat, /*ld_a=*/k, /*ld_b=*/kBlockN, /*ld_c=*/kBlockN,
                                  /*add_C=*/true, a + m0 * k, wp + nb * block + (k - repeat) * kBlockN, acc,
                                  /*is_vnni=*/true);
    store(acc, kBlockN, m0, rows, n0, std::min(kBlockN, out_features - n0));
  });
}

// Without the VNNI layout: brgemm's non-VNNI path, one call for the whole product (ATen's bf16 x bf16 -> fp32
// GEMM: oneDNN where the CPU has AVX-512, ATen's own loop elsewhere), then the epilogue, by rows.
template <class Store>
void gemm_plain(const at::Tensor& x, const at::Tensor& wt, const Store& store, int64_t repeat) {
  const int64_t tokens = x.size(0), k = x.size(1), n = wt.size(1);
  auto acc = cached_empty({tokens, n}, x.options().dtype(at::kFloat));
  float* c = acc.mutable_data_ptr<float>();
  const auto* a = x.const_data_ptr<at::BFloat16>();
  const auto* b = wt.const_data_ptr<at::BFloat16>();
  if (k == 0) {
    acc.zero_();
  } else {
    at::native::cpublas::brgemm(tokens, n, k, /*ld_a=*/k, /*ld_b=*/n, /*ld_c=*/n, /*add_C=*/false, a, b, c,
                                /*is_vnni=*/false);
    if (repeat > 0)
      at::native::cpublas::brgemm(tokens, n, repeat, /*ld_a=*/k, /*ld_b=*/n, /*ld_c=*/n, /*add_C=*/true, a,
                                  b + (k - repeat) * n, c, /*is_vnni=*/false);
  }
  at::parallel_for(0, tokens, row_grain(n), [&](int64_t begin, int64_t end) {
    store(c + begin * n, n, begin, end - begin, 0, n);
  });
}

// The fp32 product a (tokens, k) bf16 @ the packed weight, handed to store in pieces (above). a is contiguous
// with k its packed in_features (the VNNI layout's, rounded up to 2: zero columns where the weight has zero
// rows). heavy_epilogue: store applies GELU. rows_done: as amx::gemm's, called only where our AMX tile loop
// runs. repeat: see above.
template <class Store, class RowsDone>
void gemm_bf16(const at::Tensor& a, const at::Tensor& packed_weight, int64_t out_features, bool heavy_epilogue,
               const Store& store, const RowsDone& rows_done, int64_t repeat = 0) {
  const int64_t tokens = a.size(0), k = a.size(1);
  if (tokens == 0 || out_features == 0) return;
  const bool vnni = packed_weight.dim() == 3;
  if (k == 0 || !vnni) {
    gemm_plain(a, vnni ? at::empty({0, out_features}, packed_weight.options()) : packed_weight, store, repeat);
    return;
  }
  if (k % 32 == 0 && repeat % 32 == 0 && amx::enabled()) {
    amx::gemm<amx::Kind::kBf16>(a.const_data_ptr(), tokens, k * 2, packed_weight.const_data_ptr(),
                                (out_features + kBlockN - 1) / kBlockN,
                                [&](int64_t nb, int64_t m0, int64_t rows, const void* acc) {
      const int64_t n0 = nb * kBlockN;
      store(static_cast<const float*>(acc), kBlockN, m0, rows, n0, std::min(kBlockN, out_features - n0));
    }, heavy_epilogue, rows_done, repeat * 2);
    return;
  }
  gemm_vnni(a.const_data_ptr<at::BFloat16>(), tokens, k, repeat, packed_weight.const_data_ptr<at::BFloat16>(),
            out_features, store);
}

void check_linear_bf16(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features,
                       const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_cpu(packed_weight, "packed_weight");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(packed_weight.scalar_type() == at::kBFloat16, "packed_weight must be bfloat16, got ",
              packed_weight.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const int64_t k = x.size(1);
  const int64_t kp = round_up(k, brgemm::vnni_group(at::kBFloat16));
  if (packed_weight.dim() == 3) {
    TORCH_CHECK(brgemm::packs(at::kBFloat16), "packed_weight is in the matrix unit's VNNI layout, which this CPU "
                "cannot run: pack it with pack_linear_bf16(weight, vnni=False)");
    TORCH_CHECK(packed_weight.size(0) == (out_features + kBlockN - 1) / kBlockN && packed_weight.size(1) == kp &&
                packed_weight.size(2) == kBlockN, "packed_weight must be (", (out_features + kBlockN - 1) / kBlockN,
                ", ", kp, ", ", kBlockN, ") for out_features=", out_features, " and in_features=", k,
                ", got shape ", packed_weight.sizes());
  } else {
    TORCH_CHECK(packed_weight.dim() == 2 && packed_weight.size(0) == k && packed_weight.size(1) == out_features,
                "packed_weight must be (in_features=", k, ", out_features=", out_features,
                ") from pack_linear_bf16(weight, vnni=False), or 3-D from vnni=True; got shape ",
                packed_weight.sizes());
  }
  TORCH_CHECK(packed_weight.is_contiguous(), "packed_weight must be contiguous");
  if (bias.has_value()) check_vector(*bias, "bias", out_features);
}

// out (tokens, out_features) bf16 = activation(x @ weight^T + bias), arguments checked by check_linear_bf16.
// rows_done: as amx::gemm's, called only where our AMX tile loop runs.
template <class RowsDone>
void linear_bf16_into(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features, const float* bias,
                      cpu::Activation act, at::Tensor& out, const RowsDone& rows_done) {
  const int64_t k = x.size(1);
  // VNNI packs in_features in pairs: an odd in_features gets a zero column, as its packed weight has a zero row.
  const int64_t kp = packed_weight.dim() == 3 ? round_up(k, brgemm::vnni_group(at::kBFloat16)) : k;
  const auto a = kp == k ? x.contiguous() : at::constant_pad_nd(x, {0, kp - k});
  auto* c = out.mutable_data_ptr<at::BFloat16>();
  gemm_bf16(a, packed_weight, out_features, act == cpu::Activation::kGelu,
            [&](const float* acc, int64_t ld_acc, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
              epilogue(acc, ld_acc, rows, cols, bias + n0, act, c + m0 * out_features + n0, out_features);
            }, rows_done);
}

at::Tensor linear_bf16_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features,
                           const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_linear_bf16(x, packed_weight, out_features, bias);
  const Fp32Values bias_f(bias, out_features);
  const auto act = parse_activation(activation);
  auto out = cached_empty({x.size(0), out_features}, x.options());
  linear_bf16_into(x, packed_weight, out_features, bias_f.data(), act, out, amx::NoRowsDone());
  return out;
}

// LayerNorm(linear_bf16(x) + residual): the GEMM's output rounded to bf16, then add_layer_norm's row kernel on
// it, so the result is what the two ops give, bit for bit. On our AMX tile loop a thread that computed every
// tile of a row superblock normalizes those rows as soon as their epilogues have run, while they are in its
// cache, rather than a second pass reading the GEMM's output back from memory (and a second op call); rows that
// two threads shared (a superblock split between them, as at 128 rows), and every other path, are normalized
// after the GEMM, in this call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bf16_add_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features, const c10::optional<at::Tensor>& bias,
    const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& ln_bias, double eps) {
  check_linear_bf16(x, packed_weight, out_features, bias);
  TORCH_CHECK(out_features > 0, "out_features must be > 0 (the LayerNorm's dim), got ", out_features);
  check_cpu(residual, "residual");
  check_same_dtype(residual, "residual", x, "x");
  const int64_t tokens = x.size(0), n = out_features;
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == tokens && residual.size(1) == n,
              "residual must be (tokens, out_features) = (", tokens, ", ", n, "), got shape ", residual.sizes());
  check_vector(weight, "weight", n);
  check_vector(ln_bias, "ln_bias", n);
  const Fp32Values bias_f(bias, n), w32(weight, n), b32(ln_bias, n);
  const at::Tensor res = residual.contiguous();
  auto out = cached_empty({tokens, n}, x.options());
  auto mean = cached_empty({tokens}, x.options().dtype(at::kFloat));
  auto rstd = cached_empty({tokens}, x.options().dtype(at::kFloat));
  auto* o = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const auto* r = reinterpret_cast<const uint16_t*>(res.const_data_ptr<at::BFloat16>());
  float* mu = mean.mutable_data_ptr<float>();
  float* rs = rstd.mutable_data_ptr<float>();
  const float e = static_cast<float>(eps);
  const auto& kern = cpu::kernels();
  auto normalize = [&](int64_t begin, int64_t end, float* h) {  // in place: the row kernel reads x before writing
    for (int64_t i = begin; i < end; ++i)
      kern.add_layer_norm_row_bf16(o + i * n, r + i * n, w32.data(), b32.data(), e, n, h, o + i * n, mu + i, rs + i);
  };
  // done[b]: rows [64 b, 64 b + 64) normalized in the tile loop (each flag written by the one thread that owns its
  // rows; read after the loop's threads have joined).
  std::vector<uint8_t> done((tokens + kBlockM - 1) / kBlockM, 0);
  linear_bf16_into(x, packed_weight, n, bias_f.data(), cpu::Activation::kNone, out, [&](int64_t m0, int64_t rows) {
    std::vector<float> h(n);
    normalize(m0, m0 + rows, h.data());
    std::fill(done.begin() + m0 / kBlockM, done.begin() + (m0 + rows + kBlockM - 1) / kBlockM, 1);
  });
  if (std::find(done.begin(), done.end(), 0) == done.end()) return {out, mean, rstd};  // no second parallel region
  at::parallel_for(0, tokens, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> h;
    for (int64_t i = begin; i < end; ++i) {
      if (done[i / kBlockM]) continue;
      h.resize(n);
      normalize(i, i + 1, h.data());
    }
  });
  return {out, mean, rstd};
}

// ---- bf16x3: an fp32 GEMM as three bf16 products on the matrix unit --------------------------------------
//
// Each fp32 value v is split into hi = bf16(v) and lo = bf16(v - hi) (cpu::Kernels::split_bf16x3): v - hi is
// exact, so v - hi - lo is lo's own rounding, at most 2^-9 |v - hi| <= 2^-18 |v|. Then
//   x w = xh wh + xh wl + xl wh + xl wl + (x's and w's split remainders)
// and the GEMM computes the first three products, each exact in fp32, accumulated in fp32 by the bf16 GEMM
// above over in_features tripled: x's row (xh | xl) against the weight's (wl | wh), then xh against wh again
// (the GEMM's `repeat`: neither is stored twice, x's split and the weight each 2x their bf16 size, the fp32
// size), so the two small products are summed before the large one. What it leaves out, xl wl and the
// remainders, is at most ~3 * 2^-18 |x w| per product: a result within ~1.2e-5 of sum |x_k w_k| (relative) of
// the exact one, against ~2^-24 per rounding for an fp32 GEMM. This is what
// torch.set_float32_matmul_precision("high") permits ("each float32 number as the sum of two bfloat16
// numbers"); at three bf16 products per product it runs ~2x the fp32 FMA units' rate on a matrix unit that
// takes bf16 (AMX).
//
// In the VNNI layout in_features is cut into parts of at most kPartK (parts as equal as whole segments allow),
// each its own three products over a segment padded to a multiple of 32 with zeros (so every shape takes
// our AMX tile loop), summed into the fp32 output part by part. One part of in_features 3072 (lin2) gives rows
// of x 18 KB long, of which one 64-row block fills the tile loop's L2 budget (amx::gemm's superblocks): every
// weight block was then streamed again for every 64 rows. Parts of 1024 (6 KB rows, as bf16 lin2's) take 2-row-
// block superblocks: distilbert-base lin2 at 1024 rows, 2 threads, weights from beyond the cache, one part 10.0
// ms, three 7.95 (two 8.4, four 8.5). The plain layout (other CPUs: brgemm's non-VNNI GEMM, correct but slower
// than an fp32 GEMM) keeps in_features whole.
constexpr int64_t kPartK = 1024;

struct X3Layout {
  int64_t parts, part_k, seg;  // parts of part_k of in_features (the last may be shorter), each padded to seg

  X3Layout(int64_t in_features, bool vnni) {
    parts = vnni ? std::max<int64_t>(1, (in_features + kPartK - 1) / kPartK) : 1;
    part_k = (in_features + parts - 1) / parts;
    seg = vnni ? round_up(part_k, 32) : in_features;
  }
  int64_t width(int64_t p, int64_t in_features) const { return std::min(part_k, in_features - p * part_k); }
};

// Rows of x (tokens, in_features) fp32 split into (hi | lo) segments per part: out (parts, tokens, 2 seg).
void split_rows_bf16x3(const at::Tensor& x, const X3Layout& l, at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1);
  const float* src = x.const_data_ptr<float>();
  auto* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const auto& kern = cpu::kernels();
  at::parallel_for(0, rows, row_grain(2 * l.seg * l.parts), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t p = 0; p < l.parts; ++p)
        kern.split_bf16x3(src + r * k + p * l.part_k, l.width(p, k), l.seg, dst + (p * rows + r) * 2 * l.seg);
  });
}

at::Tensor pack_linear_bf16x3_cpu(const at::Tensor& weight, bool vnni) {
  check_pack_weight(weight, vnni);
  const X3Layout l(weight.size(1), vnni);
  auto split = at::empty({l.parts, weight.size(0), 2 * l.seg}, weight.options().dtype(at::kBFloat16));
  split_rows_bf16x3(weight.to(at::kFloat).contiguous(), l, split);  // (hi | lo) per part
  std::vector<at::Tensor> packed;
  for (int64_t p = 0; p < l.parts; ++p) {
    const auto hi = split[p].narrow(1, 0, l.seg), lo = split[p].narrow(1, l.seg, l.seg);
    packed.push_back(pack_bf16(at::cat({lo, hi}, 1), vnni));  // against x's (hi | lo), then hi again
  }
  return l.parts == 1 ? packed[0] : at::cat(packed, 0);
}

at::Tensor linear_bf16x3_cpu(const at::Tensor& x, const at::Tensor& packed_weight, int64_t out_features,
                             const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_cpu(x, "x");
  check_cpu(packed_weight, "packed_weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(packed_weight.scalar_type() == at::kBFloat16, "packed_weight must be bfloat16 (from "
              "pack_linear_bf16x3), got ", packed_weight.scalar_type());
  TORCH_CHECK(x.dim() == 2, "x must be (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const int64_t tokens = x.size(0), k = x.size(1);
  const bool vnni = packed_weight.dim() == 3;
  const X3Layout l(k, vnni);
  const int64_t n_blocks = (out_features + kBlockN - 1) / kBlockN;
  if (vnni) {
    TORCH_CHECK(brgemm::packs(at::kBFloat16), "packed_weight is in the matrix unit's VNNI layout, which this CPU "
                "cannot run: pack it with pack_linear_bf16x3(weight, vnni=False)");
    TORCH_CHECK(packed_weight.size(0) == l.parts * n_blocks && packed_weight.size(1) == 2 * l.seg &&
                packed_weight.size(2) == kBlockN, "packed_weight must be (", l.parts * n_blocks, ", ", 2 * l.seg,
                ", ", kBlockN, ") for out_features=", out_features, " and in_features=", k, ", got shape ",
                packed_weight.sizes());
  } else {
    TORCH_CHECK(packed_weight.dim() == 2 && packed_weight.size(0) == 2 * k && packed_weight.size(1) == out_features,
                "packed_weight must be (2 * in_features=", 2 * k, ", out_features=", out_features,
                ") from pack_linear_bf16x3(weight, vnni=False), or 3-D from vnni=True; got shape ",
                packed_weight.sizes());
  }
  TORCH_CHECK(packed_weight.is_contiguous(), "packed_weight must be contiguous");
  if (bias.has_value()) check_vector(*bias, "bias", out_features);
  const Fp32Values bias_f(bias, out_features);
  const auto act = parse_activation(activation);
  auto out = cached_empty({tokens, out_features}, x.options());
  if (tokens == 0 || out_features == 0) return out;
  auto a = cached_empty({l.parts, tokens, 2 * l.seg}, x.options().dtype(at::kBFloat16));
  split_rows_bf16x3(x.contiguous(), l, a);
  float* o = out.mutable_data_ptr<float>();
  const std::vector<float> zeros(l.parts > 1 ? out_features : 0, 0.0f);
  const auto& kern = cpu::kernels();
  for (int64_t p = 0; p < l.parts; ++p) {  // the bias with the first part, the activation with the last
    const float* b = p == 0 ? bias_f.data() : zeros.data();
    const auto part_act = p + 1 == l.parts ? act : cpu::Activation::kNone;
    const auto w = vnni ? packed_weight.narrow(0, p * n_blocks, n_blocks) : packed_weight;
    gemm_bf16(a[p], w, out_features, part_act == cpu::Activation::kGelu,
              [&](const float* acc, int64_t ld_acc, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
                kern.bias_act_to_f32(acc, ld_acc, rows, cols, b + n0, part_act, o + m0 * out_features + n0,
                                     out_features, /*accumulate=*/p > 0);
              }, amx::NoRowsDone(), /*repeat=*/l.seg);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("pack_linear_bf16", &pack_linear_bf16_cpu);
  m.impl("linear_bf16", &linear_bf16_cpu);
  m.impl("linear_bf16_add_layer_norm", &linear_bf16_add_layer_norm_cpu);
  m.impl("pack_linear_bf16x3", &pack_linear_bf16x3_cpu);
  m.impl("linear_bf16x3", &linear_bf16x3_cpu);
}

}  // namespace distilkernels
