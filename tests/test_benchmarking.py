"""The benchmark harness (bench/, outside the package): providers agree with HF fp32 eager, wrong providers are
caught by their precision's check, the FLOP count is the one the tables use, reports and results get written,
and the package's own `demo` runs without bench/."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not installed: import it from the checkout

from bench import flops, reports, run  # noqa: E402
from bench.providers import PROVIDERS, Provider, ProviderUnavailable, build_providers, hf_reference  # noqa: E402
from bench.timing import FP32_ATOL, LOW_PRECISION_MIN_COSINE, bench_shape, best_peaks, check, measure_peaks  # noqa: E402
from bench.workload import GRIDS, Shape, full_shape, mixed_shape, model_summary, parse_shape  # noqa: E402

requires_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                  reason="onnxruntime is not installed (pip install onnxruntime)")
requires_ov = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                 reason="openvino is not installed (pip install openvino)")
SHAPES = (Shape("1x16", 1, 16), Shape("3x16", 3, 16), mixed_shape(batch=5, min_len=1, max_len=16))


@pytest.fixture(scope="module")
def tiny_model():
    # Odd hidden_dim and a vocab below the position table: shapes a real checkpoint would not hide bugs behind.
    config = transformers.DistilBertConfig(dim=32, n_heads=4, hidden_dim=37, n_layers=2, vocab_size=99)
    torch.manual_seed(0)
    return transformers.DistilBertModel(config).eval()


def _rows(model, names, shape, rounds=2, peaks=None):
    example = shape.inputs(model.config.vocab_size)
    built = build_providers(model, example, names, log=lambda msg: None)
    return bench_shape(built, shape, model_summary(model), "cpu", rounds, 1, hf_reference(model), peaks=peaks)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["hf_eager", "hf_sdpa", pytest.param("onnxruntime_fp32", marks=requires_ort),
                                  pytest.param("openvino_f32", marks=requires_ov),
                                  "distilkernels_fp32", "distilkernels_optimized"])
def test_fp32_provider_matches_hf_eager(tiny_model, name, shape):
    (row,) = _rows(tiny_model, [name], shape)
    assert row["status"] == "ok", row
    assert row["check"] == "max_abs" and row["max_abs_err"] <= FP32_ATOL
    assert row["median_ms"] > 0 and row["n_samples"] == 2 and len(row["samples_ms"]) == 2
    assert row["tokens_per_s"] == pytest.approx(shape.tokens / (row["median_ms"] / 1e3))


@pytest.mark.parametrize("name", ["torch_bf16", "distilkernels_bf16", pytest.param("openvino_bf16", marks=requires_ov),
                                  "torch_int8_dynamic", pytest.param("onnxruntime_int8", marks=requires_ort),
                                  "distilkernels_int8"])
def test_low_precision_provider_passes_cosine_check(tiny_model, name):
    (row,) = _rows(tiny_model, [name], SHAPES[2])
    assert row["status"] == "ok", row
    assert row["precision"] == PROVIDERS[name].precision != "fp32"
    assert row["check"] == "min_cosine" and row["min_cosine"] >= LOW_PRECISION_MIN_COSINE


def test_fp32_high_provider(op_spy):
    """distilkernels_fp32_high: fp32 under torch's "high" float32 matmul precision, set around its calls only;
    on a CPU whose matrix unit takes bf16 its GEMMs are linear_bf16x3 and it passes the fp32 check (on a model
    whose GEMMs are large enough for bf16x3); elsewhere it is unavailable, saying why."""
    from distilkernels.gemms import use_matrix_unit

    config = transformers.DistilBertConfig(dim=256, n_heads=4, hidden_dim=300, n_layers=2, vocab_size=99)
    torch.manual_seed(0)
    model = transformers.DistilBertModel(config).eval()
    before = torch.get_float32_matmul_precision()
    (row,) = _rows(model, ["distilkernels_fp32_high"], SHAPES[1])
    assert torch.get_float32_matmul_precision() == before
    if not use_matrix_unit("bf16"):
        assert row["status"] == "unavailable" and "needs a matrix unit that takes bf16" in row["note"]
        return
    assert row["status"] == "ok", row
    assert row["precision"] == "bf16x3" and row["check"] == "max_abs" and row["max_abs_err"] <= FP32_ATOL
    assert op_spy[("linear_bf16x3", "cpp")] >= 4 * config.n_layers, op_spy


@pytest.mark.parametrize("name", ["torch_compile_fp32", "torch_compile_bf16"])
def test_torch_compile_freezing_provider(tiny_model, name):
    (row,) = _rows(tiny_model, [name], SHAPES[0])
    assert row["status"] == "ok", row
    assert "freezing=True" in row["note"]


@requires_ort
def test_onnxruntime_graph_is_fused(tiny_model):
    built = build_providers(tiny_model, SHAPES[0].inputs(99), ["onnxruntime_fp32"], log=lambda msg: None)
    note = built["onnxruntime_fp32"]["note"]
    for op in ("Attention", "SkipLayerNormalization", "BiasGelu"):
        assert f"{op} x" in note, note


@requires_ov
def test_openvino_precision_is_asked_explicitly(tiny_model):
    built = build_providers(tiny_model, SHAPES[0].inputs(99), ["openvino_f32"], log=lambda msg: None)
    assert "INFERENCE_PRECISION_HINT=f32 (reports f32)" in built["openvino_f32"]["note"]


def test_check_uses_the_precisions_own_rule():
    mask = torch.tensor([[1, 1, 0]])
    ref = torch.randn(1, 3, 8)
    shifted = ref + 1e-2  # a 1e-2 offset: far outside fp32's max-abs bound, a tiny angle for bf16
    assert check(shifted, ref, mask, "fp32")["status"] == "WRONG"
    assert check(shifted, ref, mask, "bf16")["status"] == "ok"
    flipped = ref.clone()
    flipped[0, 1] = -flipped[0, 1]  # one real token pointing the other way
    result = check(flipped, ref, mask, "int8")
    assert result["status"] == "WRONG" and result["min_cosine"] == pytest.approx(-1.0, abs=1e-6)
    garbage = ref.clone()
    garbage[0, 2] = 1e3  # the padding position is not compared by either rule
    assert check(garbage, ref, mask, "fp32")["max_abs_err"] == 0.0
    assert check(garbage, ref, mask, "bf16")["min_cosine"] == pytest.approx(1.0)


def test_wrong_provider_is_reported_and_not_timed(tiny_model):
    run_ = hf_reference(tiny_model)
    built = {"off_by_1e-2": {"run": lambda ids, mask: run_(ids, mask) + 1e-2, "note": "adds 1e-2",
                             "status": "ok", "precision": "fp32"}}
    (row,) = bench_shape(built, SHAPES[2], model_summary(tiny_model), "cpu", 2, 1, run_)
    assert row["status"] == "WRONG"
    assert row["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)
    assert "median_ms" not in row


def test_unavailable_provider_is_reported_not_raised(tiny_model, monkeypatch):
    def unavailable(model, example):
        raise ProviderUnavailable("not in this checkout")

    monkeypatch.setitem(PROVIDERS, "missing", Provider("missing", unavailable))
    (row,) = _rows(tiny_model, ["missing"], SHAPES[0])
    assert row["status"] == "unavailable" and row["note"] == "not in this checkout"


def test_forward_flops_is_the_hand_count():
    summary = {"dim": 768, "hidden_dim": 3072, "n_heads": 12, "n_layers": 6}
    gemms = 2 * 128 * (4 * 768 * 768 + 2 * 768 * 3072)
    attention = 2 * 2 * 128 * 128 * 768  # QK^T and PV over 12 heads of 64
    assert flops.forward_flops(summary, [128]) == 6 * (gemms + attention)
    # Padding does no useful work: a mixed batch counts its sequences on their own.
    assert flops.forward_flops(summary, [100, 28]) == flops.forward_flops(summary, [100]) + \
        flops.forward_flops(summary, [28])


def test_rows_carry_tflops_and_peak_fraction(tiny_model):
    peaks = {"fp32": {"tflops": 0.5, "method": "given"}}
    (row,) = _rows(tiny_model, ["hf_sdpa"], SHAPES[1], peaks=peaks)
    assert row["flops"] == flops.forward_flops(model_summary(tiny_model), SHAPES[1].seq_lengths)
    assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] / 1e3) / 1e12)
    assert row["peak_fraction"] == pytest.approx(row["tflops"] / 0.5)


def test_measure_peaks():
    peaks = measure_peaks(n=64, seconds=0.0)
    assert set(peaks) == {"fp32", "bf16", "bf16x3", "int8"}
    if peaks["bf16"]["tflops"]:
        assert peaks["bf16x3"]["tflops"] == pytest.approx(peaks["bf16"]["tflops"] / 3)
    assert peaks["fp32"]["tflops"] > 0 and peaks["fp32"]["calls"] >= 3
    assert peaks["fp32"]["tflops"] == max(peaks["fp32"]["candidates"].values())
    # Not torch.mm alone (MKL's GEMM runs at half the rate of oneDNN's on an AMD EPYC): our kernels compete too.
    for precision in ("fp32", "bf16"):
        assert any(m.startswith("distilkernels ") for m in peaks[precision]["candidates"]), peaks[precision]
    low = {p: {**e, "tflops": e["tflops"] / 2} for p, e in peaks.items() if e["tflops"]}
    assert best_peaks(low, peaks) == best_peaks(peaks, low) == {p: e for p, e in peaks.items() if e["tflops"]}
    for entry in peaks.values():  # a rate, or the reason there is none
        assert entry["tflops"] is None and entry["method"].startswith("unavailable") or entry["tflops"] > 0


def test_mixed_shape_is_right_padded_and_reproducible():
    shape = mixed_shape()
    assert shape.batch == 16 and all(8 <= n <= 128 for n in shape.lengths)
    assert mixed_shape() == shape
    ids, mask = shape.inputs(30522)
    assert mask.sum(1).tolist() == list(shape.lengths)
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())  # ones then zeros: right padding
    assert bool((ids[mask == 0] == 0).all())


def _synthetic_results(with_rates: bool = False):
    env = {"device": "Test CPU", "device_type": "cpu", "threads": 2, "commit": "abc1234",
           "versions": {"torch": "2.x"}}
    rows = []
    for shape, base in (("1x128", 10.0), ("8x128", 40.0)):
        for provider, factor in (("hf_eager", 1.25), ("hf_sdpa", 1.0), ("fast", 0.5)):
            rows.append({"shape": shape, "provider": provider, "status": "ok", "note": provider, "atol": 1e-4,
                         "max_abs_err": 1e-6, "median_ms": base * factor, "iqr_ms": 0.1})
        rows.append({"shape": shape, "provider": "broken", "status": "WRONG", "note": "adds 1e-2", "atol": 1e-4,
                     "max_abs_err": 1e-2})
    results = {"env": env, "model": {"class": "DistilBertModel", "dim": 768, "n_layers": 6}, "rounds": 5,
               "results": rows}
    if with_rates:
        env.update(isa=["avx2", "amx_bf16"])
        results["peaks"] = {"fp32": {"tflops": 0.2, "method": "torch.mm fp32, 2048^3"}}
        for row in rows:
            if row["status"] == "ok":
                row.update(precision="fp32", tflops=0.1 * 10.0 / row["median_ms"],
                           peak_fraction=0.5 * 10.0 / row["median_ms"])
    return results


def test_report_writer(tmp_path):
    reports.write_outputs(_synthetic_results(), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| shape | hf_eager | hf_sdpa | fast | broken |" in report
    assert "| 8x128 | 50.00 ± 0.10 (0.80x) | 40.00 ± 0.10 (1.00x) | 20.00 ± 0.10 (2.00x) | WRONG (err 1.0e-02) |" \
        in report
    assert "Test CPU" in report and "2 threads" in report and "abc1234" in report
    assert json.loads((tmp_path / "results.json").read_text()) == _synthetic_results()
    png = (tmp_path / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_report_states_tflops_and_peak_fraction(tmp_path):
    report = reports.markdown_report(_synthetic_results(with_rates=True))
    assert "| 1x128 | 0.080 (40% fp32) | 0.100 (50% fp32) | 0.200 (100% fp32) | WRONG (err 1.0e-02) |" in report
    assert "CPU flags: avx2 amx_bf16." in report and "fp32 0.200 TFLOP/s (torch.mm fp32, 2048^3)" in report
    assert "capped" not in report


def test_report_names_isa_caps():
    results = _synthetic_results(with_rates=True)
    results["env"]["isa_caps"] = {"DISTILKERNELS_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert ("Instruction sets capped by DISTILKERNELS_ISA=avx2, ONEDNN_MAX_CPU_ISA=AVX2: the flags above are the "
            "CPU's") in reports.markdown_report(results)


def test_environment_records_isa_caps(monkeypatch):
    from bench.environment import ISA_CAPS, environment

    for name in ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert environment()["isa_caps"] == {}
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert environment()["isa_caps"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_run_end_to_end(tiny_model, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model.save_pretrained(model_dir)
    threads = torch.get_num_threads()
    try:
        code = run.main(["--quick", "--threads", "1", "--model", str(model_dir), "--out", str(out), "--no-peaks",
                         "--providers", "hf_eager,hf_sdpa,distilkernels_bf16", "--rounds", "3", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    env = results["env"]
    assert env["threads"] == 1 and env["versions"]["torch"] == torch.__version__ and env["cpu"]
    assert isinstance(env["isa"], list) and "commit" in env
    assert [(r["shape"], r["provider"]) for r in results["results"]] == [
        (s.name, p) for s in GRIDS["quick"] for p in ("hf_eager", "hf_sdpa", "distilkernels_bf16")]
    assert all(r["status"] == "ok" and r["n_samples"] == 3 and r["tflops"] > 0 for r in results["results"])
    assert "| mixed16x128 |" in (out / "report.md").read_text()


def test_run_measures_only_the_peaks_its_providers_use(tiny_model, monkeypatch):
    asked = []

    def fake_peaks(precisions):
        asked.append(precisions)
        return {p: {"tflops": 1.0, "method": "fake"} for p in precisions}

    monkeypatch.setattr(run, "measure_peaks", fake_peaks)
    results = run.run_bench((full_shape(1, 8),), model=tiny_model, providers=["hf_sdpa", "distilkernels_int8"],
                            rounds=3, budget_s=0.0, device="cpu", progress=False)
    assert asked == [("fp32", "int8")] * 2  # before and after the timing
    assert set(results["peaks"]) == {"fp32", "int8"}
    assert all(r["peak_fraction"] > 0 for r in results["results"])


def test_parse_shape():
    assert parse_shape("8x128") == full_shape(8, 128)
    mixed = parse_shape("mixed8x512@64")
    assert mixed.batch == 8 and mixed.seqlen == 512 and min(mixed.lengths) >= 64 and max(mixed.lengths) <= 512
    with pytest.raises(ValueError, match="BxS"):
        parse_shape("eight")


def test_model_summary_reads_bert_configs():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=37, vocab_size=99))
    summary = model_summary(bert)
    assert (summary["dim"], summary["n_layers"], summary["n_heads"], summary["hidden_dim"]) == (32, 2, 4, 37)


def test_demo_runs_without_bench(tiny_model, tmp_path):
    """`python -m distilkernels demo` in a fresh process: a parity line per provider, a speedup, exit status 0,
    and bench/ (not installed with the package) never imported."""
    tiny_model.save_pretrained(tmp_path / "model")
    script = ("import sys, distilkernels.__main__ as m; rc = m.main(['demo', '--model', %r, '--batch', '3', "
              "'--seqlen', '16', '--repeats', '3', '--threads', '1']); "
              "assert not any(n == 'bench' or n.startswith('bench.') for n in sys.modules); sys.exit(rc)"
              ) % str(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    for needle in ("HF sdpa", "distilkernels", "max |out - HF eager|", "speedup"):
        assert needle in out.stdout, out.stdout


@pytest.mark.parametrize("flags, units", [
    ({"avx2", "fma"}, {"bf16": "none", "int8": "none"}),
    ({"avx2", "avx_vnni"}, {"bf16": "none", "int8": "vnni"}),
    ({"avx512f", "avx512_vnni", "avx512_bf16"}, {"bf16": "avx512_bf16", "int8": "vnni"}),
    ({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, {"bf16": "amx", "int8": "amx"}),
])
def test_machine_matrix_units(monkeypatch, flags, units):
    from distilkernels import machine

    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU", frozenset(flags | {"sse2", "not_a_flag"})))
    monkeypatch.setattr(machine, "_cpuid_flags", lambda: None)  # this process's CPUID: not asked
    assert machine.cpu_model() == "Test CPU"
    assert set(machine.isa_flags()) == flags  # only the flags the kernels care about, in ISA_FLAGS order
    assert machine.matrix_units() == units


def test_warm_calls_precede_each_timed_call():
    """With warm_calls, every timed call of a provider comes right after that many untimed calls of the same
    provider; the samples are the timed calls only, one per round. The report says so."""
    from distilkernels.timing import time_interleaved

    log = []
    runs = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    samples = time_interleaved(runs, rounds=4, warmup=0, warm_calls=2)
    assert {name: len(s) for name, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert len(log) == 4 * 3 * 3
    assert all(log[i] == log[i + 1] == log[i + 2] for i in range(0, len(log), 3))  # runs of three, one provider
    assert len(time_interleaved(runs, rounds=2, warmup=0)["a"]) == 2 and len(log) == 36 + 6
    results = dict(_synthetic_results(), warm_calls=1)
    assert "each timed call after 1 untimed call(s) of the same provider" in reports.markdown_report(results)
    assert "untimed call" not in reports.markdown_report(_synthetic_results())
