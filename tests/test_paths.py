"""The fused-vs-stock decision (distilkernels.modules.decide): the reason of every fallback, and the counters
that report them (path_stats, PatchHandle.stats)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import distilkernels
from distilkernels import modules
from distilkernels.modules import decide, path_stats

LAYERS = 2


def distilbert(cls=transformers.DistilBertForSequenceClassification, **overrides):
    kw = dict(vocab_size=99, dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=37, max_position_embeddings=64)
    kw.update(overrides)
    torch.manual_seed(0)
    # attn_implementation="distilkernels": the attention function's own decisions are counted too (patch()
    # leaves a model's attention implementation as it was built)
    return cls._from_config(transformers.DistilBertConfig(**kw), attn_implementation="distilkernels").eval()


def inputs(kind="right", batch=3, seqlen=8):
    ids = torch.randint(1, 99, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    if kind == "right":
        mask[1, 5:] = 0
    elif kind == "left":
        mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, **extra):
    handle = distilkernels.patch(model, **{k: extra.pop(k) for k in ("unpad",) if k in extra})
    handle.stats(reset=True)
    grad = extra.pop("grad", False)
    with torch.set_grad_enabled(grad):
        model(**{**inputs(extra.pop("mask", "right")), **extra})
    return handle.stats()


def test_fast_path_counts():
    model = distilbert()
    assert run(model) == {"embeddings.fused": 1, "encoder.unpadded": 1}  # unpadded: forward_tokens directly
    model.eval()
    with torch.no_grad():
        model(**inputs("none"))
    assert path_stats(model) == {"embeddings.fused": 2, "encoder.unpadded": 1,
                                 "encoder.padded: " + modules.NO_PADDING: 1, "block.fused": LAYERS}


def test_stats_reset():
    model = distilbert()
    handle = distilkernels.patch(model)
    with torch.no_grad():
        model(**inputs())
    assert handle.stats(reset=True) == {"embeddings.fused": 1, "encoder.unpadded": 1}
    assert handle.stats() == {} and path_stats(model) == {}
    with torch.no_grad():
        model(**inputs())
    modules.reset_path_stats(model)
    assert path_stats(model) == {}


@pytest.mark.parametrize("case, expected", [
    ("gradients", {"embeddings.stock: " + modules.GRADIENTS: 1, "encoder.padded: " + modules.GRADIENTS: 1,
                   "block.stock: " + modules.GRADIENTS: LAYERS, "attention.stock: " + modules.GRADIENTS: LAYERS}),
    ("dropout", {"embeddings.stock: " + modules.DROPOUT: 1, "encoder.padded: " + modules.DROPOUT: 1,
                 "block.stock: " + modules.DROPOUT: LAYERS, "attention.stock: " + modules.DROPOUT: LAYERS}),
    ("attentions", {"embeddings.fused": 1, "encoder.padded: attention weights requested": 1,
                    "block.stock: attention weights requested": LAYERS,
                    "attention.stock: attention weights requested": LAYERS}),
    ("hidden_states", {"embeddings.fused": 1, "encoder.padded: " + modules.HIDDEN_STATES: 1,
                       "block.fused": LAYERS}),
    ("labels", {"embeddings.fused": 1, "encoder.padded: " + modules.LABELS: 1, "block.fused": LAYERS}),
    ("left", {"embeddings.fused": 1, "encoder.padded: " + modules.POSITION0: 1, "block.fused": LAYERS}),
    ("unpad_off", {"embeddings.fused": 1, "encoder.padded: " + modules.UNPAD_OFF: 1, "block.fused": LAYERS}),
    ("activation", {"embeddings.fused": 1, "encoder.padded: " + modules.ACTIVATION: 1,
                    "block.stock: " + modules.ACTIVATION: LAYERS, "attention.fused": LAYERS}),
    ("dtype", {"embeddings.stock: " + modules.DTYPE: 1, "encoder.padded: " + modules.DTYPE: 1,
               "block.stock: " + modules.DTYPE: LAYERS, "attention.stock: " + modules.DTYPE: LAYERS}),
])
def test_fallback_reason(case, expected):
    model = distilbert(activation="gelu_new") if case == "activation" else distilbert()
    extra = {
        "gradients": {"grad": True},
        "attentions": {"output_attentions": True},
        "hidden_states": {"output_hidden_states": True},
        "labels": {"labels": torch.tensor([0, 1, 0])},
        "left": {"mask": "left"},
        "unpad_off": {"unpad": False},
    }.get(case, {})
    if case == "dropout":
        model.train()
    if case == "dtype":
        model.double()
    assert run(model, **extra) == expected


@pytest.mark.parametrize("way", ["forward", "base_patched", "hooked"])
def test_labels_seen_without_the_heads_hooks(way):
    """A QA loss spans every position, padded ones too (and here the answer sits on padding), so labels must
    give the padded layout however the head runs: through its hooks (model(...)), called as model.forward(...)
    (wrappers such as PEFT's skip module hooks), or with only its base model patched (patch(model.bert)). The
    loss matches HF's to 1e-4; without labels the same calls run unpadded."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=37)
    torch.manual_seed(0)
    stock = transformers.BertForQuestionAnswering(config).eval()
    model = copy.deepcopy(stock)
    distilkernels.patch(model.bert if way == "base_patched" else model)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:], mask[2, 3], mask[3, 7:] = 0, 0, 0
    ids = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(1))
    labels = {"start_positions": torch.tensor([0, 7, 3, 8]), "end_positions": torch.tensor([1, 8, 3, 8])}
    call = model.forward if way == "forward" else model
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=mask, **labels).loss
        modules.reset_path_stats(model)
        got = call(input_ids=ids, attention_mask=mask, **labels).loss
        assert path_stats(model).get("encoder.padded: " + modules.LABELS) == 1
        assert (got - want).abs().item() <= 1e-4
        call(input_ids=ids, attention_mask=mask)
        assert path_stats(model).get("encoder.unpadded") == 1


