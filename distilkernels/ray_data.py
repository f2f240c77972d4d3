"""Embedding a corpus with Ray Data: an actor-pool predictor that runs sentence-transformers on the fused kernels.

    import ray
    from distilkernels.ray_data import embed_dataset
    ray.init()                                   # a laptop; on a cluster, the same line joins it
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    out = embed_dataset(ds, model_path, actors=2, threads_per_actor=1)   # rows: id, embedding, error

Each actor loads the model once from `model_path` (a local SentenceTransformer directory every node can
read), sets its own CPU thread count, converts (bf16) or quantizes (int8) it, patches it, and then serves
batches. A patched model is never pickled: only the class and its constructor arguments travel to actors.

Inside an actor a Ray batch is split into length buckets: rows sorted by token count and cut so that no
bucket's padded size (rows x longest row) exceeds `max_tokens`, so padding stays low whatever order the rows
arrive in. Results go back in the batch's own order, each row with its id.

Bad rows do not stop the job: a row whose text is not a string, or is empty or blank, gets an embedding of
NaNs and a message in its `error` column (None for good rows). A missing column is a configuration error and
raises. Ray Data retries the batches of an actor that dies, on a restarted actor.

Needs `pip install "distilkernels[ray]"` (ray[data] and sentence-transformers).
"""
from __future__ import annotations

import numpy as np
import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "int8": "int8",
          torch.float32: "float32", torch.bfloat16: "bfloat16", torch.qint8: "int8", torch.int8: "int8"}


def length_buckets(lengths, *, max_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Indices into `lengths` (token counts, one per row) grouped into buckets of similar length.

    Rows are taken in ascending length; a bucket closes before its padded size (rows x its longest row)
    would pass `max_tokens` or its row count `max_batch_size`. A row longer than `max_tokens` alone gets a
    bucket of its own. Every index appears in exactly one bucket.
    """
    if max_tokens < 1 or max_batch_size < 1:
        raise ValueError(f"max_tokens and max_batch_size must be >= 1, got {max_tokens} and {max_batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    buckets, start = [], 0
    for end in range(1, len(order) + 1):
        # ascending order: the row at end-1 is the longest of order[start:end]
        rows = end - start
        if end < len(order):
            next_rows, next_len = rows + 1, lengths[order[end]]
            if next_rows <= max_batch_size and next_rows * next_len <= max_tokens:
                continue
        buckets.append(order[start:end])
        start = end
    return buckets


def _as_dtype(dtype) -> str:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of 'float32', 'bfloat16', 'int8' (or the torch dtypes), "
                         f"got {dtype!r}") from None


def load_patched(model_path: str, dtype="float32"):
    """A SentenceTransformer from `model_path` (CPU, eval) on distilkernels' fused kernels in `dtype`:
    float32 (patched), bfloat16 (converted, then patched) or int8 (patched, GEMMs quantized)."""
    from sentence_transformers import SentenceTransformer

    from .patching import patch, quantize

    dtype = _as_dtype(dtype)
    model = SentenceTransformer(str(model_path), device="cpu").eval()
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    if dtype == "int8":
        quantize(model)
    else:
        patch(model)
    return model


def _row_error(text) -> str | None:
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if not text.strip():
        return "text is empty"
    return None


class SentenceEmbedder:
    """A Ray Data predictor (`Dataset.map_batches(SentenceEmbedder, fn_constructor_kwargs=...)`, actor pool).

    model_path: local SentenceTransformer directory (str or path).
    text_column / id_column: input columns; a batch is a dict of numpy arrays (batch_format="numpy").
    threads: torch CPU threads of this actor (None: leave torch's default, usually all cores of the node).
    dtype: "float32", "bfloat16" or "int8" (see load_patched).
    max_tokens: cap on a bucket's padded size, rows x longest row in tokens.
    max_batch_size: cap on a bucket's row count.

    Returns {id_column: ids as given, "embedding": (rows, dim) float32, "error": object (str or None)},
    rows in the batch's order. Instances pickle as their constructor arguments (the model is reloaded).
    """

    def __init__(self, model_path, *, text_column: str = "text", id_column: str = "id", threads: int | None = None,
                 dtype="float32", max_tokens: int = 8192, max_batch_size: int = 256):
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive int or None, got {threads!r}")
            torch.set_num_threads(threads)
        self._kwargs = dict(model_path=str(model_path), text_column=text_column, id_column=id_column,
                            threads=threads, dtype=_as_dtype(dtype), max_tokens=max_tokens,
                            max_batch_size=max_batch_size)
        length_buckets([], max_tokens=max_tokens, max_batch_size=max_batch_size)  # validates both caps
        self.text_column, self.id_column = text_column, id_column
        self.max_tokens, self.max_batch_size = max_tokens, max_batch_size
        self.model = load_patched(model_path, dtype)
        dimension = getattr(self.model, "get_embedding_dimension", None)  # sentence-transformers >= 6
        self.dim = dimension() if dimension is not None else self.model.get_sentence_embedding_dimension()

    def __reduce__(self):
        kwargs = dict(self._kwargs)
        return _rebuild, (type(self), kwargs.pop("model_path"), kwargs)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens per text as the model will see them (special tokens included, truncated to its limit)."""
        encoded = self.model.tokenizer(texts, add_special_tokens=True, truncation=True,
                                       max_length=self.model.max_seq_length)
        return np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, in the order given, computed bucket by bucket."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        lengths = self.token_counts(texts)
        with torch.inference_mode():
            for bucket in length_buckets(lengths, max_tokens=self.max_tokens, max_batch_size=self.max_batch_size):
                emb = self.model.encode([texts[i] for i in bucket], batch_size=len(bucket), convert_to_tensor=True,
                                        show_progress_bar=False)
                out[bucket] = emb.float().numpy()
        return out

    def __call__(self, batch: dict) -> dict:
        for column in (self.text_column, self.id_column):
            if column not in batch:
                raise KeyError(f"SentenceEmbedder: the batch has no column {column!r} (columns: {sorted(batch)}); "
                               f"set text_column= / id_column=")
        texts = list(batch[self.text_column])
        errors = np.array([_row_error(t) for t in texts], dtype=object)
        good = np.flatnonzero(np.array([e is None for e in errors], dtype=bool))
        embedding = np.full((len(texts), self.dim), np.nan, dtype=np.float32)
        embedding[good] = self.embed([texts[i] for i in good])
        return {self.id_column: batch[self.id_column], "embedding": embedding, "error": errors}


def _rebuild(cls, model_path, kwargs):
    return cls(model_path, **kwargs)


def embed_dataset(ds, model_path, *, actors: int = 1, threads_per_actor: int = 1, batch_size: int = 256,
                  **predictor_kwargs):
    """`ds` (rows with "id" and "text", or the columns named in predictor_kwargs) -> a lazy Dataset of
    (id, embedding, error) rows: map_batches over a pool of `actors` SentenceEmbedder actors, each reserving
    and using `threads_per_actor` CPUs. Row order follows `ds` when DataContext.execution_options.preserve_order
    is set; the id column is what ties a result to its input in any case."""
    import ray.data

    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be a positive int, got {actors!r}")
    if "threads" in predictor_kwargs:
        raise TypeError("embed_dataset() takes threads_per_actor=, not threads= (it also reserves the CPUs)")
    kwargs = dict(predictor_kwargs, threads=threads_per_actor)
    return ds.map_batches(SentenceEmbedder, fn_constructor_kwargs={"model_path": str(model_path), **kwargs},
                          batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                          num_cpus=threads_per_actor)
