"""Command line: `python -m distilkernels info | demo | bench`."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def cmd_info(args) -> int:
    import torch
    import transformers

    import distilkernels
    from distilkernels import _ext, ops
    from distilkernels.benchmarking import cpu_model, isa_flags

    model, flags = cpu_model(), isa_flags()
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
    print(f"cpu features  {' '.join(flags) or 'none of avx/avx512/amx/neon'}")
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


def cmd_demo(args) -> int:
    """Patched vs stock on a padded batch, through the benchmark providers (checked, then timed interleaved)."""
    import torch

    from distilkernels import benchmarking as bm, ops

    if args.threads:
        torch.set_num_threads(args.threads)
    model = bm.load_model(args.model) if args.model else bm.default_model()
    source = args.model or "distilbert-base config, random init"
    shape = bm.mixed_shape(batch=args.batch, min_len=max(1, args.seqlen // 8), max_len=args.seqlen)
    inputs = shape.inputs(model.config.vocab_size)
    print(f"model    {type(model).__name__} ({source}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, fp32")
    print(f"batch    {shape.batch} x {shape.seqlen}, {shape.tokens} real tokens "
          f"({100 * shape.tokens / (shape.batch * shape.seqlen):.0f}%), lengths {list(shape.lengths)}")
    print(f"threads  {torch.get_num_threads()}; distilkernels backend {ops.backend_for(torch.device('cpu'))}")
    names = ["hf_sdpa", "distilkernels_patched"]
    with torch.inference_mode():
        built = bm.build_providers(model, inputs, names, log=lambda msg: None)
        rows = {row["provider"]: row for row in
                bm.bench_shape(built, shape, model.config.vocab_size, "cpu", rounds=args.repeats, warmup=1,
                               reference_run=bm.hf_reference(model))}
    ok = True
    for name in names:
        row = rows[name]
        if row["status"] != "ok":
            print(f"{name:22s} {row['status']}: {row.get('note')}  max err {row.get('max_abs_err', float('nan')):.2e}")
            ok = False
            continue
        print(f"{name:22s} {row['median_ms']:8.1f} ms/batch   max |out - HF eager| on real tokens "
              f"{row['max_abs_err']:.1e} (limit {row['atol']:.0e})")
    if ok:
        speedup = rows["hf_sdpa"]["median_ms"] / rows["distilkernels_patched"]["median_ms"]
        print(f"speedup  {speedup:.2f}x over HF sdpa (median of {args.repeats} interleaved rounds)")
    return 0 if ok else 1


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
