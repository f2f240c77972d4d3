"""Loading the C++ extension, and why it did not load when it did not."""
from __future__ import annotations

import functools
import importlib

import torch

_C = None
_C_ERROR: str | None = None


def load_extension():
    """The compiled `distilkernels._C` module (its ops live under torch.ops.distilkernels), or None."""
    global _C, _C_ERROR
    if _C is None and _C_ERROR is None:
        try:
            _C = importlib.import_module("distilkernels._C")
            from . import _fake  # noqa: F401  (fake kernels for the ops the extension defined)
        except ImportError as exc:  # not built, or built against another torch
            _C_ERROR = f"{type(exc).__name__}: {exc}"
    return _C


def extension_error() -> str | None:
    """Why the C++ extension is unavailable (None when it loaded)."""
    load_extension()
    return _C_ERROR


def cpu_fact(fn):
    """`fn` (of hashable arguments) computed once per process: a fact of this CPU and build. torch.compile takes
    its result as a constant (assume_constant_result) instead of tracing into the extension, a graph break."""
    once = functools.lru_cache(maxsize=None)(fn)

    @torch.compiler.assume_constant_result
    def fact(*args):
        return once(*args)

    fact.__name__, fact.__doc__ = fn.__name__, fn.__doc__
    return fact


@cpu_fact
def int8_vector_gemm() -> str:
    """How distilkernels.quantize's int8 product runs without the matrix unit (csrc/linear_int8.cpp), measured once
    per process: "int_mm" (torch's int8 GEMM on W^T, exact here and faster than ours), or ours on VNNI blocks:
    "dots" (AVX512-VNNI dot products) or "madd" (int16 multiply-adds); "" without the extension."""
    C = load_extension()
    return "" if C is None else C.int8_vector_gemm()
