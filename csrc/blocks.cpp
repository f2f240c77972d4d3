// The encoder block's sequence of ops, run for a stack of blocks in one call from Python (distilkernels/modules.py,
// run_blocks): per block, q|k|v = GEMM(x); attention; h = LayerNorm(GEMM(ctx) + x); f = GEMM(h) with its
// activation; out = LayerNorm(GEMM(f) + h). The ops are the ones the Python block loop calls, with the same
// arguments in the same order, so the results are the same bits; what goes is the Python between them. In
// distilbert-base on the 2-core AMX Xeon (2 threads, interleaved medians in one process, ms per forward, this
// loop vs the Python one, two or three runs each): bf16 6.96-7.07 vs 7.34-7.52 at 1 x 128 and 42.8-43.2 vs
// 43.5-44.4 at 8 x 128; int8 5.11-5.12 vs 5.56-5.62 at 1 x 128; fp32 33.4-33.5 vs 34.2-34.3 at 1 x 128 and
// 256-263 vs 263-268 at 8 x 128. More than the Python's own time at 8 x 128; why is not known (the ops are the
// same calls).
//
// Every op comes from Python as an Op: a dispatcher op with some of its arguments bound once (a GEMM's packed
// weight, bias, activation), or a Python callable (a GEMM that is not one op, such as oneDNN's linear in row
// chunks, or whatever the dispatch table holds instead of an op, such as the tests' counting wrappers), which is
// called with the GIL taken back. The loop itself runs without the GIL.
#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace distilkernels {
namespace {

namespace py = pybind11;

class Op {
 public:
  // The dispatcher op `name` ("ns::name"; overload "" for the default) with `bound` (converted to the schema's
  // types) as its arguments from index `bound_at` on; a call gives the others, in order. Its first output is
  // the result.
  Op(const std::string& name, const std::string& overload, const py::list& bound, int64_t bound_at)
      : bound_at_(bound_at) {
    op_ = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& params = op_->schema().arguments();
    TORCH_CHECK(bound_at >= 0 && static_cast<size_t>(bound_at) + bound.size() <= params.size(), name, " takes ",
                params.size(), " arguments; cannot bind ", bound.size(), " from index ", bound_at);
    for (size_t i = 0; i < bound.size(); ++i)
      bound_.push_back(torch::jit::toIValue(bound[i], params[bound_at + i].type()));
  }
  // fn(*inputs) -> the result, or a tuple whose first element is the result.
  explicit Op(py::object fn) : fn_(std::move(fn)) {}

  // Called without the GIL; a Python callable takes it back.
  at::Tensor operator()(std::vector<c10::IValue> inputs) const {
    if (!op_) {
      py::gil_scoped_acquire gil;
      py::tuple args(inputs.size());
      for (size_t i = 0; i < inputs.size(); ++i) args[i] = torch::jit::toPyObject(std::move(inputs[i]));
      py::object out = fn_(*args);
      if (py::isinstance<py::tuple>(out)) out = out.cast<py::tuple>()[0];
      return out.cast<at::Tensor>();
    }
    const size_t n_params = op_->schema().arguments().size();
    TORCH_CHECK(inputs.size() + bound_.size() == n_params, op_->schema().name(), " takes ", n_params,
                " arguments; got ", inputs.size(), " and ", bound_.size(), " bound");
    torch::jit::Stack stack;
    stack.reserve(n_params);
    stack.insert(stack.end(), std::make_move_iterator(inputs.begin()),
                 std::make_move_iterator(inputs.begin() + bound_at_));
    stack.insert(stack.end(), bound_.begin(), bound_.end());
    stack.insert(stack.end(), std::make_move_iterator(inputs.begin() + bound_at_),
                 std::make_move_iterator(inputs.end()));
    op_->callBoxed(stack);  // leaves the op's outputs on the stack, the result first
    return stack[0].toTensor();
  }

