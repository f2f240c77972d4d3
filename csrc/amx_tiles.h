// Our AMX tile loop for the GEMMs on weights packed into brgemm's VNNI blocks (brgemm_utils.h): bf16 x bf16 ->
// fp32 (linear_bf16) and s8 x s8 -> s32 (linear_int8), over 64 x 64 output tiles, each tile's epilogue applied
// while it is in L1.
//
// It computes what ATen's brgemm computes on the same blocks (accumulation over the whole in_features in steps
// of one tile, in the same order: bit-identical outputs, checked for bf16 and int8), and adds one thing brgemm
// has no hook for: while a thread computes its tiles of weight block nb, it prefetches block nb + 1 into L2,
// spread over the k loop (or, for long rows of x, the next k chunk: kChunkBytes). At 128 rows a forward that
// follows other work streams its weights from memory (85 MB for distilbert-base in bf16), and brgemm ran
// 1.4-1.9x slower on weights not in cache than on cached ones. Measured on that Xeon, bf16, 2 threads, weights not in cache, TFLOP/s brgemm -> this loop: q|k|v
// (128 x 768 -> 2304) 1.02 -> 1.23-1.37, attention output (768 -> 768) 0.95 -> 1.27, lin1 + GELU 0.98 ->
// 1.12-1.19, lin2 (3072 -> 768) 1.18 -> 1.18-1.31; with cached weights, or at 1024 rows, within noise of brgemm.
//
// Each tile's epilogue (bias, activation, rounding or dequantization) runs a few rows per k step of the next
// tile, between its tile instructions, so the core's vector units work while the tile unit computes: bf16
// lin1 + GELU at 1024 rows with weights in cache went from 1.33-1.44 to 1.54-1.61 TFLOP/s, q|k|v from
// 1.78-1.92 to 1.96-2.04, 128 rows from weights not in cache 1.12-1.19 -> 1.27 (lin1), 1.23-1.37 -> 1.41 (q|k|v).
// (Splitting k into chunks whose weight and input blocks stay in L1 measured no faster on top of this; chunks
// that keep L2 from overflowing do help where rows of x are long: kChunkBytes.)
//
// Tiles: 0-3 accumulators (16 rows x 16 fp32/int32); 4-5 two 16-row groups of x (64 bytes of k per row); 6-7 two
// weight tiles (16 VNNI rows of 16 columns; a VNNI row is 64 bytes: 2 bf16 or 4 int8 of k per column). A block
// row of the packed weight holds 64 columns: 256 bytes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "brgemm_utils.h"
#include "env.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define DK_HAVE_AMX_TILES 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DK_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,amx-int8")))
#else
#define DK_HAVE_AMX_TILES 0
#endif