def test_decoder_reason():
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=37, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel._from_config(config, attn_implementation="distilkernels").eval()
    stats = run(model, encoder_hidden_states=torch.randn(3, 5, 32))
    assert stats["encoder.padded: " + modules.DECODER] == 1
    assert stats["block.stock: " + modules.DECODER] == LAYERS
    assert stats["attention.stock: " + modules.DECODER] == 2 * LAYERS  # self (causal) + cross


def test_mask_format_reason():
    """A 4-D mask that is not a key-padding mask (query rows differ): HF's code runs, with that reason."""
    model = distilbert()
    distilkernels.patch(model)
    block = model.distilbert.transformer.layer[0]
    x = torch.randn(2, 5, 32)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5).contiguous()
    with torch.no_grad():
        block(x, causal)
        block(x, causal[:, :, :1].expand(2, 1, 5, 5).contiguous())  # same rows: a key-padding mask
        block(x, torch.where(causal[:, :, :1], 0.0, -1e4).expand(2, 1, 5, 5))  # additive, not HF's minimum
    stats = path_stats(block)
    rows, bias = ("mask format: 4-D mask that is not a key-padding mask (query rows differ)",
                  "mask format: additive 4-D mask with values other than 0 and the dtype's minimum")
    assert stats == {"block.stock: " + rows: 1, "attention.stock: " + rows: 1, "block.fused": 1,
                     "block.stock: " + bias: 1, "attention.stock: " + bias: 1}, stats


