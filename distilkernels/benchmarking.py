"""End-to-end and per-op benchmarks: one provider table, shared by tests, `bench/` and `python -m distilkernels bench`.

A provider turns an HF model (fp32, eval) into `run(input_ids, attention_mask) -> tensor` (the model's first
output: last_hidden_state, or logits for a head). Before any timing, every provider's output is compared with
HF fp32 eager on the valid (non-padding) positions; one whose max-abs error exceeds its tolerance is WRONG and
gets no time. Providers are timed side by side: round-robin across providers, repeated rounds, median and IQR.

    results = run_bench(GRIDS["quick"], threads=2, out_dir="bench/out")   # results.json, report.md, speedup.png
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RunFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# fp32 reordering noise vs HF eager at distilbert-base (random init), measured: sdpa and torch.compile 2e-6,
# ORT with its BERT fusions 4e-6. 1e-4 leaves room for other weights while a real bug (>= 1e-3) cannot hide.
FP32_ATOL = 1e-4
BASELINE = "hf_sdpa"


class ProviderUnavailable(RuntimeError):
    """A provider that cannot run here (missing package, no patch() yet, wrong device); the message says why."""


@dataclasses.dataclass
class Built:
    run: RunFn
    note: str


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]], Built]
    atol: float = FP32_ATOL


# ----------------------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """batch sequences padded (right) to seqlen; lengths=None means every sequence is full length."""
    name: str
    batch: int
    seqlen: int
    lengths: tuple[int, ...] | None = None

    def inputs(self, vocab_size: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch, seqlen) int64; padding ids are 0 (DistilBERT's pad id)."""
        gen = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(1, vocab_size, (self.batch, self.seqlen), generator=gen)
        lengths = torch.tensor(self.lengths or [self.seqlen] * self.batch)
        attention_mask = (torch.arange(self.seqlen)[None, :] < lengths[:, None]).long()
        return (input_ids * attention_mask).to(device), attention_mask.to(device)

    @property
    def tokens(self) -> int:
        """Valid (non-padding) tokens: the work a user asked for; tokens/s counts these."""
        return sum(self.lengths) if self.lengths else self.batch * self.seqlen


def mixed_shape(batch: int = 16, min_len: int = 8, max_len: int = 128, seed: int = 0) -> Shape:
    """`batch` sequences with lengths uniform in min_len..max_len (fixed seed), right-padded to max_len."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    return Shape(f"mixed{batch}x{max_len}", batch, max_len, tuple(lengths))


def _full(batch: int, seqlen: int) -> Shape:
    return Shape(f"{batch}x{seqlen}", batch, seqlen)


GRIDS = {
    "quick": (_full(1, 128), _full(8, 128), mixed_shape()),
    "full": (_full(1, 128), _full(8, 128), _full(8, 512), _full(32, 128), mixed_shape(),
             mixed_shape(batch=8, min_len=64, max_len=512)),
}


# ----------------------------------------------------------------------------------------------------------
# Providers


def _first_output(out) -> torch.Tensor:
    """last_hidden_state for a base model, logits (start_logits for QA) for a head."""
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def _module_runner(model: torch.nn.Module) -> RunFn:
    @torch.no_grad()
    def run(input_ids, attention_mask):
        return _first_output(model(input_ids=input_ids, attention_mask=attention_mask))

    return run


def _hf_copy(model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def hf_reference(model: torch.nn.Module) -> RunFn:
    """HF fp32 eager attention on a copy of `model`: what every provider is checked against."""
    return _module_runner(_hf_copy(model, "eager"))


def _build_hf(attn_implementation: str):
    def build(model, example):
        return Built(_module_runner(_hf_copy(model, attn_implementation)),
                     f"transformers {_version('transformers')}, attn_implementation={attn_implementation!r}")

    return build


def _build_compile(model, example):
    compiled = torch.compile(_hf_copy(model, "sdpa"), dynamic=False)
    return Built(_module_runner(compiled), "torch.compile(HF sdpa model), inductor default mode, dynamic=False; "
                                          "the warm-up compiles once per shape")


def _build_patched(model, example):
    import distilkernels

    patch = getattr(distilkernels, "patch", None)
    if patch is None:
        raise ProviderUnavailable("distilkernels.patch is not available in this checkout")
    model = copy.deepcopy(model).eval()
    patch(model)
    return Built(_module_runner(model), "deep copy of the HF model, distilkernels.patch(model) in place")


def _build_optimized(model, example):
    try:
        import distilkernels.models as dk_models
    except ImportError as exc:
        raise ProviderUnavailable(f"distilkernels.models is not importable ({exc})") from exc
    cls = getattr(dk_models, type(model).__name__, None)
    if cls is None:
        raise ProviderUnavailable(f"distilkernels.models has no {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="distilkernels-bench-") as tmp, _no_hf_progress_bars():
        model.save_pretrained(tmp)
        optimized = cls.from_pretrained(tmp, dtype=torch.float32).to(model_device(model)).eval()
    return Built(_module_runner(optimized), f"distilkernels.models.{cls.__name__}.from_pretrained(same weights)")


@contextlib.contextmanager
def _no_hf_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ONNX Runtime: export once per model object (cached), optimize with its BERT fusions, one CPU session.
_ORT_CACHE: dict[int, tuple[str, dict[str, int], tempfile.TemporaryDirectory]] = {}
ORT_FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu")


class _KeywordCall(torch.nn.Module):
    """model(input_ids=..., attention_mask=...)[0] with a plain two-argument forward: the tracer binds positional
    arguments, which HF's decorated forwards (BERT's use_cache default) do not take."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return _first_output(self.model(input_ids=input_ids, attention_mask=attention_mask))


