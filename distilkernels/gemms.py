"""The four GEMMs of a fused encoder block (q|k|v, attention output, lin1 + activation, lin2), and the cache of
weights derived from the block's parameters (a fused q|k|v concatenation, packed panels) that they run on.

`DenseGemms` runs them on the block's own fp32/fp16/bf16 weights; `quant.Int8Gemms` provides the same four
methods in int8. Which kernel each one uses for a given tensor is decided here, in one place.
"""
from __future__ import annotations

import torch

from . import dispatch, ops


class DerivedWeights:
    """A value derived from the concatenated weights and biases of some linears (one q|k|v projection, an int8
    packing), rebuilt whenever a source parameter is replaced or modified in place (tracked by data pointer
    and version counter), so load_state_dict, optimizer steps and .to() are all seen."""

    def __init__(self, linears, derive=lambda weight, bias: (weight, bias)):
        self.linears = tuple(linears)
        self.derive = derive
        self.key = self.value = None

    def get(self):
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        if torch.compiler.is_compiling():  # traced once per graph; no data pointers on fake tensors
            return self.derive(torch.cat(weights), torch.cat(biases))
        # (inference tensors have no version counter; they cannot change outside inference mode either)
        key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype, p.device)
                    for p in weights + biases)
        if key != self.key:
            with torch.no_grad():
                self.value = self.derive(torch.cat(weights), torch.cat(biases))
            self.key = key
        return self.value


def _pack(weight, bias):
    return ops.pack_linear_weight(weight), bias


class DenseGemms:
    """The block's four GEMMs on its own (fp32/fp16/bf16) weights. Another implementation (int8, say)
    provides the same four methods and replaces `parts.gemms`.

    fp32 on the C++ backend runs `linear_packed` on weights packed once (rebuilt when a weight changes), with
    lin1's bias and activation in the GEMM's epilogue; other dtypes and backends run `linear` + `bias_act_`."""

    def __init__(self, parts):
        self.parts = parts
        self.fused_qkv = DerivedWeights((parts.q, parts.k, parts.v))
        self.packed = {name: DerivedWeights(linears, _pack) for name, linears in (
            ("qkv", (parts.q, parts.k, parts.v)), ("out", (parts.out,)), ("lin1", (parts.lin1,)),
            ("lin2", (parts.lin2,)))}

    @staticmethod
    def _use_packed(x) -> bool:
        return not torch.compiler.is_compiling() and dispatch.has_kernel("linear_packed", x)

    def _packed(self, name, x, activation="none"):
        packed, bias = self.packed[name].get()
        return ops.linear_packed(x, packed, bias.shape[0], bias, activation)

    def qkv(self, x):  # (tokens, dim) -> (tokens, 3*dim), bias included: one GEMM for q|k|v
        if self._use_packed(x):
            return self._packed("qkv", x)
        weight, bias = self.fused_qkv.get()
        return ops.linear(x, weight, bias)

    def out(self, x):  # (tokens, dim) -> (tokens, dim), bias included
        if self._use_packed(x):
            return self._packed("out", x)
        return ops.linear(x, self.parts.out.weight, self.parts.out.bias)

    def lin1_act(self, x, activation):  # (tokens, dim) -> activation(lin1(x)), (tokens, hidden_dim)
        if self._use_packed(x):
            return self._packed("lin1", x, activation)
        f = ops.linear(x, self.parts.lin1.weight)  # without bias: bias_act_ adds it, in place
        ops.bias_act_(f, self.parts.lin1.bias, activation)
        return f

    def lin2(self, x):  # (tokens, hidden_dim) -> (tokens, dim), bias included
        if self._use_packed(x):
            return self._packed("lin2", x)
        return ops.linear(x, self.parts.lin2.weight, self.parts.lin2.bias)
