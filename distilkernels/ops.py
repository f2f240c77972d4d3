"""Functional API of distilkernels: one entry point per op, dispatched through one table.

Which implementation runs is decided in one place, `backend_for(device)`:

    CPU tensors  -> "cpp"    (the C++ extension, torch.ops.distilkernels.*)
    CUDA tensors -> "triton" (Triton kernels, torch.ops.distilkernels_triton.*)
    otherwise    -> "torch"  (plain PyTorch, distilkernels.reference)

`DISTILKERNELS_BACKEND=cpp|triton|torch` (read at import) or `with force_backend(name):` overrides the choice,
for tests and comparisons; `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before triton is imported.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from . import reference
from ._ext import extension_error, load_extension

BACKENDS = ("cpp", "triton", "torch")
ACTIVATIONS = ("gelu", "relu")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (op, backend) -> callable with the op's positional signature (see csrc/ops.cpp for the schemas).
_TABLE: dict[tuple[str, str], Callable] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    _TABLE[(op, backend)] = fn


OPS = ("linear", "pack_linear_weight", "linear_packed", "add_layer_norm", "bias_act_", "attention", "varlen_attention", "normalize_rows", "scale_rows_",
       "pack_linear_bf16", "linear_bf16", "pack_linear_int8", "linear_int8")
for _op in OPS:
    register_impl(_op, "torch", getattr(reference, _op))
    register_impl(_op, "cpp", lambda *args, _op=_op: getattr(torch.ops.distilkernels, _op)(*args))
# The bf16/int8 GEMMs for the CPU's matrix units have no Triton kernel: torch's on that backend.
for _op in ("pack_linear_bf16", "linear_bf16", "pack_linear_int8", "linear_int8"):
    register_impl(_op, "triton", getattr(reference, _op))


def _env_backend() -> str | None:
    name = os.environ.get("DISTILKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DISTILKERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_forced: str | None = _env_backend()


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run every op on backend `name` ("cpp", "triton", "torch"; None = automatic) inside the block."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def triton_error() -> str | None:
    """Why the Triton backend is unavailable (None when it can run)."""
    from .triton import availability_error  # local: importing triton is slow and optional

    return availability_error()


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got a {device.type} tensor"
        err = extension_error()
        return None if err is None else f"the C++ extension did not load ({err})"
    err = triton_error()
    if err is not None:
        return err
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    return None


def backend_for(device: torch.device) -> str:
    """The backend that ops run on for tensors on `device`."""
    if _forced is not None:
        return _forced
    if device.type == "cuda":
        return "triton" if triton_error() is None else "torch"
    if device.type == "cpu":
        return "cpp" if load_extension() is not None else "torch"
    return "torch"


def _impl(op: str, device: torch.device) -> Callable:
    backend = backend_for(device)
    if backend == "triton" and (op, backend) not in _TABLE:
        import distilkernels.triton  # noqa: F401  (registers its implementations)
    why = backend_unavailable_reason(backend, device) if _forced is not None else None
    if why is not None:
        raise RuntimeError(f"distilkernels: backend {backend!r} was forced but cannot run: {why}")
    return _TABLE[(op, backend)]


# ----------------------------------------------------------------------------------------------------------
# Argument checks shared by every backend: bad input gets an error naming the argument, before any kernel.


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_same(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share a device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: dtypes must match")


def _check_qkv(q, k, v, layout: str, ndim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dimension, got {t.stride()}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_same("q", q, k=k, v=v)
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim (last dim of q) must be in 1..256, got {head_dim}")


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
    return _impl("linear", x.device)(x, weight, bias)


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
    if in_features != x.shape[1] or n_panels != -(-out_features // panel):
        raise ValueError(f"packed_weight {tuple(packed_weight.shape)} does not hold a ({out_features}, {x.shape[1]}) "
                         "weight: pack it with pack_linear_weight(weight)")
    _check_fp32_vector("bias", bias, out_features, optional=True)
    if activation not in ("none",) + ACTIVATIONS:
        raise ValueError(f"activation must be one of {('none',) + ACTIVATIONS}, got {activation!r}")
    _check_same("x", x, packed_weight=packed_weight, bias=bias)
    return _impl("linear_packed", x.device)(x, packed_weight, out_features, bias, activation)


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-12, return_stats: bool = False):
    """LayerNorm(x + residual) over the last dimension in one pass, statistics in fp32.

    x, residual: (..., dim), same shape/dtype/device (residual may be None); weight, bias: (dim,).
    Returns out shaped like x, or (out, mean, rstd) with mean/rstd (x.shape[:-1]) fp32 if return_stats.
    """
    _check_float("x", x)
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.shape[0] != x.shape[-1]:
            raise ValueError(f"{name} must be a 1-D tensor of size dim={x.shape[-1]}, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}: all tensors must share a device")
    _check_same("x", x, residual=residual)
    out, mean, rstd = _impl("add_layer_norm", x.device)(x, residual, weight, bias, float(eps))
    return (out, mean, rstd) if return_stats else out


def bias_act_(x, bias, activation: str = "gelu"):
    """In place: x = activation(x + bias). x: (..., hidden_dim) contiguous; bias: (hidden_dim,).
    activation: "gelu" (exact, erf) or "relu". Returns x."""
    _check_float("x", x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is updated in place)")
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias must be a 1-D tensor of size {x.shape[-1]} (x's last dim), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    _check_same("x", x, bias=bias)
    _impl("bias_act_", x.device)(x, bias, activation)
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
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = attend), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[1]):
            raise ValueError(f"key_padding_mask must be (batch, seqlen) = {(q.shape[0], q.shape[1])}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    out, lse = _impl("attention", q.device)(q, k, v, key_padding_mask, _scale(softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale=None, return_lse: bool = False):
    """Attention within each of several packed sequences (no padding anywhere).

    q, k, v: (total_tokens, n_heads, head_dim); cu_seqlens: (batch + 1,) int32, cu_seqlens[0] = 0,
    non-decreasing, cu_seqlens[-1] = total_tokens; max_seqlen: the longest sequence length.
    Returns out (total_tokens, n_heads, head_dim) contiguous, and lse (n_heads, total_tokens) fp32 if
    return_lse.
    """
    _check_qkv(q, k, v, "(total_tokens, n_heads, head_dim)", 3)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor (batch + 1,), got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                        f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must hold at least 2 entries (batch + 1)")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    out, lse = _impl("varlen_attention", q.device)(q, k, v, cu_seqlens, int(max_seqlen),
                                                   _scale(softmax_scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def _describe(t) -> str:
    return f"{(t.dtype, tuple(t.shape))}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_fp32(name: str, t, ndim: int, layout: str, purpose: str = "") -> None:
    """For the fp32-only ops (the packed GEMM, int8 row scaling): t is a float32 tensor of `ndim` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32{purpose}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_fp32_matrix(name: str, t) -> None:
    _check_fp32(name, t, 2, "2-D (rows, cols)")


