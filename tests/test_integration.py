"""torch.compile, transformers.pipeline and the CLI with optimized and patched models."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import distilkernels
from distilkernels import models

from conftest import tiny_config
from helpers import holey_mask, make_model, model_inputs

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "paris", "is", "in", "france", "what", "where", "capital",
         "of", "city", "big", "small", "red", "blue", "runs", "fast", "slow", "##s", "##ed", "and", "it", "was"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A WordPiece tokenizer over a small vocabulary written here (no hub)."""
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return transformers.DistilBertTokenizerFast(vocab_file=str(path))


def _pair(hf_cls, config, tmp_path, **from_kwargs):
    make_model(hf_cls, config).save_pretrained(tmp_path)
    stock = hf_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = getattr(models, hf_cls.__name__).from_pretrained(tmp_path, **from_kwargs).eval()
    return stock, ours


def _flatten_scores(result):
    """Every number in a pipeline's result, in order; labels and words must agree exactly."""
    if isinstance(result, dict):
        return [x for _, v in sorted(result.items()) for x in _flatten_scores(v)]
    if isinstance(result, (list, tuple)):
        return [x for item in result for x in _flatten_scores(item)]
    if isinstance(result, str):
        return [result]
    return [float(x) for x in torch.as_tensor(result).flatten()]


def _assert_same_result(ref, got, atol=1e-4):
    r, g = _flatten_scores(ref), _flatten_scores(got)
    assert len(r) == len(g) > 0
    for a, b in zip(r, g):
        if isinstance(a, str):
            assert a == b
        else:
            assert abs(a - b) <= atol, (a, b)


@pytest.mark.parametrize("task, hf_cls, inputs", [
    ("text-classification", transformers.DistilBertForSequenceClassification,
     ["the cat sat on the mat", "paris is big", "what"]),
    ("fill-mask", transformers.DistilBertForMaskedLM, ["the cat sat on the [MASK]", "paris is in [MASK] and it was"]),
    ("token-classification", transformers.DistilBertForTokenClassification,
     ["the red dog runs fast", "paris is in france"]),
    ("feature-extraction", transformers.DistilBertModel, ["the cat", "where is the capital of france"]),
])
def test_pipelines(task, hf_cls, inputs, tokenizer, tmp_path):
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    stock, ours = _pair(hf_cls, config, tmp_path)
    kwargs = {"batch_size": len(inputs)}  # a padded batch
    if task == "token-classification":
        kwargs["ignore_labels"] = []  # keep every token's prediction
    ref = transformers.pipeline(task, model=stock, tokenizer=tokenizer, device="cpu")(inputs, **kwargs)
    got = transformers.pipeline(task, model=ours, tokenizer=tokenizer, device="cpu")(inputs, **kwargs)
    if task == "feature-extraction":  # batched features include padding positions: compare real tokens
        lengths = [len(tokenizer(text)["input_ids"]) for text in inputs]
        ref = [r[0][:n] for r, n in zip(ref, lengths)]
        got = [g[0][:n] for g, n in zip(got, lengths)]
    _assert_same_result(ref, got)


def test_question_answering_pipeline(tokenizer, tmp_path):
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    stock, ours = _pair(transformers.DistilBertForQuestionAnswering, config, tmp_path)
    question = {"question": "where is paris", "context": "paris is in france and it was big"}
    try:
        transformers.pipeline("question-answering", model=stock, tokenizer=tokenizer, device="cpu")
    except KeyError as exc:  # transformers >= 5.2x removed this task
        pytest.skip(f"this transformers has no question-answering pipeline: {exc}")
    ref = transformers.pipeline("question-answering", model=stock, tokenizer=tokenizer, device="cpu")(question)
    got = transformers.pipeline("question-answering", model=ours, tokenizer=tokenizer, device="cpu")(question)
    assert (got["start"], got["end"], got["answer"]) == (ref["start"], ref["end"], ref["answer"])
    assert abs(got["score"] - ref["score"]) <= 1e-4


