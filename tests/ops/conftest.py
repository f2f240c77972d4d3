"""Fixtures of the per-op tests: the backend an op runs on, and the device its Triton kernels run on.

Each op file tests one op on every backend: "cpp" (the C++ extension, on the instruction set this process
dispatches to: the test id says which, e.g. cpp-avx512; test_cpu_isa.py reruns the cpp cases under each
lower instruction set the CPU has), "triton" (on CPU tensors under Triton's interpreter, or on a GPU) and
"torch" (distilkernels.reference).
"""
from __future__ import annotations

import os

import pytest
import torch

from distilkernels import ops
from helpers import cpu_isa

CPP_ID = f"cpp-{cpu_isa()}"


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from distilkernels.triton import attention

    return isinstance(attention._attention_fwd, InterpretedFunction)


def _triton_library_interpreted() -> bool:
    import triton
    from triton.runtime.jit import JITFunction

    # triton's own @jit functions (tl.sum, tl.max, ...) are decorated when triton is imported
    return not isinstance(triton.language.sum, JITFunction)


def triton_skip_reason(device_type: str) -> str | None:
    why = ops.triton_error()
    if why is not None:
        return why
    if device_type == "cpu" and not _interpreted():
        return ("distilkernels.triton was imported before TRITON_INTERPRET=1 was set: its kernels are compiled, "
                "not interpreted; set TRITON_INTERPRET=1 in the environment")
    if device_type == "cpu" and not _triton_library_interpreted():
        return ("triton was imported before TRITON_INTERPRET=1 was set: tl.sum & co. are compiled functions the "
                "interpreter cannot call; set TRITON_INTERPRET=1 in the environment")
    if device_type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to run the compiled kernels on the GPU"
    return None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)])
def device(request):
    """The device the Triton kernels run on: CPU tensors under the interpreter, or a GPU."""
    why = triton_skip_reason(request.param)
    if why is not None:
        pytest.skip(why)
    return torch.device(request.param)


@pytest.fixture(params=[pytest.param("cpp", id=CPP_ID, marks=pytest.mark.requires_ext), "triton", "torch"])
def backend(request):
    """Every backend, on CPU tensors (Triton under its interpreter)."""
    if request.param == "triton":
        why = triton_skip_reason("cpu")
        if why is not None:
            pytest.skip(why)
    return request.param
