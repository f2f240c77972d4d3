"""Optimized model classes: HF's DistilBERT and BERT classes with the fused modules built in.

    from distilkernels.models import DistilBertForSequenceClassification
    model = DistilBertForSequenceClassification.from_pretrained(local_dir)   # a stock HF checkpoint

Each class subclasses its HF namesake (isinstance holds), loads stock checkpoints and saves checkpoints that
stock HF loads back unchanged: parameter names are HF's own. q/k/v stay separate parameters; the fused
(3*dim, dim) projection is built from them on first use and rebuilt whenever they change.
The attention implementation defaults to "distilkernels"; pass attn_implementation= to pick another.
"""
from __future__ import annotations

import transformers

from . import hf
from .patching import install_input_checks, replace_modules


class _Optimized:
    """Mixin: swap in the fused modules right after HF builds the model."""

    def __init__(self, config, *args, **kwargs):
        hf.register()
        super().__init__(config, *args, **kwargs)
        replace_modules(self)
        install_input_checks(self)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation is None:
            hf.register()
            attn_implementation = hf.NAME
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)


def _optimized(hf_class: type) -> type:
    cls = type(hf_class.__name__, (_Optimized, hf_class), {
        "__module__": __name__,
        "__doc__": f"{hf_class.__name__} running on distilkernels' fused kernels (a subclass of the HF class).",
    })
    return cls


DistilBertModel = _optimized(transformers.DistilBertModel)
DistilBertForMaskedLM = _optimized(transformers.DistilBertForMaskedLM)
DistilBertForSequenceClassification = _optimized(transformers.DistilBertForSequenceClassification)
DistilBertForQuestionAnswering = _optimized(transformers.DistilBertForQuestionAnswering)
DistilBertForTokenClassification = _optimized(transformers.DistilBertForTokenClassification)
DistilBertForMultipleChoice = _optimized(transformers.DistilBertForMultipleChoice)

BertModel = _optimized(transformers.BertModel)
BertForMaskedLM = _optimized(transformers.BertForMaskedLM)
BertForSequenceClassification = _optimized(transformers.BertForSequenceClassification)
BertForQuestionAnswering = _optimized(transformers.BertForQuestionAnswering)
BertForTokenClassification = _optimized(transformers.BertForTokenClassification)
BertForMultipleChoice = _optimized(transformers.BertForMultipleChoice)

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
]