@pytest.mark.parametrize("entry", ["patched", "optimized"])
def test_torch_compile(entry, tmp_path):
    config = tiny_config(n_layers=2)
    hf_cls = transformers.DistilBertForSequenceClassification
    stock = make_model(hf_cls, config)
    if entry == "patched":
        model = copy.deepcopy(stock)
        distilkernels.patch(model)
    else:
        stock.save_pretrained(tmp_path)
        model = models.DistilBertForSequenceClassification.from_pretrained(tmp_path).eval()
    mask = holey_mask(3, 8, seed=1)
    mask[:, 0] = 1
    inputs = model_inputs(hf_cls, config, 3, 8, mask, with_labels=False)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.inference_mode():
        ref = stock(**inputs).logits
        got = compiled(**inputs).logits
        explained = torch._dynamo.explain(model)(**inputs)
    assert (got - ref).abs().max() <= 1e-4
    # our ops are opaque custom ops with fake kernels: no graph break comes from them
    ours = [str(r.reason) for r in explained.break_reasons if "distilkernels" in str(r.reason)]
    assert not ours, ours


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "distilkernels", "info"], capture_output=True, text=True, check=True)
    for needle in ("torch", "transformers", "cpu features", "cpp", "triton", "dispatch"):
        assert needle in out.stdout, out.stdout


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "distilkernels", *args], capture_output=True, text=True,
                          env=None if env is None else dict(os.environ, **env))


@pytest.mark.parametrize("value, isa_shown", [("AVX2", "avx2"), ("scalar", "scalar"), ("garbage", None)])
def test_isa_setting_spellings(value, isa_shown):
    """DISTILKERNELS_ISA in any case caps the vector ISA; a value it does not take warns, naming the variable and
    what it takes, and leaves the CPU's own choice."""
    from distilkernels import _ext

    best = _ext.load_extension().vector_isa() if "DISTILKERNELS_ISA" not in os.environ else None
    if best is None:
        pytest.skip("DISTILKERNELS_ISA already caps this process")
    out = _run_cli("info", env={"DISTILKERNELS_ISA": value})
    assert out.returncode == 0, out.stderr
    shown = isa_shown if isa_shown != "avx2" or best == "avx512" else best  # a cap, never a raise
    assert f"vector ISA {shown or best}," in out.stdout, out.stdout
    # one warning, a Python RuntimeWarning at import (the C++ reader, told of it, does not repeat it on stderr)
    warned = out.stderr.count("DISTILKERNELS_ISA must be one of avx512|avx2|scalar, got 'garbage'")
    assert warned == (1 if isa_shown is None else 0), out.stderr
    assert warned == out.stderr.count("RuntimeWarning: DISTILKERNELS_ISA"), out.stderr


@pytest.mark.parametrize("value, on", [("off", False), ("0", False), ("FALSE", False), ("on", True), ("1", True),
                                       ("Yes", True), ("maybe", True)])
def test_amx_switch_spellings(value, on, monkeypatch):
    """DISTILKERNELS_AMX (read on every call) in every switch spelling; a misspelt one keeps the default (on) and
    warns, naming the variable and what it takes."""
    from distilkernels import _ext

    C = _ext.load_extension()
    if C is None:
        pytest.skip("the C++ extension did not load")
    monkeypatch.delenv("DISTILKERNELS_AMX", raising=False)
    present = C.amx_tiles_enabled()  # the CPU has the tiles and Linux granted them
    monkeypatch.setenv("DISTILKERNELS_AMX", value)
    assert C.amx_tiles_enabled() == (on and present)
    if value == "maybe":
        out = _run_cli("info", env={"DISTILKERNELS_AMX": value})
        assert out.returncode == 0, out.stderr
        message = "DISTILKERNELS_AMX must be one of 1/on/true/yes or 0/off/false/no, got 'maybe'; using on"
        assert out.stderr.count(message) == 1 and f"RuntimeWarning: {message}" in out.stderr, out.stderr


def test_matrix_units_switch_and_unknown_names(monkeypatch):
    """DISTILKERNELS_MATRIX_UNITS misspelt warns once and keeps the default; a DISTILKERNELS_* name the package
    does not read warns at import, naming it."""
    from distilkernels import _env, gemms

    monkeypatch.setattr(_env, "_warned", set())
    monkeypatch.setenv(gemms.MATRIX_UNITS_ENV, "Off")
    assert not gemms.use_matrix_unit("bf16")
    monkeypatch.setenv(gemms.MATRIX_UNITS_ENV, "garbage")
    with pytest.warns(RuntimeWarning, match="DISTILKERNELS_MATRIX_UNITS must be one of .* got 'garbage'; using on"):
        assert gemms.use_matrix_unit("bf16") == gemms._unit_packs("bf16")
    monkeypatch.setenv("DISTILKERNELS_MATRIX_UNIT", "off")  # the typo: a missing S
    with pytest.warns(RuntimeWarning, match="DISTILKERNELS_MATRIX_UNIT is not a distilkernels setting"):
        _env.check_environment()
    monkeypatch.delenv("DISTILKERNELS_MATRIX_UNIT")
    monkeypatch.setenv("DISTILKERNELS_BENCH_ROUNDS", "3")  # the bench suite's own variables are not warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _env.check_environment()


