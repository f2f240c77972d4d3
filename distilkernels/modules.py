"""Fused replacements for Hugging Face encoder modules (post-LayerNorm blocks: DistilBERT, BERT).

Each replacement subclasses the module it replaces (isinstance, state_dict keys, repr and HF's output
capture hooks keep working) and shares its parameters and children; only the forward differs. One block
mechanism serves every family; a `BlockLayout` says where each piece lives in that family's block:

    x (tokens, dim) -> one GEMM for q|k|v (dim -> 3*dim) -> fused attention on strided q/k/v views
      -> out GEMM -> add_layer_norm(. , x) -> lin1 GEMM with bias + activation (fused epilogue, or
      bias_act_ in place) -> lin2 GEMM -> add_layer_norm(. , h)

The fused path is inference-only for now. `decide` (below) is the one function that chooses, per call,
between the fused path and HF's stock forward (gradients needed, dropout active, attention weights
requested, a decoder or cross-attention, a mask that is not a key-padding mask, an activation we have no
kernel for, a submodule replaced by one the fused path cannot run, exporting) and, for the encoder, between the unpadded and the padded layout; every choice is
counted with its reason (`path_stats(model)`).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import dispatch, ops
from . import hf
from ._ext import load_extension
from .gemms import BoundOp, DenseGemms, _param, cpp_op
from .padding import pad, unpad, unpad_info

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockLayout:
    """Dotted paths, inside one HF block, of the pieces the fused forward uses."""

    attention: str  # the self-attention module: n_heads, attention_head_size, scaling
    n_heads: str  # attribute of `attention` holding the number of heads
    q: str
    k: str
    v: str
    out: str
    ln1: str
    lin1: str
    act: str
    lin2: str
    ln2: str


def activation_name(module) -> str | None:
    """The bias_act_ name of an HF activation module, or None if we have no fused kernel for it."""
    from transformers.activations import GELUActivation

    if type(module) is GELUActivation and not getattr(module, "use_gelu_python", False):
        return "gelu"  # exact erf GELU
    if type(module) is torch.nn.ReLU:
        return "relu"
    return None


def _dropout_active(module: torch.nn.Module) -> bool:
    return module.training and any(m.p > 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))


def _cross_attention(args, kwargs) -> bool:
    """Whether a block or encoder forward got more than the stock encoder inputs (a decoder's cross-attention
    inputs): any positional argument past the mask that is not None, or encoder_hidden_states."""
    return any(a is not None for a in args) or kwargs.get("encoder_hidden_states") is not None


class Decision(NamedTuple):
    path: str  # "fused" (block, attention), "unpadded" (encoder), "padded" (encoder), "stock" (block, attention)
    reason: str  # why a fallback or the padded layout was chosen; "" on the fast path
    mask: torch.Tensor | None = None  # the (batch, kv_len) bool key-padding mask, None = no padding


# Reasons, as counted by path_stats (tests and docs refer to these names).
EXPORTING = "exporting (stock computation)"
DECODER = "decoder / cross-attention"
ACTIVATION = "unsupported activation"
MODULES = "submodules the fused path cannot run"
DTYPE = "unsupported dtype"
GRADIENTS = "gradients needed"
DROPOUT = "dropout active"
MASK_FORMAT = "mask format"
NO_PADDING = "no padding"
UNPAD_OFF = "padding removal off"
HIDDEN_STATES = "hidden states captured (padded layout)"
COMPILING = "compiling (data-dependent token count)"
LABELS = "labels read padded positions (padded layout)"
POSITION0 = "position 0 is padding (pooled heads read it)"
HOOKS = "forward hooks (HF's module calls run them)"

# Reasons for the padded layout that leave every block on the fused path with the encoder's mask (a block
# checks nothing the encoder has not checked for all of them): FusedEncoder runs the blocks itself, without
# HF's per-layer calls (~40 us a block at 1 x 128 on 2 cores).
_OWN_LOOP = frozenset({NO_PADDING, UNPAD_OFF, LABELS, POSITION0})


def decide(level: str, module: torch.nn.Module, x: torch.Tensor, attention_mask, *, kv_len: int | None = None,
           cross: bool = False, attn_dropout: float = 0.0) -> Decision:
    """The one place that decides, for one call, whether `module` runs fused or HF's stock code, and why.

    level: "block" (a FusedBlock: fused or stock), "encoder" (a FusedEncoder: unpadded or padded layout; in
    the padded layout each block decides again) or "attention" (attn_implementation="distilkernels": fused
    kernel or HF's sdpa / eager math). x: the block's hidden states, or the attention's query (batch, n_heads,
    q_len, head_dim). Every decision is counted on `module` (see path_stats)."""
    decision = _decide(level, module, x, attention_mask, kv_len, cross, attn_dropout)
    _count(module, level, decision)
    return decision


def _count(module, level: str, decision: Decision) -> None:
    """Counts one decision on `module` (see path_stats)."""
    if not torch.compiler.is_compiling():  # (a counter bump inside a graph would be traced once, not per call)
        stats = module.__dict__.setdefault("_path_stats", {})
        key = f"{level}.{decision.path}" + (f": {decision.reason}" if decision.reason else "")
        stats[key] = stats.get(key, 0) + 1


def _decide(level, module, x, attention_mask, kv_len, cross, attn_dropout) -> Decision:
    fallback = "padded" if level == "encoder" else "stock"
    batch = x.shape[0]
    q_len = x.shape[2] if level == "attention" else x.shape[1]
    kv_len = q_len if kv_len is None else kv_len
    if hf.exporting():
        return Decision(fallback, EXPORTING)
    if level == "attention":
        decoder = cross or kv_len != q_len or bool(getattr(module, "is_causal", False))
        problem = ""
    else:
        blocks = module.layer if level == "encoder" else (module,)
        decoder = cross or any(getattr(b, "is_decoder", False) for b in blocks)
        problem = ""  # each block's parts brought up to date with its modules here (what follows reads them)
        for b in blocks:
            problem = b._current_parts().problem if isinstance(b, FusedBlock) else MODULES
            if problem:
                break
    if decoder:
        return Decision(fallback, DECODER)
    if problem:
        return Decision(fallback, problem)
    if level != "attention" and hf.forward_hooks(
            m for b in blocks for m in ((b,) if level == "encoder" else ()) + b._parts.inner):
        return Decision(fallback, HOOKS)
    if x.dtype not in _SUPPORTED_DTYPES:
        return Decision(fallback, DTYPE)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return Decision(fallback, GRADIENTS)
    if attn_dropout > 0.0 or _dropout_active(module):
        return Decision(fallback, DROPOUT)
    if hf.capturing("attentions"):
        return Decision(fallback, hf.ATTENTION_WEIGHTS)
    # (the attention level is our own implementation: it takes the mask as sdpa does)
    implementation = None if level == "attention" else getattr(
        getattr(blocks[0]._parts.attention, "config", None), "_attn_implementation", None)
    mask, why = hf.key_padding_mask_of(attention_mask, batch, kv_len, implementation)
    if mask is NotImplemented:
        return Decision(fallback, f"{MASK_FORMAT}: {why}")
    if level != "encoder":
        return Decision("fused", "", mask)
    for reason, applies in ((HIDDEN_STATES, lambda: hf.capturing("hidden_states")),
                            (COMPILING, torch.compiler.is_compiling),
                            (NO_PADDING, lambda: mask is None), (UNPAD_OFF, lambda: not module.unpad),
                            (LABELS, hf.labels_given),
                            (POSITION0, lambda: not bool(mask[:, 0].all()))):
        if applies():
            return Decision("padded", reason, mask)
    return Decision("unpadded", "", mask)


def path_stats(model: torch.nn.Module, reset: bool = False) -> dict[str, int]:
    """How often each path ran in `model` since it was built or last reset, and why: keys are
    "<level>.<path>" or "<level>.<path>: <reason>" (levels: encoder, block, attention), summed over the
    model's modules. `reset=True` zeroes the counters after reading them."""
    total: dict[str, int] = {}
    for m in model.modules():
        stats = m.__dict__.get("_path_stats")
        if stats:
            for key, n in stats.items():
                total[key] = total.get(key, 0) + n
            if reset:
                stats.clear()
    return dict(sorted(total.items()))


