"""Shared fixtures: small HF configs, holey masks, and a spy that proves which kernels ran."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter, which must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers

import distilkernels
from distilkernels import dispatch, ops  # noqa: F401
from distilkernels._ext import load_extension

HEADS = (
    transformers.DistilBertModel,
    transformers.DistilBertForMaskedLM,
    transformers.DistilBertForSequenceClassification,
    transformers.DistilBertForQuestionAnswering,
    transformers.DistilBertForTokenClassification,
    transformers.DistilBertForMultipleChoice,
)


def pytest_collection_modifyitems(config, items):
    skip_ext = pytest.mark.skip(reason=f"C++ extension not loaded: {distilkernels._ext.extension_error()}")
    skip_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "requires_ext" in item.keywords and load_extension() is None:
            item.add_marker(skip_ext)
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def tiny_config(**overrides) -> transformers.DistilBertConfig:
    """dim 32, 4 heads (head_dim 8), hidden_dim 37, 5 layers, vocab 99: odd sizes on purpose."""
    kwargs = dict(dim=32, n_heads=4, hidden_dim=37, n_layers=5, vocab_size=99, max_position_embeddings=64)
    kwargs.update(overrides)
    return transformers.DistilBertConfig(**kwargs)


def base_config(**overrides) -> transformers.DistilBertConfig:
    """distilbert-base-uncased's shape: dim 768, 12 heads, hidden_dim 3072, 6 layers."""
    return transformers.DistilBertConfig(**overrides)


def make_model(cls, config, seed=0, attn_implementation="eager"):
    torch.manual_seed(seed)
    model = cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.eval()


def holey_mask(batch, seqlen, seed=0, p_keep=0.7, kind="holey"):
    """(batch, seqlen) int64 0/1 mask. kind: holey (arbitrary 0/1, >= 1 real token per row), right, left."""
    g = torch.Generator().manual_seed(seed)
    if kind == "holey":
        mask = (torch.rand(batch, seqlen, generator=g) < p_keep).long()
        mask[torch.arange(batch), torch.randint(0, seqlen, (batch,), generator=g)] = 1
        return mask
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    pos = torch.arange(seqlen)[None, :]
    mask = (pos < lengths[:, None]) if kind == "right" else (pos >= seqlen - lengths[:, None])
    return mask.long()


def model_inputs(cls, config, batch, seqlen, mask, seed=0, with_labels=True):
    """input_ids/attention_mask (+labels) for head `cls`; MultipleChoice gets 2 choices per example."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seqlen), generator=g)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if cls is transformers.DistilBertForMultipleChoice:
        inputs = {k: torch.stack([v, v.roll(1, dims=0)], dim=1) for k, v in inputs.items()}
    if not with_labels:
        return inputs
    if cls is transformers.DistilBertForMaskedLM or cls is transformers.DistilBertForTokenClassification:
        n = config.vocab_size if cls is transformers.DistilBertForMaskedLM else config.num_labels
        labels = torch.randint(0, n, (batch, seqlen), generator=g)
        inputs["labels"] = labels.masked_fill(mask == 0, -100)  # padding positions carry no label
    elif cls is transformers.DistilBertForSequenceClassification:
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    elif cls is transformers.DistilBertForMultipleChoice:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif cls is transformers.DistilBertForQuestionAnswering:
        # positions of real tokens, as a tokenizer would produce them
        first = mask.argmax(dim=1)
        inputs["start_positions"] = first
        inputs["end_positions"] = first
    return inputs


@pytest.fixture
def op_spy(monkeypatch):
    """Counts calls per (op, backend) through the dispatch table (Triton entries stay lazy: the wrapper calls
    the table's entry, which imports its module on first use)."""
    calls: dict[tuple[str, str], int] = {}
    for key, fn in list(dispatch._TABLE.items()):
        def wrapped(*args, _key=key, _fn=fn):
            calls[_key] = calls.get(_key, 0) + 1
            return _fn(*args)
        monkeypatch.setitem(dispatch._TABLE, key, wrapped)
    return calls
