"""distilkernels.patch() on sentence-transformers models (distilkernels/sentence_transformers.py):
SentenceTransformer and CrossEncoder on all-MiniLM-L6-v2, parity with stock, restore, errors."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import transformers

import distilkernels
from distilkernels.modules import FusedBlock
from distilkernels.sentence_transformers import hf_models, is_wrapper
from helpers import MINILM_DIR, minilm_sentences, requires_minilm, tiny_bert

st = pytest.importorskip("sentence_transformers", reason="needs the ray extra: pip install -e '.[ray]'")

ATOL = 1e-4  # fp32 vs fp32 on unit-norm embeddings / logits of order 1: summation order only


def _fused_blocks(model) -> int:
    return sum(isinstance(m, FusedBlock) for m in model.modules())


def _attention_calls(op_spy) -> int:
    """Fused attention calls so far: one per layer per forward when the fused path really runs."""
    return sum(n for (op, _), n in op_spy.items() if op in ("attention", "varlen_attention"))


def _encode(model, sentences):
    return model.encode(sentences, batch_size=32, convert_to_tensor=True, show_progress_bar=False)


@pytest.fixture(scope="module")
def sentences():
    return minilm_sentences()


@requires_minilm
def test_sentence_transformer_parity_and_restore(sentences, op_spy):
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    originals = list(model.modules())
    stock = _encode(model, sentences)

    handle = distilkernels.patch(model)
    assert handle.model is model and distilkernels.patch(model) is handle  # patching twice: the same handle
    assert _fused_blocks(model) == 6  # every BertLayer of the encoder runs fused
    patched = _encode(model, sentences)
    assert _attention_calls(op_spy) == 6 * -(-len(sentences) // 32)  # 6 layers x encode()'s batches of 32
    cosine = torch.nn.functional.cosine_similarity(patched.double(), stock.double(), dim=1)
    assert cosine.min().item() >= 0.99999
    assert (patched - stock).abs().max().item() <= ATOL

    handle.restore()
    assert list(model.modules()) == originals and _fused_blocks(model) == 0
    assert not hasattr(model, "_distilkernels_patch")
    assert model[0].auto_model.config._attn_implementation == "sdpa"
    calls = _attention_calls(op_spy)
    torch.testing.assert_close(_encode(model, sentences), stock, rtol=0, atol=0)  # the stock computation again
    assert _attention_calls(op_spy) == calls


@requires_minilm
def test_sentence_transformer_handle_as_context_manager(sentences):
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    with distilkernels.patch(model):
        assert _fused_blocks(model) == 6
    assert _fused_blocks(model) == 0
    assert distilkernels.patch(model).restored is False  # a fresh handle after a restore


@requires_minilm
def test_cross_encoder_parity_and_restore(op_spy):
    torch.manual_seed(0)  # the classifier head is new (random): seeded, and stock vs patched share it
    model = st.CrossEncoder(str(MINILM_DIR), num_labels=1, device="cpu", activation_fn=torch.nn.Identity())
    pairs = [(a, b) for a, b in zip(minilm_sentences()[:40], minilm_sentences()[40:80])]
    stock = torch.as_tensor(model.predict(pairs, batch_size=16))

    handle = distilkernels.patch(model)
    assert [type(m).__name__ for m in hf_models(model)] == ["BertForSequenceClassification"]
    assert _fused_blocks(model) == 6
    patched = torch.as_tensor(model.predict(pairs, batch_size=16))
    assert _attention_calls(op_spy) == 6 * 3  # 6 layers x 40 pairs in batches of 16
    assert (patched - stock).abs().max().item() <= ATOL * max(1.0, stock.abs().max().item())

    handle.restore()
    assert _fused_blocks(model) == 0
    torch.testing.assert_close(torch.as_tensor(model.predict(pairs, batch_size=16)), stock, rtol=0, atol=0)


@requires_minilm
def test_multi_vector_encoder_parity_and_restore(sentences):
    """sentence-transformers 6's MultiVectorEncoder (per-token embeddings) holds its HF encoder as the other
    wrappers do; patch() refused it ("supports DistilBertPreTrainedModel ... got MultiVectorEncoder")."""
    if not hasattr(st, "MultiVectorEncoder"):
        pytest.skip("sentence-transformers without MultiVectorEncoder")
    model = st.MultiVectorEncoder(str(MINILM_DIR), device="cpu")
    stock = model.encode(sentences[:40], batch_size=16)  # a list of (tokens, dim) tensors, real tokens only
    handle = distilkernels.patch(model)
    assert _fused_blocks(model) == 6
    patched = model.encode(sentences[:40], batch_size=16)
    assert [t.shape for t in patched] == [t.shape for t in stock]
    assert max((a - b).abs().max().item() for a, b in zip(patched, stock)) <= ATOL
    assert not any(key.startswith("block.stock") for key in handle.stats()), handle.stats()
    handle.restore()
    assert _fused_blocks(model) == 0


@requires_minilm
def test_unsupported_encoder_inside_is_a_clear_error(tmp_path):
    """A SentenceTransformer around an encoder distilkernels does not patch (here a tiny ELECTRA)."""
    config = transformers.ElectraConfig(hidden_size=36, embedding_size=36, num_attention_heads=4, intermediate_size=37,
                                        num_hidden_layers=2, vocab_size=30522, max_position_embeddings=64)
    transformers.ElectraModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(MINILM_DIR / name, tmp_path / name)
    model = st.SentenceTransformer(modules=[st.models.Transformer(str(tmp_path)), st.models.Pooling(36)],
                                   device="cpu")
    assert is_wrapper(model)
    with pytest.raises(TypeError, match="no supported encoder inside this SentenceTransformer.*ElectraModel"):
        distilkernels.patch(model)
    assert not hasattr(model, "_distilkernels_patch")


def test_is_wrapper_only_for_sentence_transformers_models():
    assert not is_wrapper(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not is_wrapper(transformers.BertModel(tiny_bert()))


@requires_minilm
def test_patch_dtype_converts_the_whole_wrapper(sentences):
    """patch(wrapper, dtype=bf16) converts the modules after the encoder too (a Dense reads the pooled bf16
    output); restore() keeps the conversion, as it does for a model. handle.stats() sums the encoders' counts."""
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # older sentence-transformers: the same classes here
        from sentence_transformers import models

    torch.manual_seed(0)  # the Dense layer is new (random)
    model = st.SentenceTransformer(modules=[models.Transformer(str(MINILM_DIR)), models.Pooling(384),
                                            models.Dense(384, 64)], device="cpu")
    stock = _encode(model, sentences)
    stock_bf16 = _encode(copy.deepcopy(model).to(torch.bfloat16), sentences)

    handle = distilkernels.patch(model, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert handle.stats(reset=True) == {}
    patched = _encode(model, sentences)
    assert patched.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(patched.double(), stock.double(), dim=1)
    assert cosine.min().item() >= 0.999
    stats = handle.stats()
    batches = -(-len(sentences) // 32)
    assert sum(n for key, n in stats.items() if key.startswith("encoder.")) == batches, stats
    assert not any(key.startswith(("encoder.padded", "block.stock")) for key in stats), stats
    assert stats == distilkernels.modules.path_stats(model)

    handle.restore()
    assert _fused_blocks(model) == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # documented: restore() keeps the conversion
    torch.testing.assert_close(_encode(model, sentences), stock_bf16, rtol=0, atol=0)  # HF's bf16 computation
    model.to(torch.float32)
    again = _encode(model, sentences)  # back in fp32 (from the bf16-rounded weights): stock's computation again
    assert torch.nn.functional.cosine_similarity(again.double(), stock.double(), dim=1).min().item() >= 0.999