def export_onnx(model: torch.nn.Module, example, path: str) -> None:
    """TorchScript-based exporter (dynamo=False): it needs no onnxscript, and ORT's BERT fusions match its graph.
    The traced graph has dynamic batch and seqlen axes; attention is exported from HF eager attention."""
    import warnings

    eager = _hf_copy(model, "eager").cpu()
    input_ids, attention_mask = (t.cpu() for t in example)
    axes = {0: "batch", 1: "seqlen"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(_KeywordCall(eager), (input_ids, attention_mask), path, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["output"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "output": axes})


def optimized_onnx(model: torch.nn.Module, example) -> tuple[str, dict[str, int]]:
    """Path of `model` exported to ONNX with ORT's BERT fusions applied (cached per model object), and the
    count of each fused operator."""
    key = id(model)
    if key not in _ORT_CACHE:
        from onnxruntime.transformers.optimizer import optimize_model

        tmp = tempfile.TemporaryDirectory(prefix="distilkernels-onnx-")
        raw, fused = os.path.join(tmp.name, "model.onnx"), os.path.join(tmp.name, "model.opt.onnx")
        export_onnx(model, example, raw)
        sizes = _model_summary(model)
        with quiet_ort_logs():
            optimized = optimize_model(raw, model_type="bert", num_heads=sizes["n_heads"], hidden_size=sizes["dim"])
        counts = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(fused)
        _ORT_CACHE[key] = (fused, counts, tmp)
    path, counts, _ = _ORT_CACHE[key]
    return path, counts


@contextlib.contextmanager
def quiet_ort_logs():
    """optimize_model warns through loggers named after its modules (e.g. about a tiny test vocab); silence
    warnings while it runs so the progress output stays readable."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _build_onnxruntime(model, example):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ProviderUnavailable("onnxruntime is not installed (pip install onnxruntime)") from exc
    device = model_device(model)
    if device.type != "cpu":
        raise ProviderUnavailable("the onnxruntime provider runs the CPUExecutionProvider on CPU models only")
    path, counts = optimized_onnx(model, example)
    missing = [op for op in ORT_FUSED_OPS if not counts.get(op)]
    if missing:
        raise RuntimeError(f"ORT BERT optimizer did not fuse {missing}; fused ops: {counts}")
    threads = torch.get_num_threads()
    fused = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
    note = (f"onnxruntime {ort.__version__} fp32, torch.onnx.export(dynamo=False) + optimize_model(bert): {fused}; "
            f"intra_op_num_threads={threads}")
    return Built(ort_runner(path, threads), note)


def ort_runner(path: str, threads: int) -> RunFn:
    """One CPUExecutionProvider session on the ONNX model at `path`: run(input_ids, attention_mask) -> output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Spinning worker threads would keep cores busy after each call and slow the next provider in the round.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(input_ids, attention_mask):
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("hf_eager", _build_hf("eager")),
    Provider("hf_sdpa", _build_hf("sdpa")),
    Provider("torch_compile", _build_compile),
    Provider("onnxruntime", _build_onnxruntime),
    Provider("distilkernels_patched", _build_patched),
    Provider("distilkernels_optimized", _build_optimized),
)}


