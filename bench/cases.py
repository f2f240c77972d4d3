"""The per-op case table: one entry per op at one size, with every provider of that op, the fp32 reference
output and the work (bench.flops) it represents. The pytest-benchmark suite (test_ops.py), the CPU timing
script (cpu_ops_timing.py) and the GPU one (triton_timing.py) all take their cases from here.

Providers: "distilkernels" (ops.* through the dispatch table: C++ on CPU tensors, Triton on CUDA ones),
"torch_eager", "torch_sdpa" (attention only) and "torch_compile" (the eager version, compiled). The reference is
distilkernels.reference (plain PyTorch) on the inputs upcast to fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from bench import flops
from bench.workload import Shape, mixed_shape
from distilkernels import ops, reference

DIM, N_HEADS, HEAD_DIM, HIDDEN_DIM = 768, 12, 64, 3072  # distilbert-base
EPS = 1e-12


@dataclasses.dataclass
class OpCase:
    """`providers` maps name -> fn(*args) -> out; `valid` selects the rows compared (attention: real queries)."""
    op: str
    name: str
    args: tuple
    providers: dict[str, Callable]
    reference: torch.Tensor
    bytes: int
    flops: int = 0
    valid: torch.Tensor | None = None
    in_place: bool = False

    def fresh_args(self) -> tuple:
        """args, copied for an in-place op so that one provider's runs do not feed the next provider."""
        return tuple(a.clone() if self.in_place and isinstance(a, torch.Tensor) else a for a in self.args)

    def check(self, provider: str) -> float:
        """Max-abs error of one provider against the fp32 reference."""
        out, ref = self.providers[provider](*self.fresh_args()).float(), self.reference.float()
        if self.valid is not None:
            out, ref = out[self.valid], ref[self.valid]
        return (out - ref).abs().max().item()


def _eager_attention(q, k, v, key_padding_mask):
    """HF-eager style: materialized scores, additive mask, softmax, second matmul.
    q, k, v: (batch, seqlen, n_heads, head_dim); key_padding_mask: (batch, seqlen) bool."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v).transpose(1, 2)


def _sdpa_attention(q, k, v, key_padding_mask):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])
    return out.transpose(1, 2)


def _per_sequence(attention_fn, cu_seqlens: list[int]):
    """Varlen attention as a loop over sequences: what plain PyTorch does without padding."""
    def run(q, k, v, cu_seqlens_t, max_seqlen):
        outs = []
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            q_i, k_i, v_i = (t[None, start:end] for t in (q, k, v))
            mask = torch.ones(1, end - start, dtype=torch.bool, device=q.device)
            outs.append(attention_fn(q_i, k_i, v_i, mask)[0])
        return torch.cat(outs)

    return run


def _compiled(fn):
    return torch.compile(fn, dynamic=False)  # compiles on its first call (the check), not here


def attention_cases(shape: Shape, device="cpu", dtype=torch.float32, n_heads: int = N_HEADS,
                    head_dim: int = HEAD_DIM) -> list[OpCase]:
    """Padded attention (key_padding_mask) and varlen attention (the same real tokens packed) at `shape`."""
    gen = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(shape.batch, shape.seqlen, n_heads, head_dim, generator=gen).to(device)
                     for _ in range(3))
    q, k, v = (t.to(dtype) for t in (q32, k32, v32))
    mask = shape.inputs(2, device)[1].bool()
    lengths = list(shape.seq_lengths)
    work = flops.attention_flops(lengths, n_heads, head_dim)
    io_bytes = flops.attention_bytes(shape.tokens, n_heads, head_dim, q.element_size())
    scale, suffix = head_dim ** -0.5, f"{shape.name} h{n_heads} d{head_dim} {str(dtype).removeprefix('torch.')}"
    padded = OpCase(
        "attention", f"attention {suffix}", (q, k, v, mask),
        {"distilkernels": lambda q, k, v, m: ops.attention(q, k, v, key_padding_mask=m),
         "torch_eager": _eager_attention, "torch_sdpa": _sdpa_attention, "torch_compile": _compiled(_eager_attention)},
        reference.attention(q32, k32, v32, mask, scale)[0], io_bytes, work, valid=mask)
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    packed32 = tuple(t[mask].contiguous() for t in (q32, k32, v32))  # (total_tokens, n_heads, head_dim)
    packed = tuple(t.to(dtype) for t in packed32)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    varlen = OpCase(
        "varlen_attention", f"varlen_attention {suffix}", (*packed, cu_t, max(lengths)),
        {"distilkernels": lambda q, k, v, c, s: ops.varlen_attention(q, k, v, c, s),
         "torch_eager": _per_sequence(_eager_attention, cu), "torch_sdpa": _per_sequence(_sdpa_attention, cu),
         "torch_compile": _compiled(_per_sequence(_eager_attention, cu))},
        reference.varlen_attention(*packed32, cu_t, max(lengths), scale)[0], io_bytes, work)
    return [padded, varlen]


def _add_layer_norm_eager(x, residual, weight, bias):
    return F.layer_norm(x + residual, weight.shape, weight, bias, EPS)


def _bias_gelu_eager(x, bias):
    return F.gelu(x + bias)


def add_layer_norm_case(tokens: int, device="cpu", dtype=torch.float32, dim: int = DIM) -> OpCase:
    gen = torch.Generator().manual_seed(0)
    x32, r32 = (torch.randn(tokens, dim, generator=gen).to(device) for _ in range(2))
    w32, b32 = 1 + 0.1 * torch.randn(dim, generator=gen).to(device), torch.randn(dim, generator=gen).to(device)
    args = tuple(t.to(dtype) for t in (x32, r32, w32, b32))
    return OpCase(
        "add_layer_norm", f"add_layer_norm {tokens}x{dim} {str(dtype).removeprefix('torch.')}", args,
        {"distilkernels": lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS),
         "torch_eager": _add_layer_norm_eager, "torch_compile": _compiled(_add_layer_norm_eager)},
        reference.add_layer_norm(x32, r32, w32, b32, EPS)[0],
        flops.add_layer_norm_bytes(tokens, dim, args[0].element_size()))


def bias_gelu_case(tokens: int, device="cpu", dtype=torch.float32, hidden_dim: int = HIDDEN_DIM) -> OpCase:
    gen = torch.Generator().manual_seed(0)
    h32 = torch.randn(tokens, hidden_dim, generator=gen).to(device)
    b32 = torch.randn(hidden_dim, generator=gen).to(device)
    expected = h32.clone()
    reference.bias_act_(expected, b32, "gelu")
    return OpCase(
        "bias_gelu", f"bias_gelu {tokens}x{hidden_dim} {str(dtype).removeprefix('torch.')}",
        (h32.to(dtype), b32.to(dtype)),
        {"distilkernels": lambda x, b: ops.bias_act_(x, b, "gelu"),  # in place: reruns see last output, no alloc
         "torch_eager": _bias_gelu_eager, "torch_compile": _compiled(_bias_gelu_eager)},
        expected, flops.bias_act_bytes(tokens, hidden_dim, h32.to(dtype).element_size()), in_place=True)


def op_cases(device="cpu", dtype=torch.float32, shape: Shape | None = None) -> list[OpCase]:
    """Every op at distilbert-base sizes on one batch (default: 8 sequences of 8..128 tokens, right-padded):
    attention on it, the pointwise ops on its real tokens."""
    shape = shape or mixed_shape(batch=8)
    return attention_cases(shape, device, dtype) + [add_layer_norm_case(shape.tokens, device, dtype),
                                                    bias_gelu_case(shape.tokens, device, dtype)]
