"""Timing of the Triton ops against their PyTorch counterparts on a GPU, at distilbert-base sizes
(the cases of bench/cases.py, in fp16 and bf16).

    python bench/triton_timing.py --out bench/out/triton_timing.json

Every case times its providers side by side in one run (triton.testing.do_bench, median of its
repetitions, CUDA-synchronized) and reports ms, the physical rate of each (TFLOP/s for attention, GB/s
for the memory-bound ops, from bench/flops.py) and the ratio torch / triton. The JSON carries device,
versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import cases  # noqa: E402
from bench.environment import environment  # noqa: E402
from bench.workload import mixed_shape  # noqa: E402
from distilkernels import ops  # noqa: E402

TORCH_PROVIDERS = ("torch_sdpa", "torch_eager")  # the best plain-torch provider a case has, in this order


def all_cases(dtype) -> list[cases.OpCase]:
    """Attention on 32 sequences of seqlen/2..seqlen tokens (padded and varlen), pointwise ops on 32 x seqlen
    tokens, seqlen 128 and 512."""
    out = []
    for seqlen in (128, 512):
        out += cases.attention_cases(mixed_shape(32, seqlen // 2, seqlen), "cuda", dtype)
        out += [cases.add_layer_norm_case(32 * seqlen, "cuda", dtype), cases.bias_gelu_case(32 * seqlen, "cuda", dtype)]
    return out


def run_case(case: cases.OpCase, dtype) -> dict:
    from triton.testing import do_bench

    baseline = next(p for p in TORCH_PROVIDERS if p in case.providers)
    ms = {}
    for name in ("distilkernels", baseline):
        fn, args = case.providers[name], case.fresh_args()
        ms[name] = do_bench(lambda fn=fn, args=args: fn(*args), warmup=25, rep=200, return_mode="median")
    unit, work = ("TFLOP/s", case.flops / 1e12) if case.flops else ("GB/s", case.bytes / 1e9)
    row = {"case": case.name, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
           unit: {p: work / (t * 1e-3) for p, t in ms.items()},
           f"{baseline}/triton": ms[baseline] / ms["distilkernels"]}
    print(f"{case.name:48s} " + "  ".join(f"{p} {t:.4f} ms" for p, t in ms.items())
          + f"  {baseline}/triton {row[f'{baseline}/triton']:.2f}x")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "triton_timing.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_timing.py needs a CUDA GPU")
    import triton

    rows = []
    with ops.force_backend("triton"):
        for dtype in (torch.float16, torch.bfloat16):
            rows += [run_case(case, dtype) for case in all_cases(dtype)]
    env = environment("cuda")
    result = {"device": env["device"], "platform": env["platform"], "commit": env["commit"],
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
              "cases": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