# ----------------------------------------------------------------------------------------------------------
# Checking and timing


def max_error(out: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Max-abs error over valid positions (token outputs), or over everything (pooled outputs like logits)."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        return float("inf")
    if out.dim() >= 2 and tuple(out.shape[:2]) == tuple(attention_mask.shape):
        valid = attention_mask.bool().cpu()
        out, ref = out[valid], ref[valid]
    return (out - ref).abs().max().item() if out.numel() else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, with the device synchronized on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def summarize(samples: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "min_ms": min(samples) * 1e3, "n_samples": len(samples)}


def check_provider(run: RunFn, inputs, reference: torch.Tensor, atol: float) -> tuple[str, float]:
    """("ok" | "WRONG", max-abs error vs the reference on valid positions)."""
    err = max_error(run(*inputs), reference, inputs[1])
    return ("ok" if err <= atol else "WRONG"), err


def _one_line(exc: BaseException) -> str:
    """The exception's first line: dispatcher errors run to 40 lines and would break the markdown table."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def build_providers(model, example, names, log=print) -> dict[str, dict]:
    """name -> {"run", "note", "status", "atol"}; status "ok", "unavailable" or "error" (the note says why)."""
    built = {}
    for name in names:
        provider = PROVIDERS[name]
        entry = {"run": None, "atol": provider.atol}
        try:
            b = provider.build(model, example)
            entry.update(run=b.run, note=b.note, status="ok")
        except ProviderUnavailable as exc:
            entry.update(note=str(exc), status="unavailable")
        except Exception as exc:  # a broken provider is a result to report, not a reason to lose the others
            entry.update(note=_one_line(exc), status="error")
        built[name] = entry
        log(f"  {name}: {entry['status']} - {entry['note']}")
    return built


def time_interleaved(runs: dict[str, Callable[[], object]], device, rounds: int, warmup: int = 1,
                     min_rounds: int = 3, budget_s: float = float("inf")) -> dict[str, list[float]]:
    """Seconds per call for each of `runs`, round-robin: up to `rounds` rounds, none started after `budget_s`
    seconds once `min_rounds` are done. The order rotates each round so no provider always follows another."""
    names, device = list(runs), torch.device(device)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(time_call(runs[name], device))
    return samples


def _check_all(built: dict[str, dict], shape: Shape, inputs, reference: torch.Tensor, log) -> list[dict]:
    rows = []
    for name, entry in built.items():
        log(f"    checking {name} against HF eager (a compiling provider compiles now)")
        row = {"shape": shape.name, "batch": shape.batch, "seqlen": shape.seqlen, "tokens": shape.tokens,
               "provider": name, "status": entry["status"], "note": entry["note"], "atol": entry["atol"]}
        if entry["status"] == "ok":
            try:
                row["status"], row["max_abs_err"] = check_provider(entry["run"], inputs, reference, entry["atol"])
            except Exception as exc:
                row.update(status="error", note=_one_line(exc))
        rows.append(row)
    return rows


def bench_shape(built: dict[str, dict], shape: Shape, vocab_size: int, device, rounds: int, warmup: int,
                reference_run: RunFn, log=lambda msg: None, budget_s: float = float("inf")) -> list[dict]:
    """One row per provider at this shape: checked against HF eager, then the correct ones timed interleaved."""
    inputs = shape.inputs(vocab_size, device)
    rows = _check_all(built, shape, inputs, reference_run(*inputs), log)
    ok = {row["provider"]: row for row in rows if row["status"] == "ok"}
    log(f"    timing {len(ok)} providers: {warmup} warm-up + up to {rounds} interleaved rounds")
    runs = {name: (lambda run=built[name]["run"]: run(*inputs)) for name in ok}
    for name, seconds in time_interleaved(runs, device, rounds, warmup, budget_s=budget_s).items():
        ok[name].update(summarize(seconds))
        ok[name]["tokens_per_s"] = shape.tokens / (ok[name]["median_ms"] / 1e3)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Per-op providers: one table per op (distilkernels vs torch eager vs SDPA vs torch.compile), at the sizes the
# ops see inside distilbert-base. Physical units count only the work the op must do: valid tokens' bytes, and
# attention FLOPs between valid queries and valid keys (padding is overhead, not useful work).


@dataclasses.dataclass
class OpCase:
    """One op at one size: args for every provider, the fp32 reference output, and the work it represents.
    `providers` maps name -> fn(*args) -> out; `valid` selects the rows compared (attention: valid queries)."""
    op: str
    name: str
    args: tuple
    providers: dict[str, Callable]
    reference: torch.Tensor
    bytes: int
    flops: int = 0
    valid: torch.Tensor | None = None
    in_place: bool = False

    def fresh_args(self) -> tuple:
        """args, copied for an in-place op so that one provider's runs do not feed the next provider."""
        return tuple(a.clone() if self.in_place and isinstance(a, torch.Tensor) else a for a in self.args)

    def check(self, provider: str) -> float:
        """Max-abs error of one provider against the reference."""
        out, ref = self.providers[provider](*self.fresh_args()).float(), self.reference.float()
        if self.valid is not None:
            out, ref = out[self.valid], ref[self.valid]
        return (out - ref).abs().max().item()


def _eager_attention(q, k, v, key_padding_mask):
    """HF-eager style: materialized scores, additive mask, softmax, second matmul. (batch, seqlen, n_heads, head_dim)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v).transpose(1, 2)


def _sdpa_attention(q, k, v, key_padding_mask):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])
    return out.transpose(1, 2)


def _per_sequence(attention_fn, cu_seqlens: list[int]):
    """Varlen attention as a loop over sequences: what plain PyTorch does without padding."""
    def run(q, k, v, cu_seqlens_t, max_seqlen):
        outs = []
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            q_i, k_i, v_i = (t[None, start:end] for t in (q, k, v))
            mask = torch.ones(1, end - start, dtype=torch.bool, device=q.device)
            outs.append(attention_fn(q_i, k_i, v_i, mask)[0])
        return torch.cat(outs)

    return run


def _attention_cases(device, shape: Shape, n_heads: int, head_dim: int) -> list[OpCase]:
    from . import ops, reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape.batch, shape.seqlen, n_heads, head_dim, generator=gen).to(device) for _ in range(3))
    mask = shape.inputs(2, device)[1].bool()
    lengths = shape.lengths or [shape.seqlen] * shape.batch
    flops = 4 * n_heads * head_dim * sum(n * n for n in lengths)
    io_bytes = 4 * shape.tokens * n_heads * head_dim * q.element_size()
    scale = head_dim ** -0.5
    padded = OpCase(
        "attention", f"attention {shape.name} h{n_heads} d{head_dim}", (q, k, v, mask),
        {"distilkernels": lambda q, k, v, m: ops.attention(q, k, v, key_padding_mask=m),
         "torch_eager": _eager_attention, "torch_sdpa": _sdpa_attention,
         "torch_compile": torch.compile(_eager_attention, dynamic=False)},
        reference.attention(q, k, v, mask, scale)[0], io_bytes, flops, valid=mask)
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    packed = tuple(t[mask].contiguous() for t in (q, k, v))  # (total_tokens, n_heads, head_dim)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    varlen = OpCase(
        "varlen_attention", f"varlen_attention {shape.name} h{n_heads} d{head_dim}", (*packed, cu_t, max(lengths)),
        {"distilkernels": lambda q, k, v, c, s: ops.varlen_attention(q, k, v, c, s),
         "torch_eager": _per_sequence(_eager_attention, cu), "torch_sdpa": _per_sequence(_sdpa_attention, cu),
         "torch_compile": torch.compile(_per_sequence(_eager_attention, cu), dynamic=False)},
        reference.varlen_attention(*packed, cu_t, max(lengths), scale)[0], io_bytes, flops)
    return [padded, varlen]


def _add_layer_norm_eager(x, residual, weight, bias):
    return F.layer_norm(x + residual, weight.shape, weight, bias, 1e-12)


def _bias_gelu_eager(x, bias):
    return F.gelu(x + bias)


def _pointwise_cases(device, tokens: int, dim: int, hidden_dim: int) -> list[OpCase]:
    from . import ops, reference

    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(tokens, dim, generator=gen).to(device) for _ in range(2))
    weight, bias = 1 + 0.1 * torch.randn(dim, generator=gen).to(device), torch.randn(dim, generator=gen).to(device)
    h, h_bias = torch.randn(tokens, hidden_dim, generator=gen).to(device), torch.randn(hidden_dim, generator=gen).to(device)
    layer_norm = OpCase(
        "add_layer_norm", f"add_layer_norm {tokens}x{dim}", (x, residual, weight, bias),
        {"distilkernels": lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-12),
         "torch_eager": _add_layer_norm_eager, "torch_compile": torch.compile(_add_layer_norm_eager, dynamic=False)},
        reference.add_layer_norm(x, residual, weight, bias, 1e-12)[0],
        bytes=(3 * x.numel() + 2 * dim) * x.element_size())  # read x, residual; write out
    expected = h.clone()
    reference.bias_act_(expected, h_bias, "gelu")
    bias_gelu = OpCase(
        "bias_gelu", f"bias_gelu {tokens}x{hidden_dim}", (h, h_bias),
        {"distilkernels": lambda x, b: ops.bias_act_(x, b, "gelu"),  # in place: reruns see last output, no alloc
         "torch_eager": _bias_gelu_eager, "torch_compile": torch.compile(_bias_gelu_eager, dynamic=False)},
        expected, bytes=(2 * h.numel() + hidden_dim) * h.element_size(), in_place=True)  # read x; write x
    return [layer_norm, bias_gelu]


def op_cases(device="cpu", shape: Shape | None = None, n_heads: int = 12, head_dim: int = 64, dim: int = 768,
             hidden_dim: int = 3072) -> list[OpCase]:
    """distilbert-base op sizes; attention on a right-padded batch of mixed lengths (default: 8 sequences <= 128)."""
    shape = shape or mixed_shape(batch=8)
    return _attention_cases(device, shape, n_heads, head_dim) + _pointwise_cases(device, shape.tokens, dim, hidden_dim)


# ----------------------------------------------------------------------------------------------------------
# Environment


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def isa_flags() -> list[str]:
    interesting = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                   "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in interesting if f in flags]
    return []


def git_commit() -> str | None:
    """Short hash of the checkout's HEAD, "-dirty" when tracked code differs from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        # Results written by an earlier run (bench/results) do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device="cpu") -> dict:
    device = torch.device(device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type,
        "cpu": cpu_model(), "cores": os.cpu_count(), "isa": isa_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # > cores: timings are noisy
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "onnxruntime", "onnx", "triton",
                                               "distilkernels")},
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return env


