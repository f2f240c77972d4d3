"""Bidirectional softmax attention, FlashAttention-style forward pass, in Triton.

One program computes one tile of BLOCK_M queries of one (sequence, head): it walks the keys BLOCK_N at a
time, keeping a running row maximum `m_i` and row sum `l_i` of the exponentials in fp32 (online softmax),
so the (seqlen, seqlen) score matrix never exists in memory. Scores are kept in base 2 (scaled by
softmax_scale * log2(e)) so the exponentials are `exp2`.

Two kernels share that tile loop (`_attn_fwd_tile`) and differ only in how they find their rows:
  _attention_fwd         padded batch: q/k/v (batch, seqlen, n_heads, head_dim) + key_padding_mask
  _varlen_attention_fwd  packed batch: q/k/v (total_tokens, n_heads, head_dim) + cu_seqlens

Keys that are masked (or past the end of the sequence) score -inf. A query with no key to attend keeps
m_i = -inf and l_i = 0; it gets out = 0 and lse = -inf instead of 0/0.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import INTERPRETING, LaunchPlan, block_size, checked_grid, launch

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E), folded into qk_scale on the host
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2


def _tiles(*tiles) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as triton.Configs."""
    return tuple(
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in tiles)


# Tiles per (dtype class, BLOCK_D), autotuned among on a GPU. Each one compiles for sm_80 and sm_90 with no
# register spills and within the shared memory of both (163 KiB and 227 KiB per block), masked, unmasked and
# varlen: tests/test_triton_compile.py checks every one, so a tile added here is checked too. What ptxas
# makes of a tile is not monotone in its size or register budget (fp32 32x32 with 8 warps spills 8 bytes in
# varlen on sm_80; given maxnreg 128, on sm_90 instead): only that test tells. fp32 ("ieee" products) cannot
# use tensor cores: its dots are FMAs on registers, which only narrow tiles fit (64x64 with 4 warps spills
# 7 KB per thread on sm_80). In fp16/bf16 at head_dim 256 the 128-row tiles tried spill, or need 256 KiB with
# 3 stages. fp16 and bf16 share their tiles (same MMA shapes). BLOCK_D 16 and 32 use the 64 list.
_CONFIGS = {
    ("fp32", 64): _tiles((32, 32, 4, 2)),
    ("fp32", 128): _tiles((32, 16, 8, 2), (16, 16, 4, 2)),
    ("fp32", 256): _tiles((32, 16, 8, 2), (16, 16, 4, 2)),
    ("16-bit", 64): _tiles((128, 64, 8, 3), (64, 64, 4, 2)),
    ("16-bit", 128): _tiles((128, 64, 8, 3), (64, 64, 4, 2)),
    ("16-bit", 256): _tiles((64, 64, 8, 2), (64, 32, 8, 2)),
}
# Under the interpreter autotuning would time every config on the CPU: one fixed tile instead, small
# enough that the tests' short sequences still cross tile boundaries.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_IN_FP32 computes it on fp32 copies, the same products (those of
    fp16/bf16 numbers are exact in fp32): Triton's interpreter multiplies bf16 tiles as raw uint16 bits."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attn_fwd_tile(
    q_base,  # first query row of this (sequence, head): (seqlen, head_dim) rows stride_qm apart
    k_base,  # first key row of this (sequence, head): (seqlen, head_dim) rows stride_kn apart
    v_base,  # first value row of this (sequence, head): (seqlen, head_dim) rows stride_vn apart
    mask_base,  # key_padding_mask row of this sequence: (seqlen,) uint8, 1 = attend; unused if not HAS_MASK
    out_base,  # first output row of this (sequence, head): (seqlen, head_dim) rows stride_om apart
    lse_base,  # lse of this (sequence, head): (seqlen,) fp32, unit stride
    stride_qm, stride_kn, stride_vn, stride_mn, stride_om,
    seqlen, head_dim, start_m, qk_scale,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    d_ok = offs_d < head_dim  # head_dim is padded up to BLOCK_D with zeros, which add nothing to q.k

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < seqlen
        col_ok = col_in
        if HAS_MASK:
            col_ok = col_ok & (tl.load(mask_base + cols * stride_mn, mask=col_in, other=0) != 0)
        # K^T tile (BLOCK_D, BLOCK_N) loaded transposed, so the dot needs no shuffle
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=col_in[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, DOT_PRECISION, DOT_IN_FP32) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))

        # online softmax: rescale what was summed so far to the new row maximum; a row that has seen
        # only masked keys has m_new = -inf, and subtracting 0 instead keeps its exponentials at 0, not NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_in[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_IN_FP32)
        m_i = m_new

    attended = l_i > 0.0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse = tl.where(attended, (m_i + tl.math.log2(tl.where(attended, l_i, 1.0))) * LN2,
                   float("-inf"))
    tl.store(out_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(out_base.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_base + offs_m, lse, mask=row_ok)


@triton.jit
def _tile_of_program(seqlen, BLOCK_M: tl.constexpr):
    """(query tile, sequence * n_heads + head) of this program. The grid is one flat axis: CUDA takes
    2**31 - 1 blocks on axis 0 but only 65,535 on axes 1 and 2, which batch * n_heads would pass from 5,462
    sequences of 12 heads. The query tiles of one (sequence, head) are consecutive programs, so they run
    together and share its keys and values in L2."""
    n_m_tiles = tl.cdiv(seqlen, BLOCK_M)
    return tl.program_id(0) % n_m_tiles, tl.program_id(0) // n_m_tiles


@triton.jit
def _attention_fwd(
    q_ptr, k_ptr, v_ptr,  # (batch, seqlen, n_heads, head_dim), any strides, unit last stride
    mask_ptr,  # (batch, seqlen) uint8, 1 = attend; unused if not HAS_MASK
    out_ptr,  # (batch, seqlen, n_heads, head_dim) contiguous
    lse_ptr,  # (batch, n_heads, seqlen) fp32 contiguous
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_mb, stride_ms,
    stride_ob, stride_os, stride_oh,
    n_heads, seqlen, head_dim, qk_scale,
    seqlen_pow2,  # autotune key only
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= 16)  # tl.dot needs every dimension >= 16
    start_m, seq_head = _tile_of_program(seqlen, BLOCK_M)
    # batch * stride can pass 2**31 elements for large batches: the per-sequence offsets are int64
    off_b = (seq_head // n_heads).to(tl.int64)
    off_h = (seq_head % n_heads).to(tl.int64)
    _attn_fwd_tile(
        q_ptr + off_b * stride_qb + off_h * stride_qh,
        k_ptr + off_b * stride_kb + off_h * stride_kh,
        v_ptr + off_b * stride_vb + off_h * stride_vh,
        mask_ptr + off_b * stride_mb,
        out_ptr + off_b * stride_ob + off_h * stride_oh,
        lse_ptr + (off_b * n_heads + off_h) * seqlen,
        stride_qs, stride_ks, stride_vs, stride_ms, stride_os,
        seqlen, head_dim, start_m, qk_scale,
        HAS_MASK=HAS_MASK, DOT_PRECISION=DOT_PRECISION, DOT_IN_FP32=DOT_IN_FP32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )


@triton.jit
def _varlen_attention_fwd(
    q_ptr, k_ptr, v_ptr,  # (total_tokens, n_heads, head_dim), any strides, unit last stride
    cu_seqlens_ptr,  # (batch + 1,) int32, leading 0
    out_ptr,  # (total_tokens, n_heads, head_dim) contiguous
    lse_ptr,  # (n_heads, total_tokens) fp32 contiguous
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    n_heads, total_tokens, head_dim, qk_scale,
    max_seqlen,  # the longest sequence: the grid's query tiles per (sequence, head)
    max_seqlen_pow2,  # autotune key only
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= 16)  # tl.dot needs every dimension >= 16
    start_m, seq_head = _tile_of_program(max_seqlen, BLOCK_M)
    seq = seq_head // n_heads
    off_h = (seq_head % n_heads).to(tl.int64)
    seq_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)  # token index * stride can pass 2**31
    seqlen = (tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)).to(tl.int32)
    if start_m * BLOCK_M < seqlen:  # the grid covers max_seqlen; shorter sequences leave tiles idle
        _attn_fwd_tile(
            q_ptr + seq_start * stride_qt + off_h * stride_qh,
            k_ptr + seq_start * stride_kt + off_h * stride_kh,
            v_ptr + seq_start * stride_vt + off_h * stride_vh,
            cu_seqlens_ptr,  # no key_padding_mask: any pointer will do
            out_ptr + seq_start * stride_ot + off_h * stride_oh,
            lse_ptr + off_h * total_tokens + seq_start,
            stride_qt, stride_kt, stride_vt, 0, stride_ot,
            seqlen, head_dim, start_m, qk_scale,
            HAS_MASK=False, DOT_PRECISION=DOT_PRECISION, DOT_IN_FP32=DOT_IN_FP32,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )


