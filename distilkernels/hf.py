"""Hugging Face integration: `attn_implementation="distilkernels"`.

Importing distilkernels registers, under one name, both
  - an attention function (AttentionInterface): our fused attention kernel, and
  - a mask function (AttentionMaskInterface): the 2-D (batch, seqlen) bool key-padding mask, None when nothing
    is padded. Without a mask function of the same name HF would hand the attention None for padded
    batches and padded rows would come out wrong, silently.

The attention function falls back to HF's eager math (same semantics, autograd-capable) whenever the fused
kernel does not apply: gradients needed, attention dropout, attention weights requested, or a mask in
another format (a prepared 4-D mask).
"""
from __future__ import annotations

import torch

from . import ops

NAME = "distilkernels"

try:  # the ContextVar HF's output capturing sets while output_hidden_states / output_attentions is requested
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions: assume capture may be active
    _active_collector = None


def capturing(kind: str) -> bool:
    """True when HF is collecting `kind` ("hidden_states" or "attentions") in the current forward."""
    if torch.compiler.is_compiling():
        return False  # capture hooks are installed eagerly; a compiled graph never records them
    if _active_collector is None:
        return True
    collected = _active_collector.get()
    return bool(collected) and kind in collected


def key_padding_mask_of(attention_mask, batch: int, seqlen: int):
    """Our mask format, or NotImplemented when `attention_mask` is in another one (e.g. a 4-D mask)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool and tuple(attention_mask.shape) == (batch, seqlen):
        return attention_mask
    return NotImplemented


def eager_attention(query, key, value, key_padding_mask, scaling, dropout=0.0, training=False):
    """HF's eager attention on (batch, n_heads, seqlen, head_dim) inputs with a 2-D bool mask.
    Returns (out (batch, seqlen, n_heads, head_dim), weights (batch, n_heads, seqlen, seqlen))."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if key_padding_mask is not None:
        additive = torch.zeros(key_padding_mask.shape, dtype=scores.dtype, device=scores.device)
        additive.masked_fill_(~key_padding_mask, torch.finfo(scores.dtype).min)
        scores = scores + additive[:, None, None, :]
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query/key/value: (batch, n_heads, seqlen, head_dim) views.
    Returns (out (batch, seqlen, n_heads, head_dim), weights or None)."""
    batch, _, seqlen, head_dim = query.shape
    scaling = head_dim**-0.5 if scaling is None else scaling
    mask = key_padding_mask_of(attention_mask, batch, seqlen)
    causal = bool(getattr(module, "is_causal", False))
    if mask is NotImplemented or causal:  # a prepared 4-D mask, or a decoder: torch handles it
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=None if mask is None else attention_mask,
            dropout_p=dropout if module.training else 0.0, scale=scaling,
            is_causal=causal and attention_mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if needs_grad or dropout > 0.0 or capturing("attentions"):
        return eager_attention(query, key, value, mask, scaling, dropout, module.training)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, n_heads, head_dim) views
    return ops.attention(q, k, v, key_padding_mask=mask, softmax_scale=scaling), None


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """AttentionMaskInterface function: the (batch, kv_length) bool key-padding mask, or None if no padding.
    Any mask pattern other than plain bidirectional (causal, sliding windows) gets the sdpa mask instead."""
    from transformers import masking_utils as mu

    if mask_function is not None and mask_function is not mu.bidirectional_mask_function:
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            **kwargs)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    # (a compiled graph keeps the mask: the kernels take an all-True mask, and no data-dependent branch)
    if attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register `attn_implementation="distilkernels"` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
