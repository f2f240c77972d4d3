"""Hugging Face integration: the masks our fused blocks read, the state of HF's output capture, the labels
watch, HF's eager attention math (for the fallbacks). `attn_implementation="distilkernels"` itself is in
hf_attention.py (it asks modules.decide, which reads this module: kept apart so no import circles).

Whatever attention implementation a config names, `key_padding_mask_of` recovers the (batch, kv_len) mask
from it: our 2-D mask, sdpa's 4-D bool mask or eager's additive 4-D mask, as long as it is a pure key-padding
mask (every query row the same, only "attend" / "do not attend" values; an additive one with a real token in
every row, see FULLY_MASKED); anything else is reported as a mask-format fallback and HF's own code runs.
"""
from __future__ import annotations

import contextvars
import inspect
import sys

import torch


NAME = "distilkernels"
ATTENTION_WEIGHTS = "attention weights requested"

try:  # the ContextVar HF's output capturing sets while output_hidden_states / output_attentions is requested
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions: assume capture may be active
    _active_collector = None


def capturing(kind: str) -> bool:
    """True when HF is collecting `kind` ("hidden_states" or "attentions") in the current forward."""
    if torch.compiler.is_compiling():
        return False  # capture hooks are installed eagerly; a compiled graph never records them
    if _active_collector is None:
        return True
    collected = _active_collector.get()
    return bool(collected) and kind in collected


_CAPTURE_HOOKS = "transformers.utils.output_capturing"  # the module of HF's output capturing hooks


