"""Optimized classes (distilkernels.models) and attn_implementation="distilkernels": attention weights and
switching implementations. Parity and save/load round trips of every class are in test_parity.py."""
from __future__ import annotations

import copy

import torch
import transformers

from distilkernels import models

from conftest import tiny_config
from helpers import assert_parity, holey_mask, make_model, model_inputs, op_count


def test_set_attn_implementation_with_padding(op_spy):
    config = tiny_config()
    model = make_model(transformers.DistilBertForTokenClassification, config, attn_implementation="sdpa")
    mask = holey_mask(4, 11, seed=6)
    inputs = model_inputs(transformers.DistilBertForTokenClassification, config, 4, 11, mask)
    with torch.inference_mode():
        ref = model(**inputs)
        model.set_attn_implementation("distilkernels")
        got = model(**inputs)
    assert_parity(transformers.DistilBertForTokenClassification, ref, got, mask, unpad=False)
    assert op_count(op_spy, "attention") == config.n_layers


def test_output_attentions_computed_on_request():
    config = tiny_config()
    mask = holey_mask(3, 8, seed=7)
    eager = make_model(transformers.DistilBertModel, config, attn_implementation="eager")
    ours = make_model(transformers.DistilBertModel, config, attn_implementation="distilkernels")
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
    with torch.inference_mode():
        ref = eager(**inputs, output_attentions=True)
        got = ours(**inputs, output_attentions=True)
    assert len(got.attentions) == config.n_layers
    for r, g in zip(ref.attentions, got.attentions):
        assert g.shape == r.shape == (3, config.n_heads, 8, 8)
        keep = mask.bool()[:, None, :, None].expand_as(r)  # rows of real queries
        assert (g - r)[keep].abs().max() <= 1e-5


def test_optimized_class_with_output_attentions():
    config = tiny_config()
    model = models.DistilBertModel(copy.deepcopy(config)).eval()
    stock = transformers.DistilBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    stock.load_state_dict(model.state_dict())
    mask = holey_mask(2, 6, seed=8)
    inputs = model_inputs(transformers.DistilBertModel, config, 2, 6, mask, with_labels=False)
    with torch.inference_mode():
        ref = stock(**inputs, output_attentions=True, output_hidden_states=True)
        got = model(**inputs, output_attentions=True, output_hidden_states=True)
    keep = mask.bool()
    assert len(got.attentions) == len(ref.attentions) and len(got.hidden_states) == len(ref.hidden_states)
    for r, g in zip(ref.hidden_states, got.hidden_states):
        assert (g - r)[keep].abs().max() <= 1e-4
