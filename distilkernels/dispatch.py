"""The (op, backend) table of distilkernels, and the one place that decides which implementation runs.

    CPU tensors  -> "cpp"    (the C++ extension, torch.ops.distilkernels.*)
    CUDA tensors -> "triton" (Triton kernels, torch.ops.distilkernels_triton.*)
    otherwise    -> "torch"  (plain PyTorch, distilkernels.reference)

`DISTILKERNELS_BACKEND=cpp|triton|torch` (read at import) or `with force_backend(name):` overrides the choice,
for tests and comparisons; `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before triton is imported.

Every op has one row in `_ROWS`: the dtypes its C++ kernel runs, and the module of its Triton kernel (None:
that backend runs the reference, e.g. GEMMs on a GPU stay with cuBLAS). Triton entries are `_Lazy`: importing
triton is slow and optional, so a Triton module is imported when its kernel is first called. Callers that pick
between an op and a different computation ask `has_kernel(op, tensor)`, never a backend's name.

This module imports `reference` and `_ext` only; `ops` and the Triton package import nothing back from here
except through the functions below (tests/ops/test_dispatch.py walks the package for import circles).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable, NamedTuple

import torch

from . import _env, reference
from ._ext import extension_error, load_extension

BACKENDS = _env.SETTINGS["DISTILKERNELS_BACKEND"].options  # ("cpp", "triton", "torch")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FP32 = (torch.float32,)


class _Row(NamedTuple):
    cpp_dtypes: tuple  # dtypes of x (the op's first tensor) that the C++ kernel runs
    triton_module: str | None = None  # distilkernels.triton.<module> holds the kernel; None: the reference runs
    triton_dtypes: tuple = _FLOATS


# One row per op; append a row (and the op's schema in csrc/ops.cpp, its fake kernel in _fake.py, its
# reference in reference.py, its entry point in ops.py) to add one.
_ROWS: dict[str, _Row] = {
    "linear": _Row(_FLOATS),
    "pack_linear_weight": _Row(_FP32),
    "linear_packed": _Row(_FP32),
    "add_layer_norm": _Row(_FLOATS, "layer_norm"),
    "embed_layer_norm": _Row(_FLOATS),  # x: the word table
    "bias_act_": _Row(_FLOATS, "bias_act"),
    "attention": _Row(_FLOATS, "attention"),
    "varlen_attention": _Row(_FLOATS, "attention"),
    "normalize_rows": _Row(_FP32),
    "scale_rows_": _Row(_FP32),
    # GEMMs for the CPU's matrix units (AMX tiles); on a GPU torch's (cuBLAS) run
    "pack_linear_bf16": _Row(_FLOATS),
    "linear_bf16": _Row((torch.bfloat16,)),
    "linear_bf16_add_layer_norm": _Row((torch.bfloat16,)),
    "pack_linear_bf16x3": _Row(_FLOATS),
    "linear_bf16x3": _Row(_FP32),  # fp32 as three bf16 products (torch's "high" float32 matmul precision)
    "pack_linear_int8": _Row(_FP32),
    "linear_int8": _Row((torch.float32, torch.bfloat16)),
}
OPS = tuple(_ROWS)


class _Lazy:
    """A callable that imports `module` and calls its `attr` on first use (for the Triton kernels)."""

    __slots__ = ("module", "attr", "_fn")

    def __init__(self, module: str, attr: str):
        self.module, self.attr, self._fn = module, attr, None

    def resolve(self) -> Callable:
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self.module), self.attr)
        return self._fn

    def __call__(self, *args):
        return self.resolve()(*args)

    def __repr__(self) -> str:
        return f"<lazy {self.module}.{self.attr}>"


class _CppOp(_Lazy):
    """The C++ op torch.ops.distilkernels.<attr>, looked up on first use (after the extension has loaded) and
    kept: `implementation` hands out the op itself, so a call costs no lookup."""

    __slots__ = ()

    def __init__(self, op: str):
        super().__init__("torch.ops.distilkernels", op)

    def resolve(self) -> Callable:
        if self._fn is None:
            self._fn = getattr(torch.ops.distilkernels, self.attr).default
        return self._fn


# (op, backend) -> callable with the op's positional signature (see csrc/ops.cpp for the schemas).
_TABLE: dict[tuple[str, str], Callable] = {}


def register_impl(op: str, backend: str, fn: Callable) -> None:
    _TABLE[(op, backend)] = fn


for _op, _row in _ROWS.items():
    register_impl(_op, "torch", getattr(reference, _op))
    register_impl(_op, "cpp", _CppOp(_op))
    register_impl(_op, "triton", getattr(reference, _op) if _row.triton_module is None
                  else _Lazy(f"distilkernels.triton.{_row.triton_module}", _op))


def implementation(op: str, backend: str) -> Callable:
    """The callable behind (op, backend), resolved (Triton modules imported, C++ ops looked up)."""
    fn = _TABLE[(op, backend)]
    return fn.resolve() if isinstance(fn, _Lazy) else fn


def is_reference(op: str, backend: str) -> bool:
    """Whether (op, backend) runs distilkernels.reference rather than a kernel of ours."""
    return backend == "torch" or (backend == "triton" and _ROWS[op].triton_module is None)


# ----------------------------------------------------------------------------------------------------------
# Choosing the backend


def _env_backend() -> str | None:
    """DISTILKERNELS_BACKEND, any case; a value that is no backend warns and leaves dispatch automatic."""
    return _env.read("DISTILKERNELS_BACKEND")


_forced: str | None = _env_backend()


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run every op on backend `name` ("cpp", "triton", "torch"; None = automatic) inside the block."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def triton_error() -> str | None:
    """Why the Triton backend is unavailable (None when it can run)."""
    from .triton import availability_error  # local: importing triton is slow and optional

    return availability_error()


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got a {device.type} tensor"
        err = extension_error()
        return None if err is None else f"the C++ extension did not load ({err})"
    err = triton_error()
    if err is not None:
        return err
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    return None


def backend_for(device: torch.device) -> str:
    """The backend that ops run on for tensors on `device`."""
    if _forced is not None:
        return _forced
    if device.type == "cuda":
        return "triton" if triton_error() is None else "torch"
    if device.type == "cpu":
        return "cpp" if load_extension() is not None else "torch"
    return "torch"


def lookup(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for tensors on `device`; a forced backend that cannot run here raises."""
    backend = backend_for(device)
    if _forced is not None:
        why = backend_unavailable_reason(backend, device)
        if why is not None:
            raise RuntimeError(f"distilkernels: backend {backend!r} was forced but cannot run: {why}")
    return _TABLE[(op, backend)]


def has_kernel(op: str, x: torch.Tensor) -> bool:
    """Whether a kernel of ours (not the reference) runs `op` for a first argument like `x` (its device and
    dtype), on the backend chosen for x's device."""
    device = x.device
    if _forced in (None, "cpp") and device.type == "cpu":  # the common case first: it runs before every GEMM
        return load_extension() is not None and x.dtype in _ROWS[op].cpp_dtypes
    backend = backend_for(device)
    if is_reference(op, backend) or backend_unavailable_reason(backend, device) is not None:
        return False
    return x.dtype in (_ROWS[op].cpp_dtypes if backend == "cpp" else _ROWS[op].triton_dtypes)


available = has_kernel  # reads better at call sites: dispatch.available("linear_packed", x)
