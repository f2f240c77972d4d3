// bf16 attention on the matrix unit (AMX tiles) through ATen's brgemm (at::native::cpublas), with fp32
// online-softmax statistics and the logsumexp kept for a backward pass.
//
// Same segments and task split as the blocked core (attention.h). Per (segment, head), a thread gathers the
// attended keys once and packs them in the VNNI layout brgemm's B operand wants (pairs along K in one 32-bit
// word): K^T by chunks of keys, V by key block (cpublas::pack), zero past the last key and past head_dim.
// Per query block (Q read in place), per key block
//   scores = Q K^T                      brgemm, bf16 x bf16 -> fp32
//   P = bf16(exp2(scores * c - max))    one online-softmax step, c = scale * log2 e: row max, row sum and the
//                                       acc rescale in fp32, P zero past the last key
//   acc += P V                          brgemm, fp32 accumulators (acc = P V on the first key block)
// and out = bf16(acc / row_sum). P is rounded to bf16 before the second GEMM, as in torch's own bf16 flash
// attention; the statistics (row max, row sum, lse) never leave fp32.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "checks.h"
#include "cpu_kernels.h"
#include "vec.h"

namespace distilkernels {
namespace attn {
namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr int64_t kQueryBlock = 64;  // brgemm M; 64-row tiles ran faster than 32-row ones (AMX_NOTES.md)
constexpr int64_t kKeyBlock = 128;   // keys per online-softmax step; a (64, 128) fp32 score block is 32 KiB
// oneDNN's packed B operand is blocked by columns: its leading dimension is 16, 32, 48 or 64. Every brgemm
// therefore covers at most kChunk output columns, and key and head_dim counts are padded to kPad (zeros).
constexpr int64_t kChunk = 64;
constexpr int64_t kPad = 16;
static_assert(kKeyBlock % kChunk == 0, "key blocks are whole chunks");

struct AmxScratch {
  int64_t dk, dv;                   // head_dim padded to a VNNI pair (K of Q K^T) and to kPad (N of P V)
  std::vector<bf16> kt_packed;      // keys [j0, j0 + kChunk) packed at j0 * dk: (dk, chunk width) VNNI
  std::vector<bf16> v_plain;        // key block at kb * dv: (kKeyBlock, dv), zero past head_dim / last key
  std::vector<bf16> v_packed;       // key block at kb * dv, its column chunk e at + e * kChunk * kKeyBlock
  std::vector<bf16> qb;             // (kQueryBlock, dk): a query block of odd head_dim, zero past it
  std::vector<float> scores;        // (kQueryBlock, kKeyBlock)
  std::vector<bf16> pb;             // (kQueryBlock, kKeyBlock): P in bf16, zero past the last key
  std::vector<float> acc;           // (kQueryBlock, dv)
  std::vector<float> row_max, row_sum;
  int64_t seg = -1, head = -1;

  AmxScratch(int64_t head_dim, int64_t max_keys)
      : dk(round_up(head_dim, 2)), dv(round_up(head_dim, kPad)) {
    const int64_t key_rows = std::max<int64_t>(1, round_up(max_keys, kKeyBlock));
    // Value-initialized (zero): the pad columns of qb and v_plain are never written after this.
    kt_packed.resize(key_rows * dk);
    v_plain.resize(key_rows * dv);
    v_packed.resize(key_rows * dv);
    qb.resize(kQueryBlock * dk);
    scores.resize(kQueryBlock * kKeyBlock);
    pb.resize(kQueryBlock * kKeyBlock);
    acc.resize(kQueryBlock * dv);
    row_max.resize(kQueryBlock);
    row_sum.resize(kQueryBlock);
  }
};

// Gathers and packs the attended keys of (segment s, head h): K^T by chunks of keys, V by key block and
// column chunk.
void pack_keys(const Problem& p, const bf16* k, const bf16* v, int64_t s, int64_t h, AmxScratch& sc) {
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, n = seg.n_keys;
  const bf16* kbase = k + seg.k_off + h * L.k_head;
  const bf16* vbase = v + seg.v_off + h * L.v_head;
  const bf16 zero(0.0f);
  // K^T goes straight to the VNNI layout, (dk / 2, ncp) 32-bit words per chunk: word (p, j) holds
  // (K[j, 2p], K[j, 2p + 1]), the pair of K^T rows 2p, 2p + 1 at column j. A key's pairs are whole 32-bit
  // words of its row, so the transpose moves words, not halves.
  const int64_t pairs = sc.dk / 2, whole = d_n / 2;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t nc = std::min(kChunk, n - j0), ncp = round_up(nc, kPad);
    auto* kt = reinterpret_cast<uint32_t*>(sc.kt_packed.data() + j0 * sc.dk);
    for (int64_t j = 0; j < nc; ++j) {
      const bf16* src = kbase + seg.key_row(j0 + j) * L.k_row;
      for (int64_t w = 0; w < whole; ++w) std::memcpy(kt + w * ncp + j, src + 2 * w, sizeof(uint32_t));
      if (whole < pairs) kt[whole * ncp + j] = src[d_n - 1].x;  // odd head_dim: (last value, 0)
    }
    for (int64_t w = 0; w < pairs; ++w) std::fill(kt + w * ncp + nc, kt + (w + 1) * ncp, uint32_t{0});
  }
  for (int64_t kb = 0; kb < n; kb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, n - kb), nkp = round_up(nk, kPad);
    bf16* vp = sc.v_plain.data() + kb * sc.dv;
    for (int64_t j = 0; j < nk; ++j)
      std::memcpy(vp + j * sc.dv, vbase + seg.key_row(kb + j) * L.v_row, d_n * sizeof(bf16));
    std::fill(vp + nk * sc.dv, vp + nkp * sc.dv, zero);
    for (int64_t e = 0; e < sc.dv; e += kChunk) {
      const int64_t w = std::min(kChunk, sc.dv - e);
      cpublas::pack(nkp, w, sc.dv, w, at::kBFloat16, at::kBFloat16, vp + e,
                    sc.v_packed.data() + kb * sc.dv + e * kKeyBlock);
    }
  }
  sc.seg = s;
  sc.head = h;
}