@pytest.mark.parametrize("cls, config", [
    (transformers.DistilBertModel, transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=37, max_position_embeddings=64)),
    (transformers.BertModel, transformers.BertConfig(
        vocab_size=99, hidden_size=36, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=37)),
])
def test_flex_attention_block_mask(cls, config):
    """attn_implementation="flex_attention" hands the blocks a BlockMask, not a tensor: the decision read its
    .dim() (AttributeError on every padded batch); it is a mask format the fused path does not read, so HF's
    code runs it, with that reason, and matches the stock model."""
    torch.manual_seed(0)
    stock = cls._from_config(config, attn_implementation="flex_attention").eval()
    model = copy.deepcopy(stock)
    batch = inputs()
    with torch.inference_mode():
        want = stock(**batch).last_hidden_state
    handle = distilkernels.patch(model)
    with torch.inference_mode():
        got = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)  # the project's fp32 bound
    reason = "mask format: a BlockMask, not a tensor"
    assert handle.stats() == {"embeddings.fused": 1, "encoder.padded: " + reason: 1,
                              "block.stock: " + reason: LAYERS}, handle.stats()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_4d_bool_mask_on_eager_model(attn):
    """HF passes a prepared 4-D mask through as it is; its eager attention adds a bool one to the scores (1.0 where
    True, 0.0 where False: nothing is masked), sdpa applies it as a mask. The fused path read it as a key-padding
    mask under both (eager, tiny BERT: real tokens 4.4e-3 off, pooler_output 3.1e-3); on an eager model HF's code
    now runs it."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=36, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=37)
    torch.manual_seed(0)
    stock = transformers.BertModel._from_config(config, attn_implementation=attn).eval()
    model = copy.deepcopy(stock)
    batch = inputs("left")
    real = batch["attention_mask"].bool()
    batch["attention_mask"] = real[:, None, None, :]
    with torch.inference_mode():
        want = stock(**batch)
    handle = distilkernels.patch(model)
    with torch.inference_mode():
        got = model(**batch)
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=0)  # the project's fp32 bound
    stats = handle.stats()
    reason = "mask format: " + distilkernels.hf.BOOL_ON_EAGER
    assert (stats.get("block.stock: " + reason) == LAYERS) == (attn == "eager"), stats


def test_compiling_and_exporting_reasons(monkeypatch):
    """Inside graphs counters are not bumped (a traced counter would be a constant), so the reason is checked
    on decide() itself."""
    model = distilbert()
    distilkernels.patch(model)
    encoder, block = model.distilbert.transformer, model.distilbert.transformer.layer[0]
    x, mask = torch.randn(3, 8, 32), inputs()["attention_mask"].bool()
    with torch.no_grad():
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert decide("encoder", encoder, x, mask) == ("padded", modules.COMPILING, mask)
        assert decide("block", block, x, mask) == ("fused", "", mask)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        assert decide("encoder", encoder, x, mask).reason == modules.EXPORTING
        assert decide("block", block, x, mask).path == "stock"


def test_forward_hooks_run():
    """The fused paths call none of a block's submodules (nor, unpadded, the blocks): with a forward hook on a
    block or inside one, HF's calls run instead where the hook would be skipped, and every hook sees what it
    sees on HF's model. HF's own output capturing hooks (installed by an output_hidden_states call) are not
    such hooks: the next plain call takes the fast path again."""
    model = distilbert(attn_implementation="sdpa")
    reference = copy.deepcopy(model)
    seen = {"patched": [], "hf": []}
    for name, m in (("patched", model), ("hf", reference)):
        layers = m.distilbert.transformer.layer
        layers[1].register_forward_hook(lambda mod, args, out, name=name: seen[name].append(
            ("layer1", (out[0] if isinstance(out, tuple) else out).clone())))
        layers[0].ffn.lin1.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(("lin1",
                                                                                                     args[0].clone())))
    handle = distilkernels.patch(model)
    with torch.no_grad():
        out, ref = model(**inputs()).logits, reference(**inputs()).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert [k for k, _ in seen["patched"]] == [k for k, _ in seen["hf"]] == ["lin1", "layer1"]
    mask = inputs()["attention_mask"].bool()
    for (_, got), (_, want) in zip(seen["patched"], seen["hf"]):
        torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=0)  # real tokens; padded ones differ
    # (the stock block's attention still runs the fused attention function: no hook is inside it)
    assert handle.stats(reset=True) == {"embeddings.fused": 1, "encoder.padded: " + modules.HOOKS: 1,
                                        "block.stock: " + modules.HOOKS: 1, "block.fused": 1, "attention.fused": 1}

    fresh = distilbert()
    distilkernels.patch(fresh)
    with torch.no_grad():
        fresh(**inputs(), output_hidden_states=True)
        modules.reset_path_stats(fresh)
        fresh(**inputs())
    assert path_stats(fresh) == {"embeddings.fused": 1, "encoder.unpadded": 1}


def test_no_padding_runs_blocks_without_hf_calls():
    """Without padding the encoder runs its blocks itself (counted as each block's fused path); hidden states
    requested still go through HF's loop, which collects them."""
    model = distilbert(attn_implementation="sdpa")
    reference = copy.deepcopy(model)
    distilkernels.patch(model)
    with torch.no_grad():
        out = model(**inputs("none"), output_hidden_states=True)
        ref = reference(**inputs("none"), output_hidden_states=True)
        plain = model(**inputs("none"))
    assert len(out.hidden_states) == len(ref.hidden_states) == LAYERS + 1
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(plain.logits, ref.logits, atol=1e-4, rtol=0)
    assert path_stats(model) == {"embeddings.fused": 2, "encoder.padded: " + modules.HIDDEN_STATES: 1,
                                 "encoder.padded: " + modules.NO_PADDING: 1, "block.fused": 2 * LAYERS}


@pytest.mark.parametrize("kind", ["inputs_embeds", "hook", "position_ids_1d", "position_ids_shifted"])
def test_embeddings_paths(kind):
    """The embedding layer's one-pass kernel runs only where the call asks nothing else of it: inputs_embeds or
    a forward hook on one of its submodules (which then runs and sees what it sees in HF's model) take HF's
    forward. Position ids given as (seqlen,) or shifted run fused. The outputs match HF's either way."""
    model = distilbert()
    reference = copy.deepcopy(model)
    handle = distilkernels.patch(model)
    args = inputs("none")
    seen = {}
    if kind == "inputs_embeds":
        args = {"inputs_embeds": reference.distilbert.embeddings.word_embeddings(args.pop("input_ids")), **args}
    elif kind == "hook":
        for name, m in (("patched", model), ("hf", reference)):
            m.distilbert.embeddings.word_embeddings.register_forward_hook(
                lambda mod, a, out, name=name: seen.__setitem__(name, out.clone()))
    elif kind == "position_ids_1d":
        args["position_ids"] = torch.arange(8)
    else:
        args["position_ids"] = torch.arange(5, 13)[None].expand(3, 8)
    with torch.no_grad():
        got, want = model(**args).logits, reference(**args).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    why = {"inputs_embeds": "embeddings.stock: inputs_embeds given", "hook": "embeddings.stock: " + modules.HOOKS}
    assert handle.stats()[why.get(kind, "embeddings.fused")] == 1
    if kind == "hook":
        torch.testing.assert_close(seen["patched"], seen["hf"], atol=0, rtol=0)


class _ScaledEmbedding(torch.nn.Embedding):
    """A table with a forward of its own (what an adapter on the embeddings looks like to the fused pass)."""

    def forward(self, ids):
        return super().forward(ids) * 1.5


class _ShiftedLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) + 0.25


@pytest.mark.parametrize("piece", ["word_embeddings", "position_embeddings", "LayerNorm"])
def test_embeddings_piece_with_its_own_forward(piece):
    """A table or the LayerNorm replaced (after patch()) by a module whose forward is its own runs HF's forward,
    which calls it: the fused pass reads parameters only and would skip it. A plain replacement stays fused."""
    model = distilbert()
    reference = copy.deepcopy(model)
    handle = distilkernels.patch(model)
    for m in (model, reference):
        emb = m.distilbert.embeddings
        old = getattr(emb, piece)
        if piece == "LayerNorm":
            new = _ShiftedLayerNorm(old.normalized_shape, eps=old.eps)
        else:
            new = _ScaledEmbedding(old.num_embeddings, old.embedding_dim)
        new.load_state_dict(old.state_dict())
        setattr(emb, piece, new)
    args = inputs("none")
    with torch.no_grad():
        got, want = model(**args).logits, reference(**args).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    plain = "Embedding" if piece != "LayerNorm" else "LayerNorm"
    reason = f"embeddings.stock: {piece} is a {type(getattr(model.distilbert.embeddings, piece)).__name__}, not a plain {plain}"
    assert handle.stats().get(reason) == 1, handle.stats()
