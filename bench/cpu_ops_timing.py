"""Quick timing of the C++ CPU ops against their PyTorch counterparts at distilbert-base shapes.

    python bench/cpu_ops_timing.py [--threads 2] [--rounds 30]

Plain Python, not pytest. Providers of one case are timed side by side (round-robin over rounds); each time
is the median over rounds of one call (the inner loop repeats a call until ~2 ms have passed). Prints one
markdown table with medians, the ratio torch / ours and the physical rate of our op.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import distilkernels  # noqa: F401  (loads the extension)
from distilkernels import _C

DIM, N_HEADS, HEAD_DIM, HIDDEN_DIM = 768, 12, 64, 3072


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


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


def layer_norm_case(rows: int):
    x, r = torch.randn(rows, DIM), torch.randn(rows, DIM)
    w, b = torch.randn(DIM), torch.randn(DIM)
    ours = lambda: torch.ops.distilkernels.add_layer_norm(x, r, w, b, 1e-12)  # noqa: E731
    torch_fn = lambda: F.layer_norm(x + r, (DIM,), w, b, 1e-12)  # noqa: E731
    bytes_moved = 3 * rows * DIM * 4
    return f"add_layer_norm ({rows}, {DIM})", {"ours": ours, "torch": torch_fn}, bytes_moved / 1e9, "GB/s"


def bias_act_case(rows: int):
    x, b = torch.randn(rows, HIDDEN_DIM), torch.randn(HIDDEN_DIM) * 0.01
    y = x.clone()
    ours = lambda: torch.ops.distilkernels.bias_act_(y, b, "gelu")  # noqa: E731
    torch_fn = lambda: F.gelu(x + b)  # noqa: E731
    torch_inplace = lambda: torch.ops.aten.gelu_(y.add_(b))  # noqa: E731
    bytes_moved = 2 * rows * HIDDEN_DIM * 4
    return (f"bias_act_ gelu ({rows}, {HIDDEN_DIM})", {"ours": ours, "torch": torch_fn, "torch in-place": torch_inplace},
            bytes_moved / 1e9, "GB/s")


def attention_case(batch: int, seqlen: int, masked: bool):
    qkv = torch.randn(batch * seqlen, 3 * DIM)
    q, k, v = (t.view(batch, seqlen, N_HEADS, HEAD_DIM) for t in qkv.split(DIM, dim=1))
    mask = None
    if masked:  # right padding, lengths spread over [seqlen / 4, seqlen]
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(seqlen // 4, seqlen + 1, (batch,), generator=gen)
        lengths[0] = seqlen
        mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (batch, n_heads, seqlen, head_dim) views, as HF does
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    scale = HEAD_DIM ** -0.5
    ours = lambda: torch.ops.distilkernels.attention(q, k, v, mask, scale)  # noqa: E731
    torch_fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sdpa_mask)  # noqa: E731
    attended = seqlen if mask is None else mask.sum(1).double().mean().item()
    flops = 4 * batch * N_HEADS * seqlen * attended * HEAD_DIM  # useful work: attended keys only
    tag = f"masked, {attended / seqlen:.0%} keys" if masked else "no mask"
    return (f"attention ({batch}, {N_HEADS}, {seqlen}, {HEAD_DIM}) {tag}", {"ours": ours, "torch sdpa": torch_fn},
            flops / 1e9, "GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.processor() or platform.machine()}, isa={_C.vector_isa()}, threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, commit {commit}\n")
    print("| case | provider | median ms | torch / ours | our rate |")
    print("|---|---|---:|---:|---:|")
    cases = [layer_norm_case(8 * 128), layer_norm_case(8 * 512), bias_act_case(8 * 128),
             attention_case(8, 128, False), attention_case(8, 128, True), attention_case(8, 512, False),
             attention_case(8, 512, True), attention_case(1, 128, False)]
    for name, providers, work, unit in cases:
        times = side_by_side(providers, args.rounds)
        ours = times["ours"]
        for provider, t in times.items():
            ratio = "" if provider == "ours" else f"{t / ours:.2f}x"
            rate = f"{work / ours:.1f} {unit}" if provider == "ours" else ""
            print(f"| {name} | {provider} | {t * 1e3:.3f} | {ratio} | {rate} |")


if __name__ == "__main__":
    main()
