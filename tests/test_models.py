"""Optimized classes (distilkernels.models) and attn_implementation="distilkernels": parity, round trips."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import distilkernels
from distilkernels import models
from distilkernels.modules import FusedEncoder

from conftest import HEADS, holey_mask, make_model, model_inputs, tiny_config
from test_patch import assert_parity

PAIRS = [(getattr(transformers, name), getattr(models, name)) for name in models.__all__ if name.startswith("DistilBert")]


@pytest.fixture
def checkpoint(tmp_path):
    def save(hf_cls, config, seed=0):
        path = tmp_path / f"{hf_cls.__name__}-{seed}"
        make_model(hf_cls, config, seed=seed).save_pretrained(path)
        return path
    return save


@pytest.mark.parametrize("hf_cls, ours", PAIRS, ids=lambda c: getattr(c, "__name__", ""))
def test_optimized_class_parity_and_round_trip(hf_cls, ours, checkpoint, tmp_path, op_spy):
    config = tiny_config()
    path = checkpoint(hf_cls, config)
    stock = hf_cls.from_pretrained(path, attn_implementation="eager").eval()
    model = ours.from_pretrained(path).eval()
    assert isinstance(model, hf_cls)
    assert model.config._attn_implementation == "distilkernels"
    assert any(isinstance(m, FusedEncoder) for m in model.modules())
    mask = holey_mask(7, 10, seed=3)
    mask[:, 0] = 1
    inputs = model_inputs(hf_cls, config, 7, 10, mask)
    with torch.inference_mode():
        assert_parity(hf_cls, stock(**inputs), model(**inputs), mask, unpad=True)
    assert sum(op_spy.values()) > 0, "the fused kernels did not run"
    # ours -> save -> stock: the very same tensors under the same names
    model.save_pretrained(tmp_path / "ours")
    back = hf_cls.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is hf_cls
    reference = stock.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.inference_mode():
        for key, value in stock(**inputs).items():
            assert torch.equal(back(**inputs)[key], value), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimized_class_low_precision(dtype, checkpoint):
    """Our error vs fp32 HF is at most 2x HF's own error in the same dtype (plus a tiny floor)."""
    config = tiny_config()
    path = checkpoint(transformers.DistilBertModel, config)
    ref32 = transformers.DistilBertModel.from_pretrained(path, attn_implementation="eager").eval()
    hf_low = transformers.DistilBertModel.from_pretrained(path, dtype=dtype).eval()
    ours = models.DistilBertModel.from_pretrained(path, dtype=dtype).eval()
    assert next(ours.parameters()).dtype == dtype
    mask = holey_mask(5, 12, seed=4)
    inputs = model_inputs(transformers.DistilBertModel, config, 5, 12, mask, with_labels=False)
    valid = mask.bool()
    with torch.inference_mode():
        ref = ref32(**inputs).last_hidden_state[valid]
        hf_err = (hf_low(**inputs).last_hidden_state.float()[valid] - ref).abs().max().item()
        our_err = (ours(**inputs).last_hidden_state.float()[valid] - ref).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_attn_implementation_from_pretrained(cls, checkpoint, op_spy):
    config = tiny_config()
    path = checkpoint(cls, config)
    stock = cls.from_pretrained(path, attn_implementation="eager").eval()
    ours = cls.from_pretrained(path, attn_implementation="distilkernels").eval()
    mask = holey_mask(6, 9, seed=5, kind="left")
    inputs = model_inputs(cls, config, 6, 9, mask)
    with torch.inference_mode():
        assert_parity(cls, stock(**inputs), ours(**inputs), mask, unpad=False)
    assert op_spy.get(("attention", distilkernels.ops.backend_for(torch.device("cpu"))), 0) == config.n_layers


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
    assert sum(v for (op, _), v in op_spy.items() if op == "attention") == config.n_layers


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
