"""What every result file records about the run: the machine (CPU model and ISA flags, from
distilkernels.machine), threads, load, library versions and the commit of the measured code."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from distilkernels import machine

ROOT = Path(__file__).resolve().parent.parent
# Variables that cap the instruction set each library uses: ours (csrc/vec.h), oneDNN's (which torch, OpenVINO and
# the bench's oneDNN peers read), MKL's and ATen's own kernels'. An AMX machine run under them stands in for an
# AVX2-only CPU only as far as every peer obeys them, so a result file names the ones that were set.
ISA_CAPS = ("DISTILKERNELS_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
            "ATEN_CPU_CAPABILITY")
PACKAGES = ("torch", "transformers", "onnxruntime", "onnx", "openvino", "triton", "distilkernels")


def version(package: str) -> str | None:
    try:
        from importlib.metadata import version as _version

        return _version(package)
    except Exception:
        return None


def git_commit() -> str | None:
    """Short hash of the checkout's HEAD, "-dirty" when tracked code differs from it; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        # Results written by an earlier run (bench/results) do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device="cpu") -> dict:
    device = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_model(),
        "device_type": device.type,
        "cpu": machine.cpu_model(), "cores": os.cpu_count(), "isa": machine.isa_flags(),
        "matrix_units": machine.matrix_units(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)},
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # > cores: timings are noisy
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {p: version(p) for p in PACKAGES},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
