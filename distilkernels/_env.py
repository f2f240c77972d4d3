"""The library's environment variables: their names, what each takes, and one way to read a switch.

A switch is on for "1", "on", "true", "yes" and off for "0", "off", "false", "no", in any case; unset or empty
keeps its default. Any other value warns once, naming the variable and what it takes, and keeps the default: a
misspelt setting is never silently taken for another. csrc/env.h reads the C++ side's variables the same way.
At import, a DISTILKERNELS_* name that is none of these (a typo) warns once as well.
"""
from __future__ import annotations

import os
import warnings

# name -> what it takes (for the warnings); who reads it in brackets
VARIABLES = {
    "DISTILKERNELS_BACKEND": "cpp|triton|torch (dispatch: forces the backend of every op)",
    "DISTILKERNELS_ISA": "avx512|avx2|scalar (C++: caps the vector instruction set, read once)",
    "DISTILKERNELS_AMX": "a switch (C++: our AMX tile loops, read on every call)",
    "DISTILKERNELS_MATRIX_UNITS": "a switch (gemms: bf16/int8 weights packed for the matrix unit)",
    "DISTILKERNELS_CPU_CACHE_MB": "a non-negative integer (C++: the CPU ops' output cache, MiB)",
    "DISTILKERNELS_CHECK_CU_SEQLENS": "a switch (checks: cu_seqlens' values on a GPU, a device-to-host copy)",
}
BENCH_PREFIX = "DISTILKERNELS_BENCH_"  # read by the repository's bench/ suite, not by the package

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def switch(name: str, default: bool) -> bool:
    """The switch `name` (one of VARIABLES): `default` when unset, empty or misspelt (the last with a warning)."""
    raw = os.environ.get(name, "")
    value = raw.lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        _warn_once(f"{name}={raw}", f"{name} must be one of {'/'.join(_ON)} or {'/'.join(_OFF)}, got {raw!r}; "
                   f"using {'on' if default else 'off'}")
    return default


def check_names() -> None:
    """Warns about each DISTILKERNELS_* variable in the environment that the package does not read."""
    for name in sorted(os.environ):
        if name.startswith("DISTILKERNELS_") and name not in VARIABLES and not name.startswith(BENCH_PREFIX):
            _warn_once(name, f"{name} is not a distilkernels setting (it has no effect); the settings are "
                       + ", ".join(VARIABLES))
