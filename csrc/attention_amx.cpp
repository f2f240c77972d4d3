// bf16 attention on the matrix unit (AMX tiles; on a CPU without them, AVX512-BF16 dot products in their place:
// gemm_bf16_dots), with fp32 online-softmax statistics and the logsumexp kept for a backward pass.
//
// Same segments and task split as the blocked core (attention.h). Per (segment, head), a thread gathers the
// attended keys once and packs them in the VNNI layout of a tile's B operand (pairs along K in one 32-bit
// word): K^T by chunks of keys, V by key block and column chunk, zero past the last key and past head_dim. Per
// query block (Q read in place where it can be), per key block
//   scores = Q K^T                      AMX tiles, bf16 x bf16 -> fp32 (amx::gemm_bf16_tiles)
//   P = bf16(exp2(scores * c - max))    one online-softmax step, c = scale * log2 e: row max, row sum and the
//                                       acc rescale in fp32, P zero past the last key
//   acc += P V                          AMX tiles, fp32 accumulators (acc = P V on the first key block)
// and out = bf16(acc / row_sum). P is rounded to bf16 before the second product, as in torch's own bf16 flash
// attention; the statistics (row max, row sum, lse) never leave fp32.
//
// The products run on our own tile loop under one fixed tile configuration. Through ATen's brgemm (oneDNN's
// micro-kernels) each of these small products (64 x 64 x 64 for Q K^T at head_dim 64) was a separate call with
// its own dispatch and, alternating between the two shapes, its own tile configuration: at distilbert-base
// shapes (12 heads, head_dim 64, 2 threads on the AMX Xeon) the brgemm calls were half of the attention's time
// (0.79 ms of which 0.40 at 8 x 128 tokens; 0.105 ms of which 0.045 at 1 x 128).
//
// Measured at 8 x 128 tokens, 2 threads, and not kept: q|k|v written head-major by its GEMM (each head's rows
// contiguous, 128 bytes apart rather than 4.5 KiB) made that GEMM 4% and this core 10% faster on their own, but
// this core slower in the model (944-1092 us a call against 884-964), with or without padding between the heads'
// planes. Right after a large GEMM this core runs slower than back to back: after MKL's fp32 GEMM by ~30% in
// every run, after our bf16 one by 0-35% depending on what ran before. The extra time is in the Q K^T products
// (+50-70%), and stays with Q's rows read into L1 first, the scratch kept across calls, or a fence between the
// vector stores of packing and the tile loads; a 1-3 ms busy wait after the GEMM made it worse, not better.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "attention.h"
#include "checks.h"
#include "cpu_kernels.h"
#include "env.h"
#include "vec.h"

namespace distilkernels {
namespace attn {
namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr int64_t kQueryBlock = 64;  // rows of queries per task: four 16-row tile groups
// Keys per online-softmax step (fewer, longer rows amortize the per-row max/sum reductions and the acc
// rescale). Measured at 1 thread, 8 x 512 tokens: 128 keys 23.4 ms, 256 and 512 keys 15-19 ms (the two
// alike within the noise; 512 keeps such a sequence in one block). Short sequences use blocks just wide
// enough for their keys (AmxScratch::kw).
constexpr int64_t kKeyBlock = 512;
// K^T is packed in chunks of kChunk keys and V in chunks of kChunk columns. Key counts are padded to kKeyPad, one
// tile step of K in P V (32 bf16), and head_dim to kKeyPad for the K of Q K^T and to 16, one column tile, for the
// N of P V; the pads hold zeros.
constexpr int64_t kChunk = 64;
constexpr int64_t kKeyPad = 32;
constexpr int64_t kColPad = 16;
// A segment with more than kKeyBlock keys steps through whole K^T chunks; fewer keys take one block.
static_assert(kKeyBlock % kChunk == 0 && kChunk % kKeyPad == 0, "key blocks are whole chunks of whole pads");

// What both cores keep per thread: the padded sizes, one query block's scores, accumulators and statistics, and
// which (segment, head) the packed keys belong to.
struct ScratchBase {
  int64_t dk, dv;                   // head_dim padded to kKeyPad (K of Q K^T) and to kColPad (N of P V)
  int64_t kw;                       // keys per block: kKeyBlock, or fewer when no segment has that many
  int64_t keys, key_rows;           // the most keys of a segment (at least 1), and that rounded up to kw
  std::vector<float> scores;        // (kQueryBlock, kw)
  std::vector<float> acc;           // (kQueryBlock, dv)
  std::vector<float> row_max, row_sum;
  int64_t seg = -1, head = -1;

