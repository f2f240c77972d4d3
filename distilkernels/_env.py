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

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")
SWITCH = "1/on/true/yes or 0/off/false/no"
CACHE_MB_LIMIT = 2 ** 43  # MiB: the byte count must fit in int64 (csrc/cpu_cache.cpp)

# name -> (what it takes, for the warnings; which of the readers below checks it; who reads it)
VARIABLES = {
    "DISTILKERNELS_BACKEND": ("one of cpp|triton|torch", "choice", "dispatch: forces every op's backend"),
    "DISTILKERNELS_ISA": ("one of avx512|avx2|scalar", "choice", "C++: caps the vector instruction set, read once"),
    "DISTILKERNELS_AMX": (f"one of {SWITCH}", "switch", "C++: our AMX tile loops, read on every call"),
    "DISTILKERNELS_MATRIX_UNITS": (f"one of {SWITCH}", "switch", "gemms: bf16/int8 weights packed for AMX"),
    "DISTILKERNELS_CPU_CACHE_MB": ("a non-negative integer (MiB) below 2**43", "mib",
                                   "C++: the CPU ops' output cache, read once"),
    "DISTILKERNELS_CHECK_CU_SEQLENS": (f"one of {SWITCH}", "switch",
                                       "checks: cu_seqlens' values on a GPU (a device-to-host copy)"),
}
CPP_READ = ("DISTILKERNELS_ISA", "DISTILKERNELS_AMX", "DISTILKERNELS_CPU_CACHE_MB")
BENCH_PREFIX = "DISTILKERNELS_BENCH_"  # read by the repository's bench/ suite, not by the package

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> bool:
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return True


def _bad_value(name: str, raw: str, kept: str) -> None:
    if _warn_once(f"{name}={raw}", f"{name} must be {VARIABLES[name][0]}, got {raw!r}; using {kept}"):
        if name in CPP_READ:  # the C++ reader would say it again, on stderr, at first use
            from ._ext import load_extension

            ext = load_extension()
            if ext is not None:
                ext.env_reported(name, raw)


def switch(name: str, default: bool) -> bool:
    """The switch `name` (one of VARIABLES): `default` when unset, empty or misspelt (the last with a warning)."""
    raw = os.environ.get(name, "")
    value = raw.lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        _bad_value(name, raw, "on" if default else "off")
    return default


def choice(name: str, options: tuple[str, ...]) -> str | None:
    """The choice `name` lower-cased, one of `options`; None when unset, empty or none of them (with a warning)."""
    raw = os.environ.get(name, "")
    if raw.lower() in options:
        return raw.lower()
    if raw:
        _bad_value(name, raw, "the default")
    return None


def _mib(name: str) -> None:
    raw = os.environ.get(name, "")
    if raw and not (raw.isascii() and raw.isdigit() and int(raw) < CACHE_MB_LIMIT):
        _bad_value(name, raw, "the default")


def check_environment() -> None:
    """Warns about each DISTILKERNELS_* variable set now that the package does not read, or whose value is none
    of what it takes."""
    for name in sorted(os.environ):
        if not name.startswith("DISTILKERNELS_") or name.startswith(BENCH_PREFIX):
            continue
        if name not in VARIABLES:
            _warn_once(name, f"{name} is not a distilkernels setting (it has no effect); the settings are "
                       + ", ".join(VARIABLES))
            continue
        kind = VARIABLES[name][1]
        if kind == "switch":
            switch(name, name != "DISTILKERNELS_CHECK_CU_SEQLENS")
        elif kind == "mib":
            _mib(name)
        else:
            choice(name, tuple(VARIABLES[name][0].removeprefix("one of ").split("|")))
