"""Timing of the bf16 CPU ops (attention, varlen attention, add_layer_norm, bias_act_) and of a bf16
distilbert-base forward, against torch in bf16 on the same inputs.

    python bench/bf16_timing.py [--threads 2] [--rounds 15] [--json out.json] [--model] [--clock thread]

Providers of one case are timed round-robin; each time is the median over rounds of one call (the inner loop
repeats a call until ~2 ms have passed). fp32 attention is timed too, to show it did not move. A/B between two
builds: run this script alternately with each build on PYTHONPATH and compare the medians. On a machine shared
with other jobs, wall time with several threads measures the scheduler; `--threads 1 --clock thread` counts
the CPU time of the one thread that does the work instead (time.thread_time).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

import distilkernels
from distilkernels import _C

import statistics
import time

CLOCK = time.perf_counter


def timed(fn, repeat: int) -> float:
    start = CLOCK()
    for _ in range(repeat):
        fn()
    return (CLOCK() - start) / repeat


def side_by_side(providers: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each provider, timed round-robin."""
    repeats = {}
    for name, fn in providers.items():
        fn()
        once = timed(fn, 3)
        repeats[name] = max(1, int(2e-3 / max(once, 1e-7)))
    samples = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            samples[name].append(timed(fn, repeats[name]))
    return {name: statistics.median(s) for name, s in samples.items()}

DIM, N_HEADS, HEAD_DIM, HIDDEN_DIM = 768, 12, 64, 3072
ops = torch.ops.distilkernels


def attention_case(batch: int, seqlen: int, dtype: torch.dtype):
    qkv = torch.randn(batch * seqlen, 3 * DIM).to(dtype)
    q, k, v = (t.view(batch, seqlen, N_HEADS, HEAD_DIM) for t in qkv.split(DIM, dim=1))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scale = HEAD_DIM ** -0.5
    flops = 4 * batch * N_HEADS * seqlen * seqlen * HEAD_DIM
    name = f"attention {str(dtype)[6:]} ({batch}, {seqlen}, {N_HEADS}, {HEAD_DIM})"
    return name, {"ours": lambda: ops.attention(q, k, v, None, scale),
                  "torch sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt)}, flops / 1e9, "GFLOP/s"


def varlen_case(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 129, (16,), generator=gen)
    cu = torch.zeros(17, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total, max_len = int(cu[-1]), int(lengths.max())
    qkv = torch.randn(total, 3 * DIM).to(dtype)
    q, k, v = (t.view(total, N_HEADS, HEAD_DIM) for t in qkv.split(DIM, dim=1))
    # torch's peer: the padded batch with a key padding mask (what an unpadded model avoids).
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    qp = torch.randn(16, N_HEADS, max_len, HEAD_DIM).to(dtype)
    scale = HEAD_DIM ** -0.5
    flops = 4 * N_HEADS * HEAD_DIM * float((lengths.double() ** 2).sum())
    name = f"varlen_attention {str(dtype)[6:]} (16 seqs of 8..128, {total} tokens)"
    return name, {"ours": lambda: ops.varlen_attention(q, k, v, cu, max_len, scale),
                  "torch sdpa padded": lambda: F.scaled_dot_product_attention(
                      qp, qp, qp, attn_mask=mask[:, None, None, :])}, flops / 1e9, "GFLOP/s"


def layer_norm_case(rows: int):
    x, r = torch.randn(rows, DIM).bfloat16(), torch.randn(rows, DIM).bfloat16()
    w, b = torch.randn(DIM).bfloat16(), torch.randn(DIM).bfloat16()
    return f"add_layer_norm bf16 ({rows}, {DIM})", {
        "ours": lambda: ops.add_layer_norm(x, r, w, b, 1e-12),
        "torch": lambda: F.layer_norm(x + r, (DIM,), w, b, 1e-12)}, 3 * rows * DIM * 2 / 1e9, "GB/s"


def bias_act_case(rows: int):
    x, b = torch.randn(rows, HIDDEN_DIM).bfloat16(), (torch.randn(HIDDEN_DIM) * 0.01).bfloat16()
    y = x.clone()
    return f"bias_act_ gelu bf16 ({rows}, {HIDDEN_DIM})", {
        "ours": lambda: ops.bias_act_(y, b, "gelu"),
        "torch": lambda: F.gelu(x + b)}, 2 * rows * HIDDEN_DIM * 2 / 1e9, "GB/s"


def model_case(batch: int, seqlen: int):
    from transformers import DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    cfg = DistilBertConfig(attn_implementation="sdpa")
    hf = DistilBertModel(cfg).eval().to(torch.bfloat16)
    ours = DistilBertModel(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    ours = ours.to(torch.bfloat16)
    distilkernels.patch(ours)
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen))
    am = torch.ones(batch, seqlen, dtype=torch.long)
    # 2 * params * tokens for the GEMMs + 4 * layers * seqlen^2 * dim for attention
    n_params = sum(p.numel() for n, p in hf.named_parameters() if "embeddings" not in n)
    flops = 2 * n_params * batch * seqlen + 4 * cfg.n_layers * batch * seqlen * seqlen * cfg.dim

    def run(m):
        with torch.inference_mode():
            return m(input_ids=ids, attention_mask=am).last_hidden_state
    return f"distilbert-base bf16 {batch}x{seqlen}", {"ours": lambda: run(ours), "HF sdpa bf16": lambda: run(hf)}, \
        flops / 1e9, "GFLOP/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json")
    parser.add_argument("--model", action="store_true", help="also time the whole bf16 model")
    parser.add_argument("--only", default="", help="substring filter on case names")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = parser.parse_args()
    if args.clock == "thread":
        if args.threads != 1:
            parser.error("--clock thread counts one thread's CPU time: use --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, isa={_C.vector_isa()}, threads={torch.get_num_threads()}, "
          f"clock={args.clock}, torch {torch.__version__}, package {distilkernels.__file__}\n")
    print("| case | provider | median ms | other / ours | our rate |")
    print("|---|---|---:|---:|---:|")
    cases = [lambda: attention_case(1, 128, torch.bfloat16), lambda: attention_case(8, 128, torch.bfloat16),
             lambda: attention_case(8, 512, torch.bfloat16), lambda: varlen_case(torch.bfloat16),
             lambda: attention_case(8, 128, torch.float32), lambda: attention_case(8, 512, torch.float32),
             lambda: varlen_case(torch.float32),
             lambda: layer_norm_case(1024), lambda: bias_act_case(1024)]
    if args.model:
        cases += [lambda: model_case(1, 128), lambda: model_case(8, 128)]
    results = {}
    for make in cases:
        name, providers, work, unit = make()
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        times = side_by_side(providers, args.rounds)
        ours = times["ours"]
        for provider, t in times.items():
            ratio = "" if provider == "ours" else f"{t / ours:.2f}x"
            print(f"| {name} | {provider} | {t * 1e3:.3f} | {ratio} | {work / t:.1f} {unit} |", flush=True)
            results[f"{name} | {provider}"] = t
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
