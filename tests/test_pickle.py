"""torch.save / torch.load(weights_only=False), pickle and copy.deepcopy of patched models and of every optimized
class (fp32, bf16, int8): the copy gives identical outputs, still runs the fused kernels, and is independent of
the original. Pickling is how multiprocessing and distributed engines ship a model to their workers."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import distilkernels
from distilkernels.quant import Int8Gemms

from helpers import HEAD_PARAMS, OPTIMIZED_PARAMS, FAMILY_PARAMS, holey_mask, make_model, model_inputs, op_count, outputs


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "torch_save": _torch_save_load,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
    "deepcopy": copy.deepcopy,
}


def _inputs(cls, config):
    mask = holey_mask(4, 9, seed=12)
    mask[:, 0] = 1
    return model_inputs(cls, config, 4, 9, mask)


def _assert_round_trip(model, family, inputs, round_trip, op_spy):
    """Run (so derived-weight caches are filled), copy, run the copy: identical outputs, fused path, independent."""
    with torch.inference_mode():
        before = outputs(model(**inputs))
    copied = ROUND_TRIPS[round_trip](model)
    assert type(copied) is type(model)
    blocks = [m for m in copied.modules() if isinstance(m, family.fused_block)]
    assert len(blocks) == family.n_layers(copied.config)
    assert all(type(m).__module__ == "distilkernels.families" for m in blocks)
    op_spy.clear()
    with torch.inference_mode():
        after = outputs(copied(**inputs))
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert op_count(op_spy, "attention", "varlen_attention") == family.n_layers(copied.config), op_spy
    with torch.no_grad():  # the copy owns its parameters
        next(copied.parameters()).add_(1.0)
    with torch.inference_mode():
        for key, value in outputs(model(**inputs)).items():
            assert torch.equal(value, before[key]), key
    return copied


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_patched_model_round_trip(family, head, round_trip, op_spy):
    config = family.test.tiny()
    model = make_model(head.hf_class, config)
    distilkernels.patch(model)
    inputs = _inputs(head.hf_class, config)
    copied = _assert_round_trip(model, family, inputs, round_trip, op_spy)
    # the copy's handle restores the copy (and only the copy) to the stock modules
    copied._distilkernels_patch.restore()
    assert not any(isinstance(m, family.fused_block) for m in copied.modules())
    assert any(isinstance(m, family.fused_block) for m in model.modules())


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("family, head, ours", OPTIMIZED_PARAMS)
def test_optimized_class_round_trip(family, head, ours, round_trip, op_spy):
    config = family.test.tiny()
    torch.manual_seed(0)
    model = ours(copy.deepcopy(config)).eval()
    _assert_round_trip(model, family, _inputs(head.hf_class, config), round_trip, op_spy)


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("activations", ["per_token"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_int8_round_trip(family, activations, round_trip, op_spy):
    config = family.test.tiny()
    model = distilkernels.quantize(make_model(family.base_model, config), activations=activations)
    copied = _assert_round_trip(model, family, _inputs(family.base_model, config), round_trip, op_spy)
    gemms = [m._parts.gemms for m in copied.modules() if isinstance(m, family.fused_block)]
    assert all(isinstance(g, Int8Gemms) and g.activations == activations for g in gemms)


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_bf16_round_trip(family, round_trip, op_spy):
    config = family.test.tiny()
    model = make_model(family.base_model, config)
    distilkernels.patch(model, dtype=torch.bfloat16)
    copied = _assert_round_trip(model, family, _inputs(family.base_model, config), round_trip, op_spy)
    assert all(p.dtype == torch.bfloat16 for p in copied.parameters())
