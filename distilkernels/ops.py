"""Functional API of distilkernels: one entry point per op.

Each op checks its arguments once, here, before dispatch (distilkernels/_checks.py: the same error on every
backend), then runs the implementation that distilkernels.dispatch picks for its tensors' device:

    CPU tensors  -> "cpp"    (the C++ extension, torch.ops.distilkernels.*)
    CUDA tensors -> "triton" (Triton kernels, torch.ops.distilkernels_triton.*)
    otherwise    -> "torch"  (plain PyTorch, distilkernels.reference)

`DISTILKERNELS_BACKEND=cpp|triton|torch` (read at import) or `with force_backend(name):` overrides the choice,
for tests and comparisons; `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before triton is imported.
"""
from __future__ import annotations

import torch

from . import dispatch
from ._checks import (FLOAT_DTYPES as _FLOAT_DTYPES, check_activation as _check_activation,
                      check_contiguous as _check_contiguous, check_cu_seqlens as _check_cu_seqlens,
                      check_float as _check_float, check_fp32 as _check_fp32, check_index as _check_index,
                      check_fp32_matrix as _check_fp32_matrix, check_fp32_vector as _check_fp32_vector,
                      check_key_padding_mask as _check_key_padding_mask, check_last_dim as _check_last_dim,
                      check_packed as _check_packed,
                      check_qkv as _check_qkv, check_same as _check_same, check_vector as _check_vector,
                      describe as _describe)
from ._ext import extension_error, load_extension
# The dispatch names callers and tests use through this module.
from .dispatch import (BACKENDS, OPS, _TABLE, backend_for, backend_unavailable_reason, force_backend,  # noqa: F401
                       has_kernel, register_impl, triton_error)

ACTIVATIONS = ("gelu", "relu")


def _impl(op: str, device: torch.device):
    return dispatch.lookup(op, device)


def _run(op: str, device: torch.device, *args):
    """The backend's `op` on args, which must not need gradients: the ops have no backward (inference only), so
    an output would silently come out of the autograd graph."""
    if torch.is_grad_enabled():
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                import inspect  # the error path only: the argument's name in the op's signature here

                name = list(inspect.signature(globals()[op]).parameters)[i]
                raise RuntimeError(
                    f"distilkernels.ops.{op} has no backward (the ops are inference-only), and {name} requires grad: "
                    "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors")
    return dispatch.lookup(op, device)(*args)


def _scale(softmax_scale, head_dim: int) -> float:
    return float(head_dim) ** -0.5 if softmax_scale is None else float(softmax_scale)


# ----------------------------------------------------------------------------------------------------------
# Public ops