@pytest.mark.parametrize("name, value, message", [
    ("DISTILKERNELS_BACKEND", "cuda", "DISTILKERNELS_BACKEND must be one of cpp|triton|torch, got 'cuda'"),
    ("DISTILKERNELS_CPU_CACHE_MB", " 64", "DISTILKERNELS_CPU_CACHE_MB must be a non-negative integer (MiB) below "
                                          "2**43, got ' 64'"),
    ("DISTILKERNELS_CPU_CACHE_MB", str(2 ** 43), "DISTILKERNELS_CPU_CACHE_MB must be a non-negative integer"),
    ("DISTILKERNELS_CHECK_CU_SEQLENS", "y", "DISTILKERNELS_CHECK_CU_SEQLENS must be one of 1/on/true/yes or "
                                            "0/off/false/no, got 'y'; using off"),
])
def test_bad_setting_values_warn_once_at_import(name, value, message):
    """Every setting's bad value is one RuntimeWarning at import, and the process runs on with the default
    (an unknown backend used to be a traceback at import, which `info` could not even report)."""
    out = _run_cli("info", env={name: value})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(message) == 1 and "RuntimeWarning" in out.stderr, out.stderr
    if name == "DISTILKERNELS_CPU_CACHE_MB":  # the C++ reader, told of it, does not say it again
        script = "import distilkernels, torch; distilkernels.ops.add_layer_norm(torch.ones(2, 4), None, torch.ones(4), torch.zeros(4)); print(distilkernels.ops.cpu_cache_stats()['limit_bytes'])"
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=dict(os.environ, **{name: value}))
        assert run.returncode == 0 and run.stdout.split()[-1] == str(512 << 20), run.stderr
        assert run.stderr.count("DISTILKERNELS_CPU_CACHE_MB must be") == 1, run.stderr


def test_backend_setting_any_case():
    out = _run_cli("info", env={"DISTILKERNELS_BACKEND": "Torch"})
    assert out.returncode == 0 and "cpu -> torch" in out.stdout and "Warning" not in out.stderr, out.stderr


def test_cli_info_says_a_forced_backend_cannot_run():
    out = _run_cli("info", env={"DISTILKERNELS_BACKEND": "triton", "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert "WARNING: ops on cpu tensors will raise" in out.stdout, out.stdout


@pytest.mark.parametrize("args, message", [
    (("--batch", "0"), "argument --batch: invalid integer in [1, 1048576] value: '0'"),
    (("--repeats", "-2"), "argument --repeats: invalid integer in [1, 1048576] value: '-2'"),
    (("--threads", "-1"), "argument --threads: invalid integer in [0, 1048576] value: '-1'"),
    (("--threads", "9" * 25), "argument --threads: invalid integer in [0, 1048576] value: '" + "9" * 25 + "'"),
    (("--seqlen", "x"), "argument --seqlen: invalid integer in [1, 1048576] value: 'x'"),
    (("--seqlen", "513"), "--seqlen must be at most 512 (the model's positions), got 513"),
])
def test_cli_demo_bad_options(args, message):
    """Bad demo options end in a usage error naming the option (exit 2), not a traceback."""
    out = _run_cli("demo", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("matrix_units", ["on", "off"])
def test_torch_compile_fullgraph_int8(matrix_units, monkeypatch):
    """A quantized model with "distilkernels" attention compiles whole (fullgraph=True): the GEMM bindings are
    made afresh while tracing (no data pointers on fake tensors), the int8 weights packed inside the graph, and
    the CPU facts they consult are constants to dynamo, not graph breaks."""
    monkeypatch.setenv("DISTILKERNELS_MATRIX_UNITS", matrix_units)
    config = tiny_config(n_layers=2)
    model = make_model(transformers.DistilBertModel, config)
    mask = holey_mask(3, 8, seed=1)
    inputs = model_inputs(transformers.DistilBertModel, config, 3, 8, mask, with_labels=False)
    with torch.no_grad():
        fp32 = model(**inputs).last_hidden_state
    distilkernels.quantize(model)
    model.set_attn_implementation("distilkernels")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)(**inputs).last_hidden_state
    # The same int8 arithmetic; where inductor's embedding LayerNorm rounds differently, a token's quantized value
    # may flip by one step, so compiled is held to eager's own distance from fp32, not to eager itself.
    real = mask.bool()
    eager_err = (eager[real] - fp32[real]).abs().max().item()
    assert 0 < (compiled[real] - fp32[real]).abs().max().item() <= 2 * eager_err
