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


def int8_weight_max(vnni: bool) -> int:
    """The int8 weight grid's largest level for pack_linear_int8 on this CPU: 127, except for the plain layout
    (vnni=False) where torch's int8 GEMM is exact only on weights within [-63, 63] (no VNNI: oneDNN sums pairs of
    u8 x s8 products in 16 bits; csrc/linear_int8.cpp int_mm_weight_max). There the 7-bit grid keeps that GEMM,
    ~1.6x the fp32 GEMM's rate, where the full grid would need an fp32 GEMM of the int8 values. Where torch's
    int8 GEMM is slower than fp32 (a plain loop on a CPU without VNNI) the product is an fp32 GEMM anyway: 127."""
    return 63 if not vnni and _int_mm_weight_max() == 63 else 127


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
def _int_mm_weight_max() -> int:
    C = load_extension()
    return 127 if C is None else C.int_mm_weight_max()
