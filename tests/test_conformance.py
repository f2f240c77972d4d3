"""Conformance with stock Hugging Face: every head of every family, built the way HF's own model tests build
them (their testers' tiny configs, random holey masks, decoder variants), patched and optimized, compared
with stock HF on every value a caller can read.

What "the same" means (README, "What is (and is not) the same as HF"): fp32 max-abs <= TOL on losses, pooled
outputs and every per-token output at real tokens; per-token outputs at padded positions are not compared
(with padding removal they hold zeros where HF computes values no real token depends on).

The family list is FAMILIES below: a new family is one more entry.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import transformers

import distilkernels
import distilkernels.models as optimized
from distilkernels.modules import path_stats

# fp32, tiny models (hidden 32, 2 layers): outputs are O(1)-O(10) and losses O(1); HF's own math differs from
# ours only in summation order (~1e-6 relative). 1e-4 is the project's parity bound.
TOL = 1e-4
BATCH, SEQ, ENC_SEQ = 13, 7, 10  # HF's testers: batch 13, seq 7; the encoder side of a decoder differs on purpose


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: callable  # (**overrides) -> config, as HF's ModelTester builds it
    heads: tuple  # HF head classes (incl. the base model)
    decoder: type | None = None  # the causal-LM head with cross-attention, if the family has one
    token_type_ids: bool = False


def distilbert_config(**overrides):  # DistilBertModelTester.get_config
    kw = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, activation="gelu", dropout=0.1,
              attention_dropout=0.1, max_position_embeddings=512, initializer_range=0.02, num_labels=3)
    kw.update(overrides)
    return transformers.DistilBertConfig(**kw)


def bert_config(**overrides):  # BertModelTester.get_config
    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
              max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02, num_labels=3)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


FAMILIES = (
    Family("distilbert", distilbert_config, (
        transformers.DistilBertModel, transformers.DistilBertForMaskedLM,
        transformers.DistilBertForSequenceClassification, transformers.DistilBertForQuestionAnswering,
        transformers.DistilBertForTokenClassification, transformers.DistilBertForMultipleChoice)),
    Family("bert", bert_config, (
        transformers.BertModel, transformers.BertForMaskedLM, transformers.BertForSequenceClassification,
        transformers.BertForQuestionAnswering, transformers.BertForTokenClassification,
        transformers.BertForMultipleChoice, transformers.BertForPreTraining,
        transformers.BertForNextSentencePrediction),
        decoder=transformers.BertLMHeadModel, token_type_ids=True),
)
HEADS = [(f, h) for f in FAMILIES for h in f.heads]
MASKS = ("holey", "holey_first0", "left", "right", "none")
NUM_CHOICES = 4


def random_attention_mask(shape, kind: str, seed: int) -> torch.Tensor:
    """Like HF's random_attention_mask (arbitrary 0/1, last column 1), plus the layouts tokenizers make."""
    g = torch.Generator().manual_seed(seed)
    batch, seqlen = shape[0] if len(shape) == 1 else int(torch.tensor(shape[:-1]).prod()), shape[-1]
    if kind == "none":
        mask = torch.ones(batch, seqlen, dtype=torch.long)
    elif kind.startswith("holey"):
        mask = torch.randint(0, 2, (batch, seqlen), generator=g)
        mask[:, -1] = 1  # as HF: at least one real token per row
        if kind == "holey_first0":
            mask[: batch // 2 + 1, 0] = 0
    else:
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
        lengths[0] = seqlen
        pos = torch.arange(seqlen)[None, :]
        mask = (pos < lengths[:, None]) if kind == "right" else (pos >= seqlen - lengths[:, None])
        mask = mask.long()
    return mask.view(*shape)


def head_inputs(family: Family, cls: type, config, mask_kind: str, seed: int = 0, labels: bool = True) -> dict:
    """Inputs as HF's tester prepares them; labels may sit on padded positions (HF's testers do not avoid them)."""
    g = torch.Generator().manual_seed(seed + 1)
    choice = cls.__name__.endswith("ForMultipleChoice")
    shape = (BATCH, NUM_CHOICES, SEQ) if choice else (BATCH, SEQ)
    inputs = {"input_ids": torch.randint(1, config.vocab_size, shape, generator=g),
              "attention_mask": random_attention_mask(shape, mask_kind, seed)}
    if family.token_type_ids:
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, shape, generator=g)
    if not labels:
        return inputs
    name = cls.__name__
    if name.endswith(("ForSequenceClassification",)):
        inputs["labels"] = torch.randint(0, config.num_labels, (BATCH,), generator=g)
    elif name.endswith(("ForMultipleChoice",)):
        inputs["labels"] = torch.randint(0, NUM_CHOICES, (BATCH,), generator=g)
    elif name.endswith("ForNextSentencePrediction"):
        inputs["labels"] = torch.randint(0, 2, (BATCH,), generator=g)
    elif name.endswith("ForTokenClassification"):
        inputs["labels"] = torch.randint(0, config.num_labels, shape, generator=g)
    elif name.endswith(("ForMaskedLM", "LMHeadModel")):
        inputs["labels"] = torch.randint(0, config.vocab_size, shape, generator=g)
    elif name.endswith("ForPreTraining"):
        inputs["labels"] = torch.randint(0, config.vocab_size, shape, generator=g)
        inputs["next_sentence_label"] = torch.randint(0, 2, (BATCH,), generator=g)
    elif name.endswith("ForQuestionAnswering"):
        inputs["start_positions"] = torch.randint(0, SEQ, (BATCH,), generator=g)
        inputs["end_positions"] = torch.randint(0, SEQ, (BATCH,), generator=g)
    return inputs


