"""Honest wall-clock timing shared by `python -m distilkernels demo` and the benchmark harness (bench/).

Several callables are timed side by side: warm-up calls first, then rounds in which every callable runs once,
in an order shuffled anew each round (seeded, so runs repeat) so none always follows the same one: what the
previous callable left in the caches, and a noisy neighbour, hit all of them alike. (Rotating one fixed order
would not do: each callable would keep its predecessor in all but one round of n.) Report the median of the
rounds, with the interquartile range as the noise.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds for one call, with the device synchronized on both sides."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_interleaved(runs: dict[str, Callable[[], object]], device="cpu", rounds: int = 7, warmup: int = 1,
                     min_rounds: int = 3, budget_s: float = float("inf"),
                     warm_calls: int = 0) -> dict[str, list[float]]:
    """Seconds per call for each of `runs`, round-robin: up to `rounds` rounds, none started after `budget_s`
    seconds once `min_rounds` are done. warm_calls: untimed calls of the same callable right before each timed
    one, so that each is timed as in a process that runs only it (its own thread pool awake, its weights in
    cache) rather than just after another callable: runtimes with their own thread pools (OpenVINO, ONNX Runtime,
    torch's OpenMP) each lose a few percent when they follow another one, more at one sequence."""
    names, device = list(runs), torch.device(device)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        order = list(names)
        random.Random(r).shuffle(order)
        for name in order:
            for _ in range(warm_calls):
                runs[name]()
            samples[name].append(time_call(runs[name], device))
    return samples


def summarize(samples: list[float]) -> dict:
    """Median, quartiles, IQR and minimum in ms of `samples` (seconds)."""
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "min_ms": min(samples) * 1e3, "n_samples": len(samples)}
