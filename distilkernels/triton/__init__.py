"""Triton kernels of distilkernels (GPU; on CPU tensors under TRITON_INTERPRET=1).

Importing this package registers its implementations in the dispatch table of `distilkernels.ops`
under the backend name "triton". Each op is a `torch.library.triton_op` (torch.ops.distilkernels_triton.*),
so torch.compile traces through to the Triton kernels on a GPU.

    layer_norm.py  add_layer_norm      residual add + LayerNorm, one row per program
    bias_act.py    bias_act_           in-place bias + exact GELU / ReLU
    attention.py   attention           FlashAttention-style forward, padded batch + key_padding_mask
                   varlen_attention    the same tile loop over packed sequences (cu_seqlens)
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


if _TRITON_ERROR is None:
    from .. import ops as _ops, reference as _reference
    from . import attention, bias_act, layer_norm

    # GEMMs stay with torch (cuBLAS); a Triton GEMM with the bias+activation epilogue fused in would have to
    # measure faster than cuBLAS plus the epilogue first.
    for _name in ("linear", "pack_linear_weight", "linear_packed"):
        _ops.register_impl(_name, "triton", getattr(_reference, _name))
    # Per-token int8 scaling serves the CPU-only int8 mode; on this backend it is torch's.
    for _name in ("normalize_rows", "scale_rows_"):
        _ops.register_impl(_name, "triton", getattr(_reference, _name))

    for _name, _module in (("add_layer_norm", layer_norm), ("bias_act_", bias_act),
                           ("attention", attention), ("varlen_attention", attention)):
        _ops.register_impl(_name, "triton", getattr(_module, _name))
