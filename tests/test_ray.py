"""Ray Data scale-out (distilkernels/ray_data.py): the predictor alone, then on a local Ray cluster this module
starts itself (2 CPUs, no dashboard): same results as one process, ids kept, bad rows, a killed actor."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distilkernels.ray_data import SentenceEmbedder, embed_dataset, length_buckets
from helpers import MINILM_DIR, minilm_sentences, requires_minilm

pytest.importorskip("sentence_transformers", reason="needs the ray extra: pip install -e '.[ray]'")
ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")
import ray.data  # noqa: E402

# Ray and the in-process reference run the same fp32 kernels on differently composed buckets: only the
# summation order of the GEMMs changes, a few ulp of unit-norm embeddings (1e-7 scale), well under 1e-5.
SAME_ROWS_ATOL = 1e-5
MAX_TOKENS = 1024  # small enough that a 64-row Ray batch splits into several buckets


# ------------------------------------------------------------------------------------------------------------
# Length buckets

@pytest.mark.parametrize("max_tokens, max_batch_size", [(1, 1), (50, 3), (64, 1000), (997, 7), (10**6, 10**6)])
def test_length_buckets_caps_and_covers(max_tokens, max_batch_size):
    lengths = np.random.default_rng(0).integers(1, 130, size=211)
    buckets = length_buckets(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size)
    everything = np.concatenate(buckets)
    assert sorted(everything.tolist()) == list(range(len(lengths)))  # every row exactly once
    for bucket in buckets:
        assert 1 <= len(bucket) <= max_batch_size
        assert len(bucket) == 1 or len(bucket) * lengths[bucket].max() <= max_tokens
    longest = [lengths[b].max() for b in buckets]
    assert longest == sorted(longest)  # ascending lengths: similar lengths share a bucket


def test_length_buckets_edges():
    assert length_buckets([], max_tokens=8, max_batch_size=2) == []
    buckets = length_buckets([3, 100, 3, 3], max_tokens=8, max_batch_size=10)
    assert [b.tolist() for b in buckets] == [[0, 2], [3], [1]]  # 100 > max_tokens: alone
    with pytest.raises(ValueError, match="max_tokens"):
        length_buckets([1], max_tokens=0, max_batch_size=1)


# ------------------------------------------------------------------------------------------------------------
# The predictor in this process

def corpus() -> list[dict]:
    """Rows with string ids in a scrambled order, so that neither position nor sort order can stand in for them."""
    sentences = minilm_sentences()
    order = np.random.default_rng(1).permutation(len(sentences))
    return [{"id": f"doc-{int(i) * 7 + 3}", "text": sentences[i]} for i in order]


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(MINILM_DIR, threads=torch.get_num_threads(), max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def reference(embedder):
    """id -> embedding, one process, the whole corpus in one call."""
    rows = corpus()
    out = embedder({"id": np.array([r["id"] for r in rows]), "text": np.array([r["text"] for r in rows])})
    assert all(e is None for e in out["error"])
    return dict(zip(out["id"].tolist(), out["embedding"]))


@requires_minilm
def test_predictor_matches_stock_sentence_transformers(embedder, op_spy):
    from sentence_transformers import SentenceTransformer

    texts = [r["text"] for r in corpus()[:96]]
    stock = SentenceTransformer(str(MINILM_DIR), device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    out = embedder({"id": np.arange(len(texts)), "text": np.array(texts, dtype=object)})
    buckets = length_buckets(embedder.token_counts(texts), max_tokens=MAX_TOKENS, max_batch_size=256)
    attention_calls = sum(n for (op, _), n in op_spy.items() if op in ("attention", "varlen_attention"))
    assert len(buckets) > 1 and attention_calls == 6 * len(buckets)  # fused, one forward per bucket
    cos = (out["embedding"] * stock).sum(1) / np.linalg.norm(stock, axis=1) / np.linalg.norm(out["embedding"], axis=1)
    assert cos.min() >= 0.99999
    assert np.abs(out["embedding"] - stock).max() <= 1e-4
    assert out["id"].tolist() == list(range(len(texts)))


@requires_minilm
def test_predictor_bad_rows_and_errors(embedder):
    texts = np.array(["a good sentence.", "", "   ", None, 17, "another good one"], dtype=object)
    out = embedder({"id": np.arange(6), "text": texts})
    assert out["error"][[0, 5]].tolist() == [None, None]
    assert out["error"][1] == out["error"][2] == "text is empty"
    assert out["error"][3] == "text must be a string, got NoneType"
    assert out["error"][4] == "text must be a string, got int"
    bad = np.isnan(out["embedding"]).all(axis=1)
    assert bad.tolist() == [False, True, True, True, True, False]
    assert np.isfinite(out["embedding"][[0, 5]]).all()
    with pytest.raises(KeyError, match="no column 'text'"):
        embedder({"id": np.arange(2), "sentence": np.array(["a", "b"])})
    with pytest.raises(ValueError, match="dtype must be one of"):
        SentenceEmbedder(MINILM_DIR, dtype="float16")
    with pytest.raises(ValueError, match="threads must be"):
        SentenceEmbedder(MINILM_DIR, threads=0)


@requires_minilm
def test_predictor_pickles_as_its_arguments(embedder, reference):
    clone = pickle.loads(pickle.dumps(embedder))
    assert clone is not embedder and clone.max_tokens == MAX_TOKENS
    rows = corpus()[:20]
    out = clone({"id": np.array([r["id"] for r in rows]), "text": np.array([r["text"] for r in rows])})
    expected = np.stack([reference[r["id"]] for r in rows])
    assert np.abs(out["embedding"] - expected).max() <= SAME_ROWS_ATOL


def _min_cosine(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()


@requires_minilm
def test_predictor_low_precision_holds_accuracy(reference):
    """bf16 and int8 error vs fp32, against torch's own bf16 model and torch's dynamic int8 on the same rows:
    ours may be at most 2x torch's error (1 - min cosine), the project's low-precision rule."""
    from sentence_transformers import SentenceTransformer

    rows = corpus()[:128]
    texts = [r["text"] for r in rows]
    fp32 = np.stack([reference[r["id"]] for r in rows])
    batch = {"id": np.arange(len(rows)), "text": np.array(texts, dtype=object)}
    torch_bf16 = SentenceTransformer(str(MINILM_DIR), device="cpu").to(torch.bfloat16)
    torch_int8 = torch.ao.quantization.quantize_dynamic(SentenceTransformer(str(MINILM_DIR), device="cpu"),
                                                        {torch.nn.Linear}, dtype=torch.qint8)
    for dtype, peer in (("bfloat16", torch_bf16), ("int8", torch_int8)):
        ours = SentenceEmbedder(MINILM_DIR, dtype=dtype, max_tokens=MAX_TOKENS)(batch)["embedding"]
        theirs = peer.encode(texts, batch_size=32, convert_to_tensor=True).float()
        our_err, torch_err = 1 - _min_cosine(ours, fp32), 1 - _min_cosine(theirs, fp32)
        assert our_err <= 2 * torch_err, (dtype, our_err, torch_err)


def test_embed_dataset_argument_errors():
    with pytest.raises(ValueError, match="actors must be a positive int"):
        embed_dataset(None, MINILM_DIR, actors=0)
    with pytest.raises(TypeError, match="threads_per_actor"):
        embed_dataset(None, MINILM_DIR, threads=2)


# ------------------------------------------------------------------------------------------------------------
# On a local Ray cluster

@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    previous = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    yield
    context.execution_options.preserve_order = previous
    ray.shutdown()


def _check_rows(out: list[dict], rows: list[dict], reference: dict) -> None:
    """Every input row back exactly once, in input order, with its id and the single-process embedding."""
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    got = np.stack([r["embedding"] for r in out])
    expected = np.stack([reference[r["id"]] for r in rows])
    assert np.abs(got - expected).max() <= SAME_ROWS_ATOL


@requires_minilm
def test_ray_two_actors_match_one_process(cluster, reference):
    rows = corpus()
    ds = ray.data.from_items(rows, override_num_blocks=6)
    out = embed_dataset(ds, MINILM_DIR, actors=2, threads_per_actor=1, batch_size=64, max_tokens=MAX_TOKENS)
    out = out.take_all()
    _check_rows(out, rows, reference)
    assert all(r["error"] is None for r in out)


@requires_minilm
def test_ray_bad_rows_do_not_stop_the_job(cluster, reference):
    rows = corpus()[:40]
    bad = [{"id": "empty", "text": ""}, {"id": "blank", "text": " \n"}, {"id": "none", "text": None}]
    mixed = rows[:10] + bad[:2] + rows[10:30] + bad[2:] + rows[30:]
    out = embed_dataset(ray.data.from_items(mixed, override_num_blocks=3), MINILM_DIR, actors=1, batch_size=16,
                        max_tokens=MAX_TOKENS).take_all()
    assert [r["id"] for r in out] == [r["id"] for r in mixed]
    by_id = {r["id"]: r for r in out}
    assert by_id["empty"]["error"] == by_id["blank"]["error"] == "text is empty"
    assert by_id["none"]["error"] == "text must be a string, got NoneType"
    assert all(np.isnan(by_id[b["id"]]["embedding"]).all() for b in bad)
    _check_rows([by_id[r["id"]] for r in rows], rows, reference)


class CrashOnce(SentenceEmbedder):
    """Kills its own process on the first batch that any actor sees while the marker file exists."""

    def __init__(self, model_path, *, marker: str, **kwargs):
        super().__init__(model_path, **kwargs)
        self.marker = marker

    def __call__(self, batch):
        try:
            os.remove(self.marker)  # atomic: exactly one actor wins, once
        except FileNotFoundError:
            return super().__call__(batch)
        os._exit(1)


@requires_minilm
def test_ray_actor_failure_is_retried_without_losing_rows(cluster, reference, tmp_path):
    marker = tmp_path / "crash-once"
    marker.touch()
    rows = corpus()[:120]
    ds = ray.data.from_items(rows, override_num_blocks=4)
    out = ds.map_batches(CrashOnce, fn_constructor_kwargs={"model_path": str(MINILM_DIR), "marker": str(marker),
                                                           "threads": 1, "max_tokens": MAX_TOKENS},
                         batch_size=32, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=2),
                         num_cpus=1).take_all()
    assert not marker.exists()  # an actor really died
    _check_rows(out, rows, reference)


# ------------------------------------------------------------------------------------------------------------
# The README's corpus table is the benchmark's own rendering of its committed JSON

CORPUS_RUN = Path(__file__).resolve().parent.parent / "bench/results/corpus-2026-12-02-quiet"


def test_readme_corpus_table_reproduced_from_results_json():
    root = CORPUS_RUN.parent.parent.parent
    spec = importlib.util.spec_from_file_location("corpus_bench", root / "bench" / "corpus_bench.py")
    corpus_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus_bench)
    payload = json.loads((CORPUS_RUN / "results.json").read_text())
    table = corpus_bench.markdown(payload)
    assert len(table.splitlines()) == 2 + len(payload["results"])
    readme = (root / "README.md").read_text()
    for line in table.splitlines():
        assert line in readme, line
    assert payload["environment"]["cpu"] in readme
