"""End-to-end benchmark grid: every provider of bench/providers.py, checked against HF fp32 eager, then timed
side by side (interleaved rounds, medians), with TFLOP/s against the GEMM peaks measured in the same run.

    python bench/run.py --threads 2 --out bench/out                       # 1x128, 8x128, mixed16x128
    python bench/run.py --threads 2 --full --out bench/out                # + 8x512, 32x128, mixed8x512
    python bench/run.py --threads 2 --providers hf_sdpa,distilkernels_fp32 --shapes 32x128,mixed32x128

Writes results.json, report.md and speedup.png to --out and prints the report.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import reports  # noqa: E402
from bench.environment import environment  # noqa: E402
from bench.providers import PROVIDERS, build_providers, hf_reference  # noqa: E402
from bench.timing import bench_shape, best_peaks, measure_peaks  # noqa: E402
from bench.workload import GRIDS, default_model, load_model, model_summary, parse_shape  # noqa: E402


def _progress(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return log


def _bar(done: int, total: int, label: str, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"


def run_bench(grid, threads: int | None = None, out_dir: str | os.PathLike | None = None, progress: bool = True,
              model: torch.nn.Module | None = None, providers=None, rounds: int = 7, warmup: int = 1,
              budget_s: float = 120.0, device=None, peaks: bool = True, warm_calls: int = 0) -> dict:
    """Benchmark `providers` (default: all) on each Shape of `grid`. Each shape gets up to `rounds` interleaved
    rounds (at least 3), none started after `budget_s` seconds of its timing; with `warm_calls`, each timed call
    follows that many untimed calls of the same provider (distilkernels.timing.time_interleaved). Returns {"env",
    "model", "peaks", "rounds", "warmup", "warm_calls", "results": [row, ...]} and writes it
    (reports.write_outputs) to out_dir when given."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None:
        torch.set_num_threads(threads)
    log = _progress(progress)
    env = environment(device)  # before timing: the commit is the code that runs, whatever is committed meanwhile
    model = (model or default_model(device)).to(device).eval()
    summary = model_summary(model)
    names = list(providers or PROVIDERS)
    # The peaks of the precisions the providers run, in the order measure_peaks lists them.
    precisions = tuple(p for p in ("fp32", "bf16", "bf16x3", "int8") if any(PROVIDERS[n].precision == p for n in names))
    measured = {}
    if peaks and device.type == "cpu" and precisions:
        log(f"measuring GEMM peaks ({', '.join(precisions)})")
        measured = measure_peaks(precisions)
    example = grid[0].inputs(summary["vocab_size"], device)
    log(f"building {len(names)} providers for {summary['class']} on {device} ({torch.get_num_threads()} threads)")
    built = build_providers(model, example, names, log)
    reference_run = hf_reference(model)
    rows = []
    for i, shape in enumerate(grid):
        log(_bar(i, len(grid), f"{shape.name}: checking and timing (up to {rounds} rounds, {budget_s:.0f} s)"))
        rows += bench_shape(built, shape, summary, device, rounds, warmup, reference_run, log, budget_s=budget_s,
                            peaks=measured, warm_calls=warm_calls)
    if measured:
        log("measuring GEMM peaks again (the higher of the two counts)")
        measured = best_peaks(measured, measure_peaks(precisions))
        for row in rows:
            peak = measured.get(row.get("precision"), {}).get("tflops")
            if peak and "tflops" in row:
                row["peak_fraction"] = row["tflops"] / peak
    log(_bar(len(grid), len(grid), "done"))
    results = {"env": env, "model": summary, "peaks": measured, "rounds": rounds, "warmup": warmup,
               "warm_calls": warm_calls, "results": rows}
    if out_dir is not None:
        reports.write_outputs(results, out_dir)
        log(f"wrote {out_dir}/results.json, report.md, speedup.png")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="shapes 1x128, 8x128, mixed16x128 (the default)")
    which.add_argument("--full", action="store_true", help="also 8x512, 32x128 and mixed8x512 (64..512 tokens)")
    which.add_argument("--shapes", default=None, help="comma-separated shapes BxS or mixedBxS[@MIN]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, and every peer's threads")
    parser.add_argument("--out", default="bench/out", help="directory for results.json, report.md, speedup.png")
    parser.add_argument("--model", default=None, help="local HF checkpoint dir (default: random distilbert-base)")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--rounds", type=int, default=7, help="most interleaved timing rounds per shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per shape before the timed ones")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds of timing per shape after which no new round starts (at least 3 rounds)")
    parser.add_argument("--warm-calls", type=int, default=0,
                        help="untimed calls of the same provider right before each timed one (0: each timed call "
                             "follows whichever provider ran before it in the round)")
    parser.add_argument("--no-peaks", action="store_true", help="skip measuring the GEMM peaks")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    providers = args.providers.split(",") if args.providers else None
    unknown = [p for p in providers or () if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    try:
        grid = tuple(parse_shape(t) for t in args.shapes.split(",")) if args.shapes else \
            GRIDS["full" if args.full else "quick"]
    except ValueError as exc:
        parser.error(str(exc))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device) if args.model else None
    results = run_bench(grid, threads=args.threads, out_dir=args.out, model=model, providers=providers,
                        rounds=args.rounds, warmup=args.warmup, budget_s=args.budget, device=device,
                        peaks=not args.no_peaks, warm_calls=args.warm_calls)
    print(reports.markdown_report(results))
    return 1 if any(r["status"] in ("WRONG", "error") for r in results["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
