"""Timing of the Triton ops against their PyTorch counterparts on a GPU, at distilbert-base sizes.

    python bench/triton_timing.py --out bench/out/triton_timing.json

Every case times its providers side by side in one run (triton.testing.do_bench, median of its
repetitions, CUDA-synchronized) and reports ms, the physical rate of each (TFLOP/s for attention, GB/s
for the memory-bound ops) and the ratio torch / triton. The JSON carries device, versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from distilkernels import benchmarking as bm, ops

N_HEADS, HEAD_DIM, DIM, HIDDEN_DIM = 12, 64, 768, 3072


def _sdpa(q, k, v, key_padding_mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=key_padding_mask[:, None, None, :])
    return out.transpose(1, 2)


def attention_case(batch: int, seqlen: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch * seqlen, 3 * DIM, device="cuda", dtype=dtype, generator=g)
    q, k, v = qkv.view(batch, seqlen, 3, N_HEADS, HEAD_DIM).unbind(2)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), device="cuda", generator=g)
    mask = torch.arange(seqlen, device="cuda")[None, :] < lengths[:, None]
    providers = {"triton": lambda: ops.attention(q, k, v, mask), "torch_sdpa": lambda: _sdpa(q, k, v, mask)}
    flops = 4 * batch * N_HEADS * seqlen * seqlen * HEAD_DIM  # QK^T and PV, every key computed
    return f"attention ({batch}, {seqlen}, {N_HEADS}, {HEAD_DIM})", providers, flops / 1e12, "TFLOP/s"


def add_layer_norm_case(rows: int, dtype):
    x, r = (torch.randn(rows, DIM, device="cuda", dtype=dtype) for _ in range(2))
    w, b = torch.randn(DIM, device="cuda", dtype=dtype), torch.randn(DIM, device="cuda", dtype=dtype)
    providers = {"triton": lambda: ops.add_layer_norm(x, r, w, b, 1e-12),
                 "torch": lambda: F.layer_norm(x + r, (DIM,), w, b, 1e-12)}
    bytes_moved = 3 * rows * DIM * x.element_size()  # read x and residual, write out
    return f"add_layer_norm ({rows}, {DIM})", providers, bytes_moved / 1e9, "GB/s"


def bias_gelu_case(rows: int, dtype):
    x = torch.randn(rows, HIDDEN_DIM, device="cuda", dtype=dtype)
    b = torch.randn(HIDDEN_DIM, device="cuda", dtype=dtype)
    providers = {"triton": lambda: ops.bias_act_(x, b, "gelu"), "torch": lambda: F.gelu(x + b)}
    bytes_moved = 2 * rows * HIDDEN_DIM * x.element_size()  # read and write x (torch moves more)
    return f"bias_act_ gelu ({rows}, {HIDDEN_DIM})", providers, bytes_moved / 1e9, "GB/s"


def run_case(name, providers, work, unit, dtype) -> dict:
    ms = {p: do_bench(fn, warmup=25, rep=200, return_mode="median") for p, fn in providers.items()}
    baseline = next(p for p in ms if p != "triton")
    row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
           unit: {p: work / (t * 1e-3) for p, t in ms.items()}, f"{baseline}/triton": ms[baseline] / ms["triton"]}
    print(f"{name:42s} {row['dtype']:9s} " + "  ".join(f"{p} {t:.4f} ms" for p, t in ms.items())
          + f"  {baseline}/triton {row[f'{baseline}/triton']:.2f}x")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "triton_timing.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_timing.py needs a CUDA GPU")
    rows = []
    with ops.force_backend("triton"):
        for dtype in (torch.float16, torch.bfloat16):
            for batch, seqlen in ((32, 128), (32, 512)):
                rows.append(run_case(*attention_case(batch, seqlen, dtype), dtype))
                rows.append(run_case(*add_layer_norm_case(batch * seqlen, dtype), dtype))
                rows.append(run_case(*bias_gelu_case(batch * seqlen, dtype), dtype))
    result = {
        "device": torch.cuda.get_device_name(), "platform": platform.platform(), "commit": bm.git_commit(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "cases": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
