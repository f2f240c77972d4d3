"""End-to-end DistilBERT forward: every provider of distilkernels.benchmarking.PROVIDERS at every grid shape."""
from __future__ import annotations

import pytest
import torch

from distilkernels import benchmarking as bm


@pytest.mark.parametrize("provider", list(bm.PROVIDERS))
def test_e2e(benchmark, e2e, shape, provider, rounds):
    inputs, reference = e2e.inputs(shape)
    entry = e2e.provider(provider, inputs)
    status, err = bm.check_provider(entry["run"], inputs, reference, entry["atol"])
    benchmark.group = f"e2e {shape.name}"
    benchmark.extra_info.update(provider=provider, note=entry["note"], tokens=shape.tokens, max_abs_err=err,
                                atol=entry["atol"], threads=torch.get_num_threads())
    if status == "WRONG":
        pytest.fail(f"{provider} is WRONG at {shape.name}: max-abs error {err:.2e} > {entry['atol']:.0e} vs HF eager")
    device = bm.model_device(e2e.model)
    benchmark.pedantic(bm.time_call, args=(lambda: entry["run"](*inputs), device), rounds=rounds,
                       warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = shape.tokens / benchmark.stats.stats.median
