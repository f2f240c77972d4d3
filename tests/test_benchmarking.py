"""The benchmark machinery: providers agree with HF eager, wrong providers are caught, reports get written."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers

from distilkernels import benchmarking as bm

requires_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                  reason="onnxruntime is not installed (pip install onnxruntime)")
SHAPES = (bm.Shape("1x16", 1, 16), bm.Shape("3x16", 3, 16), bm.mixed_shape(batch=5, min_len=1, max_len=16))


@pytest.fixture(scope="module")
def tiny_model():
    # Odd hidden_dim and a vocab below the position table: shapes a real checkpoint would not hide bugs behind.
    config = transformers.DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, n_layers=2, vocab_size=99)
    torch.manual_seed(0)
    return transformers.DistilBertModel(config).eval()


def _rows(model, names, shape, rounds=2):
    example = shape.inputs(model.config.vocab_size)
    built = bm.build_providers(model, example, names, log=lambda msg: None)
    reference = bm.hf_reference(model)
    return bm.bench_shape(built, shape, model.config.vocab_size, "cpu", rounds, 1, reference)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["hf_eager", "hf_sdpa", pytest.param("onnxruntime", marks=requires_ort),
                                  "distilkernels_patched", "distilkernels_optimized"])
def test_provider_matches_hf_eager(tiny_model, name, shape):
    (row,) = _rows(tiny_model, [name], shape)
    if row["status"] == "unavailable":
        pytest.skip(row["note"])
    assert row["status"] == "ok", row
    assert row["max_abs_err"] <= bm.FP32_ATOL
    assert row["median_ms"] > 0 and row["n_samples"] == 2
    assert row["tokens_per_s"] == pytest.approx(shape.tokens / (row["median_ms"] / 1e3))


@requires_ort
def test_onnxruntime_graph_is_fused(tiny_model):
    built = bm.build_providers(tiny_model, SHAPES[0].inputs(99), ["onnxruntime"], log=lambda msg: None)
    note = built["onnxruntime"]["note"]
    for op in bm.ORT_FUSED_OPS:
        assert f"{op} x" in note, note


def test_wrong_provider_is_reported_and_not_timed(tiny_model):
    shape = SHAPES[2]
    run = bm.hf_reference(tiny_model)
    built = {"off_by_1e-2": {"run": lambda ids, mask: run(ids, mask) + 1e-2, "note": "adds 1e-2",
                             "status": "ok", "atol": bm.FP32_ATOL}}
    (row,) = bm.bench_shape(built, shape, 99, "cpu", 2, 1, run)
    assert row["status"] == "WRONG"
    assert row["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)
    assert "median_ms" not in row


def test_padding_positions_are_not_compared():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ref = torch.zeros(2, 3, 4)
    out = ref.clone()
    out[~mask.bool()] = 5.0  # garbage where the input was padding
    assert bm.max_error(out, ref, mask) == 0.0
    out[0, 1, 2] = 1e-3
    assert bm.max_error(out, ref, mask) == pytest.approx(1e-3)


def test_unavailable_provider_is_reported_not_raised(tiny_model, monkeypatch):
    def unavailable(model, example):
        raise bm.ProviderUnavailable("not in this checkout")

    monkeypatch.setitem(bm.PROVIDERS, "missing", bm.Provider("missing", unavailable))
    (row,) = _rows(tiny_model, ["missing"], SHAPES[0])
    assert row["status"] == "unavailable" and row["note"] == "not in this checkout"


def test_mixed_shape_is_right_padded_and_reproducible():
    shape = bm.mixed_shape()
    assert shape.batch == 16 and all(8 <= n <= 128 for n in shape.lengths)
    assert bm.mixed_shape() == shape
    ids, mask = shape.inputs(30522)
    assert mask.sum(1).tolist() == list(shape.lengths)
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())  # ones then zeros: right padding
    assert bool((ids[mask == 0] == 0).all())


def _synthetic_results():
    env = {"device": "Test CPU", "device_type": "cpu", "threads": 2, "commit": "abc1234",
           "versions": {"torch": "2.x"}}
    rows = []
    for shape, base in (("1x128", 10.0), ("8x128", 40.0)):
        for provider, factor in (("hf_eager", 1.25), ("hf_sdpa", 1.0), ("fast", 0.5)):
            rows.append({"shape": shape, "provider": provider, "status": "ok", "note": provider, "atol": 1e-4,
                         "max_abs_err": 1e-6, "median_ms": base * factor, "iqr_ms": 0.1})
        rows.append({"shape": shape, "provider": "broken", "status": "WRONG", "note": "adds 1e-2", "atol": 1e-4,
                     "max_abs_err": 1e-2})
    return {"env": env, "model": {"class": "DistilBertModel", "dim": 768, "n_layers": 6}, "rounds": 5,
            "results": rows}


def test_report_writer(tmp_path):
    bm.write_outputs(_synthetic_results(), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| shape | hf_eager | hf_sdpa | fast | broken |" in report
    assert "| 8x128 | 50.00 ± 0.10 (0.80x) | 40.00 ± 0.10 (1.00x) | 20.00 ± 0.10 (2.00x) | WRONG (err 1.0e-02) |" \
        in report
    assert "Test CPU" in report and "2 threads" in report and "abc1234" in report
    assert json.loads((tmp_path / "results.json").read_text()) == _synthetic_results()
    png = (tmp_path / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_main_bench_end_to_end(tiny_model, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model.save_pretrained(model_dir)
    threads = torch.get_num_threads()
    try:
        code = bm.main_bench(["--quick", "--threads", "1", "--model", str(model_dir), "--out", str(out),
                              "--providers", "hf_eager,hf_sdpa", "--rounds", "3", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["env"]["threads"] == 1 and results["env"]["versions"]["torch"] == torch.__version__
    assert [(r["shape"], r["provider"]) for r in results["results"]] == [
        (s.name, p) for s in bm.GRIDS["quick"] for p in ("hf_eager", "hf_sdpa")]
    assert all(r["status"] == "ok" and r["n_samples"] == 3 for r in results["results"])
    assert "| mixed16x128 |" in (out / "report.md").read_text()


def test_parse_shape():
    from distilkernels.benchmarking import parse_shape

    assert parse_shape("8x128") == bm_full(8, 128)
    mixed = parse_shape("mixed8x512@64")
    assert mixed.batch == 8 and mixed.seqlen == 512 and min(mixed.lengths) >= 64 and max(mixed.lengths) <= 512
    with pytest.raises(ValueError, match="BxS"):
        parse_shape("eight")


def bm_full(batch, seqlen):
    from distilkernels.benchmarking import Shape

    return Shape(f"{batch}x{seqlen}", batch, seqlen)


def test_model_summary_reads_bert_configs():
    import transformers

    from distilkernels.benchmarking import _model_summary

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=37, vocab_size=99))
    summary = _model_summary(bert)
    assert (summary["dim"], summary["n_layers"], summary["n_heads"], summary["hidden_dim"]) == (32, 2, 4, 37)