void attend_block(const Problem& p, const bf16* q, bf16* out, float* lse, int64_t s, int64_t h, int64_t q0,
                  AmxScratch& sc) {
  const auto& kern = cpu::kernels();
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, rows = std::min(kQueryBlock, seg.n_q - q0);
  bf16* out_rows = out + seg.out_off + h * L.out_head + q0 * L.out_row;
  float* lse_rows = lse + seg.lse_off + h * L.lse_head + q0;
  if (seg.n_keys == 0) return write_unattended(out_rows, L.out_row, lse_rows, rows, d_n);
  // Q is brgemm's A operand in place (row stride q_row) unless head_dim is odd: then a copy with a zero pad
  // column makes K a whole number of VNNI pairs.
  const bf16* q_rows = q + seg.q_off + h * L.q_head + q0 * L.q_row;
  const bf16* a = q_rows;
  int64_t lda = L.q_row;
  if (sc.dk != d_n) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(sc.qb.data() + i * sc.dk, q_rows + i * L.q_row, d_n * sizeof(bf16));
    a = sc.qb.data();
    lda = sc.dk;
  }
  std::fill(sc.row_max.begin(), sc.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.0f);
  const float q_scale = p.softmax_scale * kLog2e;

  for (int64_t kb = 0; kb < seg.n_keys; kb += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, seg.n_keys - kb), nkp = round_up(nk, kPad);
    for (int64_t c = 0; c < nkp; c += kChunk) {  // scores of zero pad keys are 0 and never read
      const int64_t w = std::min(kChunk, nkp - c);
      cpublas::brgemm(rows, w, sc.dk, lda, w, kKeyBlock, /*add_C=*/false, a,
                      sc.kt_packed.data() + (kb + c) * sc.dk, sc.scores.data() + c);
    }
    kern.softmax_update_bf16(sc.scores.data(), kKeyBlock, rows, nk, nkp, q_scale, sc.row_max.data(),
                             sc.row_sum.data(), sc.acc.data(), sc.dv, sc.dv,
                             reinterpret_cast<uint16_t*>(sc.pb.data()), kKeyBlock);
    for (int64_t e = 0; e < sc.dv; e += kChunk) {
      const int64_t w = std::min(kChunk, sc.dv - e);
      cpublas::brgemm(rows, w, nkp, kKeyBlock, w, sc.dv, /*add_C=*/kb > 0, sc.pb.data(),
                      sc.v_packed.data() + kb * sc.dv + e * kKeyBlock, sc.acc.data() + e);
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    kern.scale_to_bf16(sc.acc.data() + i * sc.dv, 1.0f / sc.row_sum[i], d_n,
                       reinterpret_cast<uint16_t*>(out_rows + i * L.out_row));
    lse_rows[i] = (sc.row_max[i] + std::log2(sc.row_sum[i])) * kLn2;
  }
}

}  // namespace

bool use_matrix_unit(at::ScalarType dtype) {
  if (dtype != at::kBFloat16 || vec::isa() != vec::Isa::kAvx512) return false;
  const char* flag = std::getenv("DISTILKERNELS_AMX");
  if (flag != nullptr && std::strcmp(flag, "0") == 0) return false;
  static const bool packs = cpublas::could_pack(at::kBFloat16);
  return packs;
}

void attention_amx(const Problem& p, const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse) {
  const Plan plan = plan_tasks(p, kQueryBlock);
  if (plan.tasks.empty()) return;
  at::parallel_for(0, static_cast<int64_t>(plan.part_begin.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    AmxScratch sc(p.head_dim, plan.max_keys);
    for (int64_t i = plan.part_begin[begin]; i < plan.part_begin[end]; ++i) {
      const Task& t = plan.tasks[i];
      if ((t.seg != sc.seg || t.head != sc.head) && p.segments[t.seg].n_keys > 0) pack_keys(p, k, v, t.seg, t.head, sc);
      attend_block(p, q, out, lse, t.seg, t.head, t.q0, sc);
    }
    cpublas::brgemm_release();  // hands the tile configuration back once per thread, after its last brgemm
  });
}

}  // namespace attn
}  // namespace distilkernels
