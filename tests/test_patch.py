"""distilkernels.patch() on HF DistilBERT models: the handle, fallbacks, bad input, dtype=. Parity with stock HF
for every family and head is in test_parity.py."""
from __future__ import annotations

import copy
import inspect
import threading

import pytest
import torch
import transformers

import distilkernels
from distilkernels import modules
from distilkernels.modules import FusedBlock, FusedEncoder

from conftest import by_name, tiny_config
from helpers import ATOL, FAMILY_PARAMS, holey_mask, make_model, model_inputs, op_count


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
    assert model.config._attn_implementation == previous  # patch() leaves the attention implementation alone
    handle.restore()
    handle.restore()  # idempotent
    assert all(m is originals[name] for name, m in model.named_modules())
    assert model.config._attn_implementation == previous
    assert distilkernels.patch(model) is not handle  # a restored model can be patched again


@pytest.mark.parametrize("inner_first", [False, True])
def test_one_handle_owns_nested_models(inner_first):
    """patch() on a head and on the base model inside it, in either order, gives one handle that restores the
    whole tree; the base model's input check is installed once."""
    model = make_model(transformers.DistilBertForSequenceClassification, tiny_config())
    originals = {name: m for name, m in model.named_modules()}
    hooks_before = len(model.distilbert._forward_pre_hooks)
    first, second = (model.distilbert, model) if inner_first else (model, model.distilbert)
    handle = distilkernels.patch(first)
    assert distilkernels.patch(second) is handle
    assert handle.model is model
    assert len(model.distilbert._forward_pre_hooks) == hooks_before + 1
    assert sum(isinstance(m, FusedBlock) for m in model.modules()) == model.config.n_layers
    with pytest.raises(ValueError, match="an empty batch"):  # the input check is live
        model(input_ids=torch.ones(0, 5, dtype=torch.long))
    handle.restore()
    assert all(m is originals[name] for name, m in model.named_modules())
    assert len(model.distilbert._forward_pre_hooks) == hooks_before
    assert not hasattr(model, "_distilkernels_patch") and not hasattr(model.distilbert, "_distilkernels_patch")
    assert distilkernels.patch(model.distilbert) is not handle  # patched afresh after a restore
    model.distilbert._distilkernels_patch.restore()
    assert all(m is originals[name] for name, m in model.named_modules())


@pytest.mark.parametrize("built_with", ["eager", "sdpa", "distilkernels"])
def test_set_attn_implementation_round_trip_on_patched_model(built_with, op_spy):
    """Switching implementations on a patched model works both ways, every one matches stock HF (fused blocks
    whatever the implementation), and restore() leaves the one in force."""
    config = tiny_config()
    cls = transformers.DistilBertForTokenClassification
    stock = make_model(cls, config, attn_implementation="eager")
    model = make_model(cls, config, attn_implementation=built_with)
    mask = holey_mask(4, 11, seed=14)
    mask[:, 0] = 1
    inputs = model_inputs(cls, config, 4, 11, mask, with_labels=False)  # labels would keep the padded layout
    with torch.inference_mode():
        ref = stock(**inputs).logits[mask.bool()]
    handle = distilkernels.patch(model)
    assert model.config._attn_implementation == built_with
    for name in ("sdpa", "eager", "distilkernels", built_with):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        op_spy.clear()
        with torch.inference_mode():
            got = model(**inputs).logits[mask.bool()]
        assert (got - ref).abs().max() <= ATOL, name
        assert op_count(op_spy, "varlen_attention") == config.n_layers, name
    model.set_attn_implementation("sdpa")
    handle.restore()
    assert model.config._attn_implementation == "sdpa"


