"""Fake (meta) kernels for the C++ ops, so torch.compile and torch.library.opcheck can trace them."""
from __future__ import annotations

import torch


@torch.library.register_fake("distilkernels::linear")
def _linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("distilkernels::pack_linear_weight")
def _pack_linear_weight_fake(weight):
    from distilkernels._C import linear_panel_width

    panel = linear_panel_width()
    return weight.new_empty((-(-weight.shape[0] // panel), weight.shape[1], panel))


@torch.library.register_fake("distilkernels::linear_packed")
def _linear_packed_fake(x, packed_weight, out_features, bias, activation):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("distilkernels::pack_linear_mkl")
def _pack_linear_mkl_fake(weight, rows=128):
    from distilkernels._C import mkl_packed_floats

    return weight.new_empty((mkl_packed_floats(weight.shape[0], weight.shape[1], rows),))


@torch.library.register_fake("distilkernels::linear_mkl")
def _linear_mkl_fake(x, packed_weight, out_features, bias, activation, row_chunk=0):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("distilkernels::add_layer_norm")
def _add_layer_norm_fake(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake("distilkernels::embed_layer_norm")
def _embed_layer_norm_fake(word, input_ids, position, position_ids, token_type, token_type_ids, weight, bias, eps):
    stats = word.new_empty(tuple(input_ids.shape), dtype=torch.float32)
    return word.new_empty((*input_ids.shape, word.shape[1])), stats, torch.empty_like(stats)


@torch.library.register_fake("distilkernels::bias_act_")
def _bias_act_fake(x, bias, activation):
    return None


@torch.library.register_fake("distilkernels::attention")
def _attention_fake(q, k, v, key_padding_mask, softmax_scale):
    batch, seqlen, n_heads, head_dim = q.shape
    out = q.new_empty((batch, seqlen, n_heads, head_dim))
    return out, q.new_empty((batch, n_heads, seqlen), dtype=torch.float32)


@torch.library.register_fake("distilkernels::varlen_attention")
def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    total, n_heads, head_dim = q.shape
    return q.new_empty((total, n_heads, head_dim)), q.new_empty((n_heads, total), dtype=torch.float32)


@torch.library.register_fake("distilkernels::normalize_rows")
def _normalize_rows_fake(x):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


@torch.library.register_fake("distilkernels::scale_rows_")
def _scale_rows_fake(y, scale, bias):
    return None


def _vnni_blocks(weight, group):  # brgemm's VNNI blocks of 64 output columns (csrc/brgemm_utils.h)
    n, k = weight.shape
    return (-(-n // 64), -(-k // group) * group, 64)


@torch.library.register_fake("distilkernels::pack_linear_bf16")
def _pack_linear_bf16_fake(weight, vnni):
    shape = _vnni_blocks(weight, 2) if vnni else (weight.shape[1], weight.shape[0])
    return weight.new_empty(shape, dtype=torch.bfloat16)


@torch.library.register_fake("distilkernels::linear_bf16")
def _linear_bf16_fake(x, packed_weight, out_features, bias, activation):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("distilkernels::linear_bf16_add_layer_norm")
def _linear_bf16_add_layer_norm_fake(x, packed_weight, out_features, bias, residual, weight, ln_bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return x.new_empty((x.shape[0], out_features)), stats, torch.empty_like(stats)


@torch.library.register_fake("distilkernels::pack_linear_bf16x3")
def _pack_linear_bf16x3_fake(weight, vnni):
    n, k = weight.shape
    if vnni:  # in parts of at most 1024 of in_features, each padded to 32 (csrc/linear_bf16.cpp, X3Layout)
        parts = max(1, -(-k // 1024))
        shape = (parts * -(-n // 64), 2 * (-(-(-(-k // parts)) // 32) * 32), 64)
    else:
        shape = (2 * k, n)
    return weight.new_empty(shape, dtype=torch.bfloat16)


@torch.library.register_fake("distilkernels::linear_bf16x3")
def _linear_bf16x3_fake(x, packed_weight, out_features, bias, activation):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("distilkernels::pack_linear_int8")
def _pack_linear_int8_fake(weight, vnni, weight_max=127):
    shape = _vnni_blocks(weight, 4) if vnni else (weight.shape[1], weight.shape[0])
    return weight.new_empty(shape, dtype=torch.int8), weight.new_empty(weight.shape[:1], dtype=torch.float32)


@torch.library.register_fake("distilkernels::linear_int8")
def _linear_int8_fake(x, packed_weight, weight_scale, out_features, bias, activation, out_dtype=None):
    return x.new_empty((x.shape[0], out_features), dtype=out_dtype or x.dtype)