def _check_fp32_vector(name: str, t, size: int, optional: bool) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (size,):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a float32 tensor of shape ({size},), "
                         f"got {_describe(t)}")


def normalize_rows(x):
    """Per-token scaling before a per-tensor int8 GEMM. x: (rows, cols) float32.
    Returns (x / scale[:, None], scale) with scale (rows,) = max(max |x[r]|, 1e-12)."""
    _check_fp32_matrix("x", x)
    return _impl("normalize_rows", x.device)(x)


def scale_rows_(y, scale, bias=None):
    """In place, after the GEMM: y = y * scale[:, None] + bias. y: (rows, cols) float32 contiguous;
    scale: (rows,) float32; bias: (cols,) float32 or None. Returns y."""
    _check_fp32_matrix("y", y)
    if not y.is_contiguous():
        raise ValueError("y must be contiguous (it is updated in place)")
    _check_fp32_vector("scale", scale, y.shape[0], optional=False)
    _check_fp32_vector("bias", bias, y.shape[1], optional=True)
    _check_same("y", y, scale=scale, bias=bias)
    _impl("scale_rows_", y.device)(y, scale, bias)
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
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    _extension().cpu_cache_set_limit(nbytes)


# ----------------------------------------------------------------------------------------------------------
# GEMMs for the matrix units (bf16 and int8 on weights packed once; csrc/linear_bf16.cpp, linear_int8.cpp)


def _check_packed(x, packed_weight, dtype, out_features, bias, bias_dtypes, activation) -> None:
    if not isinstance(packed_weight, torch.Tensor) or packed_weight.dtype != dtype or packed_weight.dim() not in (2, 3):
        raise ValueError(f"packed_weight must be a 2-D or 3-D {dtype} tensor from its pack op, got {_describe(packed_weight)}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"out_features must be a non-negative int, got {out_features!r}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype not in bias_dtypes
                             or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be None or a tensor of shape ({out_features},) and dtype in {bias_dtypes}, "
                         f"got {_describe(bias)}")
    if activation not in ("none",) + ACTIVATIONS:
        raise ValueError(f"activation must be one of {('none',) + ACTIVATIONS}, got {activation!r}")
    if packed_weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, packed_weight and bias must share a device")


def pack_linear_bf16(weight, vnni: bool = False):
    """weight (out_features, in_features) float -> the bf16 layout `linear_bf16` reads: vnni=True, the matrix
    unit's VNNI blocks (ceil(out_features / 64), in_features rounded up to 2, 64), on CPUs with AMX only;
    vnni=False, weight^T (in_features, out_features)."""
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    return _impl("pack_linear_bf16", weight.device)(weight, bool(vnni))


def linear_bf16(x, packed_weight, out_features: int, bias=None, activation: str = "none"):
    """bf16(activation(x @ weight^T + bias)), fp32 accumulation, bias + activation in the GEMM's epilogue.
    x: (tokens, in_features) bf16; packed_weight: pack_linear_bf16(weight); bias: (out_features,) bf16/fp32."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
        raise TypeError(f"x must be a 2-D (tokens, in_features) bfloat16 tensor, got {_describe(x)}")
    _check_packed(x, packed_weight, torch.bfloat16, out_features, bias, (torch.bfloat16, torch.float32), activation)
    return _impl("linear_bf16", x.device)(x, packed_weight, out_features, bias, activation)


def pack_linear_int8(weight, vnni: bool = False):
    """weight (out_features, in_features) float -> (packed int8 weight, weight_scale (out_features,) fp32):
    symmetric per output channel (scale = max|w[n]| / 127); packed as pack_linear_bf16 lays it out, VNNI
    groups of 4 along in_features."""
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    return _impl("pack_linear_int8", weight.device)(weight, bool(vnni))


def linear_int8(x, packed_weight, weight_scale, out_features: int, bias=None, activation: str = "none"):
    """activation(q(x) @ q(W)^T * x_scale * weight_scale + bias) with per-token scales: each row of x is quantized
    to int8 with its own scale (max|x[r]| / 127), the product accumulates in int32, the epilogue dequantizes.
    x: (tokens, in_features) fp32; (packed_weight, weight_scale): pack_linear_int8(weight); bias fp32."""
    _check_fp32_matrix("x", x)
    _check_packed(x, packed_weight, torch.int8, out_features, bias, (torch.float32,), activation)
    _check_fp32_vector("weight_scale", weight_scale, out_features, optional=False)
    return _impl("linear_int8", x.device)(x, packed_weight, weight_scale, out_features, bias, activation)
