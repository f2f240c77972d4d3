"""`distilkernels.quantize(model)`: int8 dynamic quantization of the fused blocks' four GEMMs (CPU).

    model = distilkernels.quantize(model)          # patches first if needed; fp32 model, CPU
    with torch.inference_mode():
        out = model(**batch)

Weights are quantized per output channel (symmetric int8, scale = max|w| / 127) and prepacked for FBGEMM
once; activations are quantized on the fly by `torch.ops.quantized.linear_dynamic` (uint8, 7-bit
`reduce_range` as torch's own dynamic quantization does: FBGEMM's AVX2 path would saturate otherwise).
Everything around the GEMMs (fused attention, add + LayerNorm, bias + GELU, padding removal) stays fp32.

FBGEMM's dynamic linear quantizes a whole activation matrix with one scale. `activations="per_token"` (the
default) gets one scale per token out of it anyway: each row is divided by its own max-abs before the GEMM
and the GEMM's row multiplied back after it (the GEMM is linear, so only the rounding grid changes), at the
cost of two passes over the activations (`ops.normalize_rows` and `ops.scale_rows_`, fused C++ loops).
`activations="per_tensor"` skips them: one scale per call.

The fp32 parameters are left untouched (state_dict, saving and `PatchHandle.restore()` see the fp32 model);
the int8 copies are rebuilt whenever a source parameter is replaced or modified in place. Where the stock HF
forward runs instead of the fused one (gradients needed, attention weights requested), it runs in fp32.
"""
from __future__ import annotations

import warnings

import torch

from . import ops
from .gemms import DerivedWeights
from .modules import FusedBlock

ACTIVATION_MODES = ("per_token", "per_tensor")
_INT8_NAMES = ("int8", "qint8")


def _check_dtype(dtype) -> None:
    if dtype in (torch.qint8, torch.int8) or (isinstance(dtype, str) and dtype.lower() in _INT8_NAMES):
        return
    raise ValueError(f"distilkernels.quantize supports dtype=torch.qint8 (or \"int8\") only, got {dtype!r}; "
                     "for bf16, convert the model (model.to(torch.bfloat16)) and patch it")


def prepack(weight: torch.Tensor, bias: torch.Tensor | None):
    """weight (out_features, in_features), bias (out_features,) or None -> FBGEMM packed int8 weight,
    quantized per output channel, symmetric."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    zero_point = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qweight = torch.quantize_per_channel(weight, scale, zero_point, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


def _packed(linears, with_bias: bool) -> DerivedWeights:
    """int8 packing of cat(weights) (with cat(biases) when with_bias), and the fp32 cat(biases)."""
    return DerivedWeights(linears, lambda weight, bias: (prepack(weight, bias if with_bias else None), bias))


class Int8Gemms:
    """The block's four GEMMs as FBGEMM dynamic int8 linears; the same methods as gemms.DenseGemms.
    Inputs and outputs are fp32 (tokens, features)."""

    def __init__(self, parts, activations: str = "per_token"):
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        self.parts = parts
        self.activations = activations
        per_tensor = activations == "per_tensor"  # per-token: bias added after the row rescale
        self._qkv = _packed((parts.q, parts.k, parts.v), with_bias=per_tensor)
        self._out = _packed((parts.out,), with_bias=per_tensor)
        self._lin1 = _packed((parts.lin1,), with_bias=False)  # bias_act_ adds lin1's bias
        self._lin2 = _packed((parts.lin2,), with_bias=per_tensor)

    def _linear(self, x, packed: DerivedWeights, with_bias: bool = True):
        weight, bias = packed.get()
        if self.activations == "per_tensor":
            return torch.ops.quantized.linear_dynamic(x, weight, True)
        normalized, row_scale = ops.normalize_rows(x)  # every token's max-abs becomes 1
        y = torch.ops.quantized.linear_dynamic(normalized, weight, True)
        return ops.scale_rows_(y, row_scale, bias if with_bias else None)

    def qkv(self, x):  # (tokens, dim) -> (tokens, 3*dim), bias included
        return self._linear(x, self._qkv)

    def out(self, x):  # (tokens, dim) -> (tokens, dim), bias included
        return self._linear(x, self._out)

    def lin1_act(self, x, activation):  # (tokens, dim) -> activation(lin1(x)), (tokens, hidden_dim)
        f = self._linear(x, self._lin1, with_bias=False)
        ops.bias_act_(f, self.parts.lin1.bias, activation)
        return f

    def lin2(self, x):  # (tokens, hidden_dim) -> (tokens, dim), bias included
        return self._linear(x, self._lin2)


def _fused_blocks(model: torch.nn.Module) -> list[FusedBlock]:
    return [m for m in model.modules() if isinstance(m, FusedBlock)]


def quantize(model: torch.nn.Module, dtype=torch.qint8, *, activations: str = "per_token") -> torch.nn.Module:
    """Run the GEMMs of every fused encoder block of `model` in int8 (dynamic quantization, CPU); returns
    `model`, changed in place.

    model: an HF DistilBERT/BERT model or head (patched here if it is not yet: `distilkernels.patch(model)`),
    or one of distilkernels.models' classes; fp32 parameters on the CPU.
    dtype: torch.qint8 or "int8".
    activations: "per_token" (one scale per token, default) or "per_tensor" (one scale per GEMM call).
    Quantizing again replaces the int8 GEMMs (e.g. to switch `activations`); `PatchHandle.restore()` (or
    `model._distilkernels_patch.restore()`) puts the original fp32 modules back.
    """
    from .patching import check_supported, patch

    _check_dtype(dtype)
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    check_supported(model)
    bad = {(p.dtype, p.device.type) for p in model.parameters()} - {(torch.float32, "cpu")}
    if bad:
        raise TypeError(f"distilkernels.quantize needs an fp32 model on the CPU, got parameters with "
                        f"(dtype, device) {sorted(map(str, bad))}")
    if not _fused_blocks(model):
        patch(model)
    for block in _fused_blocks(model):
        current = block._parts.gemms
        if not (isinstance(current, Int8Gemms) and current.activations == activations):
            block._parts.gemms = Int8Gemms(block._parts, activations)
    return model
