// attention and varlen_attention on CPU: argument checks, the segments of a call, and the blocked
// (flash-style) kernel core that serves every dtype on every CPU (bf16 on a CPU with AMX tiles or AVX512-BF16
// goes to attention_amx.cpp instead, and so does fp32 under torch's "high" float32 matmul precision, as bf16x3
// products; see attention.h for the segments and the task split).
//
// A key padding mask becomes each segment's key list once per call (masked keys are dropped, not masked in
// the inner loop), so padding costs nothing. Each thread keeps the current head's keys packed in fp32 (K
// transposed for the score GEMM, V row by row). Per query block: scores = Q K^T in key blocks, online
// softmax in log2 units (softmax_scale * log2(e) folded into Q), acc += P V, then out = acc / row_sum.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "checks.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"

namespace distilkernels {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 256;  // a multiple of every vector width
using attn::kLog2e;
using attn::Layout;
using attn::Problem;
using attn::Segment;

// Per-thread scratch: the packed keys of the current (segment, head) and one query block's state.
struct Scratch {
  int64_t width, head_dim, dpad, ldkt;
  std::vector<float> kt;       // (head_dim, ldkt): K^T, zero past the last key
  std::vector<float> vp;       // (max_keys, dpad): V, zero past head_dim
  std::vector<float> qp;       // (kQueryBlock, head_dim): Q * softmax_scale * log2(e)
  std::vector<float> scores;   // (kQueryBlock, kKeyBlock)
  std::vector<float> acc;      // (kQueryBlock, dpad)
  std::vector<float> row_max, row_sum;  // (kQueryBlock,)
  std::vector<const float*> rows;       // (max_keys,): the current head's key rows (fp32 inputs, or kw's rows)
  std::vector<float> kw;                // (max_keys, head_dim): bf16 key rows widened, before the transpose
  int64_t seg = -1, head = -1;

  Scratch(int64_t width, int64_t head_dim, int64_t max_keys, bool widen_keys)
      : width(width), head_dim(head_dim), dpad(round_up(head_dim, width)), ldkt(round_up(std::max<int64_t>(max_keys, 1), width)),
        kt(head_dim * ldkt), vp(std::max<int64_t>(max_keys, 1) * dpad, 0.0f), qp(kQueryBlock * head_dim),
        scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * dpad), row_max(kQueryBlock), row_sum(kQueryBlock),
        rows(std::max<int64_t>(max_keys, 1)), kw(widen_keys ? std::max<int64_t>(max_keys, 1) * head_dim : 0) {}
};

// bf16 rows go through the vector kernels (widen_bf16, scale_to_bf16: exact widening, the same rounding as
// c10::BFloat16); fp16 rows are converted element by element.
template <typename T>
constexpr bool kBf16 = std::is_same_v<T, at::BFloat16>;

template <typename T>
const uint16_t* bits(const T* x) {
  return reinterpret_cast<const uint16_t*>(x);
}

