"""Residual add + LayerNorm over the last dimension, in Triton.

One program normalizes one row: it loads the whole row (BLOCK = dim padded to a power of two, masked),
adds the residual, computes mean and variance in fp32, and writes out = (h - mean) * rstd * weight + bias
in the input dtype, plus mean and rstd (fp32) for a backward pass. Rows up to 4096 wide fit one tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import LaunchPlan, block_size, checked_grid, launch

MAX_DIM = 4096  # one row per tile: wider rows would spill registers


@triton.jit
def _add_layer_norm_fwd(
    x_ptr,  # (n_rows, dim), rows stride_x_row apart, unit last stride
    residual_ptr,  # (n_rows, dim), rows stride_r_row apart; unused if not HAS_RESIDUAL
    weight_ptr,  # (dim,)
    bias_ptr,  # (dim,)
    out_ptr,  # (n_rows, dim) contiguous
    mean_ptr,  # (n_rows,) fp32
    rstd_ptr,  # (n_rows,) fp32
    stride_x_row, stride_r_row, stride_out_row,
    dim, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for large batches
    cols = tl.arange(0, BLOCK)
    col_ok = cols < dim

    h = tl.load(x_ptr + row * stride_x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + row * stride_r_row + cols, mask=col_ok, other=0.0).to(tl.float32)

    # two-pass statistics over the row held in registers: no E[h^2] - E[h]^2 cancellation
    mean = tl.sum(h, axis=0) / dim
    centered = tl.where(col_ok, h - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / dim
    rstd = tl.math.rsqrt(var + eps)

    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centered * rstd * w + b
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


def add_layer_norm_plan(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                        bias: torch.Tensor, eps: float
                        ) -> tuple[Optional[LaunchPlan], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The launch of `add_layer_norm` (None when there is nothing to compute) and its outputs out, mean, rstd
    (flattened to rows)."""
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"the Triton add_layer_norm handles dim <= {MAX_DIM}, got {dim}")
    x2 = x.reshape(-1, dim)
    r2 = residual.reshape(-1, dim) if residual is not None else None
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = r2 if r2 is None or r2.stride(-1) == 1 else r2.contiguous()
    n_rows = x2.shape[0]
    out = torch.empty((n_rows, dim), dtype=x.dtype, device=x.device)
    mean = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return None, out, mean, rstd
    block = block_size(dim, minimum=1)
    args = dict(
        x_ptr=x2, residual_ptr=r2 if r2 is not None else x2, weight_ptr=weight, bias_ptr=bias,
        out_ptr=out, mean_ptr=mean, rstd_ptr=rstd,
        stride_x_row=x2.stride(0), stride_r_row=r2.stride(0) if r2 is not None else 0, stride_out_row=out.stride(0),
        dim=dim, eps=eps, HAS_RESIDUAL=r2 is not None, BLOCK=block,
    )
    config = triton.Config({}, num_warps=_num_warps(block), num_stages=1)
    plan = LaunchPlan("add_layer_norm", _add_layer_norm_fwd, args, (config,), (),
                      lambda meta: checked_grid((n_rows,), "add_layer_norm"))
    return plan, out, mean, rstd


@triton_op("distilkernels_triton::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (..., dim) (residual may be None); weight, bias: (dim,). Returns out like x (contiguous),
    mean and rstd (x.shape[:-1]) fp32."""
    plan, out, mean, rstd = add_layer_norm_plan(x, residual, weight, bias, eps)
    if plan is not None:
        launch(plan)
    return out.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])
