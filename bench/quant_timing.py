"""Reduced precision on the CPU, side by side: distilbert-base (random init) in fp32, bf16 and int8.

    python bench/quant_timing.py [--threads 2] [--rounds 9] [--shapes 1x128 8x128 mixed8x128]

Plain Python, not pytest: the reduced-precision providers of bench/providers.py, checked and timed by
bench.timing.bench_shape (interleaved rounds, medians; every provider's min token cosine vs HF fp32 eager on
the real tokens). Writes bench/results/cpu-quant-<date>-<threads>t.json (machine, versions, commit, GEMM peaks,
every sample) and prints a markdown table. `python bench/run.py` times the same providers next to the fp32
peers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.environment import environment  # noqa: E402
from bench.providers import build_providers, hf_reference  # noqa: E402
from bench.timing import bench_shape, measure_peaks  # noqa: E402
from bench.workload import default_model, full_shape, mixed_shape, model_summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"1x128": full_shape(1, 128), "8x128": full_shape(8, 128),
          "mixed8x128": mixed_shape(batch=8, min_len=8, max_len=128)}
FP32 = "HF sdpa fp32"
# provider (bench/providers.py) -> the row label of this script's table
LABELS = {
    "hf_sdpa": FP32,
    "distilkernels_fp32": "ours fp32",
    "torch_bf16": "torch bf16 (model.to(bf16), sdpa)",
    "distilkernels_bf16": "ours bf16",
    "torch_int8_dynamic": "torch quantize_dynamic int8",
    "onnxruntime_int8": "ONNX Runtime int8",
    "distilkernels_int8": "ours int8 (per-token)",
}


def time_shape(built: dict, shape, summary: dict, rounds: int, reference_run, peaks: dict) -> dict:
    """label -> timing summary, samples and min token cosine; a provider that fails its check stops the run."""
    rows = bench_shape(built, shape, summary, "cpu", rounds, 1, reference_run, peaks=peaks)
    out = {}
    for row in rows:
        if row["status"] != "ok":
            raise SystemExit(f"{row['provider']} at {shape.name}: {row['status']} ({row.get('note')}, "
                             f"min cosine {row.get('min_cosine')})")
        out[LABELS[row["provider"]]] = {k: row[k] for k in ("median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms",
                                                           "n_samples", "samples_ms", "tflops")} | {
            "min_token_cosine": row["min_cosine"], "peak_fraction": row.get("peak_fraction")}
    return out


def markdown(results: dict) -> str:
    shapes = list(results["shapes"])
    head = "| provider | " + " | ".join(f"{s} ms | vs fp32 | cosine" for s in shapes) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(shapes)]
    for name in results["shapes"][shapes[0]]:
        cells = []
        for s in shapes:
            row, base = results["shapes"][s][name], results["shapes"][s][FP32]["median_ms"]
            cells.append(f"{row['median_ms']:.1f} | {base / row['median_ms']:.2f}x | {row['min_token_cosine']:.5f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=None, help="result file (default: bench/results/cpu-quant-<date>-<N>t.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = default_model()
    summary = model_summary(model)
    peaks = measure_peaks()
    results = {"environment": environment("cpu"), "model": "distilbert-base shapes, random init (seed 0)",
               "threads": args.threads, "rounds": args.rounds, "peaks": peaks, "shapes": {}}
    built = build_providers(model, SHAPES["8x128"].inputs(summary["vocab_size"]), list(LABELS), log=print)
    reference_run = hf_reference(model)
    for name in args.shapes:
        print(f"timing {name} ...", flush=True)
        results["shapes"][name] = time_shape(built, SHAPES[name], summary, args.rounds, reference_run, peaks)
    results["load_avg_1m_after"] = os.getloadavg()[0]
    path = Path(args.out) if args.out else \
        RESULTS / f"cpu-quant-{datetime.date.today().isoformat()}-{args.threads}t.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
