"""Shared fixtures: the Triton interpreter switch, skip markers, DistilBERT configs, and a spy that proves which
kernels ran. Model, mask and input helpers for every family live in helpers.py (re-exported here)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers

import distilkernels
from distilkernels import dispatch, ops  # noqa: F401
from distilkernels._ext import load_extension
from distilkernels.families import by_name

from helpers import holey_mask, make_model, model_inputs  # noqa: F401  (shared with the test files)


def _machine_lines() -> list[str]:
    """The CPU and the instruction set the C++ kernels run here (the ISA subprocess tests cover the lower ones)."""
    from distilkernels import machine

    ext = load_extension()
    isa = ext.vector_isa() if ext is not None else f"none (C++ extension not loaded: {distilkernels._ext.extension_error()})"
    return [f"distilkernels: cpu {machine.cpu_model()}; flags {' '.join(machine.isa_flags()) or 'none'}",
            f"distilkernels: C++ kernels dispatch to {isa}; tests/ops/test_cpu_isa.py reruns them under the lower ISAs"]


def pytest_report_header(config):
    return _machine_lines()


def pytest_terminal_summary(terminalreporter):
    """Also at the end: `pytest -q` (the README's test command, what CI runs) prints no header."""
    for line in _machine_lines():
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    skip_ext = pytest.mark.skip(reason=f"C++ extension not loaded: {distilkernels._ext.extension_error()}")
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "requires_ext" in item.keywords and load_extension() is None:
            item.add_marker(skip_ext)
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def tiny_config(**overrides) -> transformers.DistilBertConfig:
    """The DistilBERT row's tiny config (odd sizes), with DistilBertConfig attributes overridden."""
    config = by_name("distilbert").test.tiny()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def base_config(**overrides) -> transformers.DistilBertConfig:
    """distilbert-base-uncased's shape: dim 768, 12 heads, hidden_dim 3072, 6 layers."""
    return transformers.DistilBertConfig(**overrides)


@pytest.fixture
def fp32_matmul_precision():
    """torch.set_float32_matmul_precision for one test; the previous setting is put back after it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def op_spy(monkeypatch):
    """Counts calls per (op, backend) through the dispatch table (Triton entries stay lazy: the wrapper calls
    the table's entry, which imports its module on first use)."""
    calls: dict[tuple[str, str], int] = {}
    for key, fn in list(dispatch._TABLE.items()):
        def wrapped(*args, _key=key, _fn=fn):
            calls[_key] = calls.get(_key, 0) + 1
            return _fn(*args)
        monkeypatch.setitem(dispatch._TABLE, key, wrapped)
    return calls
