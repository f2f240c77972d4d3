"""`attn_implementation="distilkernels"`: HF's attention switch, routed to our fused attention kernel.

Importing distilkernels registers, under one name, both
  - an attention function (AttentionInterface): our fused attention kernel, and
  - a mask function (AttentionMaskInterface): the 2-D (batch, seqlen) bool key-padding mask, None when nothing
    is padded. Without a mask function of the same name HF would hand the attention None for padded
    batches and padded rows would come out wrong, silently.
"""
from __future__ import annotations

import torch

from . import ops
from .hf import ATTENTION_WEIGHTS, NAME, eager_attention, exporting
from .modules import decide  # the one place that decides fused vs stock


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function. query: (batch, n_heads, q_len, head_dim), key/value (batch, n_heads,
    kv_len, head_dim) views. Returns (out (batch, q_len, n_heads, head_dim), weights or None)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    decision = decide("attention", module, query, attention_mask, kv_len=key.shape[2], attn_dropout=dropout)
    if decision.path == "fused":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seqlen, n_heads, head_dim) views
        return ops.attention(q, k, v, key_padding_mask=decision.mask, softmax_scale=scaling), None
    if decision.reason == ATTENTION_WEIGHTS:
        return eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:  # our mask function's key-padding mask
        attention_mask = attention_mask[:, None, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=bool(getattr(module, "is_causal", False)))


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
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
        # not one row per batch row (a single row, extra rows, a 1-D or 3-D mask): the mask sdpa builds from it,
        # or sdpa's error. The attention then runs HF's sdpa code wherever that is no (batch, kv_len) key-padding mask
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            **kwargs)
    attention_mask = attention_mask[:, -kv_length:].bool()
    # (a compiled or exported graph keeps the mask: the kernels take an all-True mask; no data-dependent branch)
    if (attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() and not exporting()
            and bool(attention_mask.all())):
        return None
    return attention_mask


def register() -> None:
    """Register `attn_implementation="distilkernels"` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