template <typename T>
void pack_keys(const Problem& p, const T* k, const T* v, int64_t s, int64_t h, Scratch& sc) {
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, n = seg.n_keys;
  const T* kbase = k + seg.k_off + h * L.k_head;
  const T* vbase = v + seg.v_off + h * L.v_head;
  auto row_of = [&](int64_t j) { return seg.key_row(j); };
  // V is packed too, even when it could be read in place: its rows sit 3 * dim apart in the fused q|k|v
  // output (9 KiB for distilbert-base), a stride that maps a block's rows onto a few L1 sets.
  const auto& kern = cpu::kernels();
  if constexpr (std::is_same_v<T, float>) {  // the vector kernels: K^T by register-block transposes, V by rows
    for (int64_t j = 0; j < n; ++j) sc.rows[j] = kbase + row_of(j) * L.k_row;
    kern.transpose_rows(sc.rows.data(), n, d_n, sc.kt.data(), sc.ldkt);
    for (int64_t j = 0; j < n; ++j) std::memcpy(sc.vp.data() + j * sc.dpad, vbase + row_of(j) * L.v_row, d_n * sizeof(float));
  } else if constexpr (kBf16<T>) {  // the same, on rows widened first
    for (int64_t j = 0; j < n; ++j) {
      float* row = sc.kw.data() + j * d_n;
      kern.widen_bf16(bits(kbase + row_of(j) * L.k_row), d_n, row);
      sc.rows[j] = row;
    }
    kern.transpose_rows(sc.rows.data(), n, d_n, sc.kt.data(), sc.ldkt);
    for (int64_t j = 0; j < n; ++j) kern.widen_bf16(bits(vbase + row_of(j) * L.v_row), d_n, sc.vp.data() + j * sc.dpad);
  } else {
    // Transpose K in tiles of 8 keys so the strided writes land in a few cache lines at a time.
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      const int64_t j1 = std::min(j0 + 8, n);
      for (int64_t d = 0; d < d_n; ++d)
        for (int64_t j = j0; j < j1; ++j) sc.kt[d * sc.ldkt + j] = static_cast<float>(kbase[row_of(j) * L.k_row + d]);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* src = vbase + row_of(j) * L.v_row;
      float* dst = sc.vp.data() + j * sc.dpad;
      for (int64_t d = 0; d < d_n; ++d) dst[d] = static_cast<float>(src[d]);
    }
  }
  for (int64_t d = 0; d < d_n; ++d)
    std::fill(sc.kt.begin() + d * sc.ldkt + n, sc.kt.begin() + (d + 1) * sc.ldkt, 0.0f);
  sc.seg = s;
  sc.head = h;
}

// One query block [q0, q0 + rows) of one (segment, head).
template <typename T>
void attend_block(const Problem& p, const T* q, T* out, float* lse, int64_t s, int64_t h, int64_t q0, Scratch& sc) {
  const auto& kern = cpu::kernels();
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, rows = std::min(kQueryBlock, seg.n_q - q0);
  T* out_rows = out + seg.out_off + h * L.out_head + q0 * L.out_row;
  float* lse_rows = lse + seg.lse_off + h * L.lse_head + q0;
  if (seg.n_keys == 0) return attn::write_unattended(out_rows, L.out_row, lse_rows, rows, d_n);
  const float q_scale = p.softmax_scale * kLog2e;
  const T* q_rows = q + seg.q_off + h * L.q_head + q0 * L.q_row;
  for (int64_t i = 0; i < rows; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      kern.scale(q_rows + i * L.q_row, q_scale, d_n, sc.qp.data() + i * d_n);
    } else if constexpr (kBf16<T>) {
      float* row = sc.qp.data() + i * d_n;
      kern.widen_bf16(bits(q_rows + i * L.q_row), d_n, row);
      kern.scale(row, q_scale, d_n, row);
    } else {
      for (int64_t d = 0; d < d_n; ++d) sc.qp[i * d_n + d] = static_cast<float>(q_rows[i * L.q_row + d]) * q_scale;
    }
  }
  std::fill(sc.row_max.begin(), sc.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.0f);
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * sc.dpad, 0.0f);

  for (int64_t kb = 0; kb < seg.n_keys; kb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, seg.n_keys - kb);
    kern.gemm(rows, round_up(nk, sc.width), d_n, sc.qp.data(), d_n, sc.kt.data() + kb, sc.ldkt, sc.scores.data(),
              kKeyBlock, /*accumulate=*/false);
    kern.softmax_update(sc.scores.data(), kKeyBlock, rows, nk, sc.row_max.data(), sc.row_sum.data(), sc.acc.data(),
                        sc.dpad, sc.dpad);
    kern.gemm(rows, sc.dpad, nk, sc.scores.data(), kKeyBlock, sc.vp.data() + kb * sc.dpad, sc.dpad, sc.acc.data(), sc.dpad,
              /*accumulate=*/true);
  }

  for (int64_t i = 0; i < rows; ++i) {
    const float inv = 1.0f / sc.row_sum[i];
    const float* a = sc.acc.data() + i * sc.dpad;
    T* o = out_rows + i * L.out_row;
    if constexpr (std::is_same_v<T, float>) {
      kern.scale(a, inv, d_n, o);
    } else if constexpr (kBf16<T>) {
      kern.scale_to_bf16(a, inv, d_n, reinterpret_cast<uint16_t*>(o));
    } else {
      for (int64_t d = 0; d < d_n; ++d) o[d] = static_cast<T>(a[d] * inv);
    }
    lse_rows[i] = attn::lse_from_stats(sc.row_max[i], sc.row_sum[i]);
  }
}

