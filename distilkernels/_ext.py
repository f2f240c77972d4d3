"""Loading the C++ extension, and why it did not load when it did not."""
from __future__ import annotations

import importlib

_C = None
_C_ERROR: str | None = None


def load_extension():
    """The compiled `distilkernels._C` module (its ops live under torch.ops.distilkernels), or None."""
    global _C, _C_ERROR
    if _C is None and _C_ERROR is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            _C = importlib.import_module("distilkernels._C")
            from . import _fake  # noqa: F401  (fake kernels for the ops the extension defined)
        except ImportError as exc:  # not built, or built against another torch
            _C_ERROR = f"{type(exc).__name__}: {exc}"
    return _C


def extension_error() -> str | None:
    """Why the C++ extension is unavailable (None when it loaded)."""
    load_extension()
    return _C_ERROR
