// Operator schemas of distilkernels: every op is declared here, once. Backend files only bind
// implementations (TORCH_LIBRARY_IMPL(distilkernels, CPU, m) in the CPU sources); Python registers a fake
// kernel per op (distilkernels/_fake.py) so torch.compile and opcheck can trace them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "attention.h"
#include "cpu_cache.h"
#include "cpu_kernels.h"
#include "brgemm_utils.h"
#include "env.h"
#include "vec.h"

TORCH_LIBRARY(distilkernels, m) {
  // Residual add + LayerNorm in one pass over each row; statistics in fp32.
  //   x, residual: (..., dim); weight, bias: (dim,)
  //   out: like x; mean, rstd: x.shape[:-1], fp32 (kept for a backward pass)
  m.def("add_layer_norm(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  // A BERT-family embedding layer in one pass per token: out = LayerNorm(word[input_ids] (+ token_type[
  // token_type_ids]) + position[position_ids]), statistics in fp32.
  //   word (vocab, dim), position (positions, dim), token_type (types, dim) or None: one float dtype;
  //   input_ids, position_ids, token_type_ids: (batch, seqlen) int64; weight, bias: (dim,)
  //   out: (batch, seqlen, dim) in the tables' dtype; mean, rstd: (batch, seqlen) fp32 (kept for a backward pass)
  m.def("embed_layer_norm(Tensor word, Tensor input_ids, Tensor position, Tensor position_ids, Tensor? token_type,"
        " Tensor? token_type_ids, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  // out = x @ weight^T + bias, the GEMM split across threads by output columns.
  //   x: (tokens, in_features); weight: (out_features, in_features); bias: (out_features,) or None
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The same GEMM on weights packed once (fp32): pack_linear_weight(weight (out_features, in_features)) ->
  // (n_panels, in_features, panel), panel = 2 vectors of this CPU's kernels, zero past out_features.
  // linear_packed: out = activation(x @ weight^T + bias), activation in {"none", "gelu" (exact erf), "relu"}.
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, str activation) -> Tensor");
  // The same on MKL's packed-weight GEMM (csrc/linear_mkl.cpp; torch builds that link MKL): pack_linear_mkl(weight
  // (out_features, in_features) fp32, rows: the row count MKL lays it out for; any row count can use it) -> MKL's
  // opaque packing as a 1-D fp32 tensor, used where it was made.
  // row_chunk 0: MKL threads the whole GEMM; > 0: each thread its own rows, in chunks of row_chunk rows, where
  // every thread has at least that many.
  m.def("pack_linear_mkl(Tensor weight, int rows=128) -> Tensor");
  m.def("linear_mkl(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, str activation, int row_chunk=0) "
        "-> Tensor");
  // In place: x = activation(x + bias), activation in {"gelu" (exact erf), "relu"}.
  //   x: (..., hidden_dim) contiguous; bias: (hidden_dim,)
  m.def("bias_act_(Tensor(a!) x, Tensor bias, str activation) -> ()");
  // Bidirectional softmax attention.
  //   q, k, v: (batch, seqlen, n_heads, head_dim), any strides with a unit last stride
  //   key_padding_mask: (batch, seqlen) bool, True = attend
  //   out: (batch, seqlen, n_heads, head_dim) contiguous; lse: (batch, n_heads, seqlen) fp32, -inf for rows
  //   with no key to attend (their out is 0)
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float softmax_scale)"
        " -> (Tensor out, Tensor lse)");
  // Attention over packed sequences.
  //   q, k, v: (total_tokens, n_heads, head_dim); cu_seqlens: (batch + 1,) int32, leading 0
  //   out: (total_tokens, n_heads, head_dim) contiguous; lse: (n_heads, total_tokens) fp32
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float softmax_scale)"
        " -> (Tensor out, Tensor lse)");
  // Per-token scaling around a per-tensor int8 GEMM (fp32).
  //   normalize_rows: x (rows, cols) -> out = x / scale[:, None], scale (rows,) = max(max|x[r]|, 1e-12)
  //   scale_rows_: in place, y (rows, cols) contiguous = y * scale[:, None] + bias; bias (cols,) or None
  m.def("normalize_rows(Tensor x) -> (Tensor out, Tensor scale)");
  m.def("scale_rows_(Tensor(a!) y, Tensor scale, Tensor? bias) -> ()");
  // bf16 linear on weights packed once (csrc/linear_bf16.cpp): out = activation(x @ weight^T + bias), bf16 out,
  // fp32 accumulation. pack_linear_bf16(weight (out_features, in_features), vnni) -> vnni: brgemm's VNNI blocks
  // (ceil(out_features / 64), in_features rounded up to 2, 64) for the CPU's matrix unit (AMX only); otherwise
  // weight^T (in_features, out_features). x: (tokens, in_features) bf16; bias: (out_features,) or None.
  m.def("pack_linear_bf16(Tensor weight, bool vnni) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, str activation) -> Tensor");
  // LayerNorm(linear_bf16(x, packed_weight, out_features, bias) + residual) in one call, the GEMM's output
  // rounded to bf16 first (what the two ops give). residual: (tokens, out_features) bf16; weight, ln_bias:
  // (out_features,); mean, rstd: (tokens,) fp32, as add_layer_norm's.
  m.def("linear_bf16_add_layer_norm(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, Tensor residual,"
        " Tensor weight, Tensor ln_bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  // fp32 linear as three bf16 products on the matrix unit (bf16x3, csrc/linear_bf16.cpp): out = activation(x @
  // weight^T + bias), fp32 in and out, within ~1.2e-5 of sum |x_k w_k| of the exact product.
  // pack_linear_bf16x3(weight (out_features, in_features), vnni) -> (lo | hi) of each weight row; vnni: VNNI blocks
  // (AMX only) of in_features in P = ceil(in_features / 1024) parts of ceil(in_features / P), each padded to 32:
  // (P * ceil(out_features / 64), 2 * padded part, 64); otherwise (2 * in_features, out_features).
  m.def("pack_linear_bf16x3(Tensor weight, bool vnni) -> Tensor");
  m.def("linear_bf16x3(Tensor x, Tensor packed_weight, int out_features, Tensor? bias, str activation) -> Tensor");
  // int8 linear with per-token activation scales (csrc/linear_int8.cpp), fp32 or bf16 in and out.
  // pack_linear_int8(weight (out_features, in_features), vnni) -> (packed int8: VNNI blocks (ceil(out_features
  // / 64), in_features rounded up to 4, 64) or weight^T (in_features, out_features); weight_scale
  // (out_features,) fp32). linear_int8: x (tokens, in_features) fp32 or bf16; bias: (out_features,) fp32 or None;
  // out_dtype: fp32 or bf16, None = x's. Both layouts run on every CPU; int8_vector_gemm() says which one is
  // faster without AMX.
  // weight_max: the int8 grid's largest level (scale = max|w[n]| / weight_max).
  m.def("pack_linear_int8(Tensor weight, bool vnni, int weight_max=127) -> (Tensor packed_weight, Tensor weight_scale)");
  m.def("linear_int8(Tensor x, Tensor packed_weight, Tensor weight_scale, int out_features, Tensor? bias,"
        " str activation, ScalarType? out_dtype=None) -> Tensor");
}