  ScratchBase(int64_t head_dim, int64_t max_keys)
      : dk(round_up(head_dim, kKeyPad)),
        dv(round_up(head_dim, kColPad)),
        kw(std::min(kKeyBlock, round_up(std::max<int64_t>(max_keys, 1), kKeyPad))),
        keys(std::max<int64_t>(max_keys, 1)),
        key_rows(round_up(keys, kw)),
        scores(kQueryBlock * kw),
        acc(kQueryBlock * dv),
        row_max(kQueryBlock),
        row_sum(kQueryBlock) {}
};

// The bf16 core's two products: AMX tiles (amx::gemm_bf16_tiles), or AVX512-BF16 dot products (gemm_bf16_dots).
using Bf16Gemm = void (*)(const char*, int64_t, int64_t, const char*, int64_t, int64_t, int64_t, char*, int64_t, bool);

struct AmxScratch : ScratchBase {
  std::vector<bf16> kt_packed;      // keys [j0, j0 + kChunk) packed at j0 * dk: (dk, chunk width) VNNI
  std::vector<bf16> v_packed;       // key block at kb * dv, its column chunk e at + e * kw
  std::vector<bf16> qb;             // (kQueryBlock, dk): a query block of odd head_dim, zero past it
  std::vector<bf16> pb;             // (kQueryBlock, kw): P in bf16, zero past the last key
  Bf16Gemm gemm = nullptr;          // the products: tiles or dot products (run_tasks sets it)

  AmxScratch(int64_t head_dim, int64_t max_keys)
      : ScratchBase(head_dim, max_keys),
        kt_packed(round_up(key_rows, kChunk) * dk),
        v_packed(key_rows * dv),
        qb(kQueryBlock * dk),  // value-initialized (zero): its pad columns are never written after this
        pb(kQueryBlock * kw) {}
};

// The packing helpers below are compiled for AVX-512 by target attributes: this core runs only where the
// vector kernels run AVX-512 (use_matrix_unit). GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their
// own _mm512_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Transposes 16 x 16 32-bit words: rows r[i] in, columns out in r[i]. Lane-local unpacks pair rows, then
// 128-bit lane shuffles gather each column's four 4-word pieces.
__attribute__((target("avx512f"))) inline void transpose16x16_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c]: column 4 * lane + c of rows i..i + 3, in each 128-bit lane
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // lanes (0, 2) and (1, 3) of row groups (0-3, 4-7) and (8-11, 12-15)
    t[c] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0xdd);
    t[c + 8] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0xdd);
  }
  for (int c = 0; c < 8; ++c) {  // column c from (t[c], t[c + 8]) lanes 0, 2; column c + 8 from lanes 1, 3
    r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
  }
}

// K^T of 16 keys (rows src[0..keys), null past the last key: zeros) in the VNNI layout: word (p, j) of
// kt (row stride ldkt words) holds (K[j, 2p], K[j, 2p + 1]). An odd head_dim's last word is (K[j, d - 1], 0).
__attribute__((target("avx512f,avx512bw"))) void pack_kt16(const bf16* const src[16], int64_t head_dim,
                                                             uint32_t* kt, int64_t ldkt) {
  for (int64_t w0 = 0; 2 * w0 < head_dim; w0 += 16) {
    const int64_t halves = std::min<int64_t>(32, head_dim - 2 * w0);
    const __mmask32 mask = halves == 32 ? ~__mmask32{0} : (__mmask32{1} << halves) - 1;
    __m512i r[16];
    for (int j = 0; j < 16; ++j)
      r[j] = src[j] ? _mm512_maskz_loadu_epi16(mask, src[j] + 2 * w0) : _mm512_setzero_si512();
    transpose16x16_words(r);
    for (int64_t c = 0; c < (halves + 1) / 2; ++c) _mm512_storeu_si512(kt + (w0 + c) * ldkt, r[c]);
  }
}

