"""`distilkernels.patch(model)`: swap fused modules into an existing Hugging Face model, reversibly.

What is replaced comes from the family rows (families.py): each maps an HF block and encoder class to the
fused class replacing it. Only instances are touched (never a class or a module attribute of transformers),
and the handle puts every original module back.

The attention implementation the model was built with (`config._attn_implementation`: "sdpa", "eager",
"distilkernels", ...) is left as it is. The fused blocks take the key-padding mask whatever format that
implementation prepares; where a block runs HF's own code instead (gradients needed, dropout active,
attention weights requested, a decoder's causal or cross-attention), HF runs it with the implementation
the model names.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from . import hf, hf_attention
from .families import FAMILIES, REPLACEMENTS, family_of, supported_names
from .modules import FusedEncoder, path_stats
from . import quant

# The encoders inside every supported model, whose inputs patch() validates.
BASE_MODELS: tuple[type, ...] = tuple(family.base_model for family in FAMILIES)


def check_supported(model) -> None:
    if family_of(model) is None:
        heads = ", ".join(head.name for family in FAMILIES for head in family.heads)
        raise TypeError(f"distilkernels.patch() supports {supported_names()}: {heads}; "
                        f"got {type(model).__name__}")


def replace_modules(model: torch.nn.Module, *, unpad: bool = True) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every module whose exact class a family row replaces; returns (parent, name, original) for each
    swap. Modules already fused are left as they are, so replacing twice is harmless."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            fused_class = REPLACEMENTS.get(type(child))
            if fused_class is None:
                continue
            new = fused_class.from_module(child)
            if isinstance(new, FusedEncoder):
                new.unpad = unpad
            parent._modules[name] = new
            swaps.append((parent, name, child))
    return swaps


def _check_positions(base_model, name: str, shaped: torch.Tensor, seqlen: int) -> None:
    """The default position ids of `shaped` (input_ids or inputs_embeds) stay inside the position table.

    BERT and DistilBERT number the tokens 0 .. seqlen - 1. RoBERTa's embeddings start at padding_idx + 1 and,
    from input_ids, count only the tokens that are not padding_idx (create_position_ids_from_input_ids): a row
    fits when it holds at most max_position_embeddings - padding_idx - 1 such tokens, however long it is.
    Past the table HF fails inside its forward (RoBERTa: "index 66 is out of bounds for dimension 1 with
    size 66", from the token type buffer)."""
    limit = base_model.config.max_position_embeddings
    embeddings = getattr(base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is None or not hasattr(embeddings, "create_position_ids_from_input_ids"):
        if seqlen > limit:
            raise ValueError(f"{name} has seqlen {seqlen} > config.max_position_embeddings={limit}: "
                             f"the model has no position embedding beyond {limit}; truncate the input")
        return
    room = limit - padding_idx - 1  # RoBERTa's positions padding_idx + 1 .. limit - 1
    if seqlen <= room:
        return
    if name == "input_ids":
        if torch.compiler.is_compiling() or hf.exporting():
            return  # (a data-dependent count: HF's own indexing reports it there)
        longest = int((shaped != padding_idx).sum(dim=1).max()) if shaped.numel() else 0
        if longest <= room:
            return
        raise ValueError(f"input_ids has a row of {longest} tokens other than padding (pad_token_id={padding_idx}) > "
                         f"config.max_position_embeddings={limit} - pad_token_id - 1 = {room}: the model's positions "
                         f"start after the padding index and have no embedding beyond; truncate the input")
    raise ValueError(f"{name} has seqlen {seqlen} > config.max_position_embeddings={limit} - pad_token_id - 1 = "
                     f"{room}: the model's positions start after the padding index and have no embedding beyond; "
                     f"truncate the input")


@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """The names of cls.forward's parameters that can be given by position, after self, in order."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def validate_inputs(base_model, args, kwargs) -> None:
    """Forward pre-hook of the patched base model: reject input HF fails on too, with an error naming the argument
    (HF's own errors come from deep inside its forward, each family's differently). Nothing HF runs is refused.

    The attention mask is checked for its type only: HF's mask preparation (create_bidirectional_mask) runs in the
    patched model as in HF's, so every mask gets what HF gives it. A value is "attend" where it is nonzero (HF
    reads the 2-D mask as `mask.to(torch.bool)`: 2, -1, 0.5 and NaN attend, an additive 0 / -inf mask comes out
    inverted), a mask with no zero in it is dropped whatever its shape, and other shapes are HF's business (a
    (batch, 1) column attends to all keys or to none, extra rows are ignored; fewer rows, other lengths, 1-D or
    3-D masks fail inside HF). The fused blocks then take HF's prepared mask only where it is a pure key-padding
    mask of the input's shape and run HF's code otherwise (see hf.key_padding_mask_of): no check, and no host
    sync, of the mask's values here."""
    if args:  # arguments given by position, named as the model's forward names them (each family its own order)
        kwargs = {**dict(zip(_forward_parameters(type(base_model)), args)), **kwargs}
    input_ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
    name, shaped = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", embeds)
    if shaped is None:
        return
    # HF takes batched input only (a 1-D input_ids fails inside every family's forward, each differently)
    if not isinstance(shaped, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(shaped).__name__}")
    dims, expected = (2, "(batch, seqlen)") if name == "input_ids" else (3, "(batch, seqlen, dim)")
    if shaped.dim() != dims:
        hint = f": add the batch dimension, {name}[None]" if shaped.dim() == dims - 1 else ""
        raise ValueError(f"{name} must be {expected}, got shape {tuple(shaped.shape)}{hint}")
    batch, seqlen = shaped.shape[0], shaped.shape[1]
    if batch == 0 or seqlen == 0:  # HF's attention fails reshaping the empty q/k/v (every family, every implementation)
        raise ValueError(f"{name} has shape {tuple(shaped.shape)}: an empty batch or sequence, which HF's forward "
                         f"fails on too")
    if kwargs.get("position_ids") is None:
        _check_positions(base_model, name, shaped, seqlen)
    if mask is not None and not isinstance(mask, torch.Tensor):  # (HF: AttributeError on mask.ndim)
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")


