"""Reduced precision on the CPU, side by side: distilbert-base (random init) in fp32, bf16 and int8.

    python bench/quant_timing.py [--threads 2] [--rounds 9] [--shapes 1x128 8x128 mixed8x128]

Plain Python, not pytest. Providers are timed round-robin in one process (distilkernels.benchmarking's
time_interleaved); each number is the median of one forward call. Every provider is also checked against HF
sdpa fp32 on the same input: min token cosine over the real tokens. Writes
bench/results/cpu-quant-<date>-<threads>t.json (machine, versions, commit, every sample) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

import distilkernels
from distilkernels import benchmarking as bm

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"1x128": bm.Shape("1x128", 1, 128), "8x128": bm.Shape("8x128", 8, 128),
          "mixed8x128": bm.mixed_shape(batch=8, min_len=8, max_len=128)}
FP32 = "HF sdpa fp32"


def _runner(model):
    @torch.inference_mode()
    def run(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return run


def _hf(model, dtype=torch.float32):
    copy_ = copy.deepcopy(model).to(dtype).eval()
    copy_.set_attn_implementation("sdpa")
    return copy_


def _torch_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(_hf(model), {torch.nn.Linear}, dtype=torch.qint8)


def _ort_int8(model, example, threads: int, tmp: str):
    """The fp32 ONNX Runtime provider's model (export, ORT's BERT fusions: distilkernels.benchmarking), then ORT's
    own dynamic int8 quantization (per-channel weights; activations quantized per tensor at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused, _ = bm.optimized_onnx(model, example)
    quantized = os.path.join(tmp, "model.int8.onnx")
    with bm.quiet_ort_logs():
        # Shape inference cannot type the outputs of ORT's fused contrib ops: they are fp32.
        quantize_dynamic(fused, quantized, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return bm.ort_runner(quantized, threads)


def build(model, example, threads: int, tmp: str) -> dict[str, object]:
    """name -> run(input_ids, attention_mask) -> last_hidden_state."""
    ours_fp32 = copy.deepcopy(model)
    distilkernels.patch(ours_fp32)
    ours_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # convert first, then patch
    distilkernels.patch(ours_bf16)
    return {
        FP32: _runner(_hf(model)),
        "ours fp32": _runner(ours_fp32),
        "torch bf16 (model.to(bf16), sdpa)": _runner(_hf(model, torch.bfloat16)),
        "ours bf16": _runner(ours_bf16),
        "torch quantize_dynamic int8": _runner(_torch_int8(model)),
        "ONNX Runtime int8": _ort_int8(model, example, threads, tmp),
        "ours int8 (per-token)": _runner(distilkernels.quantize(copy.deepcopy(model))),
        "ours int8 (per-tensor)": _runner(distilkernels.quantize(copy.deepcopy(model), activations="per_tensor")),
    }


def min_token_cosine(out, ref, attention_mask) -> float:
    valid = attention_mask.bool()
    return torch.nn.functional.cosine_similarity(out[valid].float(), ref[valid].float(), dim=-1).min().item()


def bench_shape(runs, shape: bm.Shape, vocab_size: int, rounds: int) -> dict:
    inputs = shape.inputs(vocab_size)
    ref = runs[FP32](*inputs)
    cosine = {name: min_token_cosine(run(*inputs), ref, inputs[1]) for name, run in runs.items()}
    samples = bm.time_interleaved({name: (lambda run=run: run(*inputs)) for name, run in runs.items()}, "cpu",
                                  rounds=rounds, warmup=1)
    return {name: {**bm.summarize(s), "samples_ms": [x * 1e3 for x in s], "min_token_cosine": cosine[name]}
            for name, s in samples.items()}


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = bm.default_model()
    results = {"environment": bm.environment("cpu"), "model": "distilbert-base shapes, random init (seed 0)",
               "threads": args.threads, "rounds": args.rounds, "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="distilkernels-quant-") as tmp:
        runs = build(model, SHAPES["8x128"].inputs(model.config.vocab_size), args.threads, tmp)
        for name in args.shapes:
            print(f"timing {name} ...", flush=True)
            results["shapes"][name] = bench_shape(runs, SHAPES[name], model.config.vocab_size, args.rounds)
    results["load_avg_1m_after"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cpu-quant-{datetime.date.today().isoformat()}-{args.threads}t.json"
    path.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
