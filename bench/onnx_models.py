"""ONNX-fed peers: the model exported once to ONNX, then ONNX Runtime (with its BERT fusions, fp32 and dynamic
int8) and OpenVINO (f32 or bf16 inference precision). Exports are cached per model object for the run."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings

import torch

from bench.workload import model_summary

ORT_FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu")
# id(model) -> {"dir": TemporaryDirectory, "plain": path, "fused": path, "fused_ops": {...}, "int8": path}
_CACHE: dict[int, dict] = {}


class _KeywordCall(torch.nn.Module):
    """model(input_ids=..., attention_mask=...)[0] with a plain two-argument forward: the tracer binds positional
    arguments, which HF's decorated forwards (BERT's use_cache default) do not take."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


@contextlib.contextmanager
def quiet_logs():
    """ORT's optimizer and quantizer warn through module loggers (e.g. about a tiny test vocab)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _entry(model) -> dict:
    if id(model) not in _CACHE:
        tmp = tempfile.TemporaryDirectory(prefix="distilkernels-onnx-")
        _CACHE[id(model)] = {"dir": tmp}
    return _CACHE[id(model)]


def plain_onnx(model: torch.nn.Module, example) -> str:
    """`model` exported with the TorchScript exporter (dynamo=False: no onnxscript needed, and ORT's BERT fusions
    match its graph), HF eager attention, dynamic batch and seqlen axes. What OpenVINO is fed."""
    entry = _entry(model)
    if "plain" not in entry:
        import copy

        eager = copy.deepcopy(model).eval().cpu()
        eager.set_attn_implementation("eager")
        path = os.path.join(entry["dir"].name, "model.onnx")
        axes = {0: "batch", 1: "seqlen"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(_KeywordCall(eager), tuple(t.cpu() for t in example), path, dynamo=False,
                              opset_version=17, input_names=["input_ids", "attention_mask"],
                              output_names=["output"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "output": axes})
        entry["plain"] = path
    return entry["plain"]


def fused_onnx(model: torch.nn.Module, example) -> tuple[str, dict[str, int]]:
    """The plain export with ORT's BERT fusions applied, and the count of each fused operator."""
    entry = _entry(model)
    if "fused" not in entry:
        from onnxruntime.transformers.optimizer import optimize_model

        sizes = model_summary(model)
        with quiet_logs():
            optimized = optimize_model(plain_onnx(model, example), model_type="bert", num_heads=sizes["n_heads"],
                                       hidden_size=sizes["dim"])
        entry["fused_ops"] = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        entry["fused"] = os.path.join(entry["dir"].name, "model.opt.onnx")
        optimized.save_model_to_file(entry["fused"])
    return entry["fused"], entry["fused_ops"]


def int8_onnx(model: torch.nn.Module, example) -> str:
    """The fused model through ORT's dynamic int8 quantization (per-channel weights, activations quantized per
    tensor at run time)."""
    entry = _entry(model)
    if "int8" not in entry:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fused, _ = fused_onnx(model, example)
        entry["int8"] = os.path.join(entry["dir"].name, "model.int8.onnx")
        with quiet_logs():
            # Shape inference cannot type the outputs of ORT's fused contrib ops: they are fp32.
            quantize_dynamic(fused, entry["int8"], weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return entry["int8"]


def ort_runner(path: str, threads: int):
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


def openvino_runner(path: str, threads: int, precision: str):
    """OpenVINO on the CPU with `precision` ("f32" or "bf16") asked explicitly: left unset, OpenVINO runs bf16 on
    CPUs with AMX or AVX512-BF16, silently. LATENCY hint (one stream), `threads` inference threads.
    Returns (run, the precision OpenVINO reports it uses)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(input_ids, attention_mask):
        result = request.infer({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(result[output].copy())

    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    return run, getattr(used, "get_type_name", lambda: str(used))()
