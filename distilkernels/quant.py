"""The int8 GEMMs behind `distilkernels.quantize(model)` (the entry point is in patching.py, beside patch()):
dynamic int8 quantization of the fused blocks' four GEMMs (CPU).

    model = distilkernels.quantize(model)          # patches first if needed; fp32 model, CPU
    with torch.inference_mode():
        out = model(**batch)

Weights are quantized once per output channel (symmetric int8, scale = max|w| / 127) and packed once
(`ops.pack_linear_int8`) for the product this CPU runs fastest (gemms.int8_blocks): VNNI blocks for the AMX tiles,
or, without them, for our AVX512-VNNI dot products or int16 multiply-adds; W^T where torch's int8 GEMM (oneDNN,
VNNI) measured faster than ours. Every product is exact on the full grid. Activations get one scale per token
(symmetric int8, max|x[r]| / 127), quantized in one pass inside `ops.linear_int8`, whose epilogue dequantizes and
adds the bias (and lin1's activation).
Where the CPU's matrix unit takes bf16 (AMX), or bf16 attention runs on AVX512-BF16 dot products (bf16_attention),
the q|k|v GEMM's epilogue rounds its output to bf16 and attention runs on the tiles or the dot products (fp32
softmax statistics), as it does for a bf16 model; its bf16 output is quantized for
the next GEMM as fp32 would be. Measured on a 2-core AMX Xeon (distilbert-base, 2 threads), attention in fp32 was
27% of an int8 forward at 8 x 128 tokens (23% at 1 x 128); the bf16 roundings add ~1% to int8's error against
fp32 (max-abs 0.0799 against 0.0788, min token cosine 0.99980 against 0.99982). Everything else around the
GEMMs (add + LayerNorm, padding removal, the residual stream) stays fp32.

The fp32 parameters are left untouched (state_dict, saving and `PatchHandle.restore()` see the fp32 model);
the int8 copies are rebuilt whenever a source parameter is replaced or modified in place. Where the stock HF
forward runs instead of the fused one (gradients needed, attention weights requested), it runs in fp32.
"""
from __future__ import annotations

import functools

import torch

from . import dispatch, ops
from .gemms import (BoundCalls, BoundOp, DerivedWeights, GemmCalls, bound_calls, gemm_groups, int8_attention_in_bf16,
                    int8_blocks)
from .modules import FusedBlock, _NoGemms

# One scale per token: quantizing each row costs one fused pass, so a coarser per-tensor mode gains nothing.
ACTIVATION_MODES = ("per_token",)
_INT8_NAMES = ("int8", "qint8")


def check_dtype(dtype) -> None:
    if dtype in (torch.qint8, torch.int8) or (isinstance(dtype, str) and dtype.lower() in _INT8_NAMES):
        return
    raise ValueError(f"distilkernels.quantize supports dtype=torch.qint8 (or \"int8\") only, got {dtype!r}; "
                     "for bf16, convert the model (model.to(torch.bfloat16)) and patch it")


class PackInt8:
    """derive for DerivedWeights: (packed int8 weight, weight scales, fp32 bias), in VNNI blocks or the plain
    layout."""

    def __init__(self, vnni: bool):
        self.vnni = vnni

    def __call__(self, weight, bias):
        return (*ops.pack_linear_int8(weight, vnni=self.vnni), bias)


class Int8Gemms:
    """The block's four GEMMs in int8 with per-token activation scales (`ops.linear_int8`), bound for a call by
    `calls` as gemms.DenseGemms' are. Inputs and outputs are fp32 (tokens, features), except q|k|v's output and
    so the attention output's GEMM's input, bf16 where bf16_attention()."""

    def __init__(self, parts, activations: str = "per_token"):
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        self.parts = parts
        self.activations = activations
        self.groups = gemm_groups(parts)
        # name -> {vnni: DerivedWeights}: the C++ backend packs the layout gemms.int8_blocks() picks, any other
        # backend (the torch reference, under force_backend) the plain one, so each layout is kept apart
        self.packed = {name: {} for name in self.groups}
        self.linears = tuple(lin for linears in self.groups.values() for lin in linears)
        self.bound = BoundCalls()  # (activation, backend) -> (params_key of the linears, GemmCalls): gemms.bound_calls

    def forget(self) -> None:
        """Drop the int8 packings and bindings (distilkernels.refresh): the next call quantizes again."""
        for layouts in self.packed.values():
            for derived in layouts.values():
                derived.forget()
        self.bound.clear()

    def calls(self, x, activation: str) -> GemmCalls:
        """The four GEMMs bound to their int8 packings, lin1's with `activation` (see DenseGemms.calls)."""
        backend = dispatch.backend_for(x.device)
        return bound_calls(self.bound, (activation, backend), self.linears,
                           functools.partial(self._bind, backend=backend), activation)

    def _bind(self, name, activation, *, backend):
        bad = {(p.dtype, p.device.type) for lin in self.linears for p in (lin.weight, lin.bias)}
        if bad - {(torch.float32, "cpu")}:  # what quantize() requires, checked again after a cast or move
            raise TypeError(f"a quantized model runs from its fp32 weights on the CPU, got (dtype, device) "
                            f"{sorted(map(str, bad))}: cast or moved after distilkernels.quantize? model.float() / "
                            "model.cpu() restores it; for bf16, patch a bf16 copy of the fp32 model instead")
        if name.endswith("+ln"):  # fp32 output: the block adds and normalizes it itself
            return None
        vnni = backend == "cpp" and int8_blocks()
        layouts = self.packed[name]
        if vnni not in layouts:
            layouts[vnni] = DerivedWeights(self.groups[name], PackInt8(vnni))
        packed, scale, bias = layouts[vnni].get()
        out_features = bias.shape[0]
        # q|k|v in bf16 for attention on the matrix unit; every other output fp32, the residual stream's dtype
        # (the attention output's GEMM reads bf16)
        out_dtype = torch.bfloat16 if name == "qkv" and bf16_attention() else torch.float32
        if backend == "cpp":  # the C++ op itself (its checks in C++): runnable by the C++ block loop
            return BoundOp(dispatch.implementation("linear_int8", "cpp"),
                           (packed, scale, out_features, bias, activation, out_dtype))
        return lambda x: ops.linear_int8(x, packed, scale, out_features, bias, activation, out_dtype)


def bf16_attention() -> bool:
    """Whether the int8 blocks run attention in bf16 (gemms.int8_attention_in_bf16, which precision_paths reports;
    looked up here on each binding, so a test can replace it)."""
    return int8_attention_in_bf16()


def fused_blocks(model: torch.nn.Module) -> list[FusedBlock]:
    return [m for m in model.modules() if isinstance(m, FusedBlock)]


def use_int8(model: torch.nn.Module, activations: str = "per_token") -> None:
    """Every fused block of `model` (patched, fp32, CPU) runs its GEMMs in int8 from now on (see
    distilkernels.quantize, the public entry point, in patching.py)."""
    check_activations(activations)
    for block in fused_blocks(model):
        parts = block._current_parts()  # (where a module was replaced: parts of the modules there now)
        current = parts.gemms
        if isinstance(current, _NoGemms):  # modules the fused path cannot run: int8 once it can
            current.recipe = (Int8Gemms, {"activations": activations})
        elif not (isinstance(current, Int8Gemms) and current.activations == activations):
            parts.gemms = Int8Gemms(parts, activations)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
