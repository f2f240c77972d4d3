"""What is benchmarked: batches of token ids (full-length or mixed lengths, right-padded) and the model."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Shape:
    """batch sequences padded (right) to seqlen; lengths=None means every sequence is full length."""
    name: str
    batch: int
    seqlen: int
    lengths: tuple[int, ...] | None = None

    def inputs(self, vocab_size: int, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch, seqlen) int64; padding ids are 0 (DistilBERT's pad id)."""
        gen = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(1, vocab_size, (self.batch, self.seqlen), generator=gen)
        attention_mask = (torch.arange(self.seqlen)[None, :] < torch.tensor(self.seq_lengths)[:, None]).long()
        return (input_ids * attention_mask).to(device), attention_mask.to(device)

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """Real tokens of each sequence."""
        return self.lengths or (self.seqlen,) * self.batch

    @property
    def tokens(self) -> int:
        """Valid (non-padding) tokens: the work a user asked for; tokens/s counts these."""
        return sum(self.seq_lengths)


def full_shape(batch: int, seqlen: int) -> Shape:
    return Shape(f"{batch}x{seqlen}", batch, seqlen)


def mixed_shape(batch: int = 16, min_len: int = 8, max_len: int = 128, seed: int = 0) -> Shape:
    """`batch` sequences with lengths uniform in min_len..max_len (fixed seed), right-padded to max_len."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    return Shape(f"mixed{batch}x{max_len}", batch, max_len, tuple(lengths))


GRIDS = {
    "quick": (full_shape(1, 128), full_shape(8, 128), mixed_shape()),
    "full": (full_shape(1, 128), full_shape(8, 128), full_shape(8, 512), full_shape(32, 128), mixed_shape(),
             mixed_shape(batch=8, min_len=64, max_len=512)),
}


def parse_shape(text: str) -> Shape:
    """"BxS" (full-length sequences) or "mixedBxS[@MIN]" (lengths uniform in MIN..S, MIN defaulting to 8,
    fixed seed, right-padded)."""
    mixed = text.startswith("mixed")
    try:
        dims, _, low = text.removeprefix("mixed").partition("@")
        batch, seqlen = (int(n) for n in dims.split("x"))
        min_len = int(low) if low else min(8, seqlen)
    except ValueError:
        raise ValueError(f"a shape is BxS or mixedBxS[@MIN] (e.g. 8x128, mixed16x128, mixed8x512@64), "
                         f"got {text!r}") from None
    return mixed_shape(batch=batch, min_len=min_len, max_len=seqlen) if mixed else full_shape(batch, seqlen)


def default_model(device="cpu") -> torch.nn.Module:
    """distilbert-base shapes, random weights (fixed seed): speed does not depend on the weights' values."""
    import transformers

    torch.manual_seed(0)
    return transformers.DistilBertModel(transformers.DistilBertConfig()).to(device).eval()


def load_model(model_dir: str, device="cpu") -> torch.nn.Module:
    """The HF class the checkpoint was saved from (config.architectures[0]), fp32, eval."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, (config.architectures or ["DistilBertModel"])[0])
    return cls.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_summary(model) -> dict:
    """Sizes in DistilBERT's vocabulary, read from DistilBERT or BERT config names."""
    cfg = model.config

    def first(*names):
        return next((getattr(cfg, n) for n in names if hasattr(cfg, n)), None)

    return {"class": type(model).__name__, "dim": first("dim", "hidden_size"),
            "n_layers": first("n_layers", "num_hidden_layers"), "n_heads": first("n_heads", "num_attention_heads"),
            "hidden_dim": first("hidden_dim", "intermediate_size"), "vocab_size": cfg.vocab_size,
            "params": sum(p.numel() for p in model.parameters())}
