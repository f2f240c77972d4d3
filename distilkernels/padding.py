"""Padding removal: gather the real tokens once, compute on them only, scatter back once.

Vocabulary as in FlashAttention: `indices` of the kept tokens in the flattened (batch * seqlen) layout,
`cu_seqlens` (batch + 1,) int32 with a leading 0, `max_seqlen`. A "sequence" is the set of real tokens of
one row, whatever the 0/1 pattern of its mask (holes and left padding too): position embeddings are added
before unpadding, so packing the kept tokens of a row together preserves what each one attends to.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Unpadded(NamedTuple):
    indices: torch.Tensor  # (total_tokens,) int64, into the flattened (batch * seqlen) layout
    cu_seqlens: torch.Tensor  # (batch + 1,) int32, leading 0
    max_seqlen: int
    batch: int
    seqlen: int


def unpad_info(key_padding_mask: torch.Tensor) -> Unpadded:
    """key_padding_mask: (batch, seqlen) bool, True = real token."""
    batch, seqlen = key_padding_mask.shape
    seqlens = key_padding_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(key_padding_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return Unpadded(indices, cu_seqlens, int(seqlens.max()), batch, seqlen)


def unpad(hidden_states: torch.Tensor, info: Unpadded) -> torch.Tensor:
    """(batch, seqlen, ...) -> (total_tokens, ...)"""
    return hidden_states.reshape(info.batch * info.seqlen, *hidden_states.shape[2:]).index_select(0, info.indices)


def pad(tokens: torch.Tensor, info: Unpadded) -> torch.Tensor:
    """(total_tokens, ...) -> (batch, seqlen, ...), zeros at the padded positions."""
    out = tokens.new_zeros((info.batch * info.seqlen, *tokens.shape[1:]))
    out.index_copy_(0, info.indices, tokens)
    return out.view(info.batch, info.seqlen, *tokens.shape[1:])
