"""Command line: `python -m distilkernels info | demo | bench`."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
              "amx_bf16", "amx_int8", "amx_tile")
    return model, [f for f in wanted if f in flags]


def cmd_info(args) -> int:
    import torch
    import transformers

    import distilkernels
    from distilkernels import _ext, ops

    model, flags = cpu_model_and_flags()
    print(f"distilkernels {distilkernels.__version__}")
    print(f"python        {platform.python_version()}  ({platform.platform()})")
    print(f"torch         {torch.__version__}   threads: {torch.get_num_threads()}")
    print(f"transformers  {transformers.__version__}")
    try:
        import triton
        print(f"triton        {triton.__version__}")
    except ImportError:
        print("triton        not installed")
    print(f"cpu           {model}  ({os.cpu_count()} logical cores)")
    print(f"cpu features  {' '.join(flags) or 'none of avx2/avx512/amx'}")
    print("backends:")
    C = _ext.load_extension()
    if C is None:
        print(f"  cpp     unavailable: {_ext.extension_error()}")
    else:
        used = C.parallel_threads_used()
        print(f"  cpp     available: vector ISA {C.vector_isa()}, OpenMP {'on' if C.openmp_enabled() else 'OFF'}, "
              f"at::parallel_for used {used} of {torch.get_num_threads()} threads")
    why = ops.triton_error()
    if why is not None:
        print(f"  triton  unavailable: {why}")
    elif torch.cuda.is_available():
        print(f"  triton  available on {torch.cuda.get_device_name()}")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("  triton  available on CPU tensors through the interpreter (TRITON_INTERPRET=1; slow, for tests)")
    else:
        print("  triton  installed, but no CUDA device (set TRITON_INTERPRET=1 to run its kernels on the CPU)")
    print("  torch   available (plain PyTorch reference)")
    print(f"dispatch      cpu -> {ops.backend_for(torch.device('cpu'))}, cuda -> {ops.backend_for(torch.device('cuda'))}"
          + (f"  (forced by DISTILKERNELS_BACKEND={os.environ['DISTILKERNELS_BACKEND']})"
             if os.environ.get("DISTILKERNELS_BACKEND") else ""))
    return 0


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cmd_demo(args) -> int:
    import copy

    import torch
    import transformers

    import distilkernels

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = transformers.AutoModel.from_pretrained(args.model).eval()
        source = args.model
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig()).eval()
        source = "distilbert-base config, random init"
    stock = model
    patched = copy.deepcopy(model)
    distilkernels.patch(patched)
    batch, seqlen = args.batch, args.seqlen
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, model.config.vocab_size, (batch, seqlen), generator=g) * mask
    print(f"model    {type(model).__name__} ({source}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, fp32, attn_implementation={stock.config._attn_implementation}")
    print(f"batch    {batch} x {seqlen}, {int(mask.sum())} real tokens ({100 * mask.float().mean():.0f}%), "
          f"lengths {lengths.tolist()}")
    print(f"threads  {torch.get_num_threads()}; backend {distilkernels.ops.backend_for(torch.device('cpu'))}")
    with torch.inference_mode():
        ref = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        out = patched(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
        diff = (out - ref)[valid].abs().max().item()
        runs = {"hf": lambda: stock(input_ids=ids, attention_mask=mask),
                "distilkernels": lambda: patched(input_ids=ids, attention_mask=mask)}
        for fn in runs.values():
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            for name, fn in runs.items():
                times[name].append(_median_ms(fn, 1))
    hf_ms, dk_ms = (statistics.median(times[n]) for n in runs)
    print(f"parity   max |patched - HF| on real tokens: {diff:.2e}  ({'OK' if diff <= 1e-4 else 'FAIL'}, limit 1e-4)")
    print(f"HF       {hf_ms:8.1f} ms/batch")
    print(f"patched  {dk_ms:8.1f} ms/batch   speedup {hf_ms / dk_ms:.2f}x  (median of {args.repeats})")
    return 0 if diff <= 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distilkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CPU features, available backends and why not")
    demo = sub.add_parser("demo", help="patched vs stock DistilBERT on a padded batch: parity and speed")
    demo.add_argument("--model", help="local HF checkpoint directory (default: distilbert-base, random init)")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seqlen", type=int, default=128)
    demo.add_argument("--repeats", type=int, default=7)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sub.add_parser("bench", help="end-to-end benchmark grid (see --help)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from distilkernels.benchmarking import main_bench

        return main_bench(argv[1:])
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
