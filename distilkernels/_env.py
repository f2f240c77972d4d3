"""The library's environment variables: their names, what each takes, and one way to read them.

A switch is on for "1", "on", "true", "yes" and off for "0", "off", "false", "no", in any case; a choice is one
of a few names, in any case; unset or empty keeps the default. Any other value warns once (a RuntimeWarning
naming the variable and what it takes) and keeps the default: a misspelt setting is never silently taken for
another. csrc/env.h reads the C++ side's variables the same way. `check_environment()`, run at import, checks
every DISTILKERNELS_* variable set then, the C++ side's included (and tells the extension, which would
otherwise repeat the warning on stderr only at first use); a value set later is checked where it is read.
"""
from __future__ import annotations

import os
import warnings

from typing import NamedTuple

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")
CACHE_MB_LIMIT = 2 ** 43  # MiB: the byte count must fit in int64 (csrc/cpu_cache.cpp)


class Setting(NamedTuple):
    kind: str  # "switch" (default: bool), "choice" (options; default None: unset) or "mib" (default None)
    default: object = None
    options: tuple = ()
    cpp: bool = False  # read by the C++ side (csrc/env.h), which is told what was reported here

    def takes(self) -> str:
        """What the setting takes, for the warnings."""
        if self.kind == "switch":
            return f"one of {'/'.join(_ON)} or {'/'.join(_OFF)}"
        if self.kind == "choice":
            return "one of " + "|".join(self.options)
        return "a non-negative integer (MiB) below 2**43"


SETTINGS = {
    "DISTILKERNELS_BACKEND": Setting("choice", options=("cpp", "triton", "torch")),  # dispatch: every op's backend
    "DISTILKERNELS_ISA": Setting("choice", options=("avx512", "avx2", "scalar"), cpp=True),  # the vector ISA's cap
    "DISTILKERNELS_AMX": Setting("switch", True, cpp=True),  # our AMX tile loops, read on every call
    "DISTILKERNELS_BF16_DOTS": Setting("switch", True, cpp=True),  # bf16 attention on AVX512-BF16, every call
    "DISTILKERNELS_INT8_DOTS": Setting("switch", True, cpp=True),  # int8 VNNI blocks on AVX512-VNNI, every call
    # gemms: bf16/int8 weights packed for AMX; linear_int8's VNNI blocks on the tiles (C++, every call)
    "DISTILKERNELS_MATRIX_UNITS": Setting("switch", True, cpp=True),
    "DISTILKERNELS_CPU_CACHE_MB": Setting("mib", cpp=True),  # the CPU ops' output cache, read once
    "DISTILKERNELS_CHECK_CU_SEQLENS": Setting("switch", False),  # checks: cu_seqlens' values on a GPU
}
BENCH_PREFIX = "DISTILKERNELS_BENCH_"  # read by the repository's bench/ suite, not by the package

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> bool:
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return True


def read(name: str):
    """The setting `name` (one of SETTINGS): a switch's bool, a choice lower-cased, a MiB count as given; its
    default where unset, empty or none of what it takes (the last with a warning)."""
    setting = SETTINGS[name]
    raw = os.environ.get(name, "")
    value = raw.lower()
    if setting.kind == "switch" and value in _ON + _OFF:
        return value in _ON
    if setting.kind == "choice" and value in setting.options:
        return value
    if setting.kind == "mib" and raw.isascii() and raw.isdigit() and int(raw) < CACHE_MB_LIMIT:
        return int(raw)
    if raw:
        kept = ("on" if setting.default else "off") if setting.kind == "switch" else "the default"
        if _warn_once(f"{name}={raw}", f"{name} must be {setting.takes()}, got {raw!r}; using {kept}") and setting.cpp:
            from ._ext import load_extension  # the C++ reader would say it again, on stderr, at first use

            ext = load_extension()
            if ext is not None:
                ext.env_reported(name, raw)
    return setting.default


def check_environment() -> None:
    """Warns about each DISTILKERNELS_* variable set now that the package does not read, or whose value is none
    of what it takes."""
    for name in sorted(os.environ):
        if not name.startswith("DISTILKERNELS_") or name.startswith(BENCH_PREFIX):
            continue
        if name in SETTINGS:
            read(name)
        else:
            _warn_once(name, f"{name} is not a distilkernels setting (it has no effect); the settings are "
                       + ", ".join(SETTINGS))
