"""The one count of work per op and per forward: FLOPs of the matrix products, bytes an op must move.

Only useful work counts: real (non-padding) tokens, and in attention real queries against the real keys of
their own sequence. A provider that computes padding does more arithmetic than this, and its rate here is
lower for it: the rates say how fast the user's question was answered. Elementwise work (softmax, LayerNorm,
GELU) is left out of FLOPs: it is < 1% of a distilbert-base forward's arithmetic.
"""
from __future__ import annotations

from collections.abc import Sequence


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """x (tokens, in) @ W.T (in, out): one multiply and one add per weight per token."""
    return 2 * tokens * in_features * out_features


def attention_flops(lengths: Sequence[int], n_heads: int, head_dim: int) -> int:
    """QK^T and PV of every sequence on its own real tokens: 2 * L * L * head_dim each, per head."""
    return 4 * n_heads * head_dim * sum(n * n for n in lengths)


def attention_bytes(tokens: int, n_heads: int, head_dim: int, element_size: int) -> int:
    """Read q, k, v and write the output once for every real token."""
    return 4 * tokens * n_heads * head_dim * element_size


def add_layer_norm_bytes(tokens: int, dim: int, element_size: int) -> int:
    """Read x and the residual, write the output; the weight and bias once."""
    return (3 * tokens * dim + 2 * dim) * element_size


def bias_act_bytes(tokens: int, hidden_dim: int, element_size: int) -> int:
    """In place: read and write h once; the bias once."""
    return (2 * tokens * hidden_dim + hidden_dim) * element_size


def forward_flops(summary: dict, lengths: Sequence[int]) -> int:
    """An encoder forward (model_summary's sizes) on sequences of these real lengths: per layer, the q/k/v and
    output projections (4 dim x dim GEMMs), the two FFN GEMMs (dim x hidden_dim) and attention."""
    tokens, dim, hidden_dim = sum(lengths), summary["dim"], summary["hidden_dim"]
    per_layer = (4 * linear_flops(tokens, dim, dim) + 2 * linear_flops(tokens, dim, hidden_dim)
                 + attention_flops(lengths, summary["n_heads"], dim // summary["n_heads"]))
    return summary["n_layers"] * per_layer