// One VNNI row of V for w (a multiple of 16, at most 64) columns: word j of vnni holds (r0[j], r1[j]), the
// columns at and past `valid` and a null row's values zero. Two keys' rows are interleaved 32 columns at a time.
__attribute__((target("avx512f,avx512bw"))) void pack_v_pair(const bf16* r0, const bf16* r1, int64_t valid,
                                                               int64_t w, uint16_t* vnni) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < w; c += 32) {
    const int64_t n = std::clamp<int64_t>(valid - c, 0, 32);
    const __mmask32 mask = n == 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
    const __m512i a = r0 ? _mm512_maskz_loadu_epi16(mask, r0 + c) : _mm512_setzero_si512();
    const __m512i b = r1 ? _mm512_maskz_loadu_epi16(mask, r1 + c) : _mm512_setzero_si512();
    _mm512_storeu_si512(vnni + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
    if (w - c > 16) _mm512_storeu_si512(vnni + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// gemm_bf16_tiles' product on AVX512-BF16's dot products (vdpbf16ps) instead of the tiles, for CPUs with those
// and no AMX (AMD Zen 4 and 5, Intel Cooper Lake): the same operands (a: groups x 16 rows of k_steps x 32 bf16,
// row stride lda bytes; b: the VNNI layout, k_steps x 16 rows of `tiles` x 16 words, row stride ldb bytes; c:
// fp32, row stride ldc bytes) and the same result up to the order of the fp32 sums. Four rows by up to four
// 16-column tiles in registers; per pair of K, each row's pair is broadcast against the tiles' words.
template <int kTiles>
__attribute__((target("avx512f,avx512bf16"))) void dot_rows4(const char* a, int64_t lda, const char* b, int64_t ldb,
                                                             int64_t pairs, char* c, int64_t ldc, bool accumulate) {
  __m512 acc[4][kTiles];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < kTiles; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + 64 * j) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[kTiles];
    for (int j = 0; j < kTiles; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 64 * j);
    for (int r = 0; r < 4; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * lda + 4 * p, sizeof word);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(word);
      for (int j = 0; j < kTiles; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < kTiles; ++j) _mm512_storeu_ps(c + r * ldc + 64 * j, acc[r][j]);
}

void gemm_bf16_dots(const char* a, int64_t lda, int64_t groups, const char* b, int64_t ldb, int64_t tiles,
                    int64_t k_steps, char* c, int64_t ldc, bool accumulate) {
  const int64_t pairs = k_steps * 16;
  for (int64_t j = 0; j < tiles; j += 4) {
    const int64_t n = std::min<int64_t>(4, tiles - j);
    for (int64_t r = 0; r < groups * 16; r += 4) {
      const char* ar = a + r * lda;
      const char* bj = b + 64 * j;
      char* cr = c + r * ldc + 64 * j;
      switch (n) {
        case 4: dot_rows4<4>(ar, lda, bj, ldb, pairs, cr, ldc, accumulate); break;
        case 3: dot_rows4<3>(ar, lda, bj, ldb, pairs, cr, ldc, accumulate); break;
        case 2: dot_rows4<2>(ar, lda, bj, ldb, pairs, cr, ldc, accumulate); break;
        default: dot_rows4<1>(ar, lda, bj, ldb, pairs, cr, ldc, accumulate); break;
      }
    }
  }
}

#pragma GCC diagnostic pop

// The CPU has AVX512-BF16 and DISTILKERNELS_BF16_DOTS is not off (read on every call, as DISTILKERNELS_AMX).
bool dots_run() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has && env::switch_on("DISTILKERNELS_BF16_DOTS", true);
}

// Packs n keys' rows (krow(j), vrow(j): bf16 rows of head_dim values) into kt_packed and v_packed as
// AmxScratch lays them out: K^T by chunks of keys, V by key block (of kw keys) and column chunk.
template <class KRow, class VRow>
void pack_rows(const KRow& krow, const VRow& vrow, int64_t n, int64_t d_n, int64_t dk, int64_t dv, int64_t kw,
               bf16* kt_packed, bf16* v_packed) {
  // K^T goes straight to the VNNI layout, (dk / 2, ncp) 32-bit words per chunk: word (p, j) holds
  // (K[j, 2p], K[j, 2p + 1]), the pair of K^T rows 2p, 2p + 1 at column j. A key's pairs are whole 32-bit
  // words of its row, so the transpose moves words, 16 keys x 16 words at a time.
  const int64_t pairs = (d_n + 1) / 2;  // VNNI rows pack_kt16 writes; those up to dk / 2 are zero
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t nc = std::min(kChunk, n - j0), ncp = round_up(nc, kKeyPad);
    auto* kt = reinterpret_cast<uint32_t*>(kt_packed + j0 * dk);
    for (int64_t jj = 0; jj < ncp; jj += 16) {
      const bf16* rows[16];
      for (int64_t j = 0; j < 16; ++j) rows[j] = jj + j < nc ? krow(j0 + jj + j) : nullptr;
      pack_kt16(rows, d_n, kt + jj, ncp);
    }
    // (Written every time: another segment's chunk width puts other words of the buffer under these rows.)
    std::fill(kt + pairs * ncp, kt + dk / 2 * ncp, 0u);
  }
  // V by key block and column chunk: chunk e of key block kb holds (nkp / 2) VNNI rows of w columns, gathered
  // from the attended keys' rows; zero past the last key and past head_dim.
  for (int64_t kb = 0; kb < n; kb += kw) {
    const int64_t nk = std::min(kw, n - kb), nkp = round_up(nk, kKeyPad);
    for (int64_t e = 0; e < dv; e += kChunk) {
      const int64_t w = std::min(kChunk, dv - e);
      auto* dst = reinterpret_cast<uint16_t*>(v_packed + kb * dv + e * kw);
      for (int64_t j = 0; j < nkp; j += 2) {
        const bf16* r0 = j < nk ? vrow(kb + j) + e : nullptr;
        const bf16* r1 = j + 1 < nk ? vrow(kb + j + 1) + e : nullptr;
        pack_v_pair(r0, r1, d_n - e, w, dst + j * w);
      }
    }
  }
}

