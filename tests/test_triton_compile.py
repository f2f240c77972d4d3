"""Every Triton kernel compiled ahead of time for GPUs this machine does not have: sm_80 (A100) and sm_90
(H100/H200), with the ptxas that ships in the triton wheel.

The interpreter tests (test_triton_ops.py) check what the kernels compute; they cannot see what a GPU
compiler makes of a tile. For every launch plan below and every config that plan may pick, on each target,
this asserts: it compiles; its shared memory fits the target (sm_80 163 KiB, sm_90 227 KiB per block); no
register spills (ptxas gives the kernel no stack frame); fp16/bf16 attention runs on tensor cores (wgmma on
sm_90, mma.sync on sm_80).

The plans come from the launchers' own preparation (`attention_plan`, `add_layer_norm_plan`, ...), on small
CPU tensors shaped as a model passes them (q, k, v as views of one fused QKV projection), so what is compiled
is what would run, argument specialization included. The interpreter must not be on while compiling, and
tests/conftest.py turns it on for this process, so the compiling runs in worker processes
(`python tests/test_triton_compile.py --shard I/N --out FILE`, one per core). Triton caches what it compiled
(keyed by the kernel's source, target and options; under ~/.triton/cache or TRITON_CACHE_DIR): only the
first run after a kernel edit compiles all ~170 kernels (1-2 s each on an idle core); later runs read them.

Representative subset, to keep that first run to a few minutes on 2 cores:
- attention head_dim 32 (all-MiniLM-L6-v2), 64 (BERT, DistilBERT), 128, 256 (the largest ops.attention takes):
  one per BLOCK_D but 16, which no model of the project has (head_dim <= 16);
- add_layer_norm dim 768 (BERT-base) and 4096 (MAX_DIM, the widest row, 16 warps); bias_act_ at BERT's 3072.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
# Shared memory a block may use (opt-in maximum), bytes: A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("float32", "float16", "bfloat16")
HEAD_DIMS = (32, 64, 128, 256)
SEQLEN = 128


# ---------------------------------------------------------------------------------------------------------
# worker side: runs without the interpreter, imports triton and the kernels

def _plans():
    """(case id, dtype name, LaunchPlan) for every case compiled, from the launchers' own argument preparation."""
    import torch

    from distilkernels.triton import attention, bias_act, layer_norm

    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for head_dim in HEAD_DIMS:
            n_heads = max(1, 768 // head_dim)
            qkv = torch.zeros(2, SEQLEN, 3, n_heads, head_dim, dtype=dtype)  # the model's fused projection
            q, k, v = qkv.unbind(2)
            mask = torch.ones(2, SEQLEN, dtype=torch.bool)
            for masked in (True, False):
                plan, _, _ = attention.attention_plan(q, k, v, mask if masked else None, head_dim ** -0.5)
                yield f"attention-{'masked' if masked else 'unmasked'}-{dtype_name}-d{head_dim}", dtype_name, plan
            packed = qkv.flatten(0, 1)  # (total_tokens, 3, n_heads, head_dim)
            cu_seqlens = torch.tensor([0, SEQLEN - 5, 2 * SEQLEN], dtype=torch.int32)
            pq, pk, pv = packed.unbind(1)
            plan, _, _ = attention.varlen_attention_plan(pq, pk, pv, cu_seqlens, SEQLEN + 5, head_dim ** -0.5)
            yield f"varlen_attention-{dtype_name}-d{head_dim}", dtype_name, plan
        for dim in (768, 4096):
            x = torch.zeros(4, dim, dtype=dtype)
            w = torch.ones(dim, dtype=dtype)
            for residual in (x, None):
                plan, *_ = layer_norm.add_layer_norm_plan(x, residual, w, w, 1e-12)
                case = f"add_layer_norm-{'residual' if residual is not None else 'plain'}-{dtype_name}-{dim}"
                yield case, dtype_name, plan
        for activation in bias_act.ACTIVATIONS:
            x = torch.zeros(4, 3072, dtype=dtype)
            plan = bias_act.bias_act_plan(x, torch.zeros(3072, dtype=dtype), activation)
            yield f"bias_act_-{activation}-{dtype_name}", dtype_name, plan


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """REG, STACK, SHARED (static), LOCAL of the one kernel in `cubin`, as cuobjdump reports them."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def _compile(plan, config, arch: int, cuobjdump: str) -> dict:
    """Compile `plan` with `config` for sm_`arch` the way JITFunction.run does, without a device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from distilkernels.triton._common import config_kwargs

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = plan.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**plan.args, **config_kwargs(config)}
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"], cuobjdump)
    return {"dynamic_shared": compiled.metadata.shared, **usage,
            "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx}


def _worker(shard: int, n_shards: int, out: str, match: str = "") -> None:
    import time

    from distilkernels.triton._common import config_kwargs

    cuobjdump = str(_nvidia_bin() / "cuobjdump")
    with open(out, "w") as f:
        for index, (case, dtype, plan) in enumerate(_plans()):
            if index % n_shards != shard or not re.search(match, case):
                continue
            for config in plan.configs:
                for arch in ARCHS:
                    record = {"case": case, "kernel": plan.name, "arch": arch,
                              "config": config_kwargs(config), "dtype": dtype}
                    start = time.perf_counter()
                    try:
                        record.update(_compile(plan, config, arch, cuobjdump))
                    except Exception as exc:  # recorded, and failed on by test_every_config_compiles
                        record["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
                    record["seconds"] = round(time.perf_counter() - start, 2)
                    f.write(json.dumps(record) + "\n")
                    f.flush()


def _nvidia_bin() -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# ---------------------------------------------------------------------------------------------------------
# test side

def _missing_tools() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (_nvidia_bin() / tool).exists()]
    if missing:
        return f"the triton wheel ships no {', '.join(missing)} under {_nvidia_bin()}: cannot compile for a GPU"
    return None


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    n_shards = max(1, min(len(os.sched_getaffinity(0)), 16))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    tmp = tmp_path_factory.mktemp("triton_compile")
    outs = [tmp / f"shard{i}.jsonl" for i in range(n_shards)]
    workers = [subprocess.Popen([sys.executable, __file__, "--shard", f"{i}/{n_shards}", "--out", str(out)],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i, out in enumerate(outs)]
    errors = [(w.communicate(timeout=1800)[1], w.returncode) for w in workers]
    failed = [f"worker exit status {rc}:\n{err[-3000:]}" for err, rc in errors if rc != 0]
    assert not failed, "\n".join(failed)
    return [json.loads(line) for out in outs for line in out.read_text().splitlines()]


def _describe(r: dict) -> str:
    return f"{r['case']} sm_{r['arch']} {r['config']}"


def test_cases_cover_every_kernel_target_and_dtype(records):
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in records}
    kernels = ("attention", "varlen_attention", "add_layer_norm", "bias_act_")
    wanted = {(k, a, d) for k in kernels for a in ARCHS for d in DTYPES}
    assert wanted <= seen, f"never compiled: {sorted(wanted - seen)}"
    for head_dim in HEAD_DIMS:
        assert any(r["case"].endswith(f"-d{head_dim}") for r in records), f"no attention case at head_dim {head_dim}"


def test_every_config_compiles(records):
    failed = [f"{_describe(r)}: {r['error'][:300]}" for r in records if "error" in r]
    assert not failed, f"{len(failed)} of {len(records)} compiles failed:\n" + "\n".join(failed)


def test_shared_memory_within_limit(records):
    over = [f"{_describe(r)}: {(r['dynamic_shared'] + r['shared']) / 1024:.0f} KiB > "
            f"{SHARED_LIMIT[r['arch']] // 1024} KiB"
            for r in records if "error" not in r and r["dynamic_shared"] + r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, f"{len(over)} configs need more shared memory than the GPU has:\n" + "\n".join(over)


def test_no_register_spills(records):
    # spilled registers live in local memory, through the stack frame ptxas gives the kernel
    spills = [f"{_describe(r)}: {r['reg']} registers, {r['stack']} B stack, {r['local']} B local"
              for r in records if "error" not in r and (r["stack"] or r["local"])]
    assert not spills, f"{len(spills)} configs spill registers:\n" + "\n".join(spills)


def test_fp16_bf16_attention_on_tensor_cores(records):
    instruction = {80: "mma_sync", 90: "wgmma"}
    missing = [f"{_describe(r)}: no {instruction[r['arch']]}" for r in records
               if "error" not in r and r["kernel"].endswith("attention") and r["dtype"] != "float32"
               and not r[instruction[r["arch"]]]]
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------------------------------------------------
# grid limits, at the shape level: plans on meta tensors (no memory), as large as users embed a corpus

@pytest.mark.parametrize("batch, seqlen, n_heads", [(6000, 512, 12), (6000, 1, 12), (100_000, 128, 16)])
def test_attention_grid_fits_cuda_limits(batch, seqlen, n_heads):
    pytest.importorskip("triton")
    import torch

    from distilkernels.triton import _common, attention

    head_dim = 64
    q = torch.empty(batch, seqlen, n_heads, head_dim, dtype=torch.float16, device="meta")
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device="meta")
    plan, _, _ = attention.attention_plan(q, q, q, mask, 0.125)
    packed = q.flatten(0, 1)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device="meta")
    varlen_plan, _, _ = attention.varlen_attention_plan(packed, packed, packed, cu_seqlens, seqlen, 0.125)
    for p in (plan, varlen_plan):
        for config in (*p.configs, p.interpreter_config):
            grid = p.grid(config.kwargs)
            assert all(size <= limit for size, limit in zip(grid, _common.GRID_LIMITS)), (p.name, config, grid)
            # every query tile of every (sequence, head) gets exactly one program
            n_programs = 1
            for size in grid:
                n_programs *= size
            assert n_programs == batch * n_heads * -(-seqlen // config.kwargs["BLOCK_M"]), (p.name, config, grid)


def test_grid_past_cuda_limit_is_a_clear_error():
    pytest.importorskip("triton")
    import torch

    from distilkernels.triton import attention

    batch = 2**31 // 12 + 1  # batch * 12 heads passes 2**31 - 1 programs even with one query tile each
    q = torch.empty(batch, 1, 12, 64, dtype=torch.float16, device="meta")
    plan, _, _ = attention.attention_plan(q, q, q, None, 0.125)
    with pytest.raises(ValueError, match=r"attention: grid axis 0 needs \d+ blocks, past CUDA's limit of 2147483647"):
        plan.grid(plan.configs[0].kwargs)


def test_autotune_key_holds_every_constexpr():
    """Two calls that compile differently must not share one autotuned winner: every constexpr argument of an
    autotuned plan (HAS_MASK, BLOCK_D, ...) is in its key."""
    pytest.importorskip("triton")
    import inspect

    import torch

    from distilkernels.triton import attention

    q = torch.empty(2, 100, 12, 64, dtype=torch.float16, device="meta")
    mask = torch.ones(2, 100, dtype=torch.bool, device="meta")
    cu_seqlens = torch.empty(3, dtype=torch.int32, device="meta")
    plans = [attention.attention_plan(q, q, q, m, 0.125)[0] for m in (mask, None)]
    plans.append(attention.varlen_attention_plan(q[0], q[0], q[0], cu_seqlens, 100, 0.125)[0])
    for plan in plans:
        parameters = inspect.signature(getattr(plan.kernel, "fn", plan.kernel)).parameters
        constexprs = {name for name in plan.args if "constexpr" in str(parameters[name].annotation)}
        assert constexprs and constexprs <= set(plan.key), (plan.name, constexprs - set(plan.key))
    masked, unmasked = ([plan.args[k] for k in plan.key] for plan in plans[:2])
    assert masked != unmasked


@pytest.mark.requires_cuda
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_launch_past_65535_sequence_heads(varlen):
    """6,000 sequences x 12 heads in one launch (72,000 (sequence, head) pairs) give bitwise the outputs of
    launches of 500 sequences: each program finds its own tile, and the autotuner's key (which has no batch
    in it) picks the same tile for both."""
    import torch

    from distilkernels import ops
    from distilkernels.triton import _common

    if _common.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to run the compiled kernels on the GPU")
    batch, seqlen, n_heads, head_dim, chunk = 6000, 16, 12, 64, 500
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(3, batch, seqlen, n_heads, head_dim, device="cuda", dtype=torch.float16, generator=g)
    lengths = torch.randint(1, seqlen + 1, (batch,), device="cuda", generator=g)
    mask = torch.arange(seqlen, device="cuda")[None, :] < lengths[:, None]
    name = "varlen_attention" if varlen else "attention"
    launches = _common.LAUNCHES[name]
    if not varlen:
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
        parts = [ops.attention(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk], mask[i:i + chunk], return_lse=True)
                 for i in range(0, batch, chunk)]
        assert torch.equal(out, torch.cat([p[0] for p in parts]))
        assert torch.equal(lse, torch.cat([p[1] for p in parts]))
    else:
        def packed(first, last):
            cu_seqlens = torch.nn.functional.pad(lengths[first:last].cumsum(0), (1, 0)).to(torch.int32)
            rows = mask[first:last]
            return [t[first:last][rows] for t in (q, k, v)], cu_seqlens

        (pq, pk, pv), cu_seqlens = packed(0, batch)
        out = ops.varlen_attention(pq, pk, pv, cu_seqlens, seqlen)
        parts = []
        for i in range(0, batch, chunk):
            (cq, ck, cv), cu = packed(i, i + chunk)
            parts.append(ops.varlen_attention(cq, ck, cv, cu, seqlen))
        assert torch.equal(out, torch.cat(parts))
    assert _common.LAUNCHES[name] == launches + 1 + batch // chunk, f"not every call ran the Triton {name} kernel"
    assert torch.isfinite(out).all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile one shard of the cases; write JSON lines")
    parser.add_argument("--shard", required=True, help="I/N: this worker compiles cases I, I+N, I+2N, ...")
    parser.add_argument("--out", required=True)
    parser.add_argument("--match", default="", help="only the cases whose id matches this regular expression")
    cli = parser.parse_args()
    shard_index, shard_count = map(int, cli.shard.split("/"))
    _worker(shard_index, shard_count, cli.out, cli.match)