def test_output_attentions_on_patched_eager_model():
    """A model built with "eager" keeps it after patching, so HF accepts config.output_attentions=True."""
    config = tiny_config()
    mask = holey_mask(3, 8, seed=15)
    stock = make_model(transformers.DistilBertModel, config, attn_implementation="eager")
    model = make_model(transformers.DistilBertModel, config, attn_implementation="eager")
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
    distilkernels.patch(model)
    for m in (stock, model):
        m.config.output_attentions = True
    with torch.inference_mode():
        ref, got = stock(**inputs), model(**inputs)
    assert len(got.attentions) == config.n_layers
    keep = mask.bool()
    for r, g in zip(ref.attentions, got.attentions):
        rows = keep[:, None, :, None].expand_as(r)  # rows of real queries
        assert (g - r)[rows].abs().max() <= 1e-5
    assert (got.last_hidden_state - ref.last_hidden_state)[keep].abs().max() <= ATOL


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


@pytest.mark.parametrize("family", ["distilbert", "bert", "roberta"])
def test_int32_ids(family, op_spy):
    """int32 input_ids, token_type_ids and position_ids, which HF's embeddings take, give what HF gives (patched
    and stock alike); ids of another integer dtype get HF's own error."""
    fam = by_name(family)
    config = fam.test.tiny()
    cls = fam.base_model
    mask = holey_mask(3, 8, seed=10)
    model = make_model(cls, config)
    inputs = model_inputs(cls, config, 3, 8, mask, with_labels=False)
    if family == "bert":
        inputs["position_ids"] = torch.arange(2, 10)[None]
    narrow = {k: v.int() if k != "attention_mask" else v for k, v in inputs.items()}
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
        with distilkernels.patch(model):
            got = model(**narrow).last_hidden_state
            fused = family != "roberta"  # RoBERTa's embeddings run HF's forward
            assert op_spy.get(("embed_layer_norm", "cpp"), 0) == fused  # the fused embedding ran them
            with pytest.raises((RuntimeError, IndexError, TypeError)):
                model(**dict(narrow, input_ids=narrow["input_ids"].short()))
    assert (got - ref)[mask.bool()].abs().max() <= ATOL


_POSITION_IDS = {"(seqlen,)": lambda b, s: torch.arange(s), "(1, seqlen)": lambda b, s: torch.arange(s)[None],
                 "(batch, seqlen)": lambda b, s: torch.arange(2, s + 2)[None].expand(b, s),
                 "(batch, 1)": lambda b, s: torch.ones(b, 1, dtype=torch.long), "0-D": lambda b, s: torch.tensor(3),
                 "(seqlen - 1,)": lambda b, s: torch.arange(s - 1), "(2, seqlen), batch 3": lambda b, s: torch.zeros(
                     2, s, dtype=torch.long)}


