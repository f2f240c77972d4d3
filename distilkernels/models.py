"""Optimized model classes: HF's DistilBERT, BERT and RoBERTa classes with the fused modules built in.

    from distilkernels.models import DistilBertForSequenceClassification
    model = DistilBertForSequenceClassification.from_pretrained(local_dir)   # a stock HF checkpoint
    model = DistilBertForSequenceClassification.from_pretrained(local_dir, dtype=torch.bfloat16)  # bf16 path

Each class subclasses its HF namesake (isinstance holds), loads stock checkpoints and saves checkpoints that
stock HF loads back unchanged: parameter names are HF's own. q/k/v stay separate parameters; the fused
(3*dim, dim) projection is built from them on first use and rebuilt whenever they change.
The attention implementation defaults to "distilkernels"; pass attn_implementation= to pick another.
There is one class per head of every family row (families.py), written out below so that each has an
importable, picklable module-level name.
"""
from __future__ import annotations

import transformers

from . import hf, hf_attention
from .patching import install_input_checks, replace_modules


class _Optimized:
    """Mixin: swap in the fused modules right after HF builds the model."""

    def __init__(self, config, *args, **kwargs):
        hf_attention.register()
        super().__init__(config, *args, **kwargs)
        replace_modules(self)
        install_input_checks(self)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation is None:
            hf_attention.register()
            attn_implementation = hf.NAME
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)


class DistilBertModel(_Optimized, transformers.DistilBertModel):
    """transformers.DistilBertModel running on distilkernels' fused kernels."""


class DistilBertForMaskedLM(_Optimized, transformers.DistilBertForMaskedLM):
    """transformers.DistilBertForMaskedLM running on distilkernels' fused kernels."""


class DistilBertForSequenceClassification(_Optimized, transformers.DistilBertForSequenceClassification):
    """transformers.DistilBertForSequenceClassification running on distilkernels' fused kernels."""


class DistilBertForQuestionAnswering(_Optimized, transformers.DistilBertForQuestionAnswering):
    """transformers.DistilBertForQuestionAnswering running on distilkernels' fused kernels."""


class DistilBertForTokenClassification(_Optimized, transformers.DistilBertForTokenClassification):
    """transformers.DistilBertForTokenClassification running on distilkernels' fused kernels."""


class DistilBertForMultipleChoice(_Optimized, transformers.DistilBertForMultipleChoice):
    """transformers.DistilBertForMultipleChoice running on distilkernels' fused kernels."""


class BertModel(_Optimized, transformers.BertModel):
    """transformers.BertModel running on distilkernels' fused kernels."""


class BertForMaskedLM(_Optimized, transformers.BertForMaskedLM):
    """transformers.BertForMaskedLM running on distilkernels' fused kernels."""


class BertForSequenceClassification(_Optimized, transformers.BertForSequenceClassification):
    """transformers.BertForSequenceClassification running on distilkernels' fused kernels."""


class BertForQuestionAnswering(_Optimized, transformers.BertForQuestionAnswering):
    """transformers.BertForQuestionAnswering running on distilkernels' fused kernels."""


class BertForTokenClassification(_Optimized, transformers.BertForTokenClassification):
    """transformers.BertForTokenClassification running on distilkernels' fused kernels."""


class BertForMultipleChoice(_Optimized, transformers.BertForMultipleChoice):
    """transformers.BertForMultipleChoice running on distilkernels' fused kernels."""


class RobertaModel(_Optimized, transformers.RobertaModel):
    """transformers.RobertaModel running on distilkernels' fused kernels."""


class RobertaForMaskedLM(_Optimized, transformers.RobertaForMaskedLM):
    """transformers.RobertaForMaskedLM running on distilkernels' fused kernels."""


class RobertaForSequenceClassification(_Optimized, transformers.RobertaForSequenceClassification):
    """transformers.RobertaForSequenceClassification running on distilkernels' fused kernels."""


class RobertaForQuestionAnswering(_Optimized, transformers.RobertaForQuestionAnswering):
    """transformers.RobertaForQuestionAnswering running on distilkernels' fused kernels."""


class RobertaForTokenClassification(_Optimized, transformers.RobertaForTokenClassification):
    """transformers.RobertaForTokenClassification running on distilkernels' fused kernels."""


class RobertaForMultipleChoice(_Optimized, transformers.RobertaForMultipleChoice):
    """transformers.RobertaForMultipleChoice running on distilkernels' fused kernels."""


__all__ = [
    "DistilBertModel",
    "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification",
    "DistilBertForQuestionAnswering",
    "DistilBertForTokenClassification",
    "DistilBertForMultipleChoice",
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "BertForTokenClassification",
    "BertForMultipleChoice",
    "RobertaModel",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "RobertaForQuestionAnswering",
    "RobertaForTokenClassification",
    "RobertaForMultipleChoice",
]
