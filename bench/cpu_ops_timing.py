"""Timing of the C++ CPU ops against their PyTorch counterparts at distilbert-base sizes (bench/cases.py).

    python bench/cpu_ops_timing.py [--threads 2] [--rounds 30] [--providers torch_eager,torch_sdpa]

Plain Python, not pytest. The providers of one case are timed side by side (round-robin over rounds); each
time is the median over rounds of one call (bench.timing.median_per_call). Every provider is checked against
the fp32 reference first. Prints one markdown table: medians, torch / ours, and each provider's rate
(GFLOP/s for attention, GB/s for the memory-bound ops, from bench/flops.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import cases  # noqa: E402
from bench.environment import environment  # noqa: E402
from bench.timing import FP32_ATOL, median_per_call  # noqa: E402
from bench.workload import full_shape, mixed_shape  # noqa: E402
from distilkernels import ops  # noqa: E402


def all_cases() -> list[cases.OpCase]:
    """Attention full and padded (lengths seqlen/4..seqlen) at 8x128 and 8x512, 1x128; pointwise ops at 1024
    and 4096 tokens."""
    shapes = (full_shape(8, 128), mixed_shape(8, 32, 128), full_shape(8, 512), mixed_shape(8, 128, 512),
              full_shape(1, 128))
    out = [c for shape in shapes for c in cases.attention_cases(shape)]
    out += [cases.add_layer_norm_case(n) for n in (8 * 128, 8 * 512)]
    return out + [cases.bias_gelu_case(8 * 128)]


def _rate(case: cases.OpCase, seconds: float) -> str:
    return f"{case.flops / seconds / 1e9:.1f} GFLOP/s" if case.flops else f"{case.bytes / seconds / 1e9:.1f} GB/s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--providers", default="torch_eager,torch_sdpa",
                        help="torch providers next to distilkernels (torch_compile too: slow to compile)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"# {env['cpu']}, flags {' '.join(env['isa'])}, backend {ops.backend_for(torch.device('cpu'))}, "
          f"threads={env['threads']}, torch {env['versions']['torch']}, commit {env['commit']}\n")
    print("| case | provider | median ms | provider / ours | rate |")
    print("|---|---|---:|---:|---:|")
    wanted = ["distilkernels", *args.providers.split(",")]
    failed = False
    for case in all_cases():
        runs = {}
        for name in (n for n in wanted if n in case.providers):
            err = case.check(name)
            if err > FP32_ATOL:
                print(f"| {case.name} | {name} | WRONG: max-abs error {err:.1e} | | |")
                failed = True
                continue
            args_ = case.fresh_args()
            runs[name] = lambda fn=case.providers[name], a=args_: fn(*a)
        times = median_per_call(runs, args.rounds)
        ours = times.get("distilkernels")
        for name, t in times.items():
            ratio = f"{t / ours:.2f}x" if ours and name != "distilkernels" else ""
            print(f"| {case.name} | {name} | {t * 1e3:.3f} | {ratio} | {_rate(case, t)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