def reset_path_stats(model: torch.nn.Module) -> None:
    path_stats(model, reset=True)


class _Parts:
    """The block's pieces resolved from its layout (a plain object: not registered as submodules), and what says
    they are still the block's: `dicts`, `names`, `children`, every link (parent's _modules, name, child) of the
    block's module tree, which FusedBlock._current_parts compares by identity on every block call.

    problem: "" where the fused path runs these pieces; otherwise why HF's stock forward must run: ACTIVATION (no
    kernel of ours for the activation) or MODULES (`why` names the module): a GEMM's module not a plain nn.Linear
    with a bias, a LayerNorm's not a plain affine nn.LayerNorm, either not of the block's sizes or not of one
    dtype and device with the others, or any other module of the tree not of the class it had when the block was
    patched (its forward, which the fused path does not call, may do anything: an adapter, a custom attention;
    a Dropout and an Identity count as one class).
    types: path -> class of every module of the tree when the block was patched, kept across rebuilds.
    recipe: (class, constructor options) of the GEMMs, None for DenseGemms; no GEMMs are made where problem is
    MODULES (their modules may have no weights): `gemms` then only remembers the recipe (_NoGemms)."""

    def __init__(self, block: torch.nn.Module, layout: BlockLayout, recipe: tuple | None = None,
                 types: dict | None = None):
        links = [(f"{prefix}.{name}" if prefix else name, parent._modules, name, child)
                 for prefix, parent in block.named_modules() for name, child in parent._modules.items()]
        paths, self.dicts, self.names, self.children = (tuple(c) for c in zip(*links)) if links else ((),) * 4
        self.types = {path: type(child) for path, child in zip(paths, self.children)} if types is None else types
        self.inner = tuple(m for m in block.modules() if m is not block)  # whose hooks the fused path skips
        self.cpp_blocks = {}  # id(GemmCalls) -> (what the block was bound from, the block for csrc/blocks.cpp)
        self.problem, self.why = _check_parts(self, block, layout, dict(zip(paths, self.children)))
        gemms_class, options = recipe or (DenseGemms, {})
        self.gemms = _NoGemms((gemms_class, options)) if self.problem == MODULES else gemms_class(self, **options)


