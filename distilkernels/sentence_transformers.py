"""sentence-transformers models on the fused kernels: `distilkernels.patch(SentenceTransformer(path))`.

A `SentenceTransformer` or `CrossEncoder` is a `torch.nn.Sequential` of its own modules (Transformer,
Pooling, Normalize, ...); the Hugging Face encoder sits inside the first one (`st[0].auto_model`). Patching
the wrapper patches every supported HF model found inside it and returns one handle whose `restore()` puts
all of them back. Tokenization, pooling, normalization and `encode()`'s own length sorting stay
sentence-transformers' own: only the encoder's blocks change.

sentence-transformers is optional (`pip install "distilkernels[sentence-transformers]"`); this module never
imports it: a model can only be a SentenceTransformer if the package is already loaded.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

# MultiVectorEncoder (sentence-transformers 6: per-token embeddings, ColBERT-style) holds its encoder the same way
_WRAPPER_CLASSES = ("SentenceTransformer", "CrossEncoder", "SparseEncoder", "MultiVectorEncoder")


def is_wrapper(model) -> bool:
    """True for a sentence-transformers model (SentenceTransformer, CrossEncoder, SparseEncoder, MultiVectorEncoder)."""
    package = sys.modules.get("sentence_transformers")
    if package is None:
        return False
    classes = tuple(c for c in (getattr(package, name, None) for name in _WRAPPER_CLASSES) if isinstance(c, type))
    return isinstance(model, classes)


def hf_models(wrapper: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost supported HF models (any family row of families.py) inside a sentence-transformers model."""
    from .families import FAMILIES

    supported = tuple(family.pretrained for family in FAMILIES)
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in wrapper.modules():  # pre-order: a model comes before its own submodules
        if id(module) in inside:
            continue
        if isinstance(module, supported):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def encoders(wrapper) -> list[torch.nn.Module]:
    from .families import supported_names

    models = hf_models(wrapper)
    if not models:
        inner = sorted({type(m).__name__ for m in wrapper.modules() if hasattr(m, "config")})
        raise TypeError(f"distilkernels.patch() found no supported encoder inside this {type(wrapper).__name__}: "
                        f"it supports {supported_names()}; the model holds {inner or 'no Hugging Face model'}")
    return models


@dataclass
class WrapperPatchHandle:
    """What patch() did to a sentence-transformers model: one PatchHandle per HF encoder inside it.
    `.restore()` undoes all of them; usable as a context manager like PatchHandle. A dtype conversion done by
    `patch(wrapper, dtype=...)` (of the whole wrapper) is not undone, as PatchHandle leaves a model's
    (convert back with wrapper.to())."""

    model: torch.nn.Module
    handles: list = field(default_factory=list)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        for handle in reversed(self.handles):
            handle.restore()
        self.restored = True
        if getattr(self.model, "_distilkernels_patch", None) is self:
            del self.model._distilkernels_patch

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Which path ran how often in the wrapper's encoders, and why, summed over them (see
        distilkernels.modules.path_stats)."""
        from .modules import path_stats

        return path_stats(self.model, reset=reset)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def patch_wrapper(wrapper, patch_one) -> WrapperPatchHandle:
    """`patch_one(encoder)` (distilkernels.patch with its options) on every supported HF encoder inside `wrapper`
    (a SentenceTransformer or CrossEncoder), in place, under one handle. Patching twice returns the first handle."""
    existing = getattr(wrapper, "_distilkernels_patch", None)
    if existing is not None and not existing.restored:
        return existing
    handle = WrapperPatchHandle(wrapper)
    for model in encoders(wrapper):
        handle.handles.append(patch_one(model))
    wrapper._distilkernels_patch = handle
    return handle