// Gathers and packs the attended keys of (segment s, head h).
void pack_keys(const Problem& p, const bf16* k, const bf16* v, int64_t s, int64_t h, AmxScratch& sc) {
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const bf16* kbase = k + seg.k_off + h * L.k_head;
  const bf16* vbase = v + seg.v_off + h * L.v_head;
  pack_rows([&](int64_t j) { return kbase + seg.key_row(j) * L.k_row; },
            [&](int64_t j) { return vbase + seg.key_row(j) * L.v_row; }, seg.n_keys, p.head_dim, sc.dk, sc.dv, sc.kw,
            sc.kt_packed.data(), sc.v_packed.data());
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
  // Q is the tiles' A operand in place (row stride q_row) unless head_dim is not a whole tile step (a copy with
  // zero pad columns), rows overlap (a stride below head_dim), or the block ends in a partial group of 16 rows
  // (the tile reads 16; past the block's rows the copy holds rows of earlier blocks, whose scores and outputs are
  // never read: each output row depends on its own query row only).
  const bf16* q_rows = q + seg.q_off + h * L.q_head + q0 * L.q_row;
  const bf16* a = q_rows;
  int64_t lda = L.q_row;
  if (sc.dk != d_n || L.q_row < d_n || rows % 16 != 0) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(sc.qb.data() + i * sc.dk, q_rows + i * L.q_row, d_n * sizeof(bf16));
    a = sc.qb.data();
    lda = sc.dk;
  }
  std::fill(sc.row_max.begin(), sc.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.0f);
  const float q_scale = p.softmax_scale * kLog2e;
  const int64_t groups = (rows + 15) / 16;
  const auto* a_bytes = reinterpret_cast<const char*>(a);
  auto* scores = reinterpret_cast<char*>(sc.scores.data());
  auto* acc = reinterpret_cast<char*>(sc.acc.data());
  const Bf16Gemm gemm = sc.gemm;

  for (int64_t kb = 0; kb < seg.n_keys; kb += sc.kw) {
    const int64_t nk = std::min(sc.kw, seg.n_keys - kb), nkp = round_up(nk, kKeyPad);
    for (int64_t c = 0; c < nkp; c += kChunk) {  // scores of zero pad keys are 0 and never read
      const int64_t w = std::min(kChunk, nkp - c);
      const auto* kt = reinterpret_cast<const char*>(sc.kt_packed.data() + (kb + c) * sc.dk);
      gemm(a_bytes, lda * 2, groups, kt, w * 4, w / 16, sc.dk / 32, scores + c * 4, sc.kw * 4, /*accumulate=*/false);
    }
    kern.softmax_update_bf16(sc.scores.data(), sc.kw, rows, nk, nkp, q_scale, sc.row_max.data(),
                             sc.row_sum.data(), sc.acc.data(), sc.dv, sc.dv,
                             reinterpret_cast<uint16_t*>(sc.pb.data()), sc.kw);
    for (int64_t e = 0; e < sc.dv; e += kChunk) {
      const int64_t w = std::min(kChunk, sc.dv - e);
      gemm(reinterpret_cast<const char*>(sc.pb.data()), sc.kw * 2, groups,
           reinterpret_cast<const char*>(sc.v_packed.data() + kb * sc.dv + e * sc.kw), w * 4, w / 16, nkp / 32,
           acc + e * 4, sc.dv * 4, /*accumulate=*/kb > 0);
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    kern.scale_to_bf16(sc.acc.data() + i * sc.dv, 1.0f / sc.row_sum[i], d_n,
                       reinterpret_cast<uint16_t*>(out_rows + i * L.out_row));
    lse_rows[i] = lse_from_stats(sc.row_max[i], sc.row_sum[i]);
  }
}

