"""distilkernels.patch() on real HF DistilBERT models: parity with stock HF, restore, fallbacks, bad input."""
from __future__ import annotations

import pytest
import torch
import transformers

import distilkernels
from distilkernels import ops
from distilkernels.modules import FusedBlock, FusedEncoder

from conftest import HEADS, base_config, holey_mask, make_model, model_inputs, tiny_config

# fp32 kernels vs HF fp32: different summation orders only, so 1e-4 max-abs on real tokens (the standard).
ATOL = 1e-4

TOKEN_LEVEL = (transformers.DistilBertModel, transformers.DistilBertForMaskedLM,
               transformers.DistilBertForTokenClassification, transformers.DistilBertForQuestionAnswering)


def _outputs(out) -> dict[str, torch.Tensor]:
    keys = ("loss", "logits", "start_logits", "end_logits", "last_hidden_state")
    return {k: out[k] for k in keys if k in out and out[k] is not None}


def assert_parity(cls, ref, got, mask, unpad):
    """Token-level outputs are compared on real tokens; pooled outputs and losses everywhere."""
    ref, got = _outputs(ref), _outputs(got)
    assert ref.keys() == got.keys()
    valid = mask.bool()
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, key
        if cls in TOKEN_LEVEL and key != "loss":
            r, g = r[valid], g[valid]
        assert torch.isfinite(g).all(), key
        err = (g - r).abs().max().item()
        assert err <= ATOL, f"{cls.__name__}.{key}: max-abs {err:.3g} > {ATOL}"


def run_pair(cls, config, batch, seqlen, mask, unpad):
    model = make_model(cls, config)
    inputs = model_inputs(cls, config, batch, seqlen, mask)
    with torch.inference_mode():
        ref = model(**inputs)
        handle = distilkernels.patch(model, unpad=unpad)
        got = model(**inputs)
        handle.restore()
        again = model(**inputs)
    for key, value in _outputs(ref).items():  # restore puts back exactly what was there
        assert torch.equal(_outputs(again)[key], value), key
    return ref, got


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_tiny_holey_masks(cls, unpad, op_spy):
    config = tiny_config()
    mask = holey_mask(13, 7, seed=1)
    mask[:, 0] = 1  # a [CLS] token: pooled heads read position 0
    ref, got = run_pair(cls, config, 13, 7, mask, unpad)
    assert_parity(cls, ref, got, mask, unpad)
    attention_calls = sum(v for (op, _), v in op_spy.items() if op in ("attention", "varlen_attention"))
    layer_norm_calls = sum(v for (op, _), v in op_spy.items() if op == "add_layer_norm")
    assert attention_calls == config.n_layers, op_spy  # the fused path really ran, once per layer
    assert layer_norm_calls == 2 * config.n_layers, op_spy
    varlen = sum(v for (op, _), v in op_spy.items() if op == "varlen_attention")
    # heads get labels here: their losses read padded positions, so those batches keep the padded layout
    assert varlen == (config.n_layers if unpad and cls is transformers.DistilBertModel else 0)
    # fp32 on the C++ backend: the four GEMMs of every layer run on packed weights, lin1's GELU in its epilogue
    packed = ops.backend_for(torch.device("cpu")) == "cpp"
    count = lambda name: sum(v for (op, _), v in op_spy.items() if op == name)  # noqa: E731
    assert count("linear_packed") == (4 * config.n_layers if packed else 0), op_spy
    assert count("bias_act_") == (0 if packed else config.n_layers), op_spy


@pytest.mark.parametrize("kind", ["right", "left", "holey"])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_padded_layout_matches_everywhere(cls, kind):
    """unpad=False keeps HF's padded layout: every head matches, left padding included."""
    config = tiny_config()
    mask = holey_mask(6, 11, seed=2, kind=kind)
    ref, got = run_pair(cls, config, 6, 11, mask, unpad=False)
    assert_parity(cls, ref, got, mask, unpad=False)