// The kernel core: every (segment, head, query block), split over threads by estimated cost.
template <typename T>
void attention_core(const Problem& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  const attn::Plan plan = attn::plan_tasks(p, kQueryBlock);
  if (plan.tasks.empty()) return;
  const int64_t width = cpu::kernels().width;
  at::parallel_for(0, static_cast<int64_t>(plan.part_begin.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(width, p.head_dim, plan.max_keys, kBf16<T>);
    for (int64_t i = plan.part_begin[begin]; i < plan.part_begin[end]; ++i) {
      const attn::Task& t = plan.tasks[i];
      attn::prefetch_next(p, plan, i, plan.part_begin[end], kQueryBlock, q, k, v);
      if ((t.seg != sc.seg || t.head != sc.head) && p.segments[t.seg].n_keys > 0) pack_keys(p, k, v, t.seg, t.head, sc);
      attend_block(p, q, out, lse, t.seg, t.head, t.q0, sc);
    }
  });
}

// Below this many keys in its longest segment a call takes the blocked core even where the matrix unit
// serves its dtype: the matrix unit's fixed cost per (segment, head) (packing, keys padded to 32) is then most
// of the work. Measured (bf16, 12 heads of 64, 1 thread, us per call, matrix unit vs blocked): 1 x 1 token 12
// vs 9; 1 x 4: 15 vs 12; 1 x 8: 14 vs 16; 32 x 8: 224 vs 372; 1 x 16: 16 vs 27; 32 x 16: 373 vs 762.
constexpr int64_t kMatrixUnitMinKeys = 8;

