"""Facts about the machine this process runs on: the CPU model and the ISA features the kernels care about.

Read once from /proc/cpuinfo (Linux x86 and arm64); elsewhere the model falls back to `platform` and the flag
list is empty. `info`, `demo` and the benchmark harness (bench/) all take their machine facts from here.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# The flags that decide which kernel paths can run: vector width (avx2/avx512f), bf16 dot products
# (avx512_bf16), int8 dot products (avx512_vnni, avx_vnni) and the AMX matrix tiles (amx_*).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; (None, empty) where it cannot be read."""
    model, flags = None, frozenset()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key == "model name":
            model = value.strip()
        elif not flags and key in ("flags", "Features"):
            flags = frozenset(value.split())
    return model, flags


def cpu_model() -> str:
    """e.g. "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


# The x86 flags the C++ extension also asks CPUID for (csrc/ops.cpp cpuid_flags).
CPUID_FLAGS = frozenset(ISA_FLAGS) - {"neon", "asimd", "sve"}


@functools.lru_cache(maxsize=None)
def _cpuid_flags() -> frozenset[str] | None:
    """The CPUID_FLAGS that CPUID reports to this process (the C++ extension asks; none off x86), or None where
    the extension is not loaded."""
    from ._ext import load_extension

    ext = load_extension()
    return None if ext is None else frozenset(ext.cpuid_flags())


def isa_flags() -> list[str]:
    """The subset of ISA_FLAGS this CPU reports, in ISA_FLAGS order: the flags of /proc/cpuinfo (the hardware's),
    less any x86 one that CPUID does not report to this process (hidden by a CPUID shim such as
    tests/cpuid_avx2.c, which libraries like ours, torch and oneDNN then do not use either)."""
    flags, cpuid = _cpuinfo()[1], _cpuid_flags()
    return [f for f in ISA_FLAGS if f in flags and (cpuid is None or f not in CPUID_FLAGS or f in cpuid)]


def matrix_units() -> dict[str, str]:
    """Which hardware serves each reduced precision's dot products: "amx", "avx512_bf16"/"vnni", or "none"
    (bf16 then runs as converted fp32 arithmetic, int8 as plain integer SIMD)."""
    flags = set(isa_flags())
    bf16 = "amx" if {"amx_tile", "amx_bf16"} <= flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    int8 = ("amx" if {"amx_tile", "amx_int8"} <= flags else
            "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "none")
    return {"bf16": bf16, "int8": int8}
