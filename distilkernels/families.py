"""One row per model family: everything patch(), the optimized classes and the parity tests need to know.

A `Family` row names
  - the block layout (where q/k/v, the output projection, the LayerNorms and the feed-forward live in one
    HF block),
  - the HF classes it replaces (block and encoder) and the fused classes replacing them,
  - the PreTrainedModel base class patch() accepts and the base model whose inputs it checks,
  - the HF head classes, each with the kind of labels it takes; `distilkernels.models` holds one optimized
    class per head, under the head's own name,
  - the parity-test configuration: a tiny config factory with odd sizes, the shape of the family's
    best-known small checkpoint, and how its inputs are made.

Adding a family is adding a row here, its two fused classes below and one `class` statement per head in
models.py. The fused classes are written out as plain `class` statements so that they have importable
module-level names: `print(model)` shows names a grep finds, and pickle can find the class again.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import transformers
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert import modeling_bert as hf_bert
from transformers.models.distilbert import modeling_distilbert as hf_distilbert
from transformers.models.roberta import modeling_roberta as hf_roberta

from .modules import BlockLayout, FusedBlock, FusedEmbeddings, FusedEncoder

DISTILBERT_BLOCK = BlockLayout(
    attention="attention", n_heads="n_heads", q="attention.q_lin", k="attention.k_lin", v="attention.v_lin",
    out="attention.out_lin", ln1="sa_layer_norm", lin1="ffn.lin1", act="ffn.activation", lin2="ffn.lin2",
    ln2="output_layer_norm")

# BERT's block; RoBERTa's has the same module tree (post-LayerNorm, same names).
BERT_BLOCK = BlockLayout(
    attention="attention.self", n_heads="num_attention_heads", q="attention.self.query", k="attention.self.key",
    v="attention.self.value", out="attention.output.dense", ln1="attention.output.LayerNorm",
    lin1="intermediate.dense", act="intermediate.intermediate_act_fn", lin2="output.dense", ln2="output.LayerNorm")


# ---- fused classes: one block and one encoder per family --------------------------------------------------

class FusedTransformerBlock(FusedBlock, hf_distilbert.TransformerBlock):
    """DistilBERT's TransformerBlock on distilkernels' fused path."""

    LAYOUT = DISTILBERT_BLOCK


class FusedTransformer(FusedEncoder, hf_distilbert.Transformer):
    """DistilBERT's Transformer (layer stack) with padding removal."""

    OUTPUT = BaseModelOutput


class FusedDistilBertEmbeddings(FusedEmbeddings, hf_distilbert.Embeddings):
    """DistilBERT's Embeddings (word + position, LayerNorm) in one pass per token."""

    def forward(self, input_ids, inputs_embeds=None, position_ids=None):
        out = self.fused(input_ids, inputs_embeds, position_ids, None, token_types=False)
        return super().forward(input_ids, inputs_embeds, position_ids) if out is None else out


class FusedBertEmbeddings(FusedEmbeddings, hf_bert.BertEmbeddings):
    """BERT's BertEmbeddings (word + token type + position, LayerNorm) in one pass per token."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length=0):
        out = self.fused(input_ids, inputs_embeds, position_ids, token_type_ids, first_position=cache_length,
                         token_types=True)
        if out is None:
            return super().forward(input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)
        return out


class FusedBertLayer(FusedBlock, hf_bert.BertLayer):
    """BERT's BertLayer on distilkernels' fused path."""

    LAYOUT = BERT_BLOCK


class FusedBertEncoder(FusedEncoder, hf_bert.BertEncoder):
    """BERT's BertEncoder with padding removal."""

    OUTPUT = BaseModelOutputWithPastAndCrossAttentions


class FusedRobertaLayer(FusedBlock, hf_roberta.RobertaLayer):
    """RoBERTa's RobertaLayer on distilkernels' fused path."""

    LAYOUT = BERT_BLOCK


class FusedRobertaEncoder(FusedEncoder, hf_roberta.RobertaEncoder):
    """RoBERTa's RobertaEncoder with padding removal."""

    OUTPUT = BaseModelOutputWithPastAndCrossAttentions


# ---- the rows ----------------------------------------------------------------------------------------------