def _dot_meta(dtype: torch.dtype) -> dict:
    # fp32 inputs get true fp32 products ("ieee"), not TF32's 10-bit mantissa; fp16/bf16 dots are exact
    # products with fp32 accumulation either way
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_IN_FP32": INTERPRETING and dtype == torch.bfloat16}


def configs(dtype: torch.dtype, block_d: int) -> tuple:
    """The tiles attention may pick for q.dtype `dtype` and head_dim padded to `block_d` (16 ... 256)."""
    return _CONFIGS["fp32" if dtype == torch.float32 else "16-bit", max(block_d, 64)]


# What picks the autotuned tile besides the sequence length and the tensors' dtypes (which Triton adds): all
# that changes what the kernel compiles to. HAS_MASK adds a load per key tile (248 vs 191 registers for one
# tile on sm_80); Triton compiles head_dim's divisibility by 16 into the address arithmetic. Every constexpr
# but the tile's is here (tests/test_triton_compile.py checks).
_KEY = ("BLOCK_D", "head_dim", "DOT_PRECISION", "DOT_IN_FP32")


def _grid(n_rows: int, n_seq_heads: int, what: str):
    """One flat axis of query tiles covering n_rows, for each of n_seq_heads (sequence, head) pairs."""
    return lambda meta: checked_grid((triton.cdiv(n_rows, meta["BLOCK_M"]) * n_seq_heads,), what)


def attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   softmax_scale: float) -> tuple[Optional[LaunchPlan], torch.Tensor, torch.Tensor]:
    """The launch of `attention` (None when there is nothing to compute) and its outputs out, lse."""
    batch, seqlen, n_heads, head_dim = q.shape
    out = torch.empty((batch, seqlen, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seqlen), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return None, out, lse.fill_(float("-inf"))
    has_mask = key_padding_mask is not None
    mask = key_padding_mask.view(torch.uint8) if has_mask else q  # q: a placeholder pointer, never read
    block_d = block_size(head_dim)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, mask_ptr=mask, out_ptr=out, lse_ptr=lse,
        stride_qb=q.stride(0), stride_qs=q.stride(1), stride_qh=q.stride(2),
        stride_kb=k.stride(0), stride_ks=k.stride(1), stride_kh=k.stride(2),
        stride_vb=v.stride(0), stride_vs=v.stride(1), stride_vh=v.stride(2),
        stride_mb=mask.stride(0) if has_mask else 0, stride_ms=mask.stride(1) if has_mask else 0,
        stride_ob=out.stride(0), stride_os=out.stride(1), stride_oh=out.stride(2),
        n_heads=n_heads, seqlen=seqlen, head_dim=head_dim, qk_scale=softmax_scale * LOG2E,
        seqlen_pow2=triton.next_power_of_2(seqlen),
        HAS_MASK=has_mask, **_dot_meta(q.dtype), BLOCK_D=block_d,
    )
    plan = LaunchPlan("attention", _attention_fwd, args, configs(q.dtype, block_d),
                      _KEY + ("seqlen_pow2", "HAS_MASK"), _grid(seqlen, batch * n_heads, "attention"),
                      _INTERPRETER_CONFIG)
    return plan, out, lse


def varlen_attention_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, softmax_scale: float
                          ) -> tuple[Optional[LaunchPlan], torch.Tensor, torch.Tensor]:
    """The launch of `varlen_attention` (None when there is nothing to compute) and its outputs out, lse."""
    total_tokens, n_heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty((total_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total_tokens), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or max_seqlen == 0:
        return None, out, lse.fill_(float("-inf"))
    block_d = block_size(head_dim)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, cu_seqlens_ptr=cu_seqlens, out_ptr=out, lse_ptr=lse,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1),
        stride_ot=out.stride(0), stride_oh=out.stride(1),
        n_heads=n_heads, total_tokens=total_tokens, head_dim=head_dim, qk_scale=softmax_scale * LOG2E,
        max_seqlen=max_seqlen, max_seqlen_pow2=triton.next_power_of_2(max_seqlen),
        **_dot_meta(q.dtype), BLOCK_D=block_d,
    )
    plan = LaunchPlan("varlen_attention", _varlen_attention_fwd, args, configs(q.dtype, block_d),
                      _KEY + ("max_seqlen_pow2",), _grid(max_seqlen, batch * n_heads, "varlen_attention"),
                      _INTERPRETER_CONFIG)
    return plan, out, lse


@triton_op("distilkernels_triton::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (batch, seqlen, n_heads, head_dim), unit last stride; key_padding_mask: (batch, seqlen) bool,
    True = attend, or None. Returns out (batch, seqlen, n_heads, head_dim) contiguous and lse
    (batch, n_heads, seqlen) fp32 (-inf, with out 0, for queries with no key to attend)."""
    plan, out, lse = attention_plan(q, k, v, key_padding_mask, softmax_scale)
    if plan is not None:
        launch(plan)
    return out, lse


@triton_op("distilkernels_triton::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (total_tokens, n_heads, head_dim), unit last stride; cu_seqlens: (batch + 1,) int32 with a
    leading 0; max_seqlen: the longest sequence. Returns out (total_tokens, n_heads, head_dim) contiguous and
    lse (n_heads, total_tokens) fp32."""
    plan, out, lse = varlen_attention_plan(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    if plan is not None:
        launch(plan)
    return out, lse