namespace distilkernels {
void init_blocks(pybind11::module& m);  // blocks.cpp
bool mkl_packs();  // linear_mkl.cpp
std::string int8_vector_gemm();  // linear_int8.cpp
bool int8_dots();  // linear_int8.cpp
bool amx_tiles_enabled();  // linear_bf16.cpp
int64_t mkl_packed_floats(int64_t n, int64_t k, int64_t rows);
}  // namespace distilkernels

namespace {

// How many distinct OS threads at::parallel_for really uses for a large loop: 1 means the build
// lost OpenMP (at::parallel_for then runs serially without a word).
int64_t parallel_threads_used() {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, 1 << 16, 1, [&](int64_t begin, int64_t end) {
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i) sink = sink + static_cast<double>(i) * 1e-9;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

// The x86 features among distilkernels.machine's ISA_FLAGS (named as /proc/cpuinfo names them) that CPUID reports
// to this process: the kernel's /proc/cpuinfo lists the hardware's, which a CPUID shim (tests/cpuid_avx2.c) or a
// hypervisor's masking can hide from a process without changing that file. Empty off x86.
std::vector<std::string> cpuid_flags() {
  std::vector<std::string> out;
#if defined(__x86_64__) || defined(__i386__)
  struct Feature {
    unsigned leaf, subleaf;
    int reg;  // 0 eax, 1 ebx, 2 ecx, 3 edx
    int bit;
    const char* name;
  };
  static const Feature features[] = {
      {1, 0, 2, 28, "avx"},          {1, 0, 2, 12, "fma"},          {1, 0, 2, 29, "f16c"},
      {7, 0, 1, 5, "avx2"},          {7, 0, 1, 16, "avx512f"},      {7, 0, 1, 17, "avx512dq"},
      {7, 0, 1, 30, "avx512bw"},     {7, 0, 1, 31, "avx512vl"},     {7, 0, 2, 11, "avx512_vnni"},
      {7, 0, 3, 22, "amx_bf16"},     {7, 0, 3, 24, "amx_tile"},     {7, 0, 3, 25, "amx_int8"},
      {7, 1, 0, 4, "avx_vnni"},      {7, 1, 0, 5, "avx512_bf16"},
  };
  for (const auto& f : features) {
    unsigned regs[4] = {0, 0, 0, 0};
    if (__get_cpuid_count(f.leaf, f.subleaf, &regs[0], &regs[1], &regs[2], &regs[3]) && (regs[f.reg] >> f.bit & 1u))
      out.emplace_back(f.name);
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distilkernels C++ CPU extension (ops are under torch.ops.distilkernels)";
  distilkernels::init_blocks(m);
  m.def("parallel_threads_used", &parallel_threads_used,
        "Distinct threads that at::parallel_for used for a large loop");
  m.def("vector_isa", &distilkernels::vec::isa_name, "Instruction set the CPU kernels dispatch to");
  m.def("cpuid_flags", &cpuid_flags, "The x86 ISA features CPUID reports to this process, named as /proc/cpuinfo "
        "names them (those distilkernels.machine tracks)");
  m.def("cpu_cache_stats", []() {
    const auto s = distilkernels::cpu_cache_stats();
    return pybind11::dict(pybind11::arg("limit_bytes") = s.limit_bytes, pybind11::arg("cached_bytes") = s.cached_bytes,
                          pybind11::arg("live_bytes") = s.live_bytes, pybind11::arg("hits") = s.hits,
                          pybind11::arg("misses") = s.misses);
  }, "Counters of the caching allocator behind the CPU ops' outputs");
  m.def("cpu_cache_empty", &distilkernels::cpu_cache_empty, "Frees the cached blocks; returns the bytes freed");
  m.def("cpu_cache_set_limit", &distilkernels::cpu_cache_set_limit, pybind11::arg("bytes"),
        "Sets how many free bytes the cache keeps at most (0: none)");
  m.def("linear_panel_width", []() { return distilkernels::cpu::kernels().panel; },
        "Columns per panel of pack_linear_weight's layout on this CPU");
  m.def("matrix_unit_packs", [](const std::string& dtype) {
    TORCH_CHECK(dtype == "bf16" || dtype == "int8", "dtype must be \"bf16\" or \"int8\", got \"", dtype, "\"");
    return distilkernels::brgemm::packs(dtype == "bf16" ? at::kBFloat16 : at::kChar);
  }, pybind11::arg("dtype"), "Whether brgemm runs packed (VNNI) weights of this dtype on this CPU's matrix unit");
  m.def("mkl_packs", &distilkernels::mkl_packs, "Whether this torch build exports MKL's packed fp32 GEMM");
  m.def("int8_dots", &distilkernels::int8_dots,
        "Whether int8 VNNI blocks run on AVX512-VNNI dot products now, without the matrix unit: the CPU has them "
        "and DISTILKERNELS_INT8_DOTS is not off (read per call)");
  m.def("int8_vector_gemm", &distilkernels::int8_vector_gemm,
        "How the int8 product runs without the matrix unit, measured once per process: \"int_mm\" (torch's int8 "
        "GEMM on W^T: exact here and faster than ours), or ours on the VNNI blocks: \"dots\" (AVX512-VNNI; "
        "DISTILKERNELS_INT8_DOTS=0, read per call, turns it off) or \"madd\" (int16 multiply-adds)");
  m.def("env_reported", [](const std::string& name, const std::string& value) {
    distilkernels::env::first_report(name, value);
  }, pybind11::arg("name"), pybind11::arg("value"),
        "Marks a setting's bad value as reported (by distilkernels._env): the C++ reader does not warn again");
  m.def("bf16_attention_products", []() { return std::string(distilkernels::attn::bf16_products()); },
        "Where bf16 attention runs its two products now: \"tiles\" (AMX), \"dots\" (AVX512-BF16 dot products) or "
        "\"\" (the blocked fp32 core); DISTILKERNELS_AMX and DISTILKERNELS_BF16_DOTS are read per call");
  m.def("amx_tiles_enabled", &distilkernels::amx_tiles_enabled,
        "Whether our AMX tile loops run now: the CPU has the tiles and DISTILKERNELS_AMX is not off (read per call)");
  m.def("mkl_packed_floats", &distilkernels::mkl_packed_floats, pybind11::arg("out_features"),
        pybind11::arg("in_features"), pybind11::arg("rows") = 128,
        "Length of pack_linear_mkl's output for a weight of this shape packed for this many rows");
  m.def("openmp_enabled", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