 private:
  std::optional<c10::OperatorHandle> op_;
  std::vector<c10::IValue> bound_;
  int64_t bound_at_ = 0;
  py::object fn_;
};

struct LayerNormParams {
  at::Tensor weight, bias;
  double eps = 0.0;
};

// One block: its four GEMMs, x -> result (out_ln / lin2_ln: the attention output's / lin2's GEMM with the residual
// add + LayerNorm in its call, (x, residual, weight, bias, eps) -> result, or None: then `out` / `lin2` and
// add_layer_norm), its LayerNorms and its attention's shape.
struct Block {
  Op qkv, out, lin1, lin2;
  std::optional<Op> out_ln, lin2_ln;
  LayerNormParams ln1, ln2;
  int64_t n_heads, head_dim;
  double scaling;
};

// x: (tokens, dim). Padded layout: tokens = batch * seqlen, key_padding_mask (batch, seqlen) bool or None.
// Packed layout: cu_seqlens (batch + 1,) int32 and max_seqlen.
at::Tensor run_blocks(const std::vector<const Block*>& blocks, at::Tensor x, int64_t batch, int64_t seqlen,
                      const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens,
                      int64_t max_seqlen, const Op& attention, const Op& varlen_attention, const Op& add_layer_norm) {
  py::gil_scoped_release no_gil;
  const c10::IValue mask = key_padding_mask.has_value() ? c10::IValue(*key_padding_mask) : c10::IValue();
  auto add_ln = [&](const at::Tensor& y, const at::Tensor& residual, const LayerNormParams& ln) {
    return add_layer_norm({y, residual, ln.weight, ln.bias, ln.eps});
  };
  for (const Block* b : blocks) {
    const at::Tensor qkv = b->qkv({x});  // (tokens, 3 * dim)
    at::Tensor ctx;
    if (!cu_seqlens.has_value()) {
      const auto parts = qkv.view({batch, seqlen, 3, b->n_heads, b->head_dim}).unbind(2);
      ctx = attention({parts[0], parts[1], parts[2], mask, b->scaling});
    } else {
      const auto parts = qkv.view({-1, 3, b->n_heads, b->head_dim}).unbind(1);
      ctx = varlen_attention({parts[0], parts[1], parts[2], *cu_seqlens, max_seqlen, b->scaling});
    }
    ctx = ctx.view(x.sizes());
    const at::Tensor h = b->out_ln ? (*b->out_ln)({ctx, x, b->ln1.weight, b->ln1.bias, b->ln1.eps})
                                   : add_ln(b->out({ctx}), x, b->ln1);
    const at::Tensor f = b->lin1({h});
    x = b->lin2_ln ? (*b->lin2_ln)({f, h, b->ln2.weight, b->ln2.bias, b->ln2.eps}) : add_ln(b->lin2({f}), h, b->ln2);
  }
  return x;
}

}  // namespace

void init_blocks(py::module& m) {
  py::class_<Op>(m, "BlockOp", "An op for run_blocks: a dispatcher op with bound arguments, or a Python callable")
      .def(py::init<const std::string&, const std::string&, const py::list&, int64_t>(), py::arg("name"),
           py::arg("overload"), py::arg("bound"), py::arg("bound_at"))
      .def(py::init<py::object>(), py::arg("fn"));
  py::class_<Block>(m, "Block", "One encoder block for run_blocks: its GEMMs, LayerNorms and attention shape")
      .def(py::init([](Op qkv, Op out, Op lin1, Op lin2, std::optional<Op> out_ln, std::optional<Op> lin2_ln,
                       at::Tensor ln1_weight, at::Tensor ln1_bias, double ln1_eps, at::Tensor ln2_weight,
                       at::Tensor ln2_bias, double ln2_eps, int64_t n_heads, int64_t head_dim, double scaling) {
             TORCH_CHECK(n_heads > 0 && head_dim > 0, "n_heads and head_dim must be > 0, got ", n_heads, " and ",
                         head_dim);
             return Block{std::move(qkv), std::move(out), std::move(lin1), std::move(lin2), std::move(out_ln),
                          std::move(lin2_ln), {ln1_weight, ln1_bias, ln1_eps}, {ln2_weight, ln2_bias, ln2_eps},
                          n_heads, head_dim, scaling};
           }),
           py::arg("qkv"), py::arg("out"), py::arg("lin1"), py::arg("lin2"), py::arg("out_ln"), py::arg("lin2_ln"),
           py::arg("ln1_weight"), py::arg("ln1_bias"), py::arg("ln1_eps"), py::arg("ln2_weight"),
           py::arg("ln2_bias"), py::arg("ln2_eps"), py::arg("n_heads"), py::arg("head_dim"), py::arg("scaling"));
  m.def("run_blocks", &run_blocks, py::arg("blocks"), py::arg("x"), py::arg("batch"), py::arg("seqlen"),
        py::arg("key_padding_mask"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("attention"),
        py::arg("varlen_attention"), py::arg("add_layer_norm"),
        "The blocks' forward on x (tokens, dim), one after another, without Python between their ops");
}

}  // namespace distilkernels