def linear(x, weight, bias=None):
    """out = x @ weight.T + bias. x: (tokens, in_features); weight: (out_features, in_features);
    bias: (out_features,) or None. On CPU the GEMM is split across threads by output columns for small
    token counts (MKL's own threading otherwise); elsewhere it is torch's linear."""
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, in_features), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (out_features, in_features={x.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or (out_features,) = ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    _check_same("x", x, weight=weight, bias=bias)
    return _run("linear", x.device, x, weight, bias)


def pack_linear_weight(weight):
    """weight (out_features, in_features) float32 -> the panel layout `linear_packed` reads: (n_panels,
    in_features, panel), packed[p, k, j] = weight[p * panel + j, k], zero past out_features. The panel width is
    the CPU kernels' (two vectors: 16 columns with AVX2, 32 with AVX-512); pack again after a weight changes."""
    _check_fp32("weight", weight, 2, "(out_features, in_features)", " to be packed")
    return _impl("pack_linear_weight", weight.device)(weight)


def linear_packed(x, packed_weight, out_features: int, bias=None, activation: str = "none"):
    """activation(x @ weight.T + bias) from pack_linear_weight(weight), in one pass: no per-call weight copy,
    bias and activation ("none", "gelu" = exact erf, "relu") applied while each output tile is in registers.
    x: (tokens, in_features) float32; bias: (out_features,) float32 or None."""
    _check_fp32_matrix("x", x)
    if not isinstance(packed_weight, torch.Tensor) or packed_weight.dtype != torch.float32 or packed_weight.dim() != 3:
        raise ValueError(f"packed_weight must be a 3-D float32 tensor from pack_linear_weight, got {_describe(packed_weight)}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"out_features must be a non-negative int, got {out_features!r}")
    n_panels, in_features, panel = packed_weight.shape
    if panel == 0 or in_features != x.shape[1] or n_panels != -(-out_features // panel):
        raise ValueError(f"packed_weight {tuple(packed_weight.shape)} does not hold a ({out_features}, {x.shape[1]}) "
                         "weight: pack it with pack_linear_weight(weight)")
    if not packed_weight.is_contiguous():
        raise ValueError(f"packed_weight must be contiguous, got strides {packed_weight.stride()}")
    if dispatch.backend_for(x.device) == "cpp" and panel != load_extension().linear_panel_width():
        width = load_extension().linear_panel_width()  # the C++ kernels read their own panel width only
        raise ValueError(f"packed_weight must be (n_panels, in_features, {width}) as pack_linear_weight makes it on "
                         f"this CPU, got shape {tuple(packed_weight.shape)}")
    _check_fp32_vector("bias", bias, out_features, optional=True)
    _check_activation(activation, ("none",) + ACTIVATIONS)
    _check_same("x", x, packed_weight=packed_weight, bias=bias)
    return _run("linear_packed", x.device, x, packed_weight, out_features, bias, activation)


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-12, return_stats: bool = False):
    """LayerNorm(x + residual) over the last dimension in one pass, statistics in fp32.

    x, residual: (..., dim), same shape/dtype/device (residual may be None); weight, bias: (dim,).
    Returns out shaped like x, or (out, mean, rstd) with mean/rstd (x.shape[:-1]) fp32 if return_stats.
    """
    _check_float("x", x)
    _check_last_dim("x", x, "(..., dim)", "dim")
    if residual is not None:
        _check_float("residual", residual)
        _check_same("x", x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_vector("weight", weight, x.shape[-1], "x", x)
    _check_vector("bias", bias, x.shape[-1], "x", x)
    out, mean, rstd = _run("add_layer_norm", x.device, x, residual, weight, bias, float(eps))
    return (out, mean, rstd) if return_stats else out


def embed_layer_norm(word, input_ids, position, position_ids, token_type, token_type_ids, weight, bias,
                     eps: float = 1e-12, return_stats: bool = False):
    """A BERT-family embedding layer in one pass per token: LayerNorm(word[input_ids] (+ token_type[
    token_type_ids]) + position[position_ids]), statistics in fp32.

    word (vocab, dim), position (positions, dim), token_type (types, dim) or None (with token_type_ids None): one
    float dtype and device;
    input_ids, position_ids, token_type_ids: (batch, seqlen) int64 or int32 (position_ids and token_type_ids may
    be (1, seqlen), shared by the batch); weight, bias: (dim,). Returns out (batch, seqlen, dim), or (out, mean,
    rstd) with mean/rstd (batch, seqlen) fp32 if return_stats. An index past its table is an IndexError.
    """
    for name, t in (("position", position), ("position_ids", position_ids)):
        if t is None:
            raise TypeError(f"{name} must be a tensor (every BERT-family embedding has positions), got None")
    _check_float("word", word)
    if word.dim() != 2 or word.shape[1] == 0:
        raise ValueError(f"word must be (vocab, dim) with dim > 0, got shape {tuple(word.shape)}")
    if (token_type is None) != (token_type_ids is None):
        raise ValueError("token_type and token_type_ids must be given together")
    for name, table in (("position", position), ("token_type", token_type)):
        if table is None:
            continue
        _check_float(name, table)
        _check_same("word", word, **{name: table})
        if table.dim() != 2 or table.shape[1] != word.shape[1]:
            raise ValueError(f"{name} must be (rows, dim) with dim = {word.shape[1]}, got shape {tuple(table.shape)}")
    _check_index("input_ids", input_ids, word, "word")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
    ids = {"position_ids": position_ids, "token_type_ids": token_type_ids}
    for (name, t), table in zip(ids.items(), (position, token_type)):
        if t is None:
            continue
        _check_index(name, t, table, name[:-4])
        if t.dim() != 2 or t.shape[1] != input_ids.shape[1] or t.shape[0] not in (1, input_ids.shape[0]):
            raise ValueError(f"{name} must be (batch, seqlen) = {tuple(input_ids.shape)} or (1, seqlen), "
                             f"got shape {tuple(t.shape)}")
        ids[name] = t.long().expand(input_ids.shape)
    _check_vector("weight", weight, word.shape[1], "word", word)
    _check_vector("bias", bias, word.shape[1], "word", word)
    out, mean, rstd = _run("embed_layer_norm", word.device, word, input_ids.long(), position, ids["position_ids"],
                           token_type, ids["token_type_ids"], weight, bias, float(eps))
    return (out, mean, rstd) if return_stats else out


def bias_act_(x, bias, activation: str = "gelu"):
    """In place: x = activation(x + bias). x: (..., hidden_dim) contiguous; bias: (hidden_dim,).
    activation: "gelu" (exact, erf) or "relu". Returns x."""
    _check_float("x", x)
    _check_last_dim("x", x, "(..., hidden_dim)", "hidden_dim")
    _check_contiguous("x", x)
    _check_vector("bias", bias, x.shape[-1], "x", x)
    _check_same("x", x, bias=bias)
    _check_activation(activation, ACTIVATIONS)
    _run("bias_act_", x.device, x, bias, activation)
    return x


def attention(q, k, v, key_padding_mask=None, softmax_scale=None, return_lse: bool = False):
    """Bidirectional softmax attention.

    q, k, v: (batch, seqlen, n_heads, head_dim), e.g. strided views of one fused QKV projection.
    key_padding_mask: (batch, seqlen) bool, True = attend; any 0/1 pattern; None = attend everywhere.
    softmax_scale: defaults to head_dim ** -0.5.
    Returns out (batch, seqlen, n_heads, head_dim) contiguous, and lse (batch, n_heads, seqlen) fp32 if
    return_lse. Queries with no key to attend get zeros.
    """
    _check_qkv(q, k, v, "(batch, seqlen, n_heads, head_dim)", 4)
    _check_key_padding_mask(key_padding_mask, q)
    out, lse = _run("attention", q.device, q, k, v, key_padding_mask, _scale(softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale=None, return_lse: bool = False):
    """Attention within each of several packed sequences (no padding anywhere).

    q, k, v: (total_tokens, n_heads, head_dim); cu_seqlens: (batch + 1,) int32, cu_seqlens[0] = 0,
    non-decreasing, cu_seqlens[-1] = total_tokens; max_seqlen: >= the longest sequence length.
    cu_seqlens' values are checked on CPU; on a GPU only with DISTILKERNELS_CHECK_CU_SEQLENS=1 (a debug switch:
    the check copies cu_seqlens to the host and waits for the device), so there wrong values are the caller's
    responsibility.
    Returns out (total_tokens, n_heads, head_dim) contiguous, and lse (n_heads, total_tokens) fp32 if
    return_lse.
    """
    _check_qkv(q, k, v, "(total_tokens, n_heads, head_dim)", 3)
    max_seqlen = _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q)
    out, lse = _run("varlen_attention", q.device, q, k, v, cu_seqlens, max_seqlen, _scale(softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def normalize_rows(x):
    """Per-token scaling before a per-tensor int8 GEMM. x: (rows, cols) float32.
    Returns (x / scale[:, None], scale) with scale (rows,) = max(max |x[r]|, 1e-12)."""
    _check_fp32_matrix("x", x)
    return _run("normalize_rows", x.device, x)


def scale_rows_(y, scale, bias=None):
    """In place, after the GEMM: y = y * scale[:, None] + bias. y: (rows, cols) float32 contiguous;
    scale: (rows,) float32; bias: (cols,) float32 or None. Returns y."""
    _check_fp32_matrix("y", y)
    _check_contiguous("y", y)
    _check_fp32_vector("scale", scale, y.shape[0], optional=False)
    _check_fp32_vector("bias", bias, y.shape[1], optional=True)
    _check_same("y", y, scale=scale, bias=bias)
    _run("scale_rows_", y.device, y, scale, bias)
    return y


# ----------------------------------------------------------------------------------------------------------
# The caching allocator behind the C++ ops' outputs (csrc/cpu_cache.cpp): freed outputs of 256 KiB or more are
# kept and handed out again, so an encoder forward does not fault in fresh pages every layer.


def _extension():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the C++ extension did not load ({extension_error()})")
    return ext


def cpu_cache_stats() -> dict:
    """limit_bytes, cached_bytes (free blocks kept), live_bytes (blocks in use), hits and misses."""
    return _extension().cpu_cache_stats()


def empty_cpu_cache() -> int:
    """Gives every cached (free) block back to the system; returns how many bytes that was."""
    return _extension().cpu_cache_empty()


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of freed blocks (0 turns caching off). The default is 512 MiB, or
    DISTILKERNELS_CPU_CACHE_MB at import."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes < 1 << 63:
        raise ValueError(f"nbytes must be an int in [0, 2**63), got {nbytes!r}")
    _extension().cpu_cache_set_limit(nbytes)


# ----------------------------------------------------------------------------------------------------------
# GEMMs for the matrix units (bf16 and int8 on weights packed once; csrc/linear_bf16.cpp, linear_int8.cpp)


def pack_linear_bf16(weight, vnni: bool = False):
    """weight (out_features, in_features) float -> the bf16 layout `linear_bf16` reads: vnni=True, the matrix
    unit's VNNI blocks (ceil(out_features / 64), in_features rounded up to 2, 64), on CPUs with AMX only;
    vnni=False, weight^T (in_features, out_features)."""
    return _pack_for_matrix_unit("pack_linear_bf16", weight, vnni)


def _pack_for_matrix_unit(op: str, weight, vnni, *args):
    """pack_linear_bf16 / _bf16x3 / _int8: the checks, then the backend's op (with `args` after vnni)."""
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    if vnni and weight.shape[1] == 0:
        raise ValueError("weight must have in_features > 0 for vnni=True (the matrix unit's blocks); "
                         "an empty weight packs with vnni=False")
    return _impl(op, weight.device)(weight, bool(vnni), *args)


def linear_bf16(x, packed_weight, out_features: int, bias=None, activation: str = "none"):
    """bf16(activation(x @ weight^T + bias)), fp32 accumulation, bias + activation in the GEMM's epilogue.
    x: (tokens, in_features) bf16; packed_weight: pack_linear_bf16(weight); bias: (out_features,) bf16/fp32."""
    return _bf16_weight_linear("linear_bf16", torch.bfloat16, x, packed_weight, out_features, bias, activation)


def _bf16_weight_linear(op: str, x_dtype, x, packed_weight, out_features, bias, activation):
    """linear_bf16 / linear_bf16x3 (x of x_dtype, a bf16 packed weight): the checks, then the backend's op."""
    if not isinstance(x, torch.Tensor) or x.dtype != x_dtype or x.dim() != 2:
        name = str(x_dtype).removeprefix("torch.")
        raise TypeError(f"x must be a 2-D (tokens, in_features) {name} tensor, got {_describe(x)}")
    _check_packed(x, packed_weight, torch.bfloat16, out_features, bias, (torch.bfloat16, torch.float32),
                  ("none",) + ACTIVATIONS, activation, rows_per_feature=2 if op == "linear_bf16x3" else 1)
    return _run(op, x.device, x, packed_weight, out_features, bias, activation)


def linear_bf16_add_layer_norm(x, packed_weight, out_features: int, bias, residual, weight, ln_bias,
                               eps: float = 1e-12, return_stats: bool = False):
    """LayerNorm(linear_bf16(x, packed_weight, out_features, bias) + residual) in one call: the GEMM's output
    rounded to bf16, then add_layer_norm over it (the two ops' result, bit for bit), where the matrix unit runs
    it with each row normalized while the GEMM's thread still holds it in cache.
    x: (tokens, in_features) bf16; residual: (tokens, out_features) bf16; weight, ln_bias: (out_features,).
    Returns out (tokens, out_features) bf16, or (out, mean, rstd) with mean/rstd (tokens,) fp32 if return_stats."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise TypeError(f"x must be a 2-D (tokens, in_features) bfloat16 tensor, got {_describe(x)}")
    _check_packed(x, packed_weight, torch.bfloat16, out_features, bias, (torch.bfloat16, torch.float32),
                  ("none",), "none")
    if out_features < 1:
        raise ValueError(f"out_features must be >= 1 (the LayerNorm's dim), got {out_features}")
    if not isinstance(residual, torch.Tensor) or residual.dtype != torch.bfloat16:
        raise TypeError(f"residual must be a bfloat16 tensor, got {_describe(residual)}")
    if tuple(residual.shape) != (x.shape[0], out_features):
        raise ValueError(f"residual must be (tokens, out_features) = ({x.shape[0]}, {out_features}), got shape "
                         f"{tuple(residual.shape)}")
    _check_vector("weight", weight, out_features, "x", x)
    _check_vector("ln_bias", ln_bias, out_features, "x", x)
    _check_same("x", x, residual=residual)
    out, mean, rstd = _run("linear_bf16_add_layer_norm", x.device, x, packed_weight, out_features, bias, residual,
                           weight, ln_bias, float(eps))
    return (out, mean, rstd) if return_stats else out


def pack_linear_bf16x3(weight, vnni: bool = False):
    """weight (out_features, in_features) float -> the layout `linear_bf16x3` reads: each value split into
    hi = bf16(w) and lo = bf16(w - hi), in_features doubled as (lo | hi). vnni=True: the matrix unit's VNNI
    blocks, on CPUs with AMX only, in_features in P = ceil(in_features / 1024) parts of ceil(in_features / P),
    each padded to 32: (P * ceil(out_features / 64), 2 * padded part, 64); vnni=False: (2 * in_features,
    out_features)."""
    return _pack_for_matrix_unit("pack_linear_bf16x3", weight, vnni)


def linear_bf16x3(x, packed_weight, out_features: int, bias=None, activation: str = "none"):
    """activation(x @ weight^T + bias) for fp32 x as three bf16 products (x_hi w_lo + x_lo w_hi + x_hi w_hi,
    each exact in fp32, fp32 accumulation): within ~1.2e-5 of sum_k |x_k w_k| (relative) of the exact result,
    what torch.set_float32_matmul_precision("high") permits; ~2x an fp32 GEMM's speed on AMX.
    x: (tokens, in_features) fp32; packed_weight: pack_linear_bf16x3(weight); bias: (out_features,) fp32/bf16."""
    return _bf16_weight_linear("linear_bf16x3", torch.float32, x, packed_weight, out_features, bias, activation)


def pack_linear_int8(weight, vnni: bool = False, weight_max: int = 127):
    """weight (out_features, in_features) float -> (packed int8 weight, weight_scale (out_features,) fp32):
    symmetric per output channel (scale = max|w[n]| / weight_max, weight_max in 1..127). vnni=True: VNNI blocks
    (groups of 4 along in_features, as pack_linear_bf16 lays out pairs), which linear_int8 runs on AMX tiles or,
    on any other CPU, on our AVX512-VNNI dot products or int16 multiply-adds; vnni=False: W^T for torch's int8 GEMM. Both are exact on every
    CPU (`distilkernels.gemms.int8_blocks()` says which one distilkernels.quantize packs here); the VNNI layout
    needs the C++ backend."""
    if isinstance(weight_max, bool) or not isinstance(weight_max, int) or not 1 <= weight_max <= 127:
        raise ValueError(f"weight_max must be an integer in [1, 127], got {weight_max!r}")
    return _pack_for_matrix_unit("pack_linear_int8", weight, vnni, weight_max)


def linear_int8(x, packed_weight, weight_scale, out_features: int, bias=None, activation: str = "none",
                out_dtype=None):
    """activation(q(x) @ q(W)^T * x_scale * weight_scale + bias) with per-token scales: each row of x is quantized
    to int8 with its own scale (max|x[r]| / 127), the product accumulates in int32, the epilogue dequantizes.
    x: (tokens, in_features) fp32 or bf16; (packed_weight, weight_scale): pack_linear_int8(weight); bias fp32;
    out_dtype: torch.float32 or torch.bfloat16 (the epilogue's fp32 result rounded once), None = x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _INT8_IO or x.dim() != 2:
        raise TypeError(f"x must be a 2-D (tokens, in_features) float32 or bfloat16 tensor, got {_describe(x)}")
    if out_dtype is not None and out_dtype not in _INT8_IO:
        raise TypeError(f"out_dtype must be None, torch.float32 or torch.bfloat16, got {out_dtype!r}")
    _check_packed(x, packed_weight, torch.int8, out_features, bias, (torch.float32,), ("none",) + ACTIVATIONS,
                  activation)
    _check_fp32_vector("weight_scale", weight_scale, out_features, optional=False)
    return _run("linear_int8", x.device, x, packed_weight, weight_scale, out_features, bias, activation, out_dtype)


_INT8_IO = (torch.float32, torch.bfloat16)  # linear_int8's x and output dtypes