# Label kinds of the heads (how the parity tests make labels): "none" (base model), "masked_lm" and "token"
# (one label per position), "sequence" (one per row), "question_answering" (start/end positions),
# "multiple_choice" (one per example; inputs get a choices dimension).
LABEL_KINDS = ("none", "masked_lm", "token", "sequence", "question_answering", "multiple_choice")
# Heads whose outputs are per token (compared on real tokens only).
TOKEN_LEVEL_KINDS = ("none", "masked_lm", "token", "question_answering")


@dataclass(frozen=True)
class Head:
    hf_class: type
    labels: str  # one of LABEL_KINDS

    @property
    def name(self) -> str:
        return self.hf_class.__name__


@dataclass(frozen=True)
class ParityConfig:
    """How the parity suite builds this family's models and inputs.

    tiny(layers=None, activation=None, max_positions=None): a random-init config with odd sizes (head_dim,
    hidden_dim and vocabulary not multiples of 8), the overrides named the same way for every family.
    base(): the config of the family's best-known small checkpoint (shape only; weights are random).
    token_types: whether inputs carry token_type_ids (drawn from config.type_vocab_size).
    """

    tiny: Callable[..., transformers.PretrainedConfig]
    base: Callable[[], transformers.PretrainedConfig]
    token_types: bool


@dataclass(frozen=True)
class Family:
    name: str
    layout: BlockLayout
    block: type  # HF block class replaced (exact class match)
    encoder: type  # HF encoder class replaced
    fused_block: type
    fused_encoder: type
    pretrained: type  # PreTrainedModel base: patch() accepts it and every subclass
    base_model: type  # the encoder model inside every head; its inputs are checked
    heads: tuple[Head, ...]  # encoder heads, the base model first; one optimized class each
    decoders: tuple[type, ...]  # causal-LM heads: patched, but their blocks run HF's decoder code
    test: ParityConfig
    # The embedding layer replaced and its fused class; None: HF's runs (RoBERTa's derives position ids from the
    # input ids)
    embeddings: type | None = None
    fused_embeddings: type | None = None

    def n_layers(self, config) -> int:
        return config.num_hidden_layers  # DistilBertConfig maps it to n_layers

    def optimized_classes(self) -> tuple[type, ...]:
        """distilkernels.models' class for each head (same name), in the order of `heads`."""
        models = importlib.import_module(f"{__package__}.models")
        return tuple(getattr(models, head.name) for head in self.heads)


def _with(config, mapping: dict, **generic):
    """Apply the generic tiny-config overrides under this family's attribute names."""
    for key, value in generic.items():
        if value is not None:
            setattr(config, mapping[key], value)
    return config


def tiny_distilbert(layers=None, activation=None, max_positions=None):
    """dim 32, 4 heads (head_dim 8), hidden_dim 37, 5 layers, vocab 99: odd sizes on purpose."""
    config = transformers.DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, n_layers=5, vocab_size=99,
                                           max_position_embeddings=64)
    return _with(config, {"layers": "n_layers", "activation": "activation", "max_positions": "max_position_embeddings"},
                 layers=layers, activation=activation, max_positions=max_positions)


def tiny_bert(layers=None, activation=None, max_positions=None):
    """hidden 36, 4 heads (head_dim 9), intermediate 37, 3 layers, 3 token types, vocab 97."""
    config = transformers.BertConfig(hidden_size=36, num_attention_heads=4, intermediate_size=37, num_hidden_layers=3,
                                     vocab_size=97, type_vocab_size=3, max_position_embeddings=64)
    return _with(config, {"layers": "num_hidden_layers", "activation": "hidden_act",
                          "max_positions": "max_position_embeddings"},
                 layers=layers, activation=activation, max_positions=max_positions)


def tiny_roberta(layers=None, activation=None, max_positions=None):
    """hidden 44, 4 heads (head_dim 11), intermediate 41, 3 layers, vocab 93, one token type.
    RoBERTa's position ids start at pad_token_id + 1, so the table holds max_positions + pad_token_id + 1 rows."""
    config = transformers.RobertaConfig(hidden_size=44, num_attention_heads=4, intermediate_size=41,
                                        num_hidden_layers=3, vocab_size=93, type_vocab_size=1, pad_token_id=1)
    config.max_position_embeddings = (max_positions or 64) + config.pad_token_id + 1
    return _with(config, {"layers": "num_hidden_layers", "activation": "hidden_act"},
                 layers=layers, activation=activation)