def install_input_checks(model: torch.nn.Module) -> list:
    """validate_inputs as a forward pre-hook on every base model inside `model`; returns the hook handles."""
    return [m.register_forward_pre_hook(validate_inputs, with_kwargs=True)
            for m in model.modules() if isinstance(m, BASE_MODELS)] + hf.watch_labels(model)


_FLOAT_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16,
                 "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
_INT8_DTYPES = (torch.qint8, torch.int8, "int8", "qint8")


def _resolve_dtype(dtype):
    """(float dtype to convert to or None, whether to quantize to int8) for patch()'s `dtype` argument."""
    if dtype is None:
        return None, False
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key in _INT8_DTYPES:
        return None, True
    if isinstance(key, Hashable) and key in _FLOAT_DTYPES:  # (a list or a dict would raise "unhashable type")
        return _FLOAT_DTYPES[key], False
    raise ValueError(f"distilkernels.patch: dtype must be None (keep the model's), torch.float32, torch.bfloat16, "
                     f"torch.float16 or torch.qint8 (also \"fp32\", \"bf16\", \"fp16\", \"int8\"), got {dtype!r}")


@dataclass
class PatchHandle:
    """What patch() did to a model; `.restore()` puts the original modules back and removes the input checks.
    A dtype conversion done by `patch(model, dtype=...)` is not undone (convert back with model.to())."""

    model: torch.nn.Module
    swaps: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        for parent, name, original in reversed(self.swaps):
            parent._modules[name] = original
        for hook in self.hooks:
            hook.remove()
        self.restored = True
        _mark_owner(self.model, None)

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Which path ran how often in the patched model, and why (see distilkernels.modules.path_stats)."""
        return path_stats(self.model, reset=reset)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _owner(model: torch.nn.Module):
    """The live handle that patched `model` or a model around it, or None."""
    handle = getattr(model, "_distilkernels_patch", None)
    return None if handle is None or handle.restored else handle


def _owners_inside(model: torch.nn.Module) -> list:
    """The live handles of models inside `model`, each once, outermost first."""
    found = []
    for m in model.modules():
        handle = _owner(m)
        if handle is not None and all(handle is not h for h in found):
            found.append(handle)
    return found


def _mark_owner(model: torch.nn.Module, handle) -> None:
    """Record `handle` as the owner of `model` and of every supported model inside it (None: forget the owner
    where it was `handle`'s predecessor there, i.e. any handle now restored)."""
    for m in model.modules():
        if m is model or isinstance(m, BASE_MODELS):
            if handle is not None:
                m._distilkernels_patch = handle
            elif "_distilkernels_patch" in m.__dict__ and m.__dict__["_distilkernels_patch"].restored:
                del m._distilkernels_patch


def patch(model: torch.nn.Module, *, unpad: bool = True, dtype=None) -> PatchHandle:
    """Run `model` (an HF DistilBERT, BERT or RoBERTa model or head, CPU or CUDA) on distilkernels' fused kernels.

    The model is patched in place and returned results are unchanged up to fp32 rounding (max-abs <= 1e-4
    on real tokens). With `unpad=True` padded batches are computed on their real tokens only and padded
    positions of the last hidden state hold zeros; `unpad=False` keeps HF's padded layout everywhere.
    The fused path is for inference (torch.inference_mode()/no_grad()); when gradients are needed or
    dropout is active the stock HF computation runs. Patching twice returns the first handle, and so does
    patching a model inside (or around) one already patched: one handle owns the whole tree and restores it.

    dtype: None (default) keeps the model's dtype; torch.bfloat16 / torch.float16 / torch.float32 convert
    the model first (`model.to(dtype)`) and patch it; torch.qint8 (or "int8") patches an fp32 CPU model and
    runs its GEMMs in int8 (`distilkernels.quantize`).
    The model's attention implementation (config._attn_implementation) is left as it is, and
    `set_attn_implementation` keeps working on the patched model: the fused blocks run whichever it names
    ("sdpa", "eager" or "distilkernels"); where HF's own block code runs instead (see above, and attention
    weights requested), it runs the implementation the model names, so output_attentions works with "eager".
    Returns a PatchHandle; `handle.restore()` puts back the original modules.
    A sentence-transformers SentenceTransformer or CrossEncoder is accepted too: the HF encoder(s) inside it
    are patched and one handle restores them all (see distilkernels/sentence_transformers.py); a float `dtype`
    converts the whole wrapper (Pooling, Dense and the like read the encoder's output in its dtype), and, as
    for a model, restore() keeps that conversion.
    """
    from . import sentence_transformers as st_wrappers

    if not isinstance(unpad, bool):  # ("no" or "False" would read as True)
        raise TypeError(f"distilkernels.patch: unpad must be True or False, got {unpad!r}")
    float_dtype, int8 = _resolve_dtype(dtype)
    if st_wrappers.is_wrapper(model):
        if float_dtype is not None:  # the whole wrapper: its modules after the encoder read the encoder's output
            model.to(float_dtype)
        return st_wrappers.patch_wrapper(model, lambda encoder: patch(encoder, unpad=unpad, dtype=dtype))
    check_supported(model)
    if float_dtype is not None:
        model.to(float_dtype)
    handle = _owner(model)
    if handle is None:
        hf_attention.register()
        inner = _owners_inside(model)
        # A model inside this one patched on its own: its handle takes over the whole tree (its swaps stay, its
        # input checks are installed again for every base model here), so one handle restores everything and
        # the inner patch() call's handle is the one this call returns.
        handle = inner[0] if inner else PatchHandle(model)
        for absorbed in inner:
            for hook in absorbed.hooks:
                hook.remove()
            if absorbed is not handle:
                handle.swaps += absorbed.swaps
                absorbed.swaps, absorbed.restored = [], True
        handle.model = model
        handle.swaps += replace_modules(model, unpad=unpad)
        handle.hooks = install_input_checks(model)
        _mark_owner(model, handle)
    if int8:
        quantize(model)
    return handle


def refresh(model: torch.nn.Module) -> torch.nn.Module:
    """Drop every packed, fused or quantized copy of the weights that `model`'s fused blocks keep; the next
    forward derives them from the weights as they are then. Changes torch counts are seen without this: a
    parameter replaced or loaded (load_state_dict), or changed in place where torch bumps its version counter
    (under no_grad too). Two kinds of change torch does not count need it: writes through `.data`, and in-place
    writes inside torch.inference_mode() to parameters created there (inference tensors have no version
    counter). A submodule replaced (a new nn.Linear, an adapter, another activation) is seen without it too: each
    block call checks its modules are the ones it resolved (FusedBlock._current_parts). Returns the model; a model
    without fused blocks is left as it is."""
    from .quant import fused_blocks

    for block in fused_blocks(model):
        parts = block._current_parts()
        parts.gemms.forget()
        parts.cpp_blocks.clear()
    return model


def quantize(model: torch.nn.Module, dtype=torch.qint8, *, activations: str = "per_token") -> torch.nn.Module:
    """Run the GEMMs of every fused encoder block of `model` in int8 (dynamic quantization, CPU); returns
    `model`, changed in place.

    model: an HF DistilBERT/BERT/RoBERTa model or head (patched here if it is not yet: `distilkernels.patch(model)`),
    one of distilkernels.models' classes, or a SentenceTransformer / CrossEncoder around one; fp32 parameters on
    the CPU. The int8 GEMMs themselves are in quant.py.
    dtype: torch.qint8 or "int8".
    activations: "per_token" (one scale per token; the only mode).
    Quantizing again replaces the int8 GEMMs (e.g. to switch `activations`); `PatchHandle.restore()` (or
    `model._distilkernels_patch.restore()`) puts the original fp32 modules back.
    """
    from . import sentence_transformers as st_wrappers

    if st_wrappers.is_wrapper(model):  # a SentenceTransformer / CrossEncoder: the HF encoders inside it
        patch(model)  # one handle restores them all
        for encoder in st_wrappers.encoders(model):
            quantize(encoder, dtype, activations=activations)
        return model
    quant.check_dtype(dtype)
    quant.check_activations(activations)
    check_supported(model)
    bad = {(p.dtype, p.device.type) for p in model.parameters()} - {(torch.float32, "cpu")}
    if bad:
        raise TypeError(f"distilkernels.quantize needs an fp32 model on the CPU, got parameters with "
                        f"(dtype, device) {sorted(map(str, bad))}")
    if not quant.fused_blocks(model):
        patch(model)
    quant.use_int8(model, activations)
    return model
