"""Plain PyTorch implementations of every op: the `torch` backend, and the reference the kernels are
tested against. They favour clarity over speed (fp32 math, explicit masks; fp64 math on fp64 inputs, which
only the tests' fp64 references pass)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 tensors, fp64 for fp64 ones (the tests' fp64 references must not round to fp32)."""
    return torch.promote_types(x.dtype, torch.float32)


def linear(x, weight, bias):
    """x @ weight.T + bias."""
    return F.linear(x, weight, bias)


def pack_linear_weight(weight, panel: int = 16):
    """(out_features, in_features) -> (n_panels, in_features, panel): packed[p, k, j] = weight[p * panel + j, k],
    zero past out_features."""
    n, k = weight.shape
    n_panels = -(-n // panel)
    padded = weight.new_zeros((n_panels * panel, k))
    padded[:n] = weight
    return padded.view(n_panels, panel, k).transpose(1, 2).contiguous()


def activate(y, activation):
    """activation(y) for "gelu" (exact erf), "relu" or "none"."""
    return F.gelu(y) if activation == "gelu" else torch.relu(y) if activation == "relu" else y


def linear_packed(x, packed_weight, out_features, bias, activation):
    """activation(x @ weight.T + bias) with weight unpacked from pack_linear_weight's layout."""
    n_panels, k, panel = packed_weight.shape
    weight = packed_weight.transpose(1, 2).reshape(n_panels * panel, k)[:out_features]
    return activate(F.linear(x, weight, bias), activation)


def add_layer_norm(x, residual, weight, bias, eps):
    """(x + residual) -> LayerNorm over the last dim, statistics in fp32 (fp64 for fp64 inputs). Returns (out,
    mean, rstd)."""
    acc = _math_dtype(x)
    h = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    mean = h.mean(dim=-1)
    var = h.var(dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    out = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc) + bias.to(acc)
    return out.to(x.dtype), mean, rstd


def embed_layer_norm(word, input_ids, position, position_ids, token_type, token_type_ids, weight, bias, eps):
    """LayerNorm(word[input_ids] (+ token_type[token_type_ids]) + position[position_ids]): the sum of word and
    token type rounded to the tables' dtype (as HF sums them), the rest in fp32 (fp64 for fp64 tables). Returns
    (out (batch, seqlen, dim), mean, rstd)."""
    x = F.embedding(input_ids, word)
    if token_type is not None:
        x = x + F.embedding(token_type_ids, token_type)
    return add_layer_norm(x, F.embedding(position_ids, position), weight, bias, eps)


def bias_act_(x, bias, activation):
    """In place: x = activation(x + bias)."""
    acc = _math_dtype(x)
    y = x.to(acc) + bias.to(acc)
    x.copy_(activate(y, activation))


def attention(q, k, v, key_padding_mask, softmax_scale):
    """q, k, v: (batch, seqlen, n_heads, head_dim); key_padding_mask: (batch, seqlen) bool or None.
    Returns out (batch, seqlen, n_heads, head_dim) and lse (batch, n_heads, seqlen), fp32 math (fp64 for fp64
    inputs: the tests' fp64 references)."""
    acc = _math_dtype(q)
    qf, kf, vf = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # (batch, n_heads, seqlen, head_dim)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no key is attended
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.matmul(probs, vf).transpose(1, 2).contiguous()
    return out.to(q.dtype), lse


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """q, k, v: (total_tokens, n_heads, head_dim); cu_seqlens: (batch + 1,) int32.
    Returns out (total_tokens, n_heads, head_dim) and lse (n_heads, total_tokens)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_math_dtype(q), device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            o, l = attention(q[None, start:end], k[None, start:end], v[None, start:end], None, softmax_scale)
            out[start:end] = o[0]
            lse[:, start:end] = l[0]
    return out, lse


def normalize_rows(x):
    """x (rows, cols) -> (x / scale[:, None], scale), scale = max(max |x[r]|, 1e-12) per row."""
    scale = x.abs().amax(dim=1).clamp_min(1e-12) if x.shape[1] else x.new_full((x.shape[0],), 1e-12)
    return x * (1.0 / scale)[:, None], scale


def scale_rows_(y, scale, bias):
    """In place: y = y * scale[:, None] + bias (bias may be None)."""
    y.mul_(scale[:, None])
    if bias is not None:
        y.add_(bias)


def pack_linear_bf16(weight, vnni):
    """weight (out_features, in_features) -> weight^T (in_features, out_features) bf16. The VNNI layout of the
    matrix units (vnni=True) exists in the C++ backend only."""
    if vnni:
        raise ValueError("vnni=True (the matrix unit's layout) needs the C++ backend; use vnni=False")
    return weight.to(torch.bfloat16).t().contiguous()


def linear_bf16(x, packed_weight, out_features, bias, activation):
    """bf16(activation(x @ weight^T + bias)) in fp32 math, from pack_linear_bf16(weight, vnni=False)."""
    if packed_weight.dim() != 2:
        raise ValueError("packed_weight in the VNNI layout needs the C++ backend")
    y = x.float() @ packed_weight.float()
    return activate(y if bias is None else y + bias.float(), activation).to(torch.bfloat16)


def linear_bf16_add_layer_norm(x, packed_weight, out_features, bias, residual, weight, ln_bias, eps):
    """add_layer_norm(linear_bf16(...), residual): the GEMM's output rounded to bf16 first."""
    return add_layer_norm(linear_bf16(x, packed_weight, out_features, bias, "none"), residual, weight, ln_bias, eps)


def split_bf16x3(x):
    """fp32 x -> (hi, lo) bf16: hi = bf16(x), lo = bf16(x - hi), 0 where x - hi is not finite."""
    hi = x.float().to(torch.bfloat16)
    d = x.float() - hi.float()
    return hi, torch.where(d.isfinite(), d, torch.zeros_like(d)).to(torch.bfloat16)


def pack_linear_bf16x3(weight, vnni):
    """weight (out_features, in_features) -> (lo | hi)^T (2 * in_features, out_features) bf16. The VNNI layout
    (vnni=True) exists in the C++ backend only."""
    if vnni:
        raise ValueError("vnni=True (the matrix unit's layout) needs the C++ backend; use vnni=False")
    hi, lo = split_bf16x3(weight)
    return torch.cat([lo, hi], 1).t().contiguous()


def linear_bf16x3(x, packed_weight, out_features, bias, activation):
    """activation(x_hi w_lo + x_lo w_hi + x_hi w_hi + bias) in fp32 math (each product exact), from
    pack_linear_bf16x3(weight, vnni=False)."""
    if packed_weight.dim() != 2:
        raise ValueError("packed_weight in the VNNI layout needs the C++ backend")
    hi, lo = split_bf16x3(x)
    w = packed_weight.float()  # (w_lo | w_hi)^T
    y = torch.cat([hi, lo], 1).float() @ w + hi.float() @ w[x.shape[1]:]
    return activate(y if bias is None else y + bias.float(), activation)


def pack_linear_int8(weight, vnni, weight_max=127):
    """weight (out_features, in_features) -> (int8 weight^T (in_features, out_features), scale (out_features,)):
    symmetric per output channel, scale = max(max|w[n]| / weight_max, 1e-12)."""
    if vnni:
        raise ValueError("vnni=True (the VNNI-block layout) needs the C++ backend; use vnni=False")
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / weight_max).clamp_min(1e-12)
    return torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous(), scale


def quantize_rows(x):
    """Per-token symmetric int8: x (rows, cols) fp32 -> (q int8, scale (rows,)), q = round(x * (1 / scale))."""
    scale = (x.abs().amax(dim=1) / 127 if x.shape[1] else x.new_zeros(x.shape[:1])).clamp_min(1e-12)
    return torch.round(x * (1.0 / scale)[:, None]).to(torch.int8), scale


def linear_int8(x, packed_weight, weight_scale, out_features, bias, activation, out_dtype=None):
    """activation(q(x) @ q(W)^T * x_scale * w_scale + bias), from pack_linear_int8(weight, vnni=False); the
    integer product in fp64 (exact); x fp32 or bf16 (quantized from its exact fp32 value), the result rounded
    once to out_dtype (None: x's dtype)."""
    if packed_weight.dim() != 2:
        raise ValueError("packed_weight in the VNNI layout needs the C++ backend")
    q, x_scale = quantize_rows(x.float())
    y = (q.double() @ packed_weight.double()).float() * (x_scale[:, None] * weight_scale)
    return activate(y if bias is None else y + bias, activation).to(out_dtype or x.dtype)