def minilm_l6() -> transformers.BertConfig:
    """all-MiniLM-L6-v2's shape: hidden 384, 12 heads, intermediate 1536, 6 layers."""
    return transformers.BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                                   num_hidden_layers=6, max_position_embeddings=512)


def distilroberta_base() -> transformers.RobertaConfig:
    """distilroberta-base's shape: the 6-layer RoBERTa student (hidden 768, 12 heads, intermediate 3072)."""
    return transformers.RobertaConfig(num_hidden_layers=6, vocab_size=50265, max_position_embeddings=514,
                                      type_vocab_size=1, pad_token_id=1)


FAMILIES: tuple[Family, ...] = (
    Family("distilbert", DISTILBERT_BLOCK, hf_distilbert.TransformerBlock, hf_distilbert.Transformer,
           FusedTransformerBlock, FusedTransformer, hf_distilbert.DistilBertPreTrainedModel,
           hf_distilbert.DistilBertModel,
           (Head(hf_distilbert.DistilBertModel, "none"), Head(hf_distilbert.DistilBertForMaskedLM, "masked_lm"),
            Head(hf_distilbert.DistilBertForSequenceClassification, "sequence"),
            Head(hf_distilbert.DistilBertForQuestionAnswering, "question_answering"),
            Head(hf_distilbert.DistilBertForTokenClassification, "token"),
            Head(hf_distilbert.DistilBertForMultipleChoice, "multiple_choice")),
           (),
           ParityConfig(tiny_distilbert, transformers.DistilBertConfig, token_types=False),
           hf_distilbert.Embeddings, FusedDistilBertEmbeddings),
    Family("bert", BERT_BLOCK, hf_bert.BertLayer, hf_bert.BertEncoder, FusedBertLayer, FusedBertEncoder,
           hf_bert.BertPreTrainedModel, hf_bert.BertModel,
           (Head(hf_bert.BertModel, "none"), Head(hf_bert.BertForMaskedLM, "masked_lm"),
            Head(hf_bert.BertForSequenceClassification, "sequence"),
            Head(hf_bert.BertForQuestionAnswering, "question_answering"),
            Head(hf_bert.BertForTokenClassification, "token"), Head(hf_bert.BertForMultipleChoice, "multiple_choice")),
           (hf_bert.BertLMHeadModel,),
           ParityConfig(tiny_bert, minilm_l6, token_types=True),
           hf_bert.BertEmbeddings, FusedBertEmbeddings),
    Family("roberta", BERT_BLOCK, hf_roberta.RobertaLayer, hf_roberta.RobertaEncoder, FusedRobertaLayer,
           FusedRobertaEncoder, hf_roberta.RobertaPreTrainedModel, hf_roberta.RobertaModel,
           (Head(hf_roberta.RobertaModel, "none"), Head(hf_roberta.RobertaForMaskedLM, "masked_lm"),
            Head(hf_roberta.RobertaForSequenceClassification, "sequence"),
            Head(hf_roberta.RobertaForQuestionAnswering, "question_answering"),
            Head(hf_roberta.RobertaForTokenClassification, "token"),
            Head(hf_roberta.RobertaForMultipleChoice, "multiple_choice")),
           (hf_roberta.RobertaForCausalLM,),
           ParityConfig(tiny_roberta, distilroberta_base, token_types=False)),
)

# The replacement table patch() walks a model with: exact HF class -> fused class.
REPLACEMENTS: dict[type, type] = {
    original: fused for family in FAMILIES
    for original, fused in ((family.block, family.fused_block), (family.encoder, family.fused_encoder),
                            (family.embeddings, family.fused_embeddings))
    if original is not None
}


def supported_names() -> str:
    return ", ".join(f"{family.pretrained.__name__} (and its subclasses)" for family in FAMILIES)


def family_of(model) -> Family | None:
    """The row whose PreTrainedModel base `model` is an instance of, or None."""
    return next((family for family in FAMILIES if isinstance(model, family.pretrained)), None)


def by_name(name: str) -> Family:
    return next(family for family in FAMILIES if family.name == name)
