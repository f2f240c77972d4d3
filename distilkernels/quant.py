"""The int8 GEMMs behind `distilkernels.quantize(model)` (the entry point is in patching.py, beside patch()):
dynamic int8 quantization of the fused blocks' four GEMMs (CPU).

    model = distilkernels.quantize(model)          # patches first if needed; fp32 model, CPU
    with torch.inference_mode():
        out = model(**batch)

Weights are quantized once per output channel (symmetric int8, scale = max|w| / 127) and packed for the
int8 GEMM (`ops.pack_linear_int8`: brgemm's VNNI blocks on CPUs whose matrix unit takes int8, AMX; W^T for
torch's int8 GEMM elsewhere). Activations get one scale per token (symmetric int8, max|x[r]| / 127), quantized
in one pass inside `ops.linear_int8`, whose epilogue dequantizes and adds the bias (and lin1's activation).
Everything around the GEMMs (fused attention, add + LayerNorm, padding removal) stays fp32.

The fp32 parameters are left untouched (state_dict, saving and `PatchHandle.restore()` see the fp32 model);
the int8 copies are rebuilt whenever a source parameter is replaced or modified in place. Where the stock HF
forward runs instead of the fused one (gradients needed, attention weights requested), it runs in fp32.
"""
from __future__ import annotations

import torch

from . import dispatch, ops
from .gemms import BoundCalls, DerivedWeights, GemmCalls, bound_calls, use_matrix_unit
from .modules import FusedBlock

# One scale per token: quantizing each row costs one fused pass, so a coarser per-tensor mode gains nothing.
ACTIVATION_MODES = ("per_token",)
_INT8_NAMES = ("int8", "qint8")


def check_dtype(dtype) -> None:
    if dtype in (torch.qint8, torch.int8) or (isinstance(dtype, str) and dtype.lower() in _INT8_NAMES):
        return
    raise ValueError(f"distilkernels.quantize supports dtype=torch.qint8 (or \"int8\") only, got {dtype!r}; "
                     "for bf16, convert the model (model.to(torch.bfloat16)) and patch it")


class PackInt8:
    """derive for DerivedWeights: (packed int8 weight, weight scales, fp32 bias), packed for this CPU."""

    def __call__(self, weight, bias):
        vnni = use_matrix_unit("int8") and dispatch.has_kernel("pack_linear_int8", weight)
        return (*ops.pack_linear_int8(weight, vnni=vnni), bias)


class Int8Gemms:
    """The block's four GEMMs in int8 with per-token activation scales (`ops.linear_int8`), bound for a call by
    `calls` as gemms.DenseGemms' are. Inputs and outputs are fp32 (tokens, features)."""

    def __init__(self, parts, activations: str = "per_token"):
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        self.parts = parts
        self.activations = activations
        self.packed = {name: DerivedWeights(linears, PackInt8()) for name, linears in (
            ("qkv", (parts.q, parts.k, parts.v)), ("out", (parts.out,)), ("lin1", (parts.lin1,)),
            ("lin2", (parts.lin2,)))}
        self.linears = tuple(lin for derived in self.packed.values() for lin in derived.linears)
        self.bound = BoundCalls()  # activation -> (params_key of the linears, GemmCalls): gemms.bound_calls

    def calls(self, x, activation: str) -> GemmCalls:
        """The four GEMMs bound to their int8 packings, lin1's with `activation` (see DenseGemms.calls)."""
        return bound_calls(self.bound, activation, self.linears, self._bind, activation)

    def _bind(self, name, activation):
        if name.endswith("+ln"):  # fp32 output: the block adds and normalizes it itself
            return None
        packed, scale, bias = self.packed[name].get()
        out_features = bias.shape[0]
        return lambda x: ops.linear_int8(x, packed, scale, out_features, bias, activation)


def fused_blocks(model: torch.nn.Module) -> list[FusedBlock]:
    return [m for m in model.modules() if isinstance(m, FusedBlock)]


def use_int8(model: torch.nn.Module, activations: str = "per_token") -> None:
    """Every fused block of `model` (patched, fp32, CPU) runs its GEMMs in int8 from now on (see
    distilkernels.quantize, the public entry point, in patching.py)."""
    check_activations(activations)
    for block in fused_blocks(model):
        current = block._parts.gemms
        if not (isinstance(current, Int8Gemms) and current.activations == activations):
            block._parts.gemms = Int8Gemms(block._parts, activations)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