// ---- fp32 attention as bf16x3 products (torch's "high" float32 matmul precision) -------------------------
//
// The same tasks, packing and online softmax as above, for fp32 q, k, v and out: each fp32 operand of the two
// products is split into hi = bf16(v) and lo = bf16(v - hi) (cpu::Kernels::split_bf16x3), and each product is
// a_hi b_lo + a_lo b_hi + a_hi b_hi summed in the tiles (amx::gemm_bf16_sum_tiles), as linear_bf16x3 computes
// a GEMM: within ~3 * 2^-18 of sum |a b| per product. Q is scaled by softmax_scale * log2 e in fp32 before its
// split; the softmax is the fp32 kernel's (fp32 exp2, fp32 P, split for P V); out = acc / row_sum in fp32.
struct X3Scratch : ScratchBase {
  std::vector<bf16> kt_hi, kt_lo;   // K^T's hi and lo, packed as AmxScratch::kt_packed
  std::vector<bf16> v_hi, v_lo;     // V's, as AmxScratch::v_packed
  std::vector<float> k32, v32;      // (keys, dk) / (keys, dv): the attended keys' rows, zero past head_dim
  std::vector<bf16> k_rows, v_rows; // (2, keys, dk) / (2, keys, dv): their hi, then their lo
  std::vector<float> qs;            // (kQueryBlock, dk): Q * softmax_scale * log2 e, zero past head_dim
  std::vector<bf16> q2;             // (2, kQueryBlock, dk): qs's hi, then its lo
  std::vector<bf16> p2;             // (2, kQueryBlock, kw): P's hi, then its lo

  // Value-initialized (zero): k32's, v32's and qs's columns past head_dim are never written after this.
  X3Scratch(int64_t head_dim, int64_t max_keys)
      : ScratchBase(head_dim, max_keys),
        kt_hi(round_up(key_rows, kChunk) * dk),
        kt_lo(kt_hi.size()),
        v_hi(key_rows * dv),
        v_lo(v_hi.size()),
        k32(keys * dk),
        v32(keys * dv),
        k_rows(2 * keys * dk),
        v_rows(2 * keys * dv),
        qs(kQueryBlock * dk),
        q2(2 * kQueryBlock * dk),
        p2(2 * kQueryBlock * kw) {}
};

