// The attention problem shared by the two CPU kernel cores: the blocked fp32-arithmetic core
// (attention.cpp, every dtype on every CPU) and the bf16 matrix-unit core (attention_amx.cpp).
//
// The work is cut into segments (a batch row, or one packed sequence), each with its own queries and the
// list of keys its queries attend to. Tasks are (segment, head, query block); each thread gets a contiguous
// run of tasks of equal estimated cost, so consecutive tasks share a head and its keys are packed once.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace distilkernels {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;

// Element strides, the same for every segment. lse rows (queries) have unit stride.
struct Layout {
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, out_row, out_head, lse_head;
};

struct Segment {
  int64_t q_off, k_off, v_off, out_off, lse_off;  // element offsets of the segment's first row
  int64_t n_q;
  const int64_t* keys;  // rows of the attended keys within the segment; null: rows key_start + [0, n_keys)
  int64_t key_start;
  int64_t n_keys;
  int64_t key_row(int64_t j) const { return keys ? keys[j] : key_start + j; }
};

struct Problem {
  Layout layout;
  std::vector<Segment> segments;
  int64_t n_heads, head_dim;
  float softmax_scale;
};

struct Task {
  int64_t seg, head, q0;
};

// Every (segment, head, query block of `query_block` rows), and the split of that list into one contiguous
// run per thread: thread t runs tasks [part_begin[t], part_begin[t + 1]).
struct Plan {
  std::vector<Task> tasks;
  std::vector<int64_t> part_begin;
  int64_t max_keys = 0;
};

inline Plan plan_tasks(const Problem& p, int64_t query_block) {
  Plan plan;
  std::vector<double> cost_end;  // running total of the cost of tasks [0, i]
  double total = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(p.segments.size()); ++s) {
    const Segment& seg = p.segments[s];
    plan.max_keys = std::max(plan.max_keys, seg.n_keys);
    for (int64_t h = 0; h < p.n_heads; ++h)
      for (int64_t q0 = 0; q0 < seg.n_q; q0 += query_block) {
        plan.tasks.push_back({s, h, q0});
        total += static_cast<double>(std::min(query_block, seg.n_q - q0)) * (seg.n_keys + 8);
        cost_end.push_back(total);
      }
  }
  const int64_t n_tasks = static_cast<int64_t>(plan.tasks.size());
  if (n_tasks == 0) return plan;
  const int64_t n_parts = std::min<int64_t>(at::get_num_threads(), n_tasks);
  plan.part_begin.assign(n_parts + 1, n_tasks);
  plan.part_begin[0] = 0;
  for (int64_t t = 1; t < n_parts; ++t) {
    // Part t starts where the running cost of the parts before it is closest to t / n_parts of the total: after
    // task i, the first to reach that share, or at it when stopping short is closer.
    const double target = total * t / n_parts;
    const int64_t i = std::lower_bound(cost_end.begin(), cost_end.end(), target) - cost_end.begin();
    const double before = i > 0 ? cost_end[i - 1] : 0.0;
    const int64_t split = i < n_tasks && cost_end[i] - target <= target - before ? i + 1 : i;
    plan.part_begin[t] = std::max(plan.part_begin[t - 1], std::min(split, n_tasks));
  }
  return plan;
}

// Software prefetch into L2 of what a thread's next tasks read: at task i of its run [.., end), the query
// rows of task i + 1, and, when task i starts a new (segment, head), the key and value rows of the next
// (segment, head) in the run. A head's rows sit one token apart in the fused q|k|v output (3 * dim elements:
// 9 KiB in fp32 for distilbert-base), a stride that leaves each row on its own page, where the hardware
// prefetchers do not follow; without this each row is a cache miss when the GEMM that wrote q|k|v has moved
// on. In distilbert-base bf16 at 8 x 128 tokens (2 threads) the attention calls went from 1.49-1.53 to
// 1.32-1.42 ms.
template <typename T>
inline void prefetch_rows(const T* base, int64_t row_stride, int64_t rows, int64_t row_elems,
                          const Segment* keys_of = nullptr) {
  const int64_t bytes = row_elems * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < rows; ++j) {
    const char* row = reinterpret_cast<const char*>(base + (keys_of ? keys_of->key_row(j) : j) * row_stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    __builtin_prefetch(row + bytes - 1, 0, 2);  // a row that does not start on a line ends one line further
  }
}

