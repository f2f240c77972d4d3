"""Argument checks shared by every backend, run by distilkernels.ops before dispatch.

Bad input gets the same error on every backend: TypeError for a wrong type or dtype, ValueError for a wrong
shape, stride, device or value, with a message that names the argument and says what was expected. The C++
ops' TORCH_CHECKs (csrc/checks.h and the check lines of csrc/*.cpp) use the same wording for the raw
torch.ops.distilkernels.* calls, where they surface as RuntimeError.

cu_seqlens' values (leading 0, non-decreasing, ending at the token count, no sequence longer than max_seqlen)
need its data on the host: checked always on CPU; on other devices only with DISTILKERNELS_CHECK_CU_SEQLENS=1
(read per call), since the check costs a device-to-host copy and a sync every layer.
"""
from __future__ import annotations

import operator

import torch

from . import _env

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t) -> str:
    return f"{(t.dtype, tuple(t.shape))}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same(ref_name: str, ref: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None skipped) is on ref's device and has ref's dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share a device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: dtypes must match")


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all tensors must share a device")


def check_index(name: str, t, table: torch.Tensor, table_name: str) -> None:
    """int64 or int32 indices (as torch.nn.Embedding takes) into the rows of `table`, on its device. Their range is
    checked on CPU only (elsewhere it would cost a device-to-host copy and a sync; the C++ op checks it again,
    since an index past the table would read beyond it)."""
    check_tensor(name, t)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    check_device(name, t, table_name, table)
    if t.device.type == "cpu" and t.numel() > 0:
        low, high = (v.item() for v in torch.aminmax(t))
        bad = low if low < 0 else high if high >= table.shape[0] else None
        if bad is not None:
            raise IndexError(f"{name} holds {bad}, out of range for the {table.shape[0]} rows of {table_name}")


def check_vector(name: str, t, size: int, ref_name: str, ref: torch.Tensor) -> None:
    """A (size,) float parameter such as a LayerNorm weight, on ref's device."""
    check_float(name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must be a 1-D tensor of size {size}, got shape {tuple(t.shape)}")
    check_device(name, t, ref_name, ref)


def check_last_dim(name: str, t: torch.Tensor, layout: str, dim_name: str) -> None:
    """t is (..., dim) with dim > 0: a row of no features has no LayerNorm statistics or bias to add."""
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} must be {layout} with {dim_name} > 0, got shape {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {t.stride()}")


def check_activation(activation, allowed: tuple) -> None:
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")


def check_fp32(name: str, t, ndim: int, layout: str, purpose: str = "") -> None:
    """For the fp32-only ops (the packed GEMM, int8 row scaling): t is a float32 tensor of `ndim` dims."""
    check_tensor(name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32{purpose}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def check_fp32_matrix(name: str, t) -> None:
    check_fp32(name, t, 2, "2-D (rows, cols)")


def check_fp32_vector(name: str, t, size: int, optional: bool) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (size,):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a float32 tensor of shape ({size},), "
                         f"got {describe(t)}")


def check_qkv(q, k, v, layout: str, ndim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise ValueError(f"{name} must have a unit stride in its last (head_dim) dimension, got strides "
                             f"{t.stride()}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape {layout}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_same("q", q, k=k, v=v)
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim (last dim of q) must be in 1..256, got {head_dim}")


def check_key_padding_mask(mask, q: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = attend), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (q.shape[0], q.shape[1]):
        raise ValueError(f"key_padding_mask must be (batch, seqlen) = {(q.shape[0], q.shape[1])}, got "
                         f"{tuple(mask.shape)}")
    check_device("key_padding_mask", mask, "q", q)


def _host_check_wanted(device: torch.device) -> bool:
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph; the C++ op checks
        return False
    return device.type == "cpu" or _env.read("DISTILKERNELS_CHECK_CU_SEQLENS")


def check_cu_seqlens(cu_seqlens, max_seqlen, total: int, q: torch.Tensor) -> int:
    """cu_seqlens: (batch + 1,) int32 with cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = total;
    max_seqlen >= every sequence's length. Returns max_seqlen as an int."""
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor (batch + 1,) with at least 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    check_device("cu_seqlens", cu_seqlens, "q", q)
    given = max_seqlen
    try:
        max_seqlen = operator.index(max_seqlen)  # an int, or anything that converts without loss
    except TypeError:
        max_seqlen = -1
    if isinstance(given, bool) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= 0, got {given!r}")
    if not _host_check_wanted(cu_seqlens.device):
        return max_seqlen
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {bounds[0]}")
    longest = 0
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i}] = {bounds[i]} < "
                             f"cu_seqlens[{i - 1}] = {bounds[i - 1]}")
        longest = max(longest, bounds[i] - bounds[i - 1])
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens[-1] must equal total_tokens = {total}, got {bounds[-1]}")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}")
    return max_seqlen


def check_packed(x, packed_weight, dtype, out_features, bias, bias_dtypes, activations: tuple, activation,
                 rows_per_feature: int = 1) -> None:
    """The arguments of the packed-weight GEMMs (linear_bf16, linear_bf16x3, linear_int8) besides x. The plain
    layout (2-D) is weight^T, (rows_per_feature * in_features, out_features), checked here on every backend; the
    VNNI blocks (3-D, the C++ backend only: the matrix unit's, and int8's on any CPU) are checked by the C++ op,
    which knows their blocking."""
    if not isinstance(packed_weight, torch.Tensor) or packed_weight.dtype != dtype or packed_weight.dim() not in (2, 3):
        raise ValueError(f"packed_weight must be a 2-D or 3-D {dtype} tensor from its pack op, got {describe(packed_weight)}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ValueError(f"out_features must be a non-negative int, got {out_features!r}")
    k = x.shape[1]
    if packed_weight.dim() == 2 and tuple(packed_weight.shape) != (rows_per_feature * k, out_features):
        rows = f"in_features={k}" if rows_per_feature == 1 else f"{rows_per_feature} * in_features={rows_per_feature * k}"
        raise ValueError(f"packed_weight must be ({rows}, out_features={out_features}) from its pack op with "
                         f"vnni=False, or 3-D from vnni=True; got shape {tuple(packed_weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype not in bias_dtypes
                             or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be None or a tensor of shape ({out_features},) and dtype in {bias_dtypes}, "
                         f"got {describe(bias)}")
    check_activation(activation, activations)
    if packed_weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, packed_weight and bias must share a device")