// Packs K^T and V of (segment s, head h) as hi and lo: the keys' rows gathered, split in one call each.
void pack_keys(const Problem& p, const float* k, const float* v, int64_t s, int64_t h, X3Scratch& sc) {
  const auto& kern = cpu::kernels();
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, n = seg.n_keys;
  const float* kbase = k + seg.k_off + h * L.k_head;
  const float* vbase = v + seg.v_off + h * L.v_head;
  for (int64_t j = 0; j < n; ++j) {
    std::memcpy(sc.k32.data() + j * sc.dk, kbase + seg.key_row(j) * L.k_row, d_n * sizeof(float));
    std::memcpy(sc.v32.data() + j * sc.dv, vbase + seg.key_row(j) * L.v_row, d_n * sizeof(float));
  }
  kern.split_bf16x3(sc.k32.data(), n * sc.dk, sc.keys * sc.dk, reinterpret_cast<uint16_t*>(sc.k_rows.data()));
  kern.split_bf16x3(sc.v32.data(), n * sc.dv, sc.keys * sc.dv, reinterpret_cast<uint16_t*>(sc.v_rows.data()));
  for (int half = 0; half < 2; ++half) {  // hi, then lo
    const bf16* krows = sc.k_rows.data() + half * sc.keys * sc.dk;  // hi, then lo
    const bf16* vrows = sc.v_rows.data() + half * sc.keys * sc.dv;
    pack_rows([&](int64_t j) { return krows + j * sc.dk; }, [&](int64_t j) { return vrows + j * sc.dv; }, n, d_n,
              sc.dk, sc.dv, sc.kw, (half == 0 ? sc.kt_hi : sc.kt_lo).data(), (half == 0 ? sc.v_hi : sc.v_lo).data());
  }
  sc.seg = s;
  sc.head = h;
}

void attend_block(const Problem& p, const float* q, float* out, float* lse, int64_t s, int64_t h, int64_t q0,
                  X3Scratch& sc) {
  const auto& kern = cpu::kernels();
  const Segment& seg = p.segments[s];
  const Layout& L = p.layout;
  const int64_t d_n = p.head_dim, rows = std::min(kQueryBlock, seg.n_q - q0);
  float* out_rows = out + seg.out_off + h * L.out_head + q0 * L.out_row;
  float* lse_rows = lse + seg.lse_off + h * L.lse_head + q0;
  if (seg.n_keys == 0) return write_unattended(out_rows, L.out_row, lse_rows, rows, d_n);
  const float* q_rows = q + seg.q_off + h * L.q_head + q0 * L.q_row;
  for (int64_t i = 0; i < rows; ++i)
    kern.scale(q_rows + i * L.q_row, p.softmax_scale * kLog2e, d_n, sc.qs.data() + i * sc.dk);
  kern.split_bf16x3(sc.qs.data(), rows * sc.dk, kQueryBlock * sc.dk, reinterpret_cast<uint16_t*>(sc.q2.data()));
  std::fill(sc.row_max.begin(), sc.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.0f);
  std::fill(sc.acc.begin(), sc.acc.end(), 0.0f);
  const int64_t groups = (rows + 15) / 16;
  const auto* q_hi = reinterpret_cast<const char*>(sc.q2.data());
  const char* q_lo = q_hi + kQueryBlock * sc.dk * 2;
  auto* scores = reinterpret_cast<char*>(sc.scores.data());
  auto* acc = reinterpret_cast<char*>(sc.acc.data());
  const auto* p_hi = reinterpret_cast<const char*>(sc.p2.data());
  const char* p_lo = p_hi + kQueryBlock * sc.kw * 2;

  for (int64_t kb = 0; kb < seg.n_keys; kb += sc.kw) {
    const int64_t nk = std::min(sc.kw, seg.n_keys - kb), nkp = round_up(nk, kKeyPad);
    for (int64_t c = 0; c < nkp; c += kChunk) {  // scores of zero pad keys are 0 and never read
      const int64_t w = std::min(kChunk, nkp - c);
      const auto* kt_hi = reinterpret_cast<const char*>(sc.kt_hi.data() + (kb + c) * sc.dk);
      const auto* kt_lo = reinterpret_cast<const char*>(sc.kt_lo.data() + (kb + c) * sc.dk);
      const char* a[3] = {q_hi, q_lo, q_hi};
      const char* b[3] = {kt_lo, kt_hi, kt_hi};
      amx::gemm_bf16_sum_tiles(a, b, 3, sc.dk * 2, groups, w * 4, w / 16, sc.dk / 32, scores + c * 4, sc.kw * 4,
                               /*accumulate=*/false);
    }
    kern.softmax_update(sc.scores.data(), sc.kw, rows, nk, sc.row_max.data(), sc.row_sum.data(), sc.acc.data(),
                        sc.dv, sc.dv);
    // P's rows whole (stride kw): past nk a row holds the zero scores of pad keys up to nkp (all the products read)
    kern.split_bf16x3(sc.scores.data(), rows * sc.kw, kQueryBlock * sc.kw, reinterpret_cast<uint16_t*>(sc.p2.data()));
    for (int64_t e = 0; e < sc.dv; e += kChunk) {
      const int64_t w = std::min(kChunk, sc.dv - e);
      const auto* v_hi = reinterpret_cast<const char*>(sc.v_hi.data() + kb * sc.dv + e * sc.kw);
      const auto* v_lo = reinterpret_cast<const char*>(sc.v_lo.data() + kb * sc.dv + e * sc.kw);
      const char* a[3] = {p_hi, p_lo, p_hi};
      const char* b[3] = {v_lo, v_hi, v_hi};
      amx::gemm_bf16_sum_tiles(a, b, 3, sc.kw * 2, groups, w * 4, w / 16, nkp / 32, acc + e * 4, sc.dv * 4,
                               /*accumulate=*/true);
    }
  }

  for (int64_t i = 0; i < rows; ++i) {
    kern.scale(sc.acc.data() + i * sc.dv, 1.0f / sc.row_sum[i], d_n, out_rows + i * L.out_row);
    lse_rows[i] = lse_from_stats(sc.row_max[i], sc.row_sum[i]);
  }
}

}  // namespace

