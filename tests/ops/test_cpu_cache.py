"""The caching allocator behind the C++ ops' outputs (csrc/cpu_cache.cpp), through distilkernels.ops."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distilkernels import ops
from helpers import max_err

pytestmark = pytest.mark.requires_ext


@pytest.fixture
def cpu_cache():
    limit = ops.cpu_cache_stats()["limit_bytes"]
    ops.set_cpu_cache_limit(64 << 20)
    ops.empty_cpu_cache()
    yield
    ops.set_cpu_cache_limit(limit)


def test_cpu_cache_hands_freed_blocks_out_again(cpu_cache):
    x, w = torch.randn(512, 96), torch.randn(768, 96)  # out: 512 x 768 fp32 = 1.5 MiB, cached
    expected = x.double() @ w.double().T
    a = ops.linear(x, w)
    ptr, before = a.data_ptr(), ops.cpu_cache_stats()
    assert before["live_bytes"] >= a.nbytes
    b = ops.linear(x, w)  # `a` is alive: another block
    assert b.data_ptr() != ptr
    del a
    assert ops.cpu_cache_stats()["cached_bytes"] >= 512 * 768 * 4
    c = ops.linear(x * 2, w)  # the same size class as `a`: its block, with new contents
    assert c.data_ptr() == ptr
    assert ops.cpu_cache_stats()["hits"] == before["hits"] + 1
    assert max_err(c, 2 * expected) < 1e-3 and max_err(b, expected) < 1e-3
    c.resize_(1024, 768)  # a cached output is an ordinary resizable tensor
    c[512:] = 1
    assert torch.equal(c[512:], torch.ones(512, 768))
    del b, c
    freed = ops.empty_cpu_cache()
    assert freed >= 512 * 768 * 4 and ops.cpu_cache_stats()["cached_bytes"] == 0


def test_cpu_cache_limit_and_small_outputs(cpu_cache):
    x, w = torch.randn(512, 64), torch.randn(768, 64)
    ops.set_cpu_cache_limit(2 << 20)  # room for one 1.5 MiB block
    outs = [ops.linear(x, w) for _ in range(3)]
    del outs
    stats = ops.cpu_cache_stats()
    assert 0 < stats["cached_bytes"] <= 2 << 20
    ops.set_cpu_cache_limit(0)  # off: freed blocks go straight back
    assert ops.cpu_cache_stats()["cached_bytes"] == 0
    ops.linear(x, w)
    assert ops.cpu_cache_stats()["cached_bytes"] == 0
    ops.set_cpu_cache_limit(64 << 20)
    small = ops.linear(x[:4], w)  # 12 KiB: PyTorch's own allocator, not counted
    before = ops.cpu_cache_stats()
    del small
    assert ops.cpu_cache_stats() == before
    for bad in (-1, 1 << 63, 2.0, True):
        with pytest.raises(ValueError, match=r"nbytes must be an int in \[0, 2\*\*63\)"):
            ops.set_cpu_cache_limit(bad)


@pytest.mark.parametrize("value, limit, warns", [("7", 7 << 20, False), ("0", 0, False),
                                                 ("lots", 512 << 20, True), ("8796093022208", 512 << 20, True)])
def test_cpu_cache_limit_from_environment(value, limit, warns):
    script = "import distilkernels\nprint(distilkernels.ops.cpu_cache_stats()['limit_bytes'])\n"
    env = dict(os.environ, DISTILKERNELS_CPU_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == limit
    assert ("DISTILKERNELS_CPU_CACHE_MB must be a non-negative integer" in result.stderr) == warns
