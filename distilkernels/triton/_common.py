"""What every Triton kernel file of distilkernels shares: whether kernels are interpreted, and a launch
counter that tests read to prove a kernel really ran."""
from __future__ import annotations

import collections
import os

import triton

# triton.jit decides at decoration time whether it returns an interpreted function; the kernel files are
# imported right after this module, so this reads the same environment they are decorated under.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# kernel name -> launches since import (incremented by each launcher just before its launch)
LAUNCHES: collections.Counter = collections.Counter()


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def block_size(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum) that one tile dimension is padded to."""
    return max(minimum, triton.next_power_of_2(n))