def _check_parts(parts: _Parts, block, layout: BlockLayout, tree: dict) -> tuple[str, str]:
    """(problem, why) of _Parts, resolving the pieces into `parts` where the fused path can run them."""
    slots = {layout.q: "linear", layout.k: "linear", layout.v: "linear", layout.out: "linear",
             layout.lin1: "linear", layout.lin2: "linear", layout.ln1: "layer_norm", layout.ln2: "layer_norm",
             layout.act: "activation"}
    for path, child in tree.items():
        was = parts.types.get(path)
        if path not in slots and was is not type(child) and not {was, type(child)} <= _INERT:
            return MODULES, f"{path}: {type(child).__name__}, patched as {getattr(was, '__name__', 'absent')}"
    for path in slots:
        kind, child = slots[path], tree.get(path)
        plain = {"linear": torch.nn.Linear, "layer_norm": torch.nn.LayerNorm}.get(kind)
        if plain is not None and not _is_plain(child, plain):
            return MODULES, f"{path}: {type(child).__name__}, not a plain {plain.__name__}"
    get = lambda path: operator.attrgetter(path)(block)  # noqa: E731
    parts.attention = get(layout.attention)
    parts.n_heads = getattr(parts.attention, layout.n_heads)
    parts.head_dim = parts.attention.attention_head_size
    parts.scaling = parts.attention.scaling
    parts.q, parts.k, parts.v, parts.out, parts.ln1, parts.lin1, parts.lin2, parts.ln2 = (
        get(p) for p in (layout.q, layout.k, layout.v, layout.out, layout.ln1, layout.lin1, layout.lin2, layout.ln2))
    parts.act = activation_name(get(layout.act))
    dim = parts.n_heads * parts.head_dim
    hidden = parts.lin1.out_features
    shapes = {layout.q: (dim, dim), layout.k: (dim, dim), layout.v: (dim, dim), layout.out: (dim, dim),
              layout.lin1: (hidden, dim), layout.lin2: (dim, hidden)}
    params = []
    for path, shape in shapes.items():
        weight, bias = _param(tree[path], "weight"), _param(tree[path], "bias")
        if bias is None or tuple(weight.shape) != shape or tuple(bias.shape) != shape[:1]:
            got = None if bias is None else tuple(bias.shape)
            return MODULES, f"{path}: weight {tuple(weight.shape)}, bias {got}; the block's: {shape}, with a bias"
        params += (weight, bias)
    for path in (layout.ln1, layout.ln2):
        ln = tree[path]
        if ln.weight is None or ln.bias is None or tuple(ln.normalized_shape) != (dim,):
            return MODULES, (f"{path}: normalized_shape {tuple(ln.normalized_shape)}, weight and bias "
                             f"{ln.weight is not None and ln.bias is not None}; the block's: ({dim},), both")
        params += (ln.weight, ln.bias)
    kinds = {(t.dtype, t.device) for t in params}
    if len(kinds) > 1:
        return MODULES, f"parameters of several dtypes / devices: {sorted(map(str, kinds))}"
    return ("" if parts.act is not None else ACTIVATION), ""