template <typename T>
void prefetch_next(const Problem& p, const Plan& plan, int64_t i, int64_t end, int64_t query_block, const T* q,
                   const T* k, const T* v) {
  const Layout& L = p.layout;
  const Task& t = plan.tasks[i];
  if (i + 1 < end) {
    const Task& n = plan.tasks[i + 1];
    const Segment& seg = p.segments[n.seg];
    prefetch_rows(q + seg.q_off + n.head * L.q_head + n.q0 * L.q_row, L.q_row,
                  std::min(query_block, seg.n_q - n.q0), p.head_dim);
  }
  if (i > 0 && plan.tasks[i - 1].seg == t.seg && plan.tasks[i - 1].head == t.head) return;  // not a new head
  for (int64_t j = i + 1; j < end; ++j) {
    const Task& n = plan.tasks[j];
    if (n.seg == t.seg && n.head == t.head) continue;
    const Segment& seg = p.segments[n.seg];
    prefetch_rows(k + seg.k_off + n.head * L.k_head, L.k_row, seg.n_keys, p.head_dim, &seg);
    prefetch_rows(v + seg.v_off + n.head * L.v_head, L.v_row, seg.n_keys, p.head_dim, &seg);
    return;
  }
}

// A query row's logsumexp (natural log) from the online softmax's statistics, which every core keeps in log2
// units (scores scaled by softmax_scale * log2 e): row_max the largest scaled score, row_sum the sum of
// exp2(score - row_max). The one definition the cores share, so that a backward pass can rely on it.
inline float lse_from_stats(float row_max, float row_sum) { return (row_max + std::log2(row_sum)) * kLn2; }

// The rows of a query block whose segment has no key to attend: zeros out, lse -inf (both cores).
template <typename T>
void write_unattended(T* out_rows, int64_t out_row, float* lse_rows, int64_t rows, int64_t head_dim) {
  for (int64_t i = 0; i < rows; ++i) {
    std::fill(out_rows + i * out_row, out_rows + i * out_row + head_dim, static_cast<T>(0.0f));
    lse_rows[i] = -std::numeric_limits<float>::infinity();
  }
}

// Whether attention in `dtype` runs on the matrix unit: bf16 on a CPU with AMX bf16 tiles this process may use
// (amx::enabled: DISTILKERNELS_AMX not "0", read on every call, so a test can compare the paths in one
// process) or, without them, with AVX512-BF16 dot products (DISTILKERNELS_BF16_DOTS not "0", read likewise):
// the same core, its two products on vdpbf16ps; and AVX-512 kernels not capped by DISTILKERNELS_ISA (the
// packing and softmax steps use them).
bool use_matrix_unit(at::ScalarType dtype);

// The bf16 core on the matrix unit; same contract as the blocked core (out, lse as documented in ops.cpp).
void attention_amx(const Problem& p, const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v,
                   at::BFloat16* out, float* lse);

// Where a bf16 call of 8 keys or more runs its two products now: "tiles" (AMX), "dots" (AVX512-BF16 dot
// products) or "" (the blocked core, in fp32).
const char* bf16_products();

// fp32 attention with its two products as bf16x3 on the AMX tiles (attention_amx.cpp): where torch's float32
// matmul precision is not "highest" and the bf16 tiles run (use_matrix_unit's conditions).
bool use_bf16x3(at::ScalarType dtype);
void attention_amx_x3(const Problem& p, const float* q, const float* k, const float* v, float* out, float* lse);

}  // namespace attn
}  // namespace distilkernels