@pytest.mark.parametrize("token_types", [False, True], ids=["default token types", "token_type_ids given"])
@pytest.mark.parametrize("shape", list(_POSITION_IDS))
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_position_ids_as_hf_takes_them(family, shape, token_types):
    """position_ids of every shape: where HF computes, HF's numbers (1e-4, real tokens); where HF fails, the patched
    model fails too. BERT's and RoBERTa's HF forwards fail on (seqlen,) or 0-D position ids without token_type_ids
    (they gather the default token types at the position ids, 2-D only); BERT's fused embedding pass took (seqlen,)
    ones before (HF's forward runs there now). DistilBERT takes no token types; RoBERTa's embeddings are HF's."""
    cls, config = family.base_model, family.test.tiny()
    mask = holey_mask(3, 8, seed=12)
    mask[:, 0] = 1
    model = make_model(cls, config)
    inputs = model_inputs(cls, config, 3, 8, mask, with_labels=False)
    inputs["position_ids"] = _POSITION_IDS[shape](3, 8)
    if token_types:
        inputs.setdefault("token_type_ids", torch.zeros(3, 8, dtype=torch.long))
    else:
        inputs.pop("token_type_ids", None)

    def run():
        try:
            with torch.inference_mode():
                return model(**inputs).last_hidden_state
        except Exception as error:  # noqa: BLE001  (HF's own error, whatever its type)
            return error

    want = run()
    with distilkernels.patch(model):
        got = run()
    hf_fails = isinstance(want, Exception)
    assert hf_fails == (shape in ("(seqlen - 1,)", "(2, seqlen), batch 3") or (
        family.name != "distilbert" and not token_types and shape in ("(seqlen,)", "0-D"))), want
    if hf_fails:
        assert isinstance(got, Exception), "HF fails, the patched model computes"
    else:
        assert not isinstance(got, Exception), got
        assert (got - want)[mask.bool()].abs().max() <= ATOL


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("write", ["inference", "data"])
def test_refresh_after_unversioned_weight_writes(mode, write):
    """Writes torch does not version (in place to inference tensors inside inference_mode; through .data) leave
    the packed copies as they were; distilkernels.refresh(model) drops them and the next forward matches the
    changed weights exactly as a model patched from them does. A versioned write is seen without it."""
    config = tiny_config()
    mask = holey_mask(3, 8, seed=11)
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)

    def build():
        model = make_model(transformers.DistilBertModel, config)
        if mode == "int8":
            return distilkernels.quantize(model)
        distilkernels.patch(model, dtype=torch.bfloat16 if mode == "bf16" else None)
        return model

    def change(model):
        weight = model.transformer.layer[0].attention.v_lin.weight
        (weight if write == "inference" else weight.data).mul_(3)

    ctx = torch.inference_mode if write == "inference" else torch.no_grad
    with ctx():
        model, fresh = build(), build()
        model(**inputs)  # packs
        change(model)
        change(fresh)
        want = fresh(**inputs).last_hidden_state
        stale = model(**inputs).last_hidden_state
        assert not torch.equal(stale, want)  # the write went unseen (why refresh exists)
        assert distilkernels.refresh(model) is model
        assert torch.equal(model(**inputs).last_hidden_state, want)
    with torch.no_grad():  # a versioned in-place write: seen with no refresh
        other = build()
        other(**inputs)
        if write == "data":
            other.transformer.layer[0].attention.v_lin.weight.mul_(3)
            assert torch.equal(other(**inputs).last_hidden_state, want)


def test_unsupported_model_is_type_error():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=99))
    with pytest.raises(TypeError, match="DistilBertModel.*BertModel.*RobertaModel"):
        distilkernels.patch(gpt2)
    with pytest.raises(TypeError, match="got Linear"):
        distilkernels.patch(torch.nn.Linear(3, 3))


def test_mask_not_a_tensor():
    """A mask that is no tensor: HF fails on it (AttributeError, deep inside); the patched model names it. Every
    tensor mask gets what HF gives it (test_parity.py::test_attention_masks_as_hf_takes_them)."""
    config = tiny_config()
    model = make_model(transformers.DistilBertModel, config)
    inputs = model_inputs(transformers.DistilBertModel, config, 2, 6, holey_mask(2, 6), with_labels=False)
    inputs["attention_mask"] = inputs["attention_mask"].tolist()
    with torch.inference_mode():
        with pytest.raises(AttributeError):
            model(**inputs)
        with distilkernels.patch(model), pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
            model(**inputs)


def test_too_long_sequence():
    config = tiny_config()
    model = make_model(transformers.DistilBertForSequenceClassification, config)
    ids = torch.randint(1, 99, (1, config.max_position_embeddings + 1))
    with distilkernels.patch(model), torch.inference_mode(), pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=ids)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_arguments_by_position(family):
    """The input check reads arguments given by position as the family's forward names them: inputs longer than
    the position table with position_ids of their own run as in stock HF (the check used to read position_ids
    from the keywords only, and refused them), and inputs_embeds given by position are checked like input_ids."""
    config = family.test.tiny()
    cls = family.base_model
    model = make_model(cls, config)
    params = list(inspect.signature(cls.forward).parameters)[1:]  # (self)
    names = params[:params.index("position_ids") + 1]  # DistilBERT: inputs_embeds comes before position_ids
    seqlen = config.max_position_embeddings + 3
    first = getattr(config, "pad_token_id", 0) + 1 if family.name == "roberta" else 0
    values = {"input_ids": torch.randint(first + 1, config.vocab_size, (2, seqlen)),
              "attention_mask": torch.ones(2, seqlen, dtype=torch.long),
              "token_type_ids": torch.zeros(2, seqlen, dtype=torch.long),
              "position_ids": first + torch.arange(seqlen)[None] % (config.max_position_embeddings - first)}
    args = [values.get(n) for n in names]
    with torch.inference_mode():
        want = model(*args).last_hidden_state
        with distilkernels.patch(model):
            got = model(*args).last_hidden_state
            with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, seqlen, dim\)"):
                model(*[None] * params.index("inputs_embeds"), torch.randn(5, config.hidden_size))
    assert (got - want).abs().max() <= ATOL


