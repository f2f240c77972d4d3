"""End-to-end providers: one table of everything a forward is timed with.

A provider turns an HF model (fp32, eval) into `run(input_ids, attention_mask) -> tensor` (the model's first
output: last_hidden_state, or logits for a head). `precision` says which arithmetic unit it is meant to use
(fp32, bf16, int8, or bf16x3: fp32 results from three bf16 products): it decides how the provider is checked
against HF fp32 eager (timing.check; bf16x3 as fp32) and which measured GEMM peak its TFLOP/s are a fraction of
(bf16x3: a third of the bf16 peak).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import warnings
from typing import Callable

import torch

from bench import onnx_models
from bench.environment import version
from bench.timing import one_line
from bench.workload import model_device

RunFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BASELINE = "hf_sdpa"


class ProviderUnavailable(RuntimeError):
    """A provider that cannot run here (missing package, wrong device); the message says why."""


@dataclasses.dataclass
class Built:
    run: RunFn
    note: str


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]], Built]
    precision: str = "fp32"


def _first_output(out) -> torch.Tensor:
    """last_hidden_state for a base model, logits (start_logits for QA) for a head."""
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def module_runner(model: torch.nn.Module, context=contextlib.nullcontext) -> RunFn:
    @torch.no_grad()
    def run(input_ids, attention_mask):
        with context():
            return _first_output(model(input_ids=input_ids, attention_mask=attention_mask))

    return run


def hf_copy(model: torch.nn.Module, attn_implementation: str = "sdpa", dtype=torch.float32) -> torch.nn.Module:
    model = copy.deepcopy(model).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def hf_reference(model: torch.nn.Module) -> RunFn:
    """HF fp32 eager attention on a copy of `model`: what every provider is checked against."""
    return module_runner(hf_copy(model, "eager"))


def _cpu_only(model, what: str) -> None:
    if model_device(model).type != "cpu":
        raise ProviderUnavailable(f"{what} runs on CPU models only")


def _build_hf(attn_implementation: str, dtype=torch.float32):
    def build(model, example):
        note = f"transformers {version('transformers')}, attn_implementation={attn_implementation!r}"
        if dtype != torch.float32:
            note += f", model.to({dtype})"
        return Built(module_runner(hf_copy(model, attn_implementation, dtype)), note)

    return build


def _build_compile(dtype):
    def build(model, example):
        import torch._inductor.config as inductor_config

        compiled = torch.compile(hf_copy(model, "sdpa", dtype), dynamic=False)
        # Freezing folds the weights into the graph as constants (and lets inductor pre-pack them); it is read
        # when a shape compiles, which happens on the first call at that shape, inside this context.
        context = lambda: inductor_config.patch(freezing=True)  # noqa: E731
        return Built(module_runner(compiled, context),
                     f"torch.compile(HF sdpa model{'' if dtype == torch.float32 else ', model.to(bf16)'}), "
                     "inductor freezing=True, dynamic=False; compiles once per shape in the warm-up")

    return build


def _build_torch_int8(model, example):
    _cpu_only(model, "torch dynamic int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        quantized = torch.ao.quantization.quantize_dynamic(hf_copy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return Built(module_runner(quantized), "torch.ao.quantization.quantize_dynamic(HF sdpa model, {Linear}, qint8)")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) for the calls inside, the previous setting after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _build_ours(dtype):
    def build(model, example):
        import distilkernels

        ours = copy.deepcopy(model).to(dtype).eval()  # bf16: convert first, then patch
        distilkernels.patch(ours)
        dtype_note = "" if dtype == torch.float32 else f".to({dtype})"
        return Built(module_runner(ours), f"deep copy{dtype_note}, distilkernels.patch(model)")

    return build


def _build_ours_high(model, example):
    """fp32 under torch.set_float32_matmul_precision("high"), set around each call only: our GEMMs as three bf16
    products on the matrix unit (bf16x3), checked to the fp32 limit like every fp32 provider."""
    import distilkernels
    from distilkernels.gemms import bf16x3_allowed

    _cpu_only(model, "bf16x3")
    with matmul_precision("high"):
        allowed = bf16x3_allowed()
    if not allowed:
        raise ProviderUnavailable("bf16x3 needs a matrix unit that takes bf16 (AMX); under 'high' this CPU runs "
                                  "the fp32 GEMMs of distilkernels_fp32")
    ours = copy.deepcopy(model).eval()
    distilkernels.patch(ours)
    return Built(module_runner(ours, lambda: matmul_precision("high")),
                 "deep copy, distilkernels.patch(model), torch.set_float32_matmul_precision('high') around each "
                 "call: fp32 GEMMs as three bf16 products on AMX (linear_bf16x3)")


def _build_ours_int8(model, example):
    import distilkernels

    _cpu_only(model, "distilkernels.quantize")
    quantized = distilkernels.quantize(copy.deepcopy(model).eval())
    return Built(module_runner(quantized), "distilkernels.quantize(deep copy): int8, per-token activation scales")


def _build_optimized(model, example):
    import distilkernels.models as dk_models
    from transformers.utils import logging as hf_logging

    cls = getattr(dk_models, type(model).__name__, None)
    if cls is None:
        raise ProviderUnavailable(f"distilkernels.models has no {type(model).__name__}")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="distilkernels-bench-") as tmp:
            model.save_pretrained(tmp)
            optimized = cls.from_pretrained(tmp, dtype=torch.float32).to(model_device(model)).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Built(module_runner(optimized), f"distilkernels.models.{cls.__name__}.from_pretrained(same weights)")


def _require(package: str) -> str:
    found = version(package)
    if found is None:
        raise ProviderUnavailable(f"{package} is not installed (pip install {package}, or the bench extra)")
    return found


def _build_ort(int8: bool):
    def build(model, example):
        ort_version = _require("onnxruntime")
        _cpu_only(model, "ONNX Runtime's CPUExecutionProvider")
        path, counts = onnx_models.fused_onnx(model, example)
        missing = [op for op in onnx_models.ORT_FUSED_OPS if not counts.get(op)]
        if missing:
            raise RuntimeError(f"ORT BERT optimizer did not fuse {missing}; fused ops: {counts}")
        if int8:
            path = onnx_models.int8_onnx(model, example)
        threads = torch.get_num_threads()
        fused = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
        note = (f"onnxruntime {ort_version} {'int8 quantize_dynamic(per_channel)' if int8 else 'fp32'}, "
                f"torch.onnx.export(dynamo=False) + optimize_model(bert): {fused}; intra_op_num_threads={threads}")
        return Built(onnx_models.ort_runner(path, threads), note)

    return build


def _build_openvino(precision: str):
    def build(model, example):
        ov_version = _require("openvino")
        _cpu_only(model, "OpenVINO's CPU plugin")
        threads = torch.get_num_threads()
        run, used = onnx_models.openvino_runner(onnx_models.plain_onnx(model, example), threads, precision)
        return Built(run, f"openvino {ov_version}, plain ONNX export, INFERENCE_PRECISION_HINT={precision} "
                          f"(reports {used}), PERFORMANCE_HINT=LATENCY, INFERENCE_NUM_THREADS={threads}")

    return build


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("hf_eager", _build_hf("eager")),
    Provider("hf_sdpa", _build_hf("sdpa")),
    Provider("torch_compile_fp32", _build_compile(torch.float32)),
    Provider("onnxruntime_fp32", _build_ort(int8=False)),
    Provider("openvino_f32", _build_openvino("f32")),
    Provider("distilkernels_fp32", _build_ours(torch.float32)),
    Provider("distilkernels_fp32_high", _build_ours_high, "bf16x3"),
    Provider("distilkernels_optimized", _build_optimized),
    Provider("torch_bf16", _build_hf("sdpa", torch.bfloat16), "bf16"),
    Provider("torch_compile_bf16", _build_compile(torch.bfloat16), "bf16"),
    Provider("openvino_bf16", _build_openvino("bf16"), "bf16"),
    Provider("distilkernels_bf16", _build_ours(torch.bfloat16), "bf16"),
    Provider("torch_int8_dynamic", _build_torch_int8, "int8"),
    Provider("onnxruntime_int8", _build_ort(int8=True), "int8"),
    Provider("distilkernels_int8", _build_ours_int8, "int8"),
)}


def build_providers(model, example, names, log=print) -> dict[str, dict]:
    """name -> {"run", "note", "status", "precision"}; status "ok", "unavailable" or "error" (the note says why)."""
    built = {}
    for name in names:
        provider = PROVIDERS[name]
        entry = {"run": None, "precision": provider.precision}
        try:
            b = provider.build(model, example)
            entry.update(run=b.run, note=b.note, status="ok")
        except ProviderUnavailable as exc:
            entry.update(note=str(exc), status="unavailable")
        except Exception as exc:  # a broken provider is a result to report, not a reason to lose the others
            entry.update(note=one_line(exc), status="error")
        built[name] = entry
        log(f"  {name}: {entry['status']} - {entry['note']}")
    return built
