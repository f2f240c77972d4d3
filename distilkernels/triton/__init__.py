"""Triton kernels of distilkernels (GPU; on CPU tensors under TRITON_INTERPRET=1).

Each op is a `torch.library.triton_op` (torch.ops.distilkernels_triton.*), so torch.compile traces through to
the Triton kernels on a GPU. distilkernels.dispatch lists them under the backend name "triton" and imports a
module when its kernel is first called; this package imports nothing from the rest of distilkernels.

    layer_norm.py  add_layer_norm      residual add + LayerNorm, one row per program
    bias_act.py    bias_act_           in-place bias + exact GELU / ReLU
    attention.py   attention           FlashAttention-style forward, padded batch + key_padding_mask
                   varlen_attention    the same tile loop over packed sequences (cu_seqlens)

GEMMs stay with torch (cuBLAS) on this backend: a Triton GEMM with the bias+activation epilogue fused in would
have to measure faster than cuBLAS plus the epilogue first. Per-token int8 scaling serves the CPU-only int8
mode; on this backend it is torch's too.
"""
from __future__ import annotations

_TRITON_ERROR: str | None = None
try:
    import triton  # noqa: F401
except ImportError as exc:  # optional dependency
    _TRITON_ERROR = f"triton is not installed ({exc})"


def availability_error() -> str | None:
    """Why Triton kernels cannot run here (None when they can)."""
    return _TRITON_ERROR