def forward_hooks(modules) -> bool:
    """Whether a forward or forward pre-hook is registered globally or on any of `modules`, other than HF's
    output capturing hooks (those act only while capturing, which decide() checks on its own). The fused
    paths call none of a block's submodules, nor, unpadded, the blocks: such hooks would silently not run."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
                if getattr(hook, "__module__", None) != _CAPTURE_HOOKS:
                    return True
    return False


def exporting() -> bool:
    """True while torch.export / torch.onnx.export (dynamo or TorchScript) traces the model: exporters get
    the stock computation, which every exporter can translate."""
    return bool(torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export())


# ---- labels: losses read positions that padding removal would drop -------------------------------------
LABEL_ARGUMENTS = ("labels", "start_positions", "end_positions", "next_sentence_label")
# The forwards of patched heads running in this context, innermost last, as (id of the head's watch, whether it
# got labels); () where no such hook ran. A tuple in a ContextVar, not a stack on the watch: threads (and asyncio
# tasks) sharing one model each have their own context, so one call never pops another's entry.
_labels_given = contextvars.ContextVar("distilkernels_labels_given", default=())


def labels_given() -> bool:
    """True inside the forward of a head model that was given labels (its loss reads padded positions).

    The hooks of a patched head (watch_labels) say so. Where none ran, the head's forward may still be on the
    stack: called as head.forward(...) directly (as wrappers such as PEFT's do, skipping module hooks), or the
    head's base model patched on its own (patch(head.bert)). Then the calling frames are read: a `forward` of a
    module whose signature takes label arguments, holding one that is not None, means labels (a padded layout:
    slower where a caller's own module names an argument `labels`, never wrong)."""
    running = _labels_given.get()
    return running[-1][1] if running else _labels_in_callers()


_LABEL_PARAMS: dict[type, tuple] = {}  # module type -> the label arguments its forward takes
_MAX_FRAMES = 64  # how far up the stack a head's forward is looked for


def _label_params(cls: type) -> tuple:
    if cls not in _LABEL_PARAMS:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
            params = {}
        _LABEL_PARAMS[cls] = tuple(n for n in LABEL_ARGUMENTS if n in params)
    return _LABEL_PARAMS[cls]


def _labels_in_callers() -> bool:
    frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return False
        if frame.f_code.co_name == "forward":
            local = frame.f_locals
            module = local.get("self")
            if isinstance(module, torch.nn.Module):
                names = _label_params(type(module))
                if any(local.get(n) is not None for n in names):
                    return True
        frame = frame.f_back
    return False


class _LabelWatch:
    """Pre- and post-forward hook pair (a module-level class, so hooked models still pickle and deepcopy).
    It keeps no per-call state itself: a head shared by threads runs several forwards at once (before, one list
    of ContextVar tokens per model let one thread reset another's token: ValueError, "created in a different
    Context"); each call's entry lives in its own context (_labels_given)."""

    def __init__(self, names: tuple, positions: tuple):
        self.names, self.positions = names, positions

    def before(self, module, args, kwargs):
        given = any(kwargs.get(n) is not None for n in self.names) or any(
            i < len(args) and args[i] is not None for i in self.positions)
        _labels_given.set(_labels_given.get() + ((id(self), given),))

    def after(self, module, args, kwargs, output):
        running = _labels_given.get()
        if running and running[-1][0] == id(self):  # not where an earlier pre-hook raised before ours ran
            _labels_given.set(running[:-1])


def watch_labels(model: torch.nn.Module) -> list:
    """Hooks on `model` (a head) that flag, for the duration of its forward, whether it got labels.
    Returns the hook handles ([] when its forward takes no label argument)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return []
    names = tuple(n for n in LABEL_ARGUMENTS if n in params)
    if not names:
        return []
    watch = _LabelWatch(names, tuple(params.index(n) for n in names))
    return [model.register_forward_pre_hook(watch.before, with_kwargs=True),
            model.register_forward_hook(watch.after, with_kwargs=True, always_call=True)]


# ---- masks -------------------------------------------------------------------------------------------------
# A row with no real token under an additive (eager) mask: every score there rounds to the dtype's minimum, so
# HF's softmax attends uniformly over all keys (the mean of V), where our kernels, like torch's sdpa on a bool
# mask, give a query with no key zeros (BERT, tiny config: pooler_output 2.7e-3 off, that row's
# last_hidden_state 3e-2). Such a mask runs HF's code; HF's sdpa and our numbers agree there.
FULLY_MASKED = "additive 4-D mask with a fully masked row (HF attends to every key there)"


# A 4-D bool mask handed to an "eager" model as it is (HF passes a prepared 4-D mask through untouched): HF's eager
# attention adds it to the scores, 1.0 where True and 0.0 where False, so it masks nothing, where our kernels would
# apply it as a key-padding mask (tiny BERT: real tokens 4.4e-3 off, pooler_output 3.1e-3). HF's code runs it.
BOOL_ON_EAGER = "4-D bool mask on an eager model (HF adds it to the scores as 1.0 / 0.0)"


def key_padding_mask_of(attention_mask, batch: int, kv_len: int, implementation: str | None = None):
    """(mask, why): mask is None (no padding), the (batch, kv_len) bool key-padding mask (True = attend), or
    NotImplemented when `attention_mask` is not a pure key-padding mask in a format we know, or not one to the
    attention `implementation` HF runs it with (config._attn_implementation; None: as sdpa takes it); `why` then
    says what was found."""
    if attention_mask is None:
        return None, ""
    if not isinstance(attention_mask, torch.Tensor):  # flex_attention's BlockMask, say: HF's code applies it
        return NotImplemented, f"a {type(attention_mask).__name__}, not a tensor"
    if attention_mask.dim() == 2:
        if attention_mask.dtype == torch.bool and tuple(attention_mask.shape) == (batch, kv_len):
            return attention_mask, ""
        return NotImplemented, f"2-D mask {tuple(attention_mask.shape)} {attention_mask.dtype}"
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != kv_len \
            or attention_mask.shape[0] not in (1, batch):
        return NotImplemented, f"mask of shape {tuple(attention_mask.shape)}"
    if attention_mask.dtype == torch.bool and implementation == "eager":
        return NotImplemented, BOOL_ON_EAGER
    if attention_mask.dtype != torch.bool and not attention_mask.dtype.is_floating_point:
        # a caller's own 4-D integer mask: HF's sdpa refuses it, its eager attention adds it to the scores
        return NotImplemented, f"4-D mask of dtype {attention_mask.dtype}"
    row = attention_mask[:, :, :1, :]  # (b, 1, 1, kv_len)
    by_construction = attention_mask.shape[2] == 1 or attention_mask.stride(2) == 0  # HF's expand()ed mask
    if not by_construction and torch.compiler.is_compiling():
        return NotImplemented, "4-D mask whose rows cannot be compared inside a compiled graph"
    if not by_construction and not bool((attention_mask == row).all()):
        return NotImplemented, "4-D mask that is not a key-padding mask (query rows differ)"
    row = row[:, 0, 0, :]
    if row.dtype == torch.bool:
        mask = row
    else:  # additive: 0 = attend, the dtype's min (or -inf) = do not attend; anything else is a bias
        if torch.compiler.is_compiling():
            return NotImplemented, "additive 4-D mask whose values cannot be checked inside a compiled graph"
        mask = row == 0
        if not bool((mask | (row <= torch.finfo(row.dtype).min)).all()):
            return NotImplemented, "additive 4-D mask with values other than 0 and the dtype's minimum"
        if not bool(mask.any(-1).all()):  # ~3 us (1 to 16 rows of 128 to 512, 2 cores)
            return NotImplemented, FULLY_MASKED
    return mask.expand(batch, kv_len), ""


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = attend) -> 0 / dtype's min, as HF's eager_mask builds it."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


def eager_attention(query, key, value, attention_mask, scaling, dropout=0.0, training=False):
    """HF's eager attention on (batch, n_heads, q_len / kv_len, head_dim) inputs; attention_mask is None, a
    2-D bool key-padding mask, or a 4-D bool or additive mask. Returns (out (batch, q_len, n_heads,
    head_dim), weights (batch, n_heads, q_len, kv_len))."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :]
        if attention_mask.dtype == torch.bool:
            attention_mask = additive_mask(attention_mask, scores.dtype)
        scores = scores + attention_mask
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