void run_core(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              at::Tensor& lse) {
  int64_t max_keys = 0;
  for (const Segment& seg : p.segments) max_keys = std::max(max_keys, seg.n_keys);
  if (max_keys >= kMatrixUnitMinKeys && attn::use_matrix_unit(q.scalar_type())) {
    attn::attention_amx(p, q.const_data_ptr<at::BFloat16>(), k.const_data_ptr<at::BFloat16>(),
                        v.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(),
                        lse.mutable_data_ptr<float>());
    return;
  }
  if (max_keys >= kMatrixUnitMinKeys && attn::use_bf16x3(q.scalar_type())) {
    attn::attention_amx_x3(p, q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                           out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention", [&] {
    attention_core<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<float>());
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ndim, const char* layout) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_cpu(*t, name);
    check_float(*t, name);
    TORCH_CHECK(t->dim() == ndim, name, " must be ", layout, " (", ndim, " dims), got shape ", t->sizes());
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1, name,
                " must have a unit stride in its last (head_dim) dimension, got strides ", t->strides());
  }
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must have one shape ", layout, ", got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim >= 1 && head_dim <= 256, "head_dim (last dim of q) must be in 1..256, got ", head_dim);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 double softmax_scale) {
  check_qkv(q, k, v, 4, "(batch, seqlen, n_heads, head_dim)");
  const int64_t batch = q.size(0), seqlen = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  at::Tensor mask;
  if (key_padding_mask.has_value()) {
    mask = *key_padding_mask;
    check_cpu(mask, "key_padding_mask");
    TORCH_CHECK(mask.scalar_type() == at::kBool, "key_padding_mask must be a bool tensor (True = attend), got ",
                mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == seqlen,
                "key_padding_mask must be (batch, seqlen) = (", batch, ", ", seqlen, "), got ", mask.sizes());
    mask = mask.contiguous();
  }
  at::Tensor out = cached_empty({batch, seqlen, n_heads, head_dim}, q.options());
  at::Tensor lse = cached_empty({batch, n_heads, seqlen}, q.options().dtype(at::kFloat));

  Problem p{{q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), n_heads * head_dim,
             head_dim, seqlen},
            {}, n_heads, head_dim, static_cast<float>(softmax_scale)};
  // Attended key rows of each batch row, compacted; a contiguous run needs no list at all.
  std::vector<int64_t> keys(mask.defined() ? batch * seqlen : 0);
  for (int64_t b = 0; b < batch; ++b) {
    Segment seg{b * q.stride(0), b * k.stride(0), b * v.stride(0), b * seqlen * n_heads * head_dim,
                b * n_heads * seqlen, seqlen, nullptr, 0, seqlen};
    if (mask.defined()) {
      const bool* m = mask.const_data_ptr<bool>() + b * seqlen;
      int64_t* list = keys.data() + b * seqlen;
      int64_t n = 0;
      for (int64_t j = 0; j < seqlen; ++j)
        if (m[j]) list[n++] = j;
      seg.n_keys = n;
      if (n > 0 && list[n - 1] - list[0] + 1 == n)
        seg.key_start = list[0];
      else
        seg.keys = list;
    }
    p.segments.push_back(seg);
  }
  run_core(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double softmax_scale) {
  check_qkv(q, k, v, 3, "(total_tokens, n_heads, head_dim)");
  check_cpu(cu_seqlens, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2,
              "cu_seqlens must be a 1-D tensor (batch + 1,) with at least 2 entries, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(max_seqlen >= 0, "max_seqlen must be an int >= 0, got ", max_seqlen);
  const int64_t total = q.size(0), n_heads = q.size(1), head_dim = q.size(2);
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* bounds = cu.const_data_ptr<int32_t>();
  const int64_t n_seq = cu.size(0) - 1;
  TORCH_CHECK(bounds[0] == 0, "cu_seqlens[0] must be 0, got ", bounds[0]);
  for (int64_t i = 0; i < n_seq; ++i)
    TORCH_CHECK(bounds[i + 1] >= bounds[i], "cu_seqlens must be non-decreasing, but cu_seqlens[", i + 1, "] = ",
                bounds[i + 1], " < cu_seqlens[", i, "] = ", bounds[i]);
  TORCH_CHECK(bounds[n_seq] == total, "cu_seqlens[-1] must equal total_tokens = ", total, ", got ", bounds[n_seq]);
  for (int64_t i = 0; i < n_seq; ++i)
    TORCH_CHECK(bounds[i + 1] - bounds[i] <= max_seqlen, "max_seqlen must be >= the longest sequence (",
                bounds[i + 1] - bounds[i], " or longer), got ", max_seqlen);

  at::Tensor out = cached_empty({total, n_heads, head_dim}, q.options());
  at::Tensor lse = cached_empty({n_heads, total}, q.options().dtype(at::kFloat));
  Problem p{{q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), n_heads * head_dim,
             head_dim, total},
            {}, n_heads, head_dim, static_cast<float>(softmax_scale)};
  for (int64_t i = 0; i < n_seq; ++i) {
    const int64_t start = bounds[i], len = bounds[i + 1] - bounds[i];
    p.segments.push_back(Segment{start * q.stride(0), start * k.stride(0), start * v.stride(0),
                                 start * n_heads * head_dim, start, len, nullptr, 0, len});
  }
  run_core(p, q, k, v, out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(distilkernels, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("varlen_attention", &varlen_attention_cpu);
}

}  // namespace distilkernels
