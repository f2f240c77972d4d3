"""Triton kernels of distilkernels (GPU; on CPU tensors under TRITON_INTERPRET=1).

Importing this package registers its implementations in the dispatch table of `distilkernels.ops`
under the backend name "triton".
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