def stock_model(cls, config, attn_implementation="sdpa", seed=0):
    torch.manual_seed(seed)
    return cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation).eval()


def variant(kind: str, stock, tmp_path, attn_implementation=None):
    """The model under test: "patched" (patch() on a copy of stock) or "optimized" (the distilkernels.models
    class of the same name loaded from stock's checkpoint, with `attn_implementation` if given)."""
    if kind == "patched":
        model = copy.deepcopy(stock)
        distilkernels.patch(model)
        return model
    opt_cls = getattr(optimized, type(stock).__name__, None)
    if opt_cls is None:
        pytest.skip(f"no optimized class for {type(stock).__name__}")
    stock.save_pretrained(tmp_path)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return opt_cls.from_pretrained(tmp_path, **kwargs).eval()


def assert_same(ref, got, mask: torch.Tensor | None, where: str = "") -> None:
    """Every tensor of `ref` (a ModelOutput, tuple or tensor) against `got`: per-token values (leading dims
    == mask's shape) at real tokens only, attention weights at real query rows, everything else whole."""
    if isinstance(ref, dict):
        assert set(ref.keys()) == set(got.keys()), (where, ref.keys(), got.keys())
        for key in ref.keys():
            assert_same(ref[key], got[key], mask, f"{where}.{key}")
        return
    if isinstance(ref, (tuple, list)):
        assert len(ref) == len(got), where
        for i, (r, o) in enumerate(zip(ref, got)):
            assert_same(r, o, mask, f"{where}[{i}]")
        return
    if not isinstance(ref, torch.Tensor):
        return  # caches: their tensors are compared through the logits they produce
    assert ref.shape == got.shape, (where, ref.shape, got.shape)
    real = None if mask is None else mask.reshape(-1, mask.shape[-1]).bool()
    flat_ref, flat_got = ref, got
    if real is not None and ref.dim() >= 2 and ref.shape[: mask.dim()] == mask.shape:  # per token
        flat_ref, flat_got = (t.reshape(real.numel(), *t.shape[mask.dim():])[real.flatten()] for t in (ref, got))
    elif real is not None and ref.dim() == 4 and ref.shape[2] == mask.shape[-1] == ref.shape[3]:  # attentions
        flat_ref, flat_got = (t.transpose(1, 2)[real] for t in (ref, got))  # rows of real queries
    err = (flat_ref.float() - flat_got.float()).abs().max().item() if flat_ref.numel() else 0.0
    assert err <= TOL, f"{where}: max-abs {err:.3g} > {TOL}"