const char* bf16_products() {
  if (vec::isa() != vec::Isa::kAvx512) return "";
  return amx::enabled() ? "tiles" : dots_run() ? "dots" : "";
}

bool use_matrix_unit(at::ScalarType dtype) { return dtype == at::kBFloat16 && *bf16_products() != '\0'; }

bool use_bf16x3(at::ScalarType dtype) {
  return dtype == at::kFloat && at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST &&
         vec::isa() == vec::Isa::kAvx512 && amx::enabled();
}

namespace {

// Every (segment, head, query block) of p, split over threads by estimated cost, on Scratch's core (the bf16 one
// or the bf16x3 one: pack_keys and attend_block for it).
template <class Scratch, class T>
void run_tasks(const Problem& p, const T* q, const T* k, const T* v, T* out, float* lse) {
  const Plan plan = plan_tasks(p, kQueryBlock);
  if (plan.tasks.empty()) return;
  // Decided once per call, for every thread: the tile configuration is loaded only where tiles run (the bf16x3
  // core runs on them only).
  constexpr bool kBf16 = std::is_same_v<Scratch, AmxScratch>;
  const bool tiles = !kBf16 || amx::enabled();
  at::parallel_for(0, static_cast<int64_t>(plan.part_begin.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(p.head_dim, plan.max_keys);
    if constexpr (kBf16) sc.gemm = tiles ? Bf16Gemm{amx::gemm_bf16_tiles} : Bf16Gemm{gemm_bf16_dots};
    if (tiles) amx::configure();
    for (int64_t i = plan.part_begin[begin]; i < plan.part_begin[end]; ++i) {
      const Task& t = plan.tasks[i];
      attn::prefetch_next(p, plan, i, plan.part_begin[end], kQueryBlock, q, k, v);
      if ((t.seg != sc.seg || t.head != sc.head) && p.segments[t.seg].n_keys > 0) pack_keys(p, k, v, t.seg, t.head, sc);
      attend_block(p, q, out, lse, t.seg, t.head, t.q0, sc);
    }
    if (tiles) {
      amx::release();
      cpublas::brgemm_release();  // ATen's brgemm reloads its own tile configuration next time
    }
  });
}

}  // namespace

void attention_amx(const Problem& p, const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse) {
  run_tasks<AmxScratch>(p, q, k, v, out, lse);
}

void attention_amx_x3(const Problem& p, const float* q, const float* k, const float* v, float* out, float* lse) {
  run_tasks<X3Scratch>(p, q, k, v, out, lse);
}

}  // namespace attn
}  // namespace distilkernels