@pytest.mark.parametrize("kind", ["right", "left", "holey"])
@pytest.mark.parametrize("cls", TOKEN_LEVEL, ids=lambda c: c.__name__)
def test_unpadded_left_and_right_padding(cls, kind):
    config = tiny_config()
    mask = holey_mask(6, 11, seed=3, kind=kind)
    ref, got = run_pair(cls, config, 6, 11, mask, unpad=True)
    assert_parity(cls, ref, got, mask, unpad=True)
    if cls is transformers.DistilBertModel and bool(mask[:, 0].all()):  # documented: padded positions hold
        assert (got.last_hidden_state[~mask.bool()] == 0).all()  # zeros (position 0 padded: padded layout)


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_distilbert_base_2x128(cls):
    config = base_config()
    mask = holey_mask(2, 128, seed=4, kind="right")
    ref, got = run_pair(cls, config, 2, 128, mask, unpad=True)
    assert_parity(cls, ref, got, mask, unpad=True)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_seq1_and_relu(cls, unpad):
    config = tiny_config(activation="relu")
    mask = torch.ones(3, 1, dtype=torch.long)
    ref, got = run_pair(cls, config, 3, 1, mask, unpad)
    assert_parity(cls, ref, got, mask, unpad)


def test_qa_loss_unpadded():
    """QA loss with unpadding matches HF when nothing is padded (HF's loss also spans padded positions)."""
    cls, config = transformers.DistilBertForQuestionAnswering, tiny_config()
    mask = torch.ones(5, 9, dtype=torch.long)
    ref, got = run_pair(cls, config, 5, 9, mask, unpad=True)
    assert abs(ref.loss.item() - got.loss.item()) <= ATOL


def test_no_padding_skips_unpad(op_spy):
    config = tiny_config()
    mask = torch.ones(4, 9, dtype=torch.long)
    ref, got = run_pair(transformers.DistilBertModel, config, 4, 9, mask, unpad=True)
    assert_parity(transformers.DistilBertModel, ref, got, mask, unpad=True)
    assert not any(op == "varlen_attention" for op, _ in op_spy), op_spy


def test_fully_padded_row_no_nan():
    config = tiny_config()
    mask = holey_mask(4, 9, seed=5)
    mask[2] = 0
    model = make_model(transformers.DistilBertModel, config)
    inputs = model_inputs(transformers.DistilBertModel, config, 4, 9, mask, with_labels=False)
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
        for unpad in (False, True):
            with distilkernels.patch(model, unpad=unpad):
                got = model(**inputs).last_hidden_state
            assert torch.isfinite(got).all()
            keep = mask.bool()
            assert (got - ref)[keep].abs().max() <= ATOL  # other rows unaffected



@pytest.mark.parametrize("batch,seqlen,kind", [
    (1, 1, "right"), (1, 512, "right"), (2, 512, "holey"), (7, 300, "left"), (64, 9, "holey"), (64, 128, "right"),
])
@pytest.mark.parametrize("cls", [transformers.DistilBertModel, transformers.DistilBertForSequenceClassification],
                         ids=lambda c: c.__name__)
def test_unpadded_batch_and_length_sweep(cls, batch, seqlen, kind, op_spy):
    """Padding removal from batch 1 to 64 and length 1 to 512: real tokens match, padding holds zeros."""
    config = tiny_config(n_layers=2, max_position_embeddings=512)
    mask = holey_mask(batch, seqlen, seed=batch * 1000 + seqlen, kind=kind)
    mask[:, 0] = 1  # the pooled head reads position 0
    ref, got = run_pair(cls, config, batch, seqlen, mask, unpad=True)
    assert_parity(cls, ref, got, mask, unpad=True)
    padded = bool((mask == 0).any())
    unpadded = padded and cls is transformers.DistilBertModel  # the head gets labels: padded layout
    assert sum(v for (op, _), v in op_spy.items() if op == "varlen_attention") == (2 if unpadded else 0), op_spy
    if cls is transformers.DistilBertModel:
        assert (got.last_hidden_state[~mask.bool()] == 0).all()

def test_handle_restore_and_structure():
    model = make_model(transformers.DistilBertForSequenceClassification, tiny_config())
    keys = list(model.state_dict().keys())
    originals = {name: m for name, m in model.named_modules()}
    previous = model.config._attn_implementation
    handle = distilkernels.patch(model)
    assert distilkernels.patch(model) is handle  # patching twice is harmless
    assert list(model.state_dict().keys()) == keys
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(blocks) == model.config.n_layers
    assert all(isinstance(b, transformers.models.distilbert.modeling_distilbert.TransformerBlock) for b in blocks)
    assert isinstance(model.distilbert.transformer, FusedEncoder)
    assert model.config._attn_implementation == "distilkernels"
    handle.restore()
    handle.restore()  # idempotent
    assert all(m is originals[name] for name, m in model.named_modules())
    assert model.config._attn_implementation == previous
    assert distilkernels.patch(model) is not handle  # a restored model can be patched again


