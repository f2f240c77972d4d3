"""`distilkernels.patch(model)`: swap fused modules into an existing Hugging Face model, reversibly.

One declarative table decides what is replaced: a row maps an HF module class to the fused class that
replaces it. Adding a model family is adding rows. Only instances are touched (never a class or a module
attribute of transformers), and the handle puts every original module back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert import modeling_bert as hf_bert
from transformers.models.distilbert import modeling_distilbert as hf_distilbert

from . import hf
from .modules import BERT_BLOCK, DISTILBERT_BLOCK, FusedBlock, FusedEncoder, fused_class


@dataclass(frozen=True)
class Row:
    family: str
    original: type  # exact HF class matched
    replacement: type  # subclass of `original` with a `from_module(original_instance)` constructor


def _row(family: str, original: type, mixin: type, **attrs) -> Row:
    return Row(family, original, fused_class(family, original, mixin, **attrs))


REPLACEMENTS: tuple[Row, ...] = (
    _row("distilbert", hf_distilbert.TransformerBlock, FusedBlock, LAYOUT=DISTILBERT_BLOCK),
    _row("distilbert", hf_distilbert.Transformer, FusedEncoder, OUTPUT=BaseModelOutput),
    _row("bert", hf_bert.BertLayer, FusedBlock, LAYOUT=BERT_BLOCK),
    _row("bert", hf_bert.BertEncoder, FusedEncoder, OUTPUT=BaseModelOutputWithPastAndCrossAttentions),
)

# Models patch() accepts: the PreTrainedModel base class of each family.
SUPPORTED_MODELS: dict[str, type] = {
    "distilbert": hf_distilbert.DistilBertPreTrainedModel,
    "bert": hf_bert.BertPreTrainedModel,
}
# The encoders inside them, whose inputs patch() validates.
BASE_MODELS: tuple[type, ...] = (hf_distilbert.DistilBertModel, hf_bert.BertModel)


def _rows_by_class() -> dict[type, Row]:
    return {row.original: row for row in REPLACEMENTS}


def supported_names() -> str:
    return ", ".join(f"{cls.__name__} (and its subclasses)" for cls in SUPPORTED_MODELS.values())


def check_supported(model) -> None:
    if not isinstance(model, tuple(SUPPORTED_MODELS.values())):
        raise TypeError(f"distilkernels.patch() supports {supported_names()}: DistilBertModel, BertModel and their "
                        f"ForMaskedLM, ForSequenceClassification, ForQuestionAnswering, ForTokenClassification and "
                        f"ForMultipleChoice heads; got {type(model).__name__}")


def replace_modules(model: torch.nn.Module, *, unpad: bool = True) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every module matching a table row; returns (parent, name, original) for each swap.
    Modules already fused are left as they are, so replacing twice is harmless."""
    rows = _rows_by_class()
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            row = rows.get(type(child))
            if row is None:
                continue
            new = row.replacement.from_module(child)
            if isinstance(new, FusedEncoder):
                new.unpad = unpad
            parent._modules[name] = new
            swaps.append((parent, name, child))
    return swaps


def validate_inputs(base_model, args, kwargs) -> None:
    """Forward pre-hook of the patched base model: reject input HF would mishandle or fail on obscurely."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    shaped = input_ids if input_ids is not None else embeds
    if shaped is None:
        return
    batch, seqlen = shaped.shape[0], shaped.shape[1]
    limit = base_model.config.max_position_embeddings
    if seqlen > limit and kwargs.get("position_ids") is None:
        raise ValueError(f"input_ids has seqlen {seqlen} > config.max_position_embeddings={limit}: "
                         f"the model has no position embedding beyond {limit}; truncate the input")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 4:
        return  # a prepared 4-D mask: HF applies it as given
    if mask.dim() != 2 or tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must be (batch, seqlen) = {(batch, seqlen)} like input_ids, "
                         f"got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or a 0/1 integer or float tensor, got {mask.dtype}")
    checkable = mask.dtype != torch.bool and not torch.compiler.is_compiling()
    if checkable and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token), "
                         f"got values such as {mask[(mask != 0) & (mask != 1)][:3].tolist()}")


def install_input_checks(model: torch.nn.Module) -> list:
    """validate_inputs as a forward pre-hook on every base model inside `model`; returns the hook handles."""
    return [m.register_forward_pre_hook(validate_inputs, with_kwargs=True)
            for m in model.modules() if isinstance(m, BASE_MODELS)]


@dataclass
class PatchHandle:
    """What patch() did to a model; `.restore()` undoes it exactly."""

    model: torch.nn.Module
    swaps: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    previous_attn_implementation: str | None = None
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        for parent, name, original in reversed(self.swaps):
            parent._modules[name] = original
        for hook in self.hooks:
            hook.remove()
        if self.previous_attn_implementation is not None:
            _set_attn_implementation(self.model, self.previous_attn_implementation)
        self.restored = True
        if getattr(self.model, "_distilkernels_patch", None) is self:
            del self.model._distilkernels_patch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _set_attn_implementation(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):  # older/newer transformers: set the config field directly
        model.config._attn_implementation = name


def patch(model: torch.nn.Module, *, unpad: bool = True) -> PatchHandle:
    """Run `model` (an HF DistilBERT model or head, CPU or CUDA) on distilkernels' fused kernels.

    The model is patched in place and returned results are unchanged up to fp32 rounding (max-abs <= 1e-4
    on real tokens). With `unpad=True` padded batches are computed on their real tokens only and padded
    positions of the last hidden state hold zeros; `unpad=False` keeps HF's padded layout everywhere.
    The fused path is for inference (torch.inference_mode()/no_grad()); when gradients are needed or
    dropout is active the stock HF computation runs. Patching twice returns the first handle.
    Returns a PatchHandle; `handle.restore()` puts back the original modules.
    A sentence-transformers SentenceTransformer or CrossEncoder is accepted too: the HF encoder(s) inside it
    are patched and one handle restores them all (see distilkernels/sentence_transformers.py).
    """
    from . import sentence_transformers as st_wrappers

    if st_wrappers.is_wrapper(model):
        return st_wrappers.patch_wrapper(model, unpad=unpad)
    check_supported(model)
    existing = getattr(model, "_distilkernels_patch", None)
    if existing is not None and not existing.restored:
        return existing
    hf.register()
    handle = PatchHandle(model, previous_attn_implementation=model.config._attn_implementation)
    handle.swaps = replace_modules(model, unpad=unpad)
    handle.hooks = install_input_checks(model)
    _set_attn_implementation(model, hf.NAME)
    model._distilkernels_patch = handle
    return handle
