"""The family table (families.py): every row is complete and its classes are real, importable module-level
classes (pickle and grep find them); patch() accepts exactly the rows' models."""
from __future__ import annotations

import importlib

import pytest
import transformers

import distilkernels
from distilkernels import models
from distilkernels.families import FAMILIES, LABEL_KINDS, REPLACEMENTS
from distilkernels.modules import FusedBlock, FusedEncoder

from helpers import FAMILY_PARAMS, make_model


def _importable(cls) -> bool:
    return getattr(importlib.import_module(cls.__module__), cls.__qualname__, None) is cls


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_row_is_complete(family):
    assert issubclass(family.fused_block, FusedBlock) and issubclass(family.fused_block, family.block)
    assert issubclass(family.fused_encoder, FusedEncoder) and issubclass(family.fused_encoder, family.encoder)
    assert family.fused_block.LAYOUT is family.layout
    assert REPLACEMENTS[family.block] is family.fused_block and REPLACEMENTS[family.encoder] is family.fused_encoder
    assert family.heads[0].hf_class is family.base_model and issubclass(family.base_model, family.pretrained)
    assert sorted(head.labels for head in family.heads) == sorted(LABEL_KINDS)  # one head per label kind
    for cls in (family.fused_block, family.fused_encoder):
        assert _importable(cls) and cls.__module__ == "distilkernels.families", cls
    for head, ours in zip(family.heads, family.optimized_classes()):
        assert issubclass(ours, head.hf_class) and ours.__name__ == head.name
        assert _importable(ours) and ours.__module__ == "distilkernels.models"
        assert ours.__name__ in models.__all__


def test_models_all_is_the_rows_heads():
    assert sorted(models.__all__) == sorted(head.name for family in FAMILIES for head in family.heads)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_patch_swaps_every_block_of_the_row(family):
    config = family.test.tiny()
    model = make_model(family.base_model, config)
    distilkernels.patch(model)
    assert sum(type(m) is family.fused_block for m in model.modules()) == family.n_layers(config)
    assert sum(type(m) is family.fused_encoder for m in model.modules()) == 1
    assert family.fused_block.__name__ in repr(model)  # print(model) names a class grep finds


def test_unsupported_family_names_the_rows():
    model = transformers.AlbertModel(transformers.AlbertConfig(hidden_size=32, num_attention_heads=4,
                                                               intermediate_size=37, num_hidden_layers=1))
    with pytest.raises(TypeError, match="RobertaForMultipleChoice.*got AlbertModel"):
        distilkernels.patch(model)