# ---- every head, every mask layout, labels on and off ----------------------------------------------------

@pytest.mark.parametrize("labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family,cls", HEADS, ids=lambda x: getattr(x, "name", getattr(x, "__name__", x)))
def test_head(family, cls, kind, mask_kind, labels, tmp_path):
    config = family.config(**({"num_labels": 2} if cls.__name__.endswith("QuestionAnswering") else {}))
    stock = stock_model(cls, config)
    model = variant(kind, stock, tmp_path)
    inputs = head_inputs(family, cls, config, mask_kind, labels=labels)
    with torch.no_grad():
        ref, got = stock(**inputs), model(**inputs)
    assert_same(ref, got, inputs["attention_mask"], cls.__name__)
    if labels and cls.__name__ not in ("DistilBertModel", "BertModel"):
        assert got.loss is not None
    stats = path_stats(model)
    assert not any(k.startswith("block.stock") for k in stats), stats  # every block ran fused
    if mask_kind == "right" and not labels:  # the fast path: padding removed
        assert stats.get("encoder.unpadded", 0) == 1, stats


@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_attn_implementation_masks_run_fused(family, attn, kind, tmp_path):
    """A model whose config names "sdpa" or "eager" (4-D masks: bool, additive) still runs fused: optimized
    classes loaded with that attn_implementation, and patched models that keep it."""
    cls = family.heads[2]  # ForSequenceClassification
    config = family.config()
    stock = stock_model(cls, config, attn_implementation=attn)
    model = variant(kind, stock, tmp_path, attn_implementation=attn)
    if kind == "patched":
        model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    for mask_kind in ("right", "holey_first0"):
        inputs = head_inputs(family, cls, config, mask_kind, labels=False)
        with torch.no_grad():
            assert_same(stock(**inputs), model(**inputs), inputs["attention_mask"], mask_kind)
    stats = path_stats(model)
    assert stats == {"embeddings.fused": 2, "encoder.unpadded": 1,
                     "encoder.padded: " + "position 0 is padding (pooled heads read it)": 1,
                     "block.fused": config.num_hidden_layers}, stats


# ---- output_attentions / output_hidden_states ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_output_attentions_and_hidden_states_per_call(family, kind, tmp_path):
    cls = family.heads[1]  # ForMaskedLM: per-token outputs
    config = family.config()
    stock = stock_model(cls, config, attn_implementation="eager")  # eager: the one that returns weights
    model = variant(kind, stock, tmp_path, attn_implementation="eager")
    inputs = head_inputs(family, cls, config, "holey_first0")
    with torch.no_grad():
        ref = stock(**inputs, output_attentions=True, output_hidden_states=True)
        got = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(got.attentions) == len(got.hidden_states) - 1 == config.num_hidden_layers
    assert_same(ref, got, inputs["attention_mask"])


@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_output_attentions_per_config(family, kind, tmp_path):
    cls = family.heads[2]
    config = family.config()
    stock = stock_model(cls, config, attn_implementation="eager")
    stock.config.output_attentions = True
    stock.config.output_hidden_states = True
    model = variant(kind, stock, tmp_path, attn_implementation="eager")
    assert model.config.output_attentions
    inputs = head_inputs(family, cls, config, "holey")
    with torch.no_grad():
        ref, got = stock(**inputs), model(**inputs)
    assert len(got.attentions) == config.num_hidden_layers
    assert_same(ref, got, inputs["attention_mask"])


# ---- decoders ----------------------------------------------------------------------------------------------

def decoder_config(family):
    return family.config(is_decoder=True, add_cross_attention=True)


