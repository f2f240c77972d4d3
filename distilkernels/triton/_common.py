"""What every Triton kernel file of distilkernels shares: whether kernels are interpreted, a launch counter
that tests read to prove a kernel really ran, and the launch plan.

A launcher does not start its kernel itself: it prepares a `LaunchPlan` (the kernel, every argument, the
tiles it may pick, the grid) and hands it to `launch`. tests/test_triton_compile.py compiles the same plans
for GPUs this machine does not have, so what is checked there is exactly what would run.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable

import triton
from torch.library import wrap_triton

# triton.jit decides at decoration time whether it returns an interpreted function; the kernel files are
# imported right after this module, so this reads the same environment they are decorated under.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# kernel name -> launches since import (incremented by `launch` just before each launch)
LAUNCHES: collections.Counter = collections.Counter()

# CUDA's grid limits (blocks per axis): axis 0 up to 2**31 - 1, axes 1 and 2 up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def block_size(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum) that one tile dimension is padded to."""
    return max(minimum, triton.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One launch of a Triton kernel, prepared but not started.

    name      the op, as counted in LAUNCHES
    kernel    the @triton.jit function
    args      every kernel argument by name, constexprs included, except the tile's (those of a config)
    configs   the tiles (triton.Config) it may run with on a GPU
    key       argument names whose values pick the autotuned winner among configs (Triton adds tensor dtypes);
              empty: one config, launched directly. A keyed plan runs through triton.autotune even with one
              config: the autotuner carries every Config field (maxnreg too, which torch.compile would take
              for a kernel argument if passed as a launch keyword).
    grid      the config's kwargs -> grid (x[, y[, z]]); raises ValueError past CUDA's limits
    interpreter_config  the one tile used under TRITON_INTERPRET=1, where timing tiles would be meaningless
    """
    name: str
    kernel: Any
    args: dict
    configs: tuple
    key: tuple
    grid: Callable[[dict], tuple]
    interpreter_config: Any = None


def checked_grid(grid: tuple, what: str) -> tuple:
    """`grid`, or a ValueError naming the CUDA limit an axis passes (`what` says what the axes count)."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{what}: grid axis {axis} needs {size} blocks, past CUDA's limit of {limit}")
    return grid


# (kernel, configs, key) -> the autotuned kernel: one autotuner per config list, so each keeps its own cache
_TUNED: dict = {}


def _tuned(plan: LaunchPlan):
    ident = (plan.kernel, plan.configs, plan.key)
    if ident not in _TUNED:
        _TUNED[ident] = triton.autotune(configs=list(plan.configs), key=list(plan.key))(plan.kernel)
    return _TUNED[ident]


def config_kwargs(config) -> dict:
    """A triton.Config as launch keywords: its constexprs plus num_warps, num_stages (and maxnreg if set)."""
    kwargs = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        kwargs["maxnreg"] = config.maxnreg
    return kwargs


def launch(plan: LaunchPlan) -> None:
    """Run `plan`: autotuned over its configs, its one config, or its interpreter tile on CPU tensors."""
    count_launch(plan.name)
    if INTERPRETING and plan.interpreter_config is not None:
        meta = plan.interpreter_config.kwargs
        wrap_triton(plan.kernel)[plan.grid(meta)](**plan.args, **config_kwargs(plan.interpreter_config))
    elif plan.key:
        wrap_triton(_tuned(plan))[plan.grid](**plan.args)
    else:
        (config,) = plan.configs
        wrap_triton(plan.kernel)[plan.grid(config.kwargs)](**plan.args, **config_kwargs(config))