namespace distilkernels {
namespace amx {

enum class Kind { kBf16, kInt8 };

// gemm's rows_done when there is none.
struct NoRowsDone {
  void operator()(int64_t, int64_t) const {}
};

#if DK_HAVE_AMX_TILES

// Whether this process may run AMX tiles of both kinds: the CPU has them (CPUID.7.0:EDX bits 22 bf16, 24 tile,
// 25 int8) and Linux granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM).
inline bool ready() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Whether the GEMMs take this loop now: ready(), and the switch DISTILKERNELS_AMX (env.h; read on every call, as the
// AMX attention reads it) is not off, which sends them to brgemm.
inline bool enabled() { return ready() && env::switch_on("DISTILKERNELS_AMX", true); }

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

DK_AMX_TARGET inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // (GCC's _tile_loadconfig names only 8 bytes of the config as read, so the other stores may be dropped.)
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

DK_AMX_TARGET inline void release() { _tile_release(); }

// The lines of a weight block a tile prefetches into L2, in kPrefetchStreams interleaved runs: `lines` lines from
// `base` split into `streams` equal runs of `run` lines, prefetched in the order run 0 line 0, run 1 line 0, ...,
// run 0 line 1, ... (the next is line `line` of run `stream`; `left` to go). From memory, several concurrent runs
// stream faster than one walk through the lines in order. Measured on the 2-core AMX Xeon, bf16, 2 threads, 128
// rows, weights from memory (a 1.5 GB set of copies), us per call, one run -> four: q|k|v 294-318 -> 213-221,
// attention output 91-96 -> 81-86, lin1 (in_features 768, out 3072) 379-415 -> 285-339; lin2 (in_features 3072)
// within noise (410-472 -> 425-445; its k chunks, below, are what helped it); at 1024 rows q|k|v 1367-1377 ->
// 1315-1320. With weights in cache no change. Eight runs measured the same as four, sixteen slower at lin1,
// thirty-two slower everywhere. (A standalone loop of these tiles on one core, in us per 98 KB block from
// memory: tiles alone 8.1-8.4, prefetches alone 8.7-8.8, both in order 13.4-14.4, in 8 runs 12.0-12.4. The
// tile loads from L2 and the prefetches share the core's L1 fill buffers; with the tile operands in L1 the two
// overlapped: 9.0-9.5.)
constexpr int64_t kPrefetchStreams = 4;

struct Prefetch {
  const char* base = nullptr;
  int64_t left = 0, run = 0, streams = 1, stream = 0, line = 0;

  Prefetch() = default;
  Prefetch(const char* first, int64_t lines) : base(first), left(lines), streams(kPrefetchStreams) {
    while (streams > 1 && lines % streams != 0) --streams;  // equal runs (a block's lines are a multiple of 64)
    run = lines / streams;
  }
  // Issues up to `count` more prefetches.
  void issue(int64_t count) {
    for (; count > 0 && left > 0; --count, --left) {
      _mm_prefetch(base + (stream * run + line) * 64, _MM_HINT_T1);
      if (++stream == streams) {
        stream = 0;
        ++line;
      }
    }
  }
};

// Accumulator tiles 0-3 of kM (1 or 2) row groups by kN (1 or 2) column tiles: (group g, column tile j) is tile
// 2 g + j, stored at c + 16 g ldc + 64 j (fp32 or int32, row stride ldc bytes).
template <int kM, int kN>
DK_AMX_TARGET inline void zero_acc() {
  static_assert((kM == 1 || kM == 2) && (kN == 1 || kN == 2), "one or two row groups and column tiles");
  _tile_zero(0);
  if (kN == 2) _tile_zero(1);
  if (kM == 2) _tile_zero(2);
  if (kM == 2 && kN == 2) _tile_zero(3);
}
template <int kM, int kN>
DK_AMX_TARGET inline void load_acc(const char* c, int64_t ldc) {
  _tile_loadd(0, c, ldc);
  if (kN == 2) _tile_loadd(1, c + 64, ldc);
  if (kM == 2) _tile_loadd(2, c + 16 * ldc, ldc);
  if (kM == 2 && kN == 2) _tile_loadd(3, c + 16 * ldc + 64, ldc);
}
template <int kM, int kN>
DK_AMX_TARGET inline void store_acc(char* c, int64_t ldc) {
  _tile_stored(0, c, ldc);
  if (kN == 2) _tile_stored(1, c + 64, ldc);
  if (kM == 2) _tile_stored(2, c + 16 * ldc, ldc);
  if (kM == 2 && kN == 2) _tile_stored(3, c + 16 * ldc + 64, ldc);
}

// c[16 * kM, 32] (+)= (kM 16-row groups a0, a1 of x, row stride lda bytes) @ (32 columns of a weight block from
// `b`, its VNNI row for the first of these k at those columns), over k_bytes of each row of x (a multiple of 64).
// c: 4-byte accumulators, row stride 64 bytes, read first where `accumulate`. Spreads pf's prefetches into L2
// over the k loop, `per` per step, and calls drain() after every drain_every-th step, counting from `step` (the
// unit's steps before this call); returns the count after this call's.
template <Kind kKind, int kM, class Drain>
DK_AMX_TARGET inline int64_t half_block(const char* a0, const char* a1, int64_t lda, const char* b, int64_t k_bytes,
                                        void* c, bool accumulate, Prefetch& pf, int64_t per, int64_t step,
                                        int64_t drain_every, const Drain& drain) {
  constexpr int64_t kRow = 4 * brgemm::kBlockN;  // bytes per VNNI row of a block
  if (accumulate)
    load_acc<kM, 2>(static_cast<const char*>(c), kRow);
  else
    zero_acc<kM, 2>();
  for (int64_t k = 0; k < k_bytes; k += 64) {
    const char* bk = b + (k / 64) * 16 * kRow;
    _tile_loadd(6, bk, kRow);
    _tile_loadd(7, bk + 64, kRow);
    _tile_loadd(4, a0 + k, lda);
    if (kKind == Kind::kBf16) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    } else {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
    }
    if (kM == 2) {
      _tile_loadd(5, a1 + k, lda);
      if (kKind == Kind::kBf16) {
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      } else {
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
    pf.issue(per);
    if (++step % drain_every == 0) drain();  // vector work on the previous tile while the tile unit computes
  }
  store_acc<kM, 2>(static_cast<char*>(c), kRow);
  return step;
}

// The k steps of mm_bf16 (below) on accumulators already in tiles 0-3.
template <int kM, int kN>
DK_AMX_TARGET inline void mm_bf16_steps(const char* a0, const char* a1, int64_t lda, const char* b0, const char* b1,
                                        int64_t ldb, int64_t k_steps) {
  for (int64_t s = 0; s < k_steps; ++s) {
    const int64_t ka = 64 * s, kb = 16 * s * ldb;
    _tile_loadd(4, a0 + ka, lda);
    _tile_loadd(6, b0 + kb, ldb);
    _tile_dpbf16ps(0, 4, 6);
    if (kN == 2) {
      _tile_loadd(7, b1 + kb, ldb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kM == 2) {
      _tile_loadd(5, a1 + ka, lda);
      _tile_dpbf16ps(2, 5, 6);
      if (kN == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Small bf16 products on whole tiles, for attention's Q K^T and P V (attention_amx.cpp), under configure()'s
// configuration: c (+)= a @ b over kM (1 or 2) groups of 16 rows by kN (1 or 2) tiles of 16 columns.
//   a: group g's rows at a0 / a1, row stride lda bytes; k step s (32 bf16 of each row) at + 64 s.
//   b: VNNI rows (a pair of k per 32-bit word) of ldb bytes; column tile j at b0 / b1, k step s at + 16 s ldb.
//   c: fp32, row stride ldc bytes, as zero_acc / load_acc / store_acc lay it out; read first where `accumulate`.
template <int kM, int kN>
DK_AMX_TARGET inline void mm_bf16(const char* a0, const char* a1, int64_t lda, const char* b0, const char* b1,
                                  int64_t ldb, int64_t k_steps, char* c, int64_t ldc, bool accumulate) {
  if (accumulate)
    load_acc<kM, kN>(c, ldc);
  else
    zero_acc<kM, kN>();
  mm_bf16_steps<kM, kN>(a0, a1, lda, b0, b1, ldb, k_steps);
  store_acc<kM, kN>(c, ldc);
}

// c (+)= sum over the n pairs (a[i], b[i]) of a[i] @ b[i] (operands as in mm_bf16, all a[i] with row stride lda
// and all b[i] with ldb), into the same accumulator tiles: bf16x3's three products, summed in the tiles before
// one store.
template <int kM, int kN>
DK_AMX_TARGET inline void mm_bf16_sum(const char* const* a, const char* const* b, int n, int64_t lda, int64_t ldb,
                                      int64_t a_off, int64_t b_off, int64_t b1_off, int64_t k_steps, char* c,
                                      int64_t ldc, bool accumulate) {
  if (accumulate)
    load_acc<kM, kN>(c, ldc);
  else
    zero_acc<kM, kN>();
  for (int i = 0; i < n; ++i)
    mm_bf16_steps<kM, kN>(a[i] + a_off, a[i] + a_off + 16 * lda, lda, b[i] + b_off, b[i] + b_off + b1_off, ldb,
                          k_steps);
  store_acc<kM, kN>(c, ldc);
}

// c (+)= a @ b over groups x 16 rows and tiles x 16 columns (operands as in mm_bf16), two by two.
DK_AMX_TARGET inline void gemm_bf16_tiles(const char* a, int64_t lda, int64_t groups, const char* b, int64_t ldb,
                                          int64_t tiles, int64_t k_steps, char* c, int64_t ldc, bool accumulate) {
  for (int64_t g = 0; g < groups; g += 2) {
    const char* a0 = a + 16 * g * lda;
    char* cg = c + 16 * g * ldc;
    for (int64_t j = 0; j < tiles; j += 2) {
      const char* bj = b + 64 * j;
      char* cj = cg + 64 * j;
      if (g + 1 < groups && j + 1 < tiles)
        mm_bf16<2, 2>(a0, a0 + 16 * lda, lda, bj, bj + 64, ldb, k_steps, cj, ldc, accumulate);
      else if (g + 1 < groups)
        mm_bf16<2, 1>(a0, a0 + 16 * lda, lda, bj, bj, ldb, k_steps, cj, ldc, accumulate);
      else if (j + 1 < tiles)
        mm_bf16<1, 2>(a0, a0, lda, bj, bj + 64, ldb, k_steps, cj, ldc, accumulate);
      else
        mm_bf16<1, 1>(a0, a0, lda, bj, bj, ldb, k_steps, cj, ldc, accumulate);
    }
  }
}

// gemm_bf16_tiles over the sum of n products a[i] @ b[i] (bf16x3: three), each tile's products summed in the
// tile unit before one store.
DK_AMX_TARGET inline void gemm_bf16_sum_tiles(const char* const* a, const char* const* b, int n, int64_t lda,
                                              int64_t groups, int64_t ldb, int64_t tiles, int64_t k_steps, char* c,
                                              int64_t ldc, bool accumulate) {
  for (int64_t g = 0; g < groups; g += 2) {
    for (int64_t j = 0; j < tiles; j += 2) {
      const int64_t a_off = 16 * g * lda, b_off = 64 * j;
      char* cj = c + 16 * g * ldc + 64 * j;
      if (g + 1 < groups && j + 1 < tiles)
        mm_bf16_sum<2, 2>(a, b, n, lda, ldb, a_off, b_off, 64, k_steps, cj, ldc, accumulate);
      else if (g + 1 < groups)
        mm_bf16_sum<2, 1>(a, b, n, lda, ldb, a_off, b_off, 0, k_steps, cj, ldc, accumulate);
      else if (j + 1 < tiles)
        mm_bf16_sum<1, 2>(a, b, n, lda, ldb, a_off, b_off, 64, k_steps, cj, ldc, accumulate);
      else
        mm_bf16_sum<1, 1>(a, b, n, lda, ldb, a_off, b_off, 0, k_steps, cj, ldc, accumulate);
    }
  }
}

// k steps between two slices of the previous tile's epilogue (drain, in gemm), whose rows are spread evenly over
// the slices. A light epilogue (bias, rounding or dequantization: ~5 vector instructions per 16 values) runs in a
// slice every 4 steps (2-3 rows at in_features 768); GELU (~25 per 16 values, a row about as long as the tile
// unit's step) every step (a row in two steps of three). Measured on the 2-core AMX Xeon, bf16, weights in
// cache, TFLOP/s with light epilogues, every step -> every 4 steps: 128 rows q|k|v 2.46 -> 2.70, attention
// output 2.45 -> 2.72, lin2 2.46 -> 2.54; 1024 rows q|k|v 2.77 -> 2.82-3.10, attention output 2.79 -> 3.12, lin2
// unchanged; lin1 + GELU 2.25-2.40 every step, 2.19-2.40 every 4, 2.07-2.26 every 16 (every 8 for light ones,
// and every 2 for GELU, measured no better). The slices' calls, each a loop over rows through a function pointer,
// are what a light epilogue spends. Rows spread evenly rather than the same number per slice until none are left
// (which left the last third of a GELU tile's steps without vector work): lin1 + GELU 2.22-2.25 -> 2.31-2.32 at
// 128 rows, 2.34-2.37 -> 2.47-2.49 at 1024, lin2 at 1024 2.5-2.55 -> 2.6-2.65.
constexpr int64_t kDrainEvery = 4;
constexpr int64_t kDrainEveryHeavy = 1;

// The most bytes of each row of x one pass over a weight block covers. A longer row (bf16 lin2: in_features 3072,
// 6 KiB) is computed in k chunks, each for all of a superblock's rows before the next, and a tile prefetches the
// next chunk rather than the next block: the superblock's x (786 KB at 128 rows), the block being computed and
// the one prefetched (393 KB each at in_features 3072 bf16) no longer crowd the 2 MiB L2 together. Measured on
// the 2-core AMX Xeon, bf16 lin2 (128 or 1024 rows x 3072 -> 768), 2 threads, us per call, whole rows -> chunks
// of 3072 bytes: 128 rows weights in cache 237-239 -> 217-222, from memory 420-437 -> 293-298; 1024 rows in cache
// 1888-1936 -> 1739-1745, from memory 2026-2043 -> 1868-1874 (chunks of 1536 bytes measured the same within 5%).
// int8 lin2 (3072 bytes a row) in 1536-byte chunks measured no better (1024 rows in cache 1175 -> 1216-1221), so
// rows up to 3072 bytes stay whole: every GEMM but bf16 lin2 runs as before.
constexpr int64_t kChunkBytes = 3072;

// Where this loop's time goes (the 2-core AMX Xeon, bf16, 1 thread, 1024 rows x in_features 768, weights in
// cache; standalone tile loops in C on one core, and this loop with parts switched off):
// - The tile unit itself: back-to-back TDPBF16PS on tiles already loaded, or with their four loads per step from
//   L1, ran 3.1-3.2 TFLOP/s a core (16 cycles an instruction at ~3.1 GHz). Tile loads from L2 in this loop's
//   order with no stores: 2.0-2.3.
// - Storing the four accumulators after each pass over k costs the loop about a third of that rate (1.3-1.4 with
//   the stores, 2.0 without) when both operands stream from L2, next to nothing when they sit in L1 (the same
//   stores every 24 steps). Reordered so that a k chunk of the block stays in L1 (chunks of 8 steps, both 32-column
//   halves of a 32-row group back to back) the tile work alone ran 1.5-1.6.
// - The epilogues then take that back: with them, the reordered loop measured 1.26-1.33 against 1.27-1.30 for
//   this one, and at 2 threads the two were within the run-to-run spread (5-10%). Writing the output is most of
//   the epilogues' cost: with the rows sent to a scratch tile instead, q|k|v went from 1.30 to 1.58 and lin1 from
//   1.14 to 1.31 (lin2, with a quarter of the output per FLOP, unchanged). Prefetching the output lines for
//   writing a unit ahead, CLDEMOTE after writing them, and 2 MiB pages (THP) each measured no gain.
// - The epilogues' vector work adds to the loop's time rather than hiding under the tile unit's (bf16 lin1, 1024 x
//   768 -> 3072, 2 threads, weights of six layers in turn): GELU costs 310-400 us a call over no activation, about
//   what the same GELU takes on its own (bias_act_ in place on 1024 x 3072: 445 us over ReLU), the same with its
//   rows drained every 1, 2, 3 or 6 steps; the AVX2 build of the GELU, twice the instructions, costs twice that.
//   Also no gain: non-temporal stores of the output (the bf16 forward at 8 x 128 0.93-0.97x: the next GEMM then
//   reads it from memory) and each step's tile instructions in mm_bf16_steps' interleaved order (within 3%).
// So this loop runs at ~40% of what the tile unit can do, and what is left is the memory traffic around it, not
// the tile instructions.

// Most m blocks in a row superblock (gemm).
constexpr int64_t kMaxSuper = 8;

// For every 64 x 64 output tile of x (tokens, k_bytes per row, row stride k_bytes) @ a packed weight of n_blocks
// blocks, split over threads in contiguous runs of tiles (m fastest within a superblock of rows, below):
// computes the tile, or a unit of a superblock's tiles of one block (see kChunkBytes), into a (rows, 64) buffer
// of 4-byte accumulators (fp32 for kBf16, int32 for kInt8) and calls epilogue(nb, m0, rows, const void* acc) on
// consecutive slices of its rows (acc: row stride 256 bytes). k_bytes must be a multiple of 64 (bf16:
// in_features % 32 == 0; int8: % 64 == 0) and enabled() true.
// heavy_epilogue: the epilogue applies GELU (see kDrainEvery).
// rows_done(m0, rows), where given: called by the thread that computed every tile of a row superblock, once the
// epilogues of all of them have run (a whole row of the output is then final, in its cache): with at least one
// superblock per thread (1024 rows and 2 threads), every row; rows whose tiles two threads share are not reported.
// repeat_bytes, where given (a multiple of 64, at most k_bytes): after the whole of k, the first repeat_bytes of
// each row of x multiply the weight's last repeat_bytes again, the tile accumulating over k_bytes + repeat_bytes
// (bf16x3: x's (hi | lo) against the weight's (lo | hi), then hi against hi, neither stored twice).
template <Kind kKind, class Epilogue, class RowsDone = NoRowsDone>
void gemm(const void* x, int64_t tokens, int64_t k_bytes, const void* packed, int64_t n_blocks,
          const Epilogue& epilogue, bool heavy_epilogue, const RowsDone& rows_done = RowsDone(),
          int64_t repeat_bytes = 0) {
  const int64_t drain_every = heavy_epilogue ? kDrainEveryHeavy : kDrainEvery;
  using brgemm::kBlockM;
  using brgemm::kBlockN;
  const char* a = static_cast<const char*>(x);
  const char* wp = static_cast<const char*>(packed);
  const int64_t m_blocks = (tokens + kBlockM - 1) / kBlockM;
  const int64_t k_total = k_bytes + repeat_bytes;  // the product's k: a row of x, then its first repeat_bytes again
  const int64_t block = k_bytes * kBlockN;  // bytes per weight block
  // Rows in superblocks of up to 8 m blocks (512 rows), as many as keep their x within half of the 2 MiB L2 of
  // every AMX CPU so far: the block stays in L2 while the thread's weight blocks pass it, instead of all of x
  // (1.5-6 MB at 1024 rows) being re-read from beyond L2 for every weight block. At 1024 rows with weights in
  // cache: bf16 q|k|v 2.17 -> 2.36 TFLOP/s, lin1 + GELU 1.79 -> 1.95; int8 q|k|v 3.43 -> 3.91, lin2 2.94 -> 3.43.
  // bf16 lin2 (6 KiB of x per row) takes 2 m blocks: in distilbert-base at 8 x 128 tokens (x just written by
  // lin1, 2 threads) its calls took 2.35 ms without superblocks, 2.15 with 4 m blocks, 2.02 with 2.
  // Each superblock reads every weight block of the thread's range once: at in_features 768, 8 m blocks (512
  // rows, 768 KB of bf16 x) rather than 4 halve the weight reads at 1024 rows. Measured in the model
  // (distilbert-base, 8 x 128 tokens, 2 threads, checkout against checkout, 15 rounds): bf16 1.055 and 1.058,
  // int8 1.043 faster than with 4; 16 m blocks (10 by this fit) 1.017. At 128 rows nothing changes (2 m blocks).
  const int64_t fit = std::clamp<int64_t>((1 << 20) / (kBlockM * k_bytes), 1, kMaxSuper);
  const int64_t super = std::min(m_blocks, fit);
  // k in chunks of at most kChunkBytes of each row of x; with more than one, a unit is the thread's tiles of one
  // weight block in a superblock, each chunk computed for all of them before the next (see kChunkBytes).
  const int64_t chunks = (k_total + kChunkBytes - 1) / kChunkBytes;
  const int64_t chunk = (k_total / 64 + chunks - 1) / chunks * 64;
  const int64_t unit_m = chunks > 1 ? super : 1;
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t begin, int64_t end) {
    configure();
    // Two accumulator buffers: while the tile unit computes one unit, the epilogue of the other runs a few rows
    // per k step (vector instructions, which the core executes alongside the tile instructions).
    alignas(64) char acc[2 * kMaxSuper * kBlockM * kBlockN * 4];  // two units' accumulators, side by side
    // The previous unit's rows [first, rows) still to run when this unit starts (`left` of them), spread evenly
    // over this unit's `drains` slices: after its c-th slice (from 1), c * left / drains of them (rounded up).
    struct Pending {
      int64_t nb = 0, m0 = 0, next = 0, rows = 0, first = 0, left = 0, drains = 1, calls = 0;
      const char* acc = nullptr;
    } pending;
    auto run_to = [&](int64_t r1) {
      if (r1 <= pending.next) return;
      epilogue(pending.nb, pending.m0 + pending.next, r1 - pending.next, pending.acc + pending.next * kBlockN * 4);
      pending.next = r1;
    };
    auto drain = [&] {
      const int64_t c = ++pending.calls;
      run_to(std::min(pending.rows, pending.first + (c * pending.left + pending.drains - 1) / pending.drains));
    };
    auto finish = [&] { run_to(pending.rows); };
    std::vector<char> pad;  // a last partial 16-row group, zero-padded to 16 rows
    int64_t units = 0;
    int64_t done_m0 = 0, done_rows = 0;  // a superblock this thread owns, final once the pending epilogue has run
    auto report = [&] {
      if (done_rows > 0) rows_done(done_m0, done_rows);
      done_rows = 0;
    };
    for (int64_t t = begin; t < end; ++units) {
      // t -> (row superblock sb of `super` m blocks, nb, m block within sb), m fastest. A unit: this thread's
      // next tiles of block nb in this superblock, up to unit_m of them.
      const int64_t sb = t / (super * n_blocks), in_sb = t % (super * n_blocks);
      const int64_t sb_m = std::min(super, m_blocks - sb * super);  // m blocks in this superblock
      const int64_t sb_start = sb * super * n_blocks;
      const int64_t nb = in_sb / sb_m, mb = sb * super + in_sb % sb_m, m0 = mb * kBlockM;
      const int64_t unit_end = std::min({end, sb_start + (nb + 1) * sb_m, t + unit_m});
      const int64_t rows = std::min((unit_end - t) * kBlockM, tokens - m0);
      const int64_t groups = (rows + 15) / 16;
      const char* group[4 * kMaxSuper];
      for (int64_t g = 0; g < groups; ++g) group[g] = a + (m0 + 16 * g) * k_bytes;
      if (rows % 16 != 0) {
        const int64_t full = rows / 16;
        pad.assign(16 * k_bytes, 0);
        std::memcpy(pad.data(), group[full], (rows - 16 * full) * k_bytes);
        group[full] = pad.data();
      }
      const int64_t steps = 2 * ((groups + 1) / 2) * (k_total / 64);  // the unit's half_block steps
      pending.first = pending.next;
      pending.left = pending.rows - pending.next;
      pending.drains = std::max<int64_t>(1, steps / drain_every);
      pending.calls = 0;
      char* cur = acc + (units % 2) * unit_m * kBlockM * kBlockN * 4;
      const char* w = wp + nb * block;
      int64_t step = 0;
      for (int64_t k0 = 0, kb = 0; k0 < k_total; k0 += kb) {
        // a chunk, cut at the end of x's row, after which the repeated k begins
        kb = std::min(chunk, (k0 < k_bytes ? k_bytes : k_total) - k0);
        const int64_t xk0 = k0 < k_bytes ? k0 : k0 - k_bytes;  // x's k for the product's k0, and the weight's:
        const int64_t wk0 = k0 < k_bytes ? k0 : k0 - repeat_bytes;
        // Prefetched while this chunk computes: the next chunk of this block or, after the last, this thread's
        // share of the next block's first chunk when this thread computes that block next. (The repeated part of
        // the weight was read by this block's earlier chunks: not prefetched again.)
        Prefetch pf;
        if (k0 + kb < k_bytes) {
          pf = Prefetch(w + (k0 + kb) * kBlockN, std::min(chunk, k_bytes - k0 - kb) * kBlockN / 64);
        } else if (k0 + kb == k_total && nb + 1 < n_blocks && t + sb_m < end) {  // (t + sb_m: this tile's row
                                                                                  // block, next weight block)
          const int64_t lines = std::min(chunk, k_bytes) * kBlockN / 64, share = (lines + sb_m - 1) / sb_m;
          const int64_t own = unit_end - t, first = std::min(lines, (mb - sb * super) * share);
          pf = Prefetch(wp + (nb + 1) * block + first * 64, std::min(own * share, lines - first));
        }
        const int64_t chunk_steps = 2 * ((groups + 1) / 2) * (kb / 64);
        const int64_t per = (pf.left + chunk_steps - 1) / chunk_steps;
        for (int64_t h = 0; h < 2; ++h) {  // 32-column halves of the block
          for (int64_t g = 0; g < groups; g += 2) {
            char* cg = cur + (16 * g * kBlockN + 32 * h) * 4;
            const char* b = w + wk0 * kBlockN + 128 * h;
            if (g + 1 < groups)
              step = half_block<kKind, 2>(group[g] + xk0, group[g + 1] + xk0, k_bytes, b, kb, cg, k0 > 0, pf, per,
                                          step, drain_every, drain);
            else
              step = half_block<kKind, 1>(group[g] + xk0, group[g] + xk0, k_bytes, b, kb, cg, k0 > 0, pf, per,
                                          step, drain_every, drain);
          }
        }
      }
      finish();  // whatever of the previous unit is left
      report();
      pending = {nb, m0, 0, rows, 0, 0, 1, 0, cur};
      if (unit_end == sb_start + sb_m * n_blocks && sb_start >= begin) {  // the last unit of a superblock all ours
        done_m0 = sb * super * kBlockM;
        done_rows = std::min(sb_m * kBlockM, tokens - done_m0);
      }
      t = unit_end;
    }
    finish();
    report();
    release();
    at::native::cpublas::brgemm_release();  // ATen's brgemm reloads its own tile configuration next time
  });
}

#else

inline bool ready() { return false; }
inline bool enabled() { return false; }
inline void configure() {}
inline void release() {}
inline void gemm_bf16_tiles(const char*, int64_t, int64_t, const char*, int64_t, int64_t, int64_t, char*, int64_t,
                            bool) {}
inline void gemm_bf16_sum_tiles(const char* const*, const char* const*, int, int64_t, int64_t, int64_t, int64_t,
                                int64_t, char*, int64_t, bool) {}
template <Kind kKind, class Epilogue, class RowsDone = NoRowsDone>
void gemm(const void*, int64_t, int64_t, const void*, int64_t, const Epilogue&, bool, const RowsDone& = RowsDone(),
          int64_t = 0) {}

#endif

}  // namespace amx
}  // namespace distilkernels
