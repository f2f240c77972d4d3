"""Command line: `python -m distilkernels info | demo`. Benchmarks live in the repository's bench/ directory
(`python bench/run.py --help`)."""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys


def _flat(value) -> str:
    """A mapping (possibly nested) on one line: "a 1, b: c 2, d 3"; anything else as str()."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_flat(v)}" if isinstance(v, dict) else f"{k} {v}" for k, v in value.items())
    return str(value)


def cmd_info(args) -> int:
    import torch
    import transformers

    import distilkernels
    from distilkernels import _ext, gemms, machine, ops

    print(f"distilkernels {distilkernels.__version__}")
    print(f"python        {platform.python_version()}  ({platform.platform()})")
    print(f"torch         {torch.__version__}   threads: {torch.get_num_threads()}")
    print(f"transformers  {transformers.__version__}")
    try:
        import triton
        print(f"triton        {triton.__version__}")
    except ImportError:
        print("triton        not installed")
    print(f"cpu           {machine.cpu_model()}  ({os.cpu_count()} logical cores)")
    print(f"cpu features  {' '.join(machine.isa_flags()) or 'none of avx/avx512/amx/neon'}")
    units = machine.matrix_units()
    print(f"matrix units  bf16: {units['bf16']}, int8: {units['int8']}")
    paths = gemms.precision_paths()
    print("gemm paths (CPU tensors):")
    for precision in ("fp32", "bf16", "int8"):
        print(f"  {precision:6s}{paths[precision]}")
    print("backends:")
    C = _ext.load_extension()
    if C is None:
        print(f"  cpp     unavailable: {_ext.extension_error()}")
    else:
        used = C.parallel_threads_used()
        print(f"  cpp     available: vector ISA {C.vector_isa()}, OpenMP {'on' if C.openmp_enabled() else 'OFF'}, "
              f"at::parallel_for used {used} of {torch.get_num_threads()} threads, our AMX tile loops "
              f"{'on' if C.amx_tiles_enabled() else 'off'}")
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
    cpu, cuda = ops.backend_for(torch.device("cpu")), ops.backend_for(torch.device("cuda"))
    print(f"dispatch      cpu -> {cpu}, cuda -> {cuda}"
          + (f"  (forced by DISTILKERNELS_BACKEND={os.environ['DISTILKERNELS_BACKEND']})"
             if os.environ.get("DISTILKERNELS_BACKEND") else ""))
    for kind, backend in (("cpu", cpu), ("cuda", cuda)):  # a forced backend that cannot run here: ops will raise
        why = ops.backend_unavailable_reason(backend, torch.device(kind))
        if why is not None and (kind == "cpu" or torch.cuda.is_available()):
            print(f"  WARNING: ops on {kind} tensors will raise: {why}")
    return 0


def _demo_model(model_dir: str | None):
    """The checkpoint's own HF class (fp32, eval), or distilbert-base's shape with random weights (seed 0)."""
    import torch
    import transformers

    if model_dir is None:
        torch.manual_seed(0)
        return transformers.DistilBertModel(transformers.DistilBertConfig()).eval()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, (config.architectures or ["DistilBertModel"])[0])
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def _padded_batch(vocab_size: int, batch: int, seqlen: int):
    """Token ids and a right-padded 0/1 mask: lengths uniform in seqlen/8..seqlen, fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=gen)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return torch.randint(1, vocab_size, (batch, seqlen), generator=gen) * mask, mask


def cmd_demo(args) -> int:
    """Patched vs stock (HF sdpa) on a padded batch: both checked against HF fp32 eager on the real tokens,
    then timed in interleaved rounds (distilkernels.timing), medians."""
    import torch

    import distilkernels
    from distilkernels import machine, ops
    from distilkernels.timing import summarize, time_interleaved

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _demo_model(args.model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and "roberta" in model.config.model_type:  # positions start after the padding index
        limit -= model.config.pad_token_id + 1
    if limit is not None and args.seqlen > limit:
        print(f"python -m distilkernels demo: error: --seqlen must be at most {limit} (the model's positions), got "
              f"{args.seqlen}", file=sys.stderr)
        return 2
    ids, mask = _padded_batch(model.config.vocab_size, args.batch, args.seqlen)
    real = mask.bool()
    print(f"model    {type(model).__name__} ({args.model or 'distilbert-base config, random init'}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32")
    print(f"batch    {args.batch} x {args.seqlen}, {int(mask.sum())} real tokens ({100 * mask.float().mean():.0f}%), "
          f"lengths {mask.sum(1).tolist()}")
    print(f"machine  {machine.cpu_model()}, {torch.get_num_threads()} threads; "
          f"distilkernels backend {ops.backend_for(torch.device('cpu'))}")
    copies = {name: copy.deepcopy(model) for name in ("HF eager", "HF sdpa", "distilkernels")}
    copies["HF eager"].set_attn_implementation("eager")
    copies["HF sdpa"].set_attn_implementation("sdpa")
    handle = distilkernels.patch(copies["distilkernels"])
    with torch.inference_mode():
        outs = {name: m(input_ids=ids, attention_mask=mask)[0] for name, m in copies.items()}
        runs = {name: (lambda m=copies[name]: m(input_ids=ids, attention_mask=mask))
                for name in ("HF sdpa", "distilkernels")}
        samples = time_interleaved(runs, "cpu", rounds=args.repeats, warmup=1)
    limit, ok = 1e-4, True  # the project's fp32 parity bound, on every value a caller can read
    for name, seconds in samples.items():
        err = (outs[name][real] - outs["HF eager"][real]).abs().max().item()
        ok = ok and err <= limit
        print(f"{name:14s} {summarize(seconds)['median_ms']:8.1f} ms/batch   max |out - HF eager| on real tokens "
              f"{err:.1e} (limit {limit:.0e}){'' if err <= limit else '  WRONG'}")
    if hasattr(handle, "stats"):
        print(f"paths    {_flat(handle.stats())}")
    medians = {name: summarize(seconds)["median_ms"] for name, seconds in samples.items()}
    print(f"speedup  {medians['HF sdpa'] / medians['distilkernels']:.2f}x over HF sdpa "
          f"(medians of {args.repeats} interleaved rounds)")
    return 0 if ok else 1


def _at_least(low: int, high: int = 1 << 20):
    """An argparse type: an integer in [low, high] (argparse turns the ValueError into a usage error naming the
    option; the upper end keeps torch from overflowing on a huge --threads)."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(text)
        return value
    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distilkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CPU features and matrix units, available backends and why not")
    demo = sub.add_parser("demo", help="patched vs stock DistilBERT on a padded batch: parity and speed")
    demo.add_argument("--model", help="local HF checkpoint directory (default: distilbert-base, random init)")
    demo.add_argument("--batch", type=_at_least(1), default=8)
    demo.add_argument("--seqlen", type=_at_least(1), default=128,
                      help="at most the model's positions")
    demo.add_argument("--repeats", type=_at_least(1), default=7)
    demo.add_argument("--threads", type=_at_least(0), default=0, help="torch threads (default 0: torch's choice)")
    sub.add_parser("bench", help="moved: `python bench/run.py` in a checkout of the repository", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark harness is not part of the installed package
        print("The benchmarks live in the repository's bench/ directory, outside the package: from a checkout, "
              "run `python bench/run.py --help`.", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