def _is_plain(module, cls) -> bool:
    """Whether `module` is a `cls` whose forward is cls's own: the fused path reads its parameters and never calls
    its forward, so a subclass with a forward of its own (an adapter, say) is not one."""
    return isinstance(module, cls) and type(module).forward is cls.forward


# Modules of a block's tree the fused path may see swapped for one another (dropout off for inference): nothing
# the fused path skips is lost, and where dropout is active (training) HF's forward runs anyway.
_INERT = {torch.nn.Dropout, torch.nn.Identity}


class _NoGemms:
    """A block's GEMMs where the fused path cannot run its modules (_Parts.problem is MODULES): none are made;
    `recipe` is the kind made again once it can (an int8 block stays int8)."""

    def __init__(self, recipe: tuple):
        self.recipe = recipe

    def forget(self) -> None:
        pass


def _recipe(gemms) -> tuple:
    """(class, constructor options) that rebuild `gemms` for new parts: `class(parts, **options)`."""
    if isinstance(gemms, _NoGemms):
        return gemms.recipe
    params = list(inspect.signature(type(gemms).__init__).parameters)[2:]  # after self, parts
    return type(gemms), {name: getattr(gemms, name) for name in params if hasattr(gemms, name)}


class FusedBlock:
    """Mixin for a post-LayerNorm encoder block: `LAYOUT` names the pieces; the HF class supplies the
    stock forward (used as the fallback). The concrete classes (one per family) are in families.py."""

    LAYOUT: BlockLayout

    @classmethod
    def from_module(cls, block):
        fused = clone_as(block, cls)
        fused._parts = _Parts(fused, cls.LAYOUT)  # (the links of fused's own _modules, which callers change)
        return fused

    def _current_parts(self) -> _Parts:
        """The block's parts, resolved again (with new GEMMs of the same kind: packings and bindings of the old
        modules dropped) where any module of its tree was replaced since they were resolved: an adapter
        injected or an activation swapped after patch(). Every call of the block checks this: one identity
        comparison per link of the tree (13 in DistilBERT's block, 17 in BERT's): 0.7-0.8 us on 2 cores, ~2% of
        the ~40 us a fused block call of a tiny model costs in Python."""
        p = self._parts
        if tuple(map(dict.get, p.dicts, p.names)) != p.children:
            p = self.__dict__["_parts"] = _Parts(self, self.LAYOUT, _recipe(p.gemms), p.types)
        return p

    # Pickling (torch.save, copy.deepcopy, multiprocessing): `_parts` is derived state (references into the
    # block and caches of weights derived from its parameters), so it is not pickled; the kind of GEMMs it
    # used (class and options, e.g. int8 with per-token scales) and the classes of its modules when the block
    # was patched are, and `_parts` is rebuilt on first use.
    def __getstate__(self):
        state = super().__getstate__()  # a copy of __dict__
        parts = state.pop("_parts", None)
        if parts is not None:  # (None: unpickled and not used since; its recipe and types are still in state)
            state["_gemms_recipe"] = _recipe(parts.gemms)
            state["_module_types"] = parts.types
        return state

    def __getattr__(self, name):
        if name == "_parts" and "_gemms_recipe" in self.__dict__:
            recipe = self.__dict__.pop("_gemms_recipe")
            types = self.__dict__.pop("_module_types", None)
            parts = self.__dict__["_parts"] = _Parts(self, self.LAYOUT, recipe, types)
            return parts
        return super().__getattr__(name)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        decision = decide("block", self, hidden_states, attention_mask, cross=_cross_attention(args, kwargs))
        if decision.path == "stock":
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        batch, seqlen, dim = hidden_states.shape
        out = run_blocks((self,), hidden_states.reshape(batch * seqlen, dim), batch=batch, seqlen=seqlen,
                         key_padding_mask=decision.mask)  # (decide brought the parts up to date)
        return out.view(batch, seqlen, dim)

    def forward_tokens(self, x, *, batch=None, seqlen=None, key_padding_mask=None, cu_seqlens=None,
                       max_seqlen=None):
        """x: (tokens, dim). Padded layout: tokens = batch * seqlen with an optional key_padding_mask
        (batch, seqlen). Packed layout: cu_seqlens (batch + 1,) int32 and max_seqlen. Returns (tokens, dim).
        Raises where the fused path cannot run the block's modules (see _Parts.problem; forward() runs HF's)."""
        parts = self._current_parts()
        if parts.problem:
            raise RuntimeError(f"{type(self).__name__}.forward_tokens: {parts.problem}"
                               + (f" ({parts.why})" if parts.why else "") + "; call the block itself for HF's forward")
        return run_blocks((self,), x, batch=batch, seqlen=seqlen, key_padding_mask=key_padding_mask,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def _cpp_block(self, x):
        """This block bound for the C++ block loop (csrc/blocks.cpp) for inputs like x (on the C++ backend: see
        run_blocks), or None under CPU autocast, which the loop does not run. Rebuilt when its GEMMs' binding
        (gemms.DenseGemms.calls: new on a weight change) or a LayerNorm parameter is another object."""
        p = self._parts
        if _autocast_bf16(x) and x.dtype == torch.float32:
            return None
        calls = p.gemms.calls(x, p.act)
        key = (calls, p.ln1.weight, p.ln1.bias, p.ln1.eps, p.ln2.weight, p.ln2.bias, p.ln2.eps, p.scaling)
        plans = p.cpp_blocks
        hit = plans.get(id(calls))
        if hit is not None and all(a is b for a, b in zip(hit[0], key)):
            return hit[1]
        ext = load_extension()

        def gemm(bound):
            return bound.to_cpp(ext) if isinstance(bound, BoundOp) else cpp_op(ext, bound)

        block = ext.Block(
            gemm(calls.qkv), gemm(calls.out), gemm(calls.lin1_act), gemm(calls.lin2),
            None if calls.out_add_ln is None else gemm(calls.out_add_ln),
            None if calls.lin2_add_ln is None else gemm(calls.lin2_add_ln),
            p.ln1.weight, p.ln1.bias, p.ln1.eps, p.ln2.weight, p.ln2.bias, p.ln2.eps, p.n_heads, p.head_dim,
            p.scaling)
        if len(plans) >= 8:  # bindings of replaced weights: dropped, not kept alive
            plans.clear()
        plans[id(calls)] = (key, block)
        return block

    def _forward_tokens_python(self, x, *, batch=None, seqlen=None, key_padding_mask=None, cu_seqlens=None,
                               max_seqlen=None):
        """forward_tokens one op call at a time from Python: on the Triton and torch backends, and under CPU
        autocast.

        Under CPU autocast to bf16, an fp32 block runs as HF's block runs there: the GEMMs (on a bf16 packing of
        its weights) and attention in bf16, the residual stream and add + LayerNorm in fp32.

        This Python costs more than its hot timing says: a forward of a tiny 6-block model (the same calls, next
        to no arithmetic) took 1.1 ms back to back but 2.0-2.4 ms with other work between forwards (interleaved
        with OpenVINO, or after reading 1.2 GB), 2 cores, bf16. Hence run_blocks on the C++ backend; here the
        GEMMs come bound once per call (gemms.DenseGemms.calls) and the ops are called directly."""
        p = self._parts
        cpp = dispatch.backend_for(x.device) == "cpp"
        low = x
        if cpp and x.dtype == torch.float32 and isinstance(p.gemms, DenseGemms) and _autocast_bf16(x):
            low = x.to(torch.bfloat16)
        gemms = p.gemms.calls(low, p.act)
        qkv = gemms.qkv(low)  # (tokens, 3*dim)
        if cu_seqlens is None:
            q, k, v = qkv.view(batch, seqlen, 3, p.n_heads, p.head_dim).unbind(2)
            ctx = (dispatch.implementation("attention", "cpp")(q, k, v, key_padding_mask, p.scaling)[0] if cpp
                   else ops.attention(q, k, v, key_padding_mask=key_padding_mask, softmax_scale=p.scaling))
        else:
            q, k, v = qkv.view(-1, 3, p.n_heads, p.head_dim).unbind(1)
            ctx = (dispatch.implementation("varlen_attention", "cpp")(q, k, v, cu_seqlens, max_seqlen, p.scaling)[0]
                   if cpp else ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=p.scaling))
        ctx = ctx.view(low.shape)
        if gemms.out_add_ln is not None and low is x:  # bf16 on our GEMM: the add + LayerNorm in its call
            h = gemms.out_add_ln(ctx, x, p.ln1.weight, p.ln1.bias, p.ln1.eps)
        else:
            h = _add_layer_norm(cpp, _cast(gemms.out(ctx), x.dtype), x, p.ln1)
        f = gemms.lin1_act(_cast(h, low.dtype))
        if gemms.lin2_add_ln is not None and low is x:
            return gemms.lin2_add_ln(f, h, p.ln2.weight, p.ln2.bias, p.ln2.eps)
        return _add_layer_norm(cpp, _cast(gemms.lin2(f), x.dtype), h, p.ln2)