def test_roberta_positions_limit():
    """RoBERTa's positions start at pad_token_id + 1 and count only the tokens that are not padding, so its limit
    is max_position_embeddings - pad_token_id - 1 real tokens a row, whatever the row's length. One token past it,
    stock HF fails with "index 66 is out of bounds for dimension 1 with size 66" (the check let it through: seqlen
    65 <= 66); a longer row mostly padding runs in HF (the check refused it: seqlen 70 > 66)."""
    config = by_name("roberta").test.tiny()
    room = config.max_position_embeddings - config.pad_token_id - 1
    model = make_model(transformers.RobertaForSequenceClassification, config)
    dim = config.hidden_size
    too_long = torch.randint(config.pad_token_id + 1, config.vocab_size, (2, room + 1))
    padded = torch.randint(config.pad_token_id + 1, config.vocab_size, (2, room + 6))
    padded[0, room - 3:] = config.pad_token_id
    padded[1, room:] = config.pad_token_id
    mask = (padded != config.pad_token_id).long()
    with torch.inference_mode():
        for inputs in ({"input_ids": too_long}, {"inputs_embeds": torch.randn(1, room + 1, dim)}):
            with pytest.raises(Exception):
                model(**inputs)  # stock HF fails too
        want = model(input_ids=padded, attention_mask=mask).logits
        model(input_ids=too_long[:, :room])  # at the limit: fine
        with distilkernels.patch(model):
            with pytest.raises(ValueError, match=rf"input_ids has a row of {room + 1} tokens other than padding"):
                model(input_ids=too_long)
            with pytest.raises(ValueError, match=rf"inputs_embeds has seqlen {room + 1} > "
                                                 rf"config.max_position_embeddings={room + 2} - pad_token_id - 1"):
                model(inputs_embeds=torch.randn(1, room + 1, dim))
            model(input_ids=too_long[:, :room])
            got = model(input_ids=padded, attention_mask=mask).logits
    assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize("bad, error, match", [
    (lambda ids, dim: {"input_ids": ids[0]}, ValueError, r"input_ids must be \(batch, seqlen\), got shape \(6,\)"),
    (lambda ids, dim: {"input_ids": ids[None]}, ValueError, r"input_ids must be \(batch, seqlen\), got shape \(1, 2"),
    (lambda ids, dim: {"input_ids": ids.tolist()}, TypeError, "input_ids must be a torch.Tensor, got list"),
    (lambda ids, dim: {"inputs_embeds": torch.randn(6, dim)}, ValueError,
     r"inputs_embeds must be \(batch, seqlen, dim\), got shape \(6, \d+\): add the batch dimension"),
    (lambda ids, dim: {"inputs_embeds": torch.randn(1, 200, dim)}, ValueError,
     "inputs_embeds has seqlen 200 > config.max_position_embeddings"),  # (RoBERTa: "=66 - pad_token_id - 1")
    (lambda ids, dim: {"input_ids": ids[:0]}, ValueError, r"input_ids has shape \(0, 6\): an empty batch"),
    (lambda ids, dim: {"input_ids": ids[:0], "attention_mask": torch.ones(0, 6)}, ValueError,
     r"input_ids has shape \(0, 6\): an empty batch"),
    (lambda ids, dim: {"input_ids": ids[:, :0]}, ValueError, r"input_ids has shape \(2, 0\): an empty batch or seq"),
    (lambda ids, dim: {"inputs_embeds": torch.randn(0, 6, dim)}, ValueError, r"inputs_embeds has shape \(0, 6, \d+\)"),
], ids=["1-D ids", "3-D ids", "list ids", "2-D embeds", "embeds too long", "batch 0", "batch 0 with mask",
        "seqlen 0", "embeds batch 0"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_bad_input_shape_names_the_argument(family, bad, error, match):
    """Input that stock HF fails on too (each family with its own IndexError, ValueError or RuntimeError from
    deep inside; an empty batch or sequence where its attention reshapes q/k/v) is rejected before the forward,
    naming the argument given. (The patched model ran an empty batch before, returning an empty output.)"""
    config = family.test.tiny()
    cls = family.base_model
    model = make_model(cls, config)
    ids = model_inputs(cls, config, 2, 6, torch.ones(2, 6, dtype=torch.long), with_labels=False)["input_ids"]
    inputs = bad(ids, model.get_input_embeddings().embedding_dim)
    with torch.inference_mode():
        with pytest.raises(Exception):
            model(**inputs)  # stock HF fails too: nothing it runs is refused
        with distilkernels.patch(model), pytest.raises(error, match=match):
            model(**inputs)


@pytest.mark.parametrize("unpad", ["no", 0, None])
def test_patch_bad_unpad(unpad):
    model = make_model(transformers.DistilBertModel, tiny_config())
    with pytest.raises(TypeError, match="unpad must be True or False"):
        distilkernels.patch(model, unpad=unpad)
    assert not any(isinstance(m, FusedBlock) for m in model.modules())


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



def test_threads_share_one_patched_head():
    """Threads serving one patched head at once: each call's labels are its own. A pre-hook on the head holds
    every thread inside its forward until all have entered (so their label hooks interleave on every call),
    half of them with labels. The QA answers sit on padding, so the loss reads padded positions: a call given
    labels that ran unpadded would be off. (Before, the hooks kept one list of ContextVar tokens per model and
    a thread reset another's: ValueError "was created in a different Context".)"""
    cls, config = transformers.DistilBertForQuestionAnswering, tiny_config()
    model = make_model(cls, config)
    mask = holey_mask(4, 9, seed=11, kind="right")
    mask[0, 6:] = 0
    inputs = model_inputs(cls, config, 4, 9, mask, with_labels=False)
    labels = {"start_positions": torch.tensor([7, 1, 8, 0]), "end_positions": torch.tensor([8, 2, 8, 3])}
    assert not mask[0, 7:].any()  # the first answer is padding
    with torch.inference_mode():
        want = model(**inputs, **labels)
    distilkernels.patch(model)
    n_threads, calls = 4, 10
    barrier = threading.Barrier(n_threads, timeout=30)
    errors, results = [], []

    def all_inside(module, args):
        barrier.wait()  # (returns None: a pre-hook's result would replace the arguments)

    model.register_forward_pre_hook(all_inside)

    def serve(with_labels):
        try:
            with torch.inference_mode():
                for _ in range(calls):
                    results.append((with_labels, model(**inputs, **(labels if with_labels else {}))))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(i % 2 == 0,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == n_threads * calls
    real = mask.bool()
    for with_labels, got in results:
        for key in ("start_logits", "end_logits"):
            assert (got[key] - want[key])[real].abs().max() <= ATOL, key
        assert (got.loss is not None) == with_labels
        if with_labels:
            assert (got.loss - want.loss).abs() <= ATOL

# ---- patch(model, dtype=...) --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16", torch.float16])
def test_patch_dtype_converts_and_patches(dtype, op_spy):
    """One call converts and patches; our error vs fp32 HF is at most 2x torch's own in the same dtype (plus a
    floor of a few roundings of the dtype at the outputs' magnitude, for when torch's error happens to be tiny)."""
    config = tiny_config()
    mask = holey_mask(5, 12, seed=13)
    mask[:, 0] = 1  # position 0 padded would keep the padded layout (pooled heads read it): test padding removal
    fp32 = make_model(transformers.DistilBertModel, config)
    model = make_model(transformers.DistilBertModel, config)
    inputs = model_inputs(transformers.DistilBertModel, config, 5, 12, mask, with_labels=False)
    handle = distilkernels.patch(model, dtype=dtype)
    target = torch.float16 if dtype is torch.float16 else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {target}
    assert any(isinstance(m, FusedBlock) for m in model.modules())
    valid = mask.bool()
    with torch.inference_mode():
        ref = fp32(**inputs).last_hidden_state[valid]
        got = model(**inputs).last_hidden_state
        torch_low = fp32.to(target)(**inputs).last_hidden_state
    assert got.dtype == target
    assert op_count(op_spy, "varlen_attention") == config.n_layers  # fused ran
    our_err = (got.float()[valid] - ref).abs().max().item()
    torch_err = (torch_low.float()[valid] - ref).abs().max().item()
    assert our_err <= 2 * torch_err + 4 * torch.finfo(target).eps * ref.abs().max().item(), (our_err, torch_err)
    handle.restore()
    assert not any(isinstance(m, FusedBlock) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {target}  # documented: restore() keeps the conversion


@pytest.mark.parametrize("dtype", [torch.qint8, "int8", torch.int8])
def test_patch_dtype_int8_quantizes(dtype):
    from distilkernels.quant import Int8Gemms

    config = tiny_config()
    model = make_model(transformers.DistilBertForSequenceClassification, config)
    handle = distilkernels.patch(model, dtype=dtype)
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(blocks) == config.n_layers
    assert all(isinstance(b._parts.gemms, Int8Gemms) for b in blocks)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # int8 copies; fp32 parameters stay
    assert distilkernels.patch(model, dtype=dtype) is handle


def test_patch_dtype_none_keeps_the_model():
    model = make_model(transformers.DistilBertModel, tiny_config())
    distilkernels.patch(model, dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(b._parts.gemms.__class__.__name__ == "Int8Gemms" for b in model.modules()
                   if isinstance(b, FusedBlock))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, "fp8", 8, ["bf16"], {"dtype": "bf16"}])  # (unhashable: "unhashable type: list" before)
def test_patch_bad_dtype(dtype):
    model = make_model(transformers.DistilBertModel, tiny_config())
    with pytest.raises(ValueError, match="dtype must be None"):
        distilkernels.patch(model, dtype=dtype)
    assert not any(isinstance(m, FusedBlock) for m in model.modules())  # nothing was changed
    assert {p.dtype for p in model.parameters()} == {torch.float32}


class _Adapter(torch.nn.Module):
    """A low-rank adapter around a Linear (LoRA-like): what the fused path cannot run as one GEMM."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _replace(block, path: str, make):
    """block.<path> = make(the module there now); returns the new module."""
    parent_path, _, name = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    new = make(getattr(parent, name))
    setattr(parent, name, new)
    return new


def _replacements(layout, dim: int, seed: int):
    """what -> (path in the block, factory of the new module from the old one, whether the fused path runs it)."""
    def linear(old):
        torch.manual_seed(seed)
        return torch.nn.Linear(old.in_features, old.out_features).to(old.weight.dtype)

    def layer_norm(old):
        torch.manual_seed(seed)
        new = torch.nn.LayerNorm(dim, eps=1e-3)
        with torch.no_grad():
            new.weight.uniform_(0.5, 2.0)
            new.bias.normal_()
        return new.to(old.weight.dtype)  # (drawn in fp32: the same values whatever the model's dtype)

    def adapter(old):
        torch.manual_seed(seed)
        return _Adapter(old).to(old.weight.dtype)

    return {"linear": (layout.v, linear, True), "layer_norm": (layout.ln2, layer_norm, True),
            "activation": (layout.act, lambda old: torch.nn.ReLU(), True),
            "unsupported_activation": (layout.act, lambda old: torch.nn.SiLU(), False),
            "adapter": (layout.lin1, adapter, False)}


def _base_model_case(family, batch: int, seqlen: int, seed: int):
    """(config, class, mask, inputs) for the family's base model: its tiny config, a holey mask whose first
    position is real in every row (so padding removal runs), and inputs without labels."""
    config = family.test.tiny()
    cls = family.heads[0].hf_class
    mask = holey_mask(batch, seqlen, seed=seed)
    mask[:, 0] = 1
    return config, cls, mask, model_inputs(cls, config, batch, seqlen, mask, with_labels=False)


def _blocks(model, family):
    return [m for m in model.modules() if isinstance(m, (family.block, family.fused_block))]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("what", ["linear", "layer_norm", "activation", "unsupported_activation", "adapter"])
def test_submodule_replaced_after_patch(family, what):
    """A module of a block replaced after patch() (a new Linear, LayerNorm or activation, an adapter around a
    Linear) is what the patched model computes with, as HF's does: the fused path where it can run the new
    module, HF's block otherwise (counted with the reason). Checked after a forward, which packed the old
    weights."""
    config, cls, mask, inputs = _base_model_case(family, 3, 9, seed=21)
    stock = make_model(cls, config)
    model = make_model(cls, config)
    handle = distilkernels.patch(model)
    dim = _blocks(model, family)[0]._parts.n_heads * _blocks(model, family)[0]._parts.head_dim
    path, make, fused = _replacements(family.layout, dim, seed=3)[what]
    with torch.inference_mode():
        model(**inputs)
        for m in (stock, model):
            _replace(_blocks(m, family)[1], path, make)
        handle.stats(reset=True)
        ref, got = stock(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    assert (got - ref)[mask.bool()].abs().max() <= ATOL
    stats = handle.stats()
    if fused:
        assert stats.get("encoder.unpadded") == 1, stats
    else:
        reason = modules.ACTIVATION if what == "unsupported_activation" else modules.MODULES
        assert stats.get(f"encoder.padded: {reason}") == 1 and stats.get(f"block.stock: {reason}"), stats
    handle.restore()  # the replacement stays in the restored model
    assert _blocks(model, family)[1].get_submodule(path) is not _blocks(stock, family)[1].get_submodule(path)
    assert type(_blocks(model, family)[1].get_submodule(path)) is type(_blocks(stock, family)[1].get_submodule(path))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_hook_on_replaced_submodule_runs(family):
    """A forward hook on a module put into a block after patch() runs, and sees what it sees in HF's model."""
    config, cls, mask, inputs = _base_model_case(family, 2, 7, seed=22)
    stock, model = make_model(cls, config), make_model(cls, config)
    distilkernels.patch(model)
    seen = {"hf": [], "patched": []}
    torch.manual_seed(5)
    v = _blocks(stock, family)[0].get_submodule(family.layout.v)
    fresh = torch.nn.Linear(v.in_features, v.out_features)
    with torch.inference_mode():
        model(**inputs)
        for name, m in (("hf", stock), ("patched", model)):
            new = _replace(_blocks(m, family)[0], family.layout.v, lambda old: copy.deepcopy(fresh))
            new.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(out.clone()))
        ref, got = stock(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    assert len(seen["patched"]) == len(seen["hf"]) == 1
    assert (seen["patched"][0] - seen["hf"][0]).abs().max() <= ATOL
    assert (got - ref)[mask.bool()].abs().max() <= ATOL


@pytest.mark.parametrize("dtype", [torch.qint8, torch.bfloat16])
@pytest.mark.parametrize("what", ["linear", "layer_norm", "activation", "adapter"])
def test_submodule_replaced_after_patch_int8_and_bf16(dtype, what):
    """On a quantized or a bf16-patched model a module replaced after patch() gives what patching the model
    with that module in place gives: new int8 / bf16 packings of the new weights (an int8 block stays int8)."""
    family = by_name("bert")
    config, cls, mask, inputs = _base_model_case(family, 3, 9, seed=23)
    before, after = make_model(cls, config), make_model(cls, config)
    path, make, _ = _replacements(family.layout, config.hidden_size, seed=4)[what]
    _replace(_blocks(before, family)[1], path, make)
    distilkernels.patch(before, dtype=dtype)  # patched with the new module in place
    distilkernels.patch(after, dtype=dtype)
    with torch.inference_mode():
        after(**inputs)
        _replace(_blocks(after, family)[1], path, make)
        want, got = before(**inputs).last_hidden_state, after(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if dtype == torch.qint8:
        from distilkernels.quant import Int8Gemms

        assert all(isinstance(b._parts.gemms, Int8Gemms) for b in _blocks(after, family)
                   if not b._parts.problem)
