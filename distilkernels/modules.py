"""Fused replacements for Hugging Face encoder modules.

Each replacement subclasses the module it replaces (isinstance, state_dict keys, repr and HF's output
capture hooks keep working) and shares its parameters and children; only the forward differs:

    x (tokens, dim) -> one GEMM for q|k|v (dim -> 3*dim) -> fused attention on strided q/k/v views
      -> out_lin GEMM -> add_layer_norm(. , x) -> lin1 GEMM without bias -> bias_act_ in place
      -> lin2 GEMM -> add_layer_norm(. , h)

The fused path is inference-only for now: whenever gradients are needed (grad mode with trainable
parameters), dropout is active, attention weights are requested, or the mask comes in another format,
the stock HF forward runs instead, so training stays correct.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.distilbert import modeling_distilbert as hf_distilbert

from . import ops
from .hf import capturing, key_padding_mask_of
from .padding import pad, unpad, unpad_info

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def activation_name(module: torch.nn.Module) -> str | None:
    """The bias_act_ name of an HF activation module, or None if we have no fused kernel for it."""
    from transformers.activations import GELUActivation

    if type(module) is GELUActivation and not getattr(module, "use_gelu_python", False):
        return "gelu"  # exact erf GELU
    if type(module) is torch.nn.ReLU:
        return "relu"
    return None


def _dropout_active(module: torch.nn.Module) -> bool:
    return module.training and any(m.p > 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))


def needs_stock_forward(module: torch.nn.Module, sample: torch.Tensor) -> bool:
    """True when the fused inference path must not run for `module` on input `sample`."""
    if sample.dtype not in _SUPPORTED_DTYPES:
        return True
    if torch.is_grad_enabled() and (sample.requires_grad or any(p.requires_grad for p in module.parameters())):
        return True
    return _dropout_active(module) or capturing("attentions")


class FusedQKV:
    """The q/k/v projections concatenated into one (3*dim, dim) weight, rebuilt whenever a source parameter
    is replaced or modified in place (tracked by data pointer and version counter), so load_state_dict,
    optimizer steps and .to() are all seen."""

    def __init__(self, q_lin, k_lin, v_lin):
        self.linears = (q_lin, k_lin, v_lin)
        self.key = None
        self.weight = self.bias = None

    def get(self):
        params = [p for lin in self.linears for p in (lin.weight, lin.bias)]
        if torch.compiler.is_compiling():  # traced once per graph; no data pointers on fake tensors
            return torch.cat(params[0::2]), torch.cat(params[1::2])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if key != self.key:
            with torch.no_grad():
                self.weight = torch.cat(params[0::2])
                self.bias = torch.cat(params[1::2])
            self.key = key
        return self.weight, self.bias


class FusedDistilBertBlock(hf_distilbert.TransformerBlock):
    """DistilBERT TransformerBlock with the fused inference path."""

    @classmethod
    def from_module(cls, block: hf_distilbert.TransformerBlock) -> "FusedDistilBertBlock":
        fused = clone_as(block, cls)
        attn = block.attention
        fused._qkv = FusedQKV(attn.q_lin, attn.k_lin, attn.v_lin)
        fused._act = activation_name(block.ffn.activation)
        return fused

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        batch, seqlen, dim = hidden_states.shape
        mask = key_padding_mask_of(attention_mask, batch, seqlen)
        if mask is NotImplemented or self._act is None or needs_stock_forward(self, hidden_states):
            return super().forward(hidden_states, attention_mask, **kwargs)
        out = self.forward_tokens(hidden_states.reshape(batch * seqlen, dim), batch=batch, seqlen=seqlen,
                                  key_padding_mask=mask)
        return out.view(batch, seqlen, dim)

    def forward_tokens(self, x, *, batch=None, seqlen=None, key_padding_mask=None, cu_seqlens=None,
                       max_seqlen=None):
        """x: (tokens, dim). Padded layout: tokens = batch * seqlen with an optional key_padding_mask
        (batch, seqlen). Packed layout: cu_seqlens (batch + 1,) int32 and max_seqlen. Returns (tokens, dim)."""
        attn, ffn = self.attention, self.ffn
        n_heads, head_dim = attn.n_heads, attn.attention_head_size
        weight, bias = self._qkv.get()
        qkv = torch.addmm(bias, x, weight.t())  # (tokens, 3*dim): one GEMM
        if cu_seqlens is None:
            q, k, v = qkv.view(batch, seqlen, 3, n_heads, head_dim).unbind(2)
            ctx = ops.attention(q, k, v, key_padding_mask=key_padding_mask, softmax_scale=attn.scaling)
        else:
            q, k, v = qkv.view(-1, 3, n_heads, head_dim).unbind(1)
            ctx = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=attn.scaling)
        out = F.linear(ctx.view(x.shape), attn.out_lin.weight, attn.out_lin.bias)
        ln = self.sa_layer_norm
        h = ops.add_layer_norm(out, x, ln.weight, ln.bias, ln.eps)
        f = torch.mm(h, ffn.lin1.weight.t())  # bias folded into the activation kernel below
        ops.bias_act_(f, ffn.lin1.bias, self._act)
        f = F.linear(f, ffn.lin2.weight, ffn.lin2.bias)
        ln = self.output_layer_norm
        return ops.add_layer_norm(f, h, ln.weight, ln.bias, ln.eps)


class FusedDistilBertTransformer(hf_distilbert.Transformer):
    """DistilBERT's layer stack; removes padding once on entry and restores it once on exit.

    With `unpad` (the default) and a padded batch, every GEMM, LayerNorm, activation and the (varlen)
    attention run on the real tokens only; padded positions of the output hold zeros. Where HF needs
    the padded layout per layer (output_hidden_states), and inside torch.compile graphs (the token count
    depends on the data), the layers run padded instead.
    """

    unpad = True

    @classmethod
    def from_module(cls, transformer: hf_distilbert.Transformer) -> "FusedDistilBertTransformer":
        return clone_as(transformer, cls)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        batch, seqlen, _ = hidden_states.shape
        mask = key_padding_mask_of(attention_mask, batch, seqlen)
        if (not self.unpad or mask is None or mask is NotImplemented or capturing("hidden_states")
                or torch.compiler.is_compiling()
                or not all(isinstance(layer, FusedDistilBertBlock) and layer._act is not None
                           for layer in self.layer)
                or needs_stock_forward(self, hidden_states)):
            return super().forward(hidden_states, attention_mask, **kwargs)
        info = unpad_info(mask)
        x = unpad(hidden_states, info)
        for layer in self.layer:
            x = layer.forward_tokens(x, cu_seqlens=info.cu_seqlens, max_seqlen=info.max_seqlen)
        return BaseModelOutput(last_hidden_state=pad(x, info))


def clone_as(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new `cls` instance (a subclass of type(module)) sharing module's parameters, buffers, children and
    hooks; the original is left untouched so it can be put back exactly."""
    assert isinstance(module, cls.__mro__[1]), (type(module), cls)
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for name, value in state.items():  # own copies of the registries, same entries
        if isinstance(value, dict):
            state[name] = type(value)(value)
    new.__dict__.update(state)
    return new
