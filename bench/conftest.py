"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (quick grid), `--bench-full` or
DISTILKERNELS_BENCH_FULL=1 for the full grid. Providers, shapes, checks and per-op cases come from the bench
package, the same tables `python bench/run.py` uses; that command times providers interleaved in one run,
this suite times them one test at a time, grouped by shape.

Environment: DISTILKERNELS_BENCH_THREADS (torch threads, and the peers', default unchanged),
DISTILKERNELS_BENCH_ROUNDS (timed rounds per test, default 3; ops run 4x as many), DISTILKERNELS_BENCH_MODEL
(local HF checkpoint dir; default random distilbert-base).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.providers import build_providers, hf_reference  # noqa: E402
from bench.workload import GRIDS, Shape, default_model, load_model, model_device, model_summary  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="benchmark the full shape grid, not the quick one")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        full = metafunc.config.getoption("--bench-full") or os.environ.get("DISTILKERNELS_BENCH_FULL") == "1"
        grid = GRIDS["full" if full else "quick"]
        metafunc.parametrize("shape", grid, ids=[s.name for s in grid])


def pytest_configure(config):
    threads = os.environ.get("DISTILKERNELS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def rounds() -> int:
    return int(os.environ.get("DISTILKERNELS_BENCH_ROUNDS", "3"))


class E2E:
    """Lazily built providers and per-shape inputs/references for one model, shared by the whole session."""

    def __init__(self, model):
        self.model = model
        self.summary = model_summary(model)
        self._built: dict[str, dict] = {}
        self._shapes: dict[str, tuple] = {}
        self.reference_run = hf_reference(model)

    def provider(self, name: str, example) -> dict:
        if name not in self._built:
            self._built.update(build_providers(self.model, example, [name], log=lambda msg: None))
        entry = self._built[name]
        if entry["status"] == "unavailable":
            pytest.skip(f"{name}: {entry['note']}")
        if entry["status"] != "ok":
            pytest.fail(f"{name} failed to build: {entry['note']}")
        return entry

    def inputs(self, shape: Shape):
        if shape.name not in self._shapes:
            inputs = shape.inputs(self.summary["vocab_size"], model_device(self.model))
            self._shapes[shape.name] = (inputs, self.reference_run(*inputs))
        return self._shapes[shape.name]


@pytest.fixture(scope="session")
def e2e() -> E2E:
    model_dir = os.environ.get("DISTILKERNELS_BENCH_MODEL")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return E2E(load_model(model_dir, device) if model_dir else default_model(device))


@pytest.fixture(scope="session")
def peaks() -> dict:
    """The machine's GEMM peaks per precision (bench.timing.measure_peaks), measured once per session."""
    from bench.timing import measure_peaks

    return measure_peaks() if not torch.cuda.is_available() else {}