def run_blocks(blocks, x, *, batch=None, seqlen=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
    """The FusedBlocks' forward_tokens one after another (the layout arguments as there): on the C++ backend in one
    call into csrc/blocks.cpp, which runs every block's ops with no Python between them (a distilbert-base forward
    spent 0.5-0.7 ms in that Python on 2 cores, ~6% of it in bf16 at 1 x 128); elsewhere block by block."""
    if dispatch.backend_for(x.device) == "cpp" and not torch.compiler.is_compiling():
        cpp = [block._cpp_block(x) for block in blocks]
        if all(b is not None for b in cpp):
            ext = load_extension()
            shared = [_cpp_op(ext, dispatch.implementation(op, "cpp"))
                      for op in ("attention", "varlen_attention", "add_layer_norm")]
            return ext.run_blocks(cpp, x, batch or 0, seqlen or 0, key_padding_mask, cu_seqlens, max_seqlen or 0,
                                  *shared)
    for block in blocks:
        x = block._forward_tokens_python(x, batch=batch, seqlen=seqlen, key_padding_mask=key_padding_mask,
                                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return x


_CPP_OPS: dict[int, tuple] = {}  # id(dispatch-table entry) -> (the entry, the same for the C++ block loop)


def _cpp_op(ext, fn):
    """A dispatch-table entry for the C++ block loop: the dispatcher op it is, or a Python callable (whatever
    else the table holds, e.g. the tests' counting wrappers), made once per entry."""
    hit = _CPP_OPS.get(id(fn))
    if hit is None or hit[0] is not fn:
        if len(_CPP_OPS) >= 32:  # entries of replaced tables: dropped, not kept alive
            _CPP_OPS.clear()
        hit = _CPP_OPS[id(fn)] = (fn, cpp_op(ext, fn))
    return hit[1]


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_bf16(x) -> bool:
    """Whether CPU autocast to bf16 is on for x (a CPU tensor), outside a torch.compile trace."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling())


# The blocks build their ops' arguments themselves, well-formed by construction: on the C++ backend they call
# the C++ ops' table entries directly (the ops check their arguments in C++) rather than the public ops, whose
# Python checks cost ~200 us per distilbert forward (~2% at 1 x 128 in bf16 on 2 cores).
def _add_layer_norm(cpp: bool, x, residual, ln):
    if cpp:
        return dispatch.implementation("add_layer_norm", "cpp")(x, residual, ln.weight, ln.bias, ln.eps)[0]
    return ops.add_layer_norm(x, residual, ln.weight, ln.bias, ln.eps)


class FusedEncoder:
    """Mixin for an encoder's layer stack (`self.layer`); removes padding once on entry and restores it
    once on exit. `OUTPUT` is the HF output class the stock forward returns.

    With `unpad` (the default) and a padded batch, every GEMM, LayerNorm, activation and the (varlen)
    attention run on the real tokens only; padded positions of the output hold zeros (HF computes values
    there that no real token depends on). Wherever a value a caller can read depends on padded positions
    the layers run in the padded layout instead, which computes them as HF does: position 0 padded (the
    pooled heads and BERT's pooler read it), labels given (losses read padded positions), hidden states
    captured, and inside torch.compile graphs (the token count would depend on the data). In the padded
    layout the encoder runs the blocks itself (no padding, or one of the reasons in _OWN_LOOP), except where
    HF's loop does something for the caller: hidden states captured, compiling, a fallback of the blocks, or
    forward hooks on a block or inside one (HF's module calls run them; the fused paths would skip them).
    """

    OUTPUT: type
    unpad = True

    @classmethod
    def from_module(cls, encoder):
        return clone_as(encoder, cls)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        decision = decide("encoder", self, hidden_states, attention_mask, cross=_cross_attention(args, kwargs))
        if decision.path == "padded":
            if decision.reason not in _OWN_LOOP:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            batch, seqlen, dim = hidden_states.shape
            fused = Decision("fused", "", decision.mask)  # what each block would decide (counted as such)
            for layer in self.layer:
                _count(layer, "block", fused)
            x = run_blocks(self.layer, hidden_states.reshape(batch * seqlen, dim), batch=batch, seqlen=seqlen,
                           key_padding_mask=decision.mask)
            return self.OUTPUT(last_hidden_state=x.view(batch, seqlen, dim))
        info = unpad_info(decision.mask)
        x = run_blocks(self.layer, unpad(hidden_states, info), cu_seqlens=info.cu_seqlens, max_seqlen=info.max_seqlen)
        return self.OUTPUT(last_hidden_state=pad(x, info))


# The embedding layer's pieces the fused pass reads (token types: BERT and RoBERTa only)
_EMBEDDING_PIECES = (("word_embeddings", torch.nn.Embedding), ("position_embeddings", torch.nn.Embedding),
                     ("token_type_embeddings", torch.nn.Embedding), ("LayerNorm", torch.nn.LayerNorm))


class FusedEmbeddings:
    """Mixin for a BERT-family embedding layer (word, optional token type and position embeddings summed, then
    LayerNorm and dropout): one `embed_layer_norm` pass per token where a kernel of ours runs it and the call asks
    nothing else of the layer. HF's forward runs instead for inputs_embeds, position ids that are neither (batch or
    1, seqlen) nor (seqlen,) (BERT: (seqlen,) only with token_type_ids given; HF's forward fails on them without),
    gradients, active dropout, forward hooks on its submodules (the fused pass calls none of them), a table or
    LayerNorm replaced by a module with a forward of its own (the fused pass reads parameters only), an embedding
    with max_norm (which renormalizes its table), compiling or exporting, or no kernel of ours for the table's
    device and dtype; each choice is counted (path_stats: "embeddings.fused" / "embeddings.stock: why").

    HF in bf16 (distilbert-base, 2 cores, AMX Xeon, in the model): 0.26 ms at 1 x 128 and 0.94 ms at 8 x 128,
    torch's bf16 gather, broadcast add and LayerNorm each a pass over the tokens."""

    @classmethod
    def from_module(cls, module):
        return clone_as(module, cls)

    def _stock_reason(self, input_ids, inputs_embeds) -> str:
        """Why this call runs HF's forward ("" when it runs fused)."""
        if hf.exporting():
            return EXPORTING
        if torch.compiler.is_compiling():
            return "compiling (stock computation)"
        if input_ids is None or inputs_embeds is not None:
            return "inputs_embeds given"
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return GRADIENTS
        if _dropout_active(self):
            return DROPOUT
        if hf.forward_hooks(self._modules.values()):
            return HOOKS
        modules = self._modules
        # A table or the LayerNorm replaced by a module with a forward of its own (an adapter, say): the fused pass
        # reads their parameters only, so it would skip that forward
        for name, plain in _EMBEDDING_PIECES:
            m = modules.get(name)
            if (m is not None or name != "token_type_embeddings") and not _is_plain(m, plain):
                return f"{name} is a {type(m).__name__}, not a plain {plain.__name__}"
        tables = [m for m in modules.values() if isinstance(m, torch.nn.Embedding)]
        ln = self.LayerNorm
        if any(t.max_norm is not None for t in tables) or ln.weight is None or ln.bias is None:
            return "embedding options (max_norm, a LayerNorm without affine parameters)"
        if not dispatch.has_kernel("embed_layer_norm", self.word_embeddings.weight):
            return DTYPE
        return ""

    def fused(self, input_ids, inputs_embeds, position_ids, token_type_ids, *, first_position: int = 0,
              token_types: bool):
        """The layer's output computed in one pass, or None where HF's forward must run (counted either way).
        Position ids default to the layer's position_ids buffer from `first_position` on; with `token_types`,
        token type ids default as HF's BertEmbeddings makes them (its token_type_ids buffer at the positions)."""
        reason = self._stock_reason(input_ids, inputs_embeds)
        given = (input_ids, position_ids, token_type_ids)
        if not reason and any(t is not None and t.dtype not in _INDEX_DTYPES for t in given):
            reason = "ids neither int64 nor int32"  # HF's forward raises its own error
        if not reason:
            # int32 ids, which HF's embeddings take too, as the int64 the op reads
            input_ids, position_ids, token_type_ids = (None if t is None else t.long() for t in given)
            batch, seqlen = input_ids.shape
            if position_ids is None:
                position_ids = (self.position_ids[:, first_position:first_position + seqlen]
                                if hasattr(self, "position_ids") else
                                torch.arange(first_position, first_position + seqlen, device=input_ids.device)[None])
            elif position_ids.dim() == 1 and not (token_types and token_type_ids is None
                                                  and hasattr(self, "token_type_ids")):
                # (seqlen,) as HF broadcasts it; not where BERT's forward gathers its default token types at the
                # position ids, which fails on 1-D ones: HF's forward runs there, and fails as HF's does
                position_ids = position_ids[None]
            if position_ids.dim() != 2 or position_ids.shape[1] != seqlen or position_ids.shape[0] not in (1, batch):
                reason = "position ids not (batch or 1, seqlen)"
        if reason:
            _count(self, "embeddings", Decision("stock", reason))
            return None
        table = None
        if token_types:
            table = self.token_type_embeddings.weight
            if token_type_ids is None:
                if hasattr(self, "token_type_ids"):
                    buffered = self.token_type_ids.expand(position_ids.shape[0], -1)
                    token_type_ids = torch.gather(buffered, dim=1, index=position_ids)
                else:
                    token_type_ids = torch.zeros_like(input_ids)
            token_type_ids = token_type_ids.expand(batch, seqlen)
        _count(self, "embeddings", Decision("fused", ""))
        ln = self.LayerNorm
        return dispatch.implementation("embed_layer_norm", "cpp")(
            self.word_embeddings.weight, input_ids, self.position_embeddings.weight, position_ids.expand(batch, seqlen),
            table, token_type_ids, ln.weight, ln.bias, ln.eps)[0]


_INDEX_DTYPES = (torch.int64, torch.int32)  # what torch.nn.Embedding takes as indices


def clone_as(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new `cls` instance (a subclass of type(module)) sharing module's parameters, buffers, children and
    hooks; the original is left untouched so it can be put back exactly."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} does not replace {type(module).__name__}")
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for name, value in state.items():  # own copies of the registries, same entries
        if isinstance(value, dict):
            state[name] = type(value)(value)
    new.__dict__.update(state)
    return new

