"""End-to-end forward: every provider of bench/providers.py at every grid shape, checked against HF fp32 eager
(bench.timing.check) before it is timed. extra_info carries tokens/s, TFLOP/s of the forward's real FLOPs
(bench/flops.py) and the fraction of the measured peak of the provider's precision."""
from __future__ import annotations

import pytest
import torch

from bench.flops import forward_flops
from bench.providers import PROVIDERS
from bench.timing import check, describe, time_call
from bench.workload import model_device


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_e2e(benchmark, e2e, shape, provider, rounds, peaks):
    inputs, reference = e2e.inputs(shape)
    entry = e2e.provider(provider, inputs)
    result = check(entry["run"](*inputs), reference, inputs[1], entry["precision"])
    benchmark.group = f"e2e {shape.name}"
    benchmark.extra_info.update(provider=provider, precision=entry["precision"], note=entry["note"],
                                tokens=shape.tokens, threads=torch.get_num_threads(), **result)
    if result["status"] == "WRONG":
        pytest.fail(f"{provider} is WRONG at {shape.name} vs HF fp32 eager: {describe(result)}")
    benchmark.pedantic(time_call, args=(lambda: entry["run"](*inputs), model_device(e2e.model)), rounds=rounds,
                       warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # None under --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    tflops = forward_flops(e2e.summary, shape.seq_lengths) / seconds / 1e12
    benchmark.extra_info.update(tokens_per_s=shape.tokens / seconds, tflops=tflops)
    peak = peaks.get(entry["precision"], {}).get("tflops")
    if peak:
        benchmark.extra_info["peak_fraction"] = tflops / peak