# ----------------------------------------------------------------------------------------------------------
# Running and reporting


def _progress(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return log


def _bar(done: int, total: int, label: str, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"


def default_model(device="cpu") -> torch.nn.Module:
    """distilbert-base shapes, random weights (fixed seed): speed does not depend on the weights' values."""
    import transformers

    torch.manual_seed(0)
    return transformers.DistilBertModel(transformers.DistilBertConfig()).to(device).eval()


def load_model(model_dir: str, device="cpu") -> torch.nn.Module:
    """The HF class the checkpoint was saved from (config.architectures[0]), fp32, eval."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, (config.architectures or ["DistilBertModel"])[0])
    return cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def run_bench(grid, threads: int | None = None, out_dir: str | os.PathLike | None = None, progress: bool = True,
              model: torch.nn.Module | None = None, providers=None, rounds: int = 10, warmup: int = 1,
              budget_s: float = 60.0, device=None) -> dict:
    """Benchmark `providers` (default: all) on each Shape of `grid`; write results.json, report.md and
    speedup.png to out_dir when given. Each shape gets up to `rounds` interleaved rounds (at least 3), fewer once
    its timing has taken `budget_s` seconds. Returns {"env", "model", "rounds", "warmup", "results": [row, ...]}."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is not None:
        torch.set_num_threads(threads)
    log = _progress(progress)
    env = environment(device)  # before timing: the commit is the code that runs, whatever is committed meanwhile
    model = (model or default_model(device)).to(device).eval()
    names = list(providers or PROVIDERS)
    example = grid[0].inputs(model.config.vocab_size, device)
    log(f"building {len(names)} providers for {type(model).__name__} on {device} "
        f"({torch.get_num_threads()} threads)")
    summary = _model_summary(model)
    built = build_providers(model, example, names, log)
    reference_run = hf_reference(model)
    rows = []
    for i, shape in enumerate(grid):
        log(_bar(i, len(grid), f"{shape.name}: checking and timing ({rounds} rounds)"))
        rows += bench_shape(built, shape, model.config.vocab_size, device, rounds, warmup, reference_run, log,
                            budget_s=budget_s)
    log(_bar(len(grid), len(grid), "done"))
    results = {"env": env, "model": summary, "rounds": rounds, "warmup": warmup,
               "results": rows}
    if out_dir is not None:
        write_outputs(results, out_dir)
        log(f"wrote {out_dir}/results.json, report.md, speedup.png")
    return results


def _model_summary(model) -> dict:
    """Sizes in DistilBERT's vocabulary, read from DistilBERT or BERT config names."""
    cfg = model.config

    def first(*names):
        return next((getattr(cfg, n) for n in names if hasattr(cfg, n)), None)

    return {"class": type(model).__name__, "dim": first("dim", "hidden_size"),
            "n_layers": first("n_layers", "num_hidden_layers"), "n_heads": first("n_heads", "num_attention_heads"),
            "hidden_dim": first("hidden_dim", "intermediate_size"), "vocab_size": cfg.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}


def write_outputs(results: dict, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown_report(results))
    plot_speedup(results, out / "speedup.png")


def _by_shape(results: dict) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    shapes = list(dict.fromkeys(r["shape"] for r in results["results"]))
    providers = list(dict.fromkeys(r["provider"] for r in results["results"]))
    return shapes, providers, {(r["shape"], r["provider"]): r for r in results["results"]}


def _speedup(cells, shape: str, provider: str) -> float | None:
    base, row = cells.get((shape, BASELINE)), cells.get((shape, provider))
    if not (base and row and row["status"] == "ok" and base.get("median_ms") and row.get("median_ms")):
        return None
    return base["median_ms"] / row["median_ms"]


def _cell(cells, shape: str, provider: str) -> str:
    row = cells.get((shape, provider))
    if row is None:
        return "-"
    if row["status"] == "WRONG":
        return f"WRONG (err {row['max_abs_err']:.1e})"
    if row["status"] != "ok":
        return row["status"]
    speedup = _speedup(cells, shape, provider)
    return f"{row['median_ms']:.2f} ± {row['iqr_ms']:.2f}" + ("" if speedup is None else f" ({speedup:.2f}x)")


def _caption(results: dict) -> str:
    env, m = results["env"], results.get("model", {})
    load = f", load avg {env['load_avg_1m']:.1f}" if env.get("load_avg_1m") is not None else ""
    return (f"{env['device']} ({env['device_type']}), {env['threads']} threads{load}, commit {env.get('commit')}, "
            f"torch {env['versions'].get('torch')}, {m.get('class', 'model')} dim={m.get('dim')} "
            f"layers={m.get('n_layers')}")


def markdown_report(results: dict) -> str:
    """Rows: shapes; columns: providers' median ms ± IQR and (speedup vs hf_sdpa); then status notes."""
    shapes, providers, cells = _by_shape(results)
    lines = ["# distilkernels end-to-end benchmark", "", _caption(results), "",
             f"Median ms ± IQR over up to {results.get('rounds')} interleaved rounds; (speedup vs {BASELINE}). "
             "WRONG = max-abs error vs HF fp32 eager above tolerance, not timed.", "",
             "| shape | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for shape in shapes:
        lines.append(f"| {shape} | " + " | ".join(_cell(cells, shape, p) for p in providers) + " |")
    lines += ["", "| provider | max-abs err (worst shape) | tolerance | note |", "|---|---|---|---|"]
    for p in providers:
        rows = [cells[(s, p)] for s in shapes if (s, p) in cells]
        errs = [r["max_abs_err"] for r in rows if "max_abs_err" in r]
        err = f"{max(errs):.1e}" if errs else "-"
        lines.append(f"| {p} | {err} | {rows[0]['atol']:.0e} | {rows[0]['note']} |")
    return "\n".join(lines) + "\n"


def plot_speedup(results: dict, path) -> None:
    """Grouped bars: speedup over hf_sdpa, one group per shape, one bar per provider (WRONG/unavailable: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, providers, cells = _by_shape(results)
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 2), 4.5))
    for i, p in enumerate(providers):
        xs = [s_i + (i - (len(providers) - 1) / 2) * width for s_i in range(len(shapes))]
        speedups = [_speedup(cells, s, p) for s in shapes]
        ax.bar(xs, [v or 0.0 for v in speedups], width, label=p)
        for x, v, s in zip(xs, speedups, shapes):
            if v is None:  # say why there is no bar: WRONG, unavailable, error, or not run
                status = cells[(s, p)]["status"] if (s, p) in cells else "not run"
                ax.text(x, 0.02, status, rotation=90, ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel(f"speedup over {BASELINE} (higher is better)")
    ax.set_title(textwrap.fill(_caption(results), 110), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shape(text: str) -> Shape:
    """"BxS" (full-length sequences) or "mixedBxS[@MIN]" (lengths uniform in MIN..S, MIN defaulting to 8,
    fixed seed, right-padded)."""
    mixed = text.startswith("mixed")
    try:
        dims, _, low = text.removeprefix("mixed").partition("@")
        batch, seqlen = (int(n) for n in dims.split("x"))
        min_len = int(low) if low else min(8, seqlen)
    except ValueError:
        raise ValueError(f"a shape is BxS or mixedBxS[@MIN] (e.g. 8x128, mixed16x128, mixed8x512@64), "
                         f"got {text!r}") from None
    return mixed_shape(batch=batch, min_len=min_len, max_len=seqlen) if mixed else _full(batch, seqlen)


def main_bench(argv=None) -> int:
    """`python -m distilkernels bench [--quick] [--threads N] [--out DIR] [--model DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m distilkernels bench", description="Time DistilBERT end to end: HF eager/sdpa, torch.compile, ONNX Runtime and distilkernels, "
                                                 "side by side, each checked against HF fp32 eager first.")
    parser.add_argument("--quick", action="store_true", help="shapes 1x128, 8x128, mixed16x128 only")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes BxS or mixedBxS, e.g. 32x128,mixed32x128")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and ORT's intra-op)")
    parser.add_argument("--out", default="bench/out", help="directory for results.json, report.md, speedup.png")
    parser.add_argument("--model", default=None, help="local HF checkpoint dir (default: random distilbert-base)")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--rounds", type=int, default=10, help="most interleaved timing rounds per shape")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timing per shape after which no new round starts (at least 3 rounds)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    providers = args.providers.split(",") if args.providers else None
    unknown = [p for p in providers or () if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device) if args.model else None
    try:
        grid = tuple(parse_shape(t) for t in args.shapes.split(",")) if args.shapes else \
            GRIDS["quick" if args.quick else "full"]
    except ValueError as exc:
        parser.error(str(exc))
    results = run_bench(grid, threads=args.threads, out_dir=args.out,
                        model=model, providers=providers, rounds=args.rounds, budget_s=args.budget,
                        device=device)
    print(markdown_report(results))
    return 1 if any(r["status"] in ("WRONG", "error") for r in results["results"]) else 0