def test_output_hidden_states_and_return_dict_false():
    config = tiny_config()
    mask = holey_mask(3, 8, seed=6)
    model = make_model(transformers.DistilBertModel, config)
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
    with torch.inference_mode():
        ref = model(**inputs, output_hidden_states=True)
        with distilkernels.patch(model):
            got = model(**inputs, output_hidden_states=True)
            tup = model(**inputs, return_dict=False)
    assert len(got.hidden_states) == len(ref.hidden_states) == config.n_layers + 1
    valid = mask.bool()
    for r, g in zip(ref.hidden_states, got.hidden_states):
        assert g.shape == r.shape
        assert (g - r)[valid].abs().max() <= ATOL
    assert isinstance(tup, tuple) and (tup[0] - ref.last_hidden_state)[valid].abs().max() <= ATOL


def test_training_uses_stock_path_and_gradients_match(op_spy):
    config = tiny_config()
    mask = holey_mask(4, 8, seed=7)
    cls = transformers.DistilBertForSequenceClassification
    stock, patched = make_model(cls, config), make_model(cls, config)
    inputs = model_inputs(cls, config, 4, 8, mask)
    for model in (stock, patched):
        model.train()
    distilkernels.patch(patched)
    losses = []
    for model in (stock, patched):
        torch.manual_seed(11)  # same dropout draws
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p), (_, q) in zip(stock.named_parameters(), patched.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert not any(op in ("attention", "varlen_attention", "add_layer_norm") for op, _ in op_spy), op_spy


def test_weights_changed_after_patch_are_seen():
    config = tiny_config()
    mask = holey_mask(3, 8, seed=8)
    model = make_model(transformers.DistilBertModel, config)
    other = make_model(transformers.DistilBertModel, config, seed=1)
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
    with torch.inference_mode():
        distilkernels.patch(model)
        model(**inputs)  # builds the fused q|k|v weights
        model.load_state_dict(other.state_dict())
        got = model(**inputs).last_hidden_state
        ref = other(**inputs).last_hidden_state
    assert (got - ref)[mask.bool()].abs().max() <= ATOL


def test_unsupported_model_is_type_error():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=99))
    with pytest.raises(TypeError, match="DistilBertModel, BertModel"):
        distilkernels.patch(gpt2)
    with pytest.raises(TypeError, match="got Linear"):
        distilkernels.patch(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("bad, error, match", [
    (lambda m: m[:, :-1], ValueError, r"attention_mask must be \(batch, seqlen\)"),
    (lambda m: m[None], ValueError, r"attention_mask must be \(batch, seqlen\)"),
    (lambda m: m.float() * 2.0, ValueError, "only 0"),
    (lambda m: torch.where(m.bool(), 0.0, float("-inf")), ValueError, "only 0"),
    (lambda m: m.to(torch.complex64), TypeError, "attention_mask must be bool"),
])
def test_bad_mask(bad, error, match):
    config = tiny_config()
    model = make_model(transformers.DistilBertModel, config)
    inputs = model_inputs(transformers.DistilBertModel, config, 2, 6, holey_mask(2, 6), with_labels=False)
    inputs["attention_mask"] = bad(inputs["attention_mask"])
    with distilkernels.patch(model), torch.inference_mode(), pytest.raises(error, match=match):
        model(**inputs)


def test_too_long_sequence():
    config = tiny_config()
    model = make_model(transformers.DistilBertForSequenceClassification, config)
    ids = torch.randint(1, 99, (1, config.max_position_embeddings + 1))
    with distilkernels.patch(model), torch.inference_mode(), pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=ids)


def test_model_built_in_inference_mode():
    """Parameters created under inference_mode have no version counter; the fused weights still work."""
    config = tiny_config()
    mask = holey_mask(3, 8, seed=9)
    with torch.inference_mode():
        model = make_model(transformers.DistilBertModel, config)
        inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
        ref = model(**inputs).last_hidden_state
        with distilkernels.patch(model):
            got = model(**inputs).last_hidden_state
    assert (got - ref)[mask.bool()].abs().max() <= ATOL