DECODERS = [f for f in FAMILIES if f.decoder is not None]


@pytest.mark.parametrize("enc_mask", ["holey", "none"])
@pytest.mark.parametrize("kind", ["patched", "optimized-base"])
@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_decoder_cross_attention_unequal_lengths(family, kind, enc_mask, tmp_path):
    config = decoder_config(family)
    cls = family.decoder if kind == "patched" else family.heads[0]
    stock = stock_model(cls, config)
    if kind == "patched":
        model = variant("patched", stock, tmp_path)
    else:  # distilkernels.models.<Base> configured as a decoder
        model = variant("optimized", stock, tmp_path)
    inputs = head_inputs(family, cls, config, "holey", labels=kind == "patched")
    g = torch.Generator().manual_seed(5)
    inputs["encoder_hidden_states"] = torch.randn(BATCH, ENC_SEQ, config.hidden_size, generator=g)
    inputs["encoder_attention_mask"] = random_attention_mask((BATCH, ENC_SEQ), enc_mask, seed=6)
    with torch.no_grad():
        ref, got = stock(**inputs), model(**inputs)
    assert_same(ref, got, inputs["attention_mask"], cls.__name__)
    assert any("decoder / cross-attention" in k for k in path_stats(model)), path_stats(model)


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_generate_with_cache_left_padding(family, tmp_path):
    config = family.config(is_decoder=True, pad_token_id=0, bos_token_id=1, eos_token_id=98)
    stock = stock_model(family.decoder, config)
    model = variant("patched", stock, tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, config.vocab_size - 1, (3, 7), generator=g)
    mask = random_attention_mask((3, 7), "left", seed=4)
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
                  return_dict_in_generate=True, output_scores=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, got = stock.generate(**kwargs), model.generate(**kwargs)
    assert torch.equal(ref.sequences, got.sequences)
    assert_same(ref.scores, got.scores, None, "scores")


# ---- eager vs torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_eager_and_compiled_agree(family, kind, tmp_path):
    """Same model, eager (unpadded where allowed) vs torch.compile (padded layout): every readable value."""
    torch._dynamo.reset()
    cls = family.heads[2]  # ForSequenceClassification: pooled output and a loss
    config = family.config()
    model = variant(kind, stock_model(cls, config), tmp_path)
    compiled = torch.compile(model, backend="aot_eager")  # the graph our ops run in; inductor adds nothing here
    for mask_kind, labels in (("holey_first0", True), ("holey", False), ("right", False)):
        inputs = head_inputs(family, cls, config, mask_kind, labels=labels)
        with torch.no_grad():
            eager, graph = model(**inputs), compiled(**inputs)
        assert_same(eager, graph, inputs["attention_mask"], mask_kind)


# ---- export -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_torch_export(family, kind, tmp_path):
    cls = family.heads[2]
    config = family.config()
    stock = stock_model(cls, config)
    model = variant(kind, stock, tmp_path)
    inputs = head_inputs(family, cls, config, "holey_first0", labels=False)
    exported = torch.export.export(model, (), kwargs=inputs)
    with torch.no_grad():
        assert_same(stock(**inputs), exported.module()(**inputs), inputs["attention_mask"])
    ours = [n for n in exported.graph.nodes if "distilkernels" in str(n.target)]
    assert not ours, f"exporters get the stock computation, found {ours}"


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["patched", "optimized"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_onnx_export(family, kind, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    cls = family.heads[2]
    config = family.config()
    stock = stock_model(cls, config)
    model = variant(kind, stock, tmp_path / "ckpt")
    inputs = head_inputs(family, cls, config, "holey_first0", labels=False)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=inputs, dynamo=dynamo, input_names=list(inputs),
                          output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    (logits,) = session.run(["logits"], feed)
    with torch.no_grad():
        assert_same(stock(**inputs).logits, torch.from_numpy(logits), None, "onnx logits")
