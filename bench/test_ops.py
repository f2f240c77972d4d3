"""Per-op benchmarks at distilbert-base sizes (bench/cases.py): distilkernels vs torch eager vs torch SDPA vs
torch.compile. extra_info carries GB/s (and GFLOP/s for attention) from bench/flops.py's counts."""
from __future__ import annotations

import pytest
import torch

from bench.cases import op_cases
from bench.timing import FP32_ATOL, time_call

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {case.name: case for case in op_cases(DEVICE)}
PARAMS = [(name, provider) for name, case in CASES.items() for provider in case.providers]


@pytest.mark.parametrize(("case_name", "provider"), PARAMS, ids=[f"{c}-{p}" for c, p in PARAMS])
def test_op(benchmark, case_name, provider, rounds):
    case = CASES[case_name]
    try:
        err = case.check(provider)
    except NotImplementedError as exc:  # the dispatcher has no kernel for this op yet
        pytest.skip(f"{provider} has no {case.op} kernel here: {str(exc).splitlines()[0]}")
    benchmark.group = f"op {case.name}"
    benchmark.extra_info.update(max_abs_err=err, bytes=case.bytes, flops=case.flops)
    assert err <= FP32_ATOL, f"{provider} {case.name}: max-abs error {err:.2e} vs the fp32 reference"
    fn, args, device = case.providers[provider], case.fresh_args(), torch.device(DEVICE)
    benchmark.pedantic(time_call, args=(lambda: fn(*args), device), rounds=4 * rounds,
                       warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: checked and run once, nothing timed
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = case.bytes / seconds / 1e9
    if case.flops:
        benchmark.extra_info["GFLOP/s"] = case.flops / seconds / 1e9
