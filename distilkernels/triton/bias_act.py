"""In-place bias + activation, the epilogue of a matmul that ran without one, in Triton.

x = activation(x + bias) over x (..., hidden_dim) contiguous, bias (hidden_dim,), viewed as one flat
array: each program updates BLOCK consecutive elements, finding each one's bias by its column. The sum
and the activation are computed in fp32; "gelu" is the exact erf form (as torch's default and
DistilBERT's), "relu" is max(0, .).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import LaunchPlan, checked_grid, launch

ACTIVATIONS = {"gelu": 0, "relu": 1}  # activation name -> ACTIVATION constexpr
BLOCK = 1024
RSQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)


@triton.jit
def _bias_act_fwd(
    x_ptr,  # (n_elements,) = (..., hidden_dim) contiguous, updated in place
    bias_ptr,  # (hidden_dim,)
    n_elements, hidden_dim,
    ACTIVATION: tl.constexpr,  # 0: gelu (erf), 1: relu
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n_elements may pass 2**31
    ok = offs < n_elements
    y = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y += tl.load(bias_ptr + offs % hidden_dim, mask=ok, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        y = 0.5 * y * (1.0 + tl.math.erf(y * RSQRT2))
    else:
        y = tl.maximum(y, 0.0)
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=ok)


def bias_act_plan(x: torch.Tensor, bias: torch.Tensor, activation: str) -> Optional[LaunchPlan]:
    """The launch of `bias_act_` (None when x is empty)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    n_elements = x.numel()
    if n_elements == 0:
        return None
    args = dict(x_ptr=x, bias_ptr=bias, n_elements=n_elements, hidden_dim=x.shape[-1],
                ACTIVATION=ACTIVATIONS[activation], BLOCK=BLOCK)
    return LaunchPlan("bias_act_", _bias_act_fwd, args, (triton.Config({}, num_warps=4, num_stages=1),), (),
                      lambda meta: checked_grid((triton.cdiv(n_elements, BLOCK),), "bias_act_"))


@triton_op("distilkernels_triton::bias_act_", mutates_args={"x"})
def bias_act_(x: torch.Tensor, bias: torch.Tensor, activation: str) -> None:
    """In place: x = activation(x + bias). x: (..., hidden_dim) contiguous; bias: (hidden_dim,);
    activation: "gelu" (exact, erf) or "relu"."""
    plan = bias_act_plan(x, bias, activation)
    if plan is not None:
        launch(plan)
