"""Check every provider against HF fp32 eager, time the correct ones side by side, measure the GEMM peaks.

Checks, per precision:
- fp32 and bf16x3: max-abs error on every value a caller reads (real tokens; all of a pooled output) <= FP32_ATOL.
- bf16 and int8: minimum cosine over real tokens (rows of a pooled output) >= LOW_PRECISION_MIN_COSINE.
A provider that fails its check is WRONG and gets no time.
"""
from __future__ import annotations

import time

import torch

from bench.flops import forward_flops
from bench.workload import Shape
from distilkernels import gemms, ops
from distilkernels.timing import summarize, time_call, time_interleaved

__all__ = ["bench_shape", "best_peaks", "check", "describe", "measure_peaks", "median_per_call", "summarize", "time_call",
           "time_interleaved"]

# fp32 reordering noise vs HF eager at distilbert-base (random init), measured: sdpa and torch.compile 2e-6,
# ORT with its BERT fusions 4e-6. 1e-4 leaves room for other weights while a real bug (>= 1e-3) cannot hide.
FP32_ATOL = 1e-4
# bf16 keeps 8 significant bits (relative rounding 2^-9 per value); after six layers a token's hidden state is
# off by ~1% of its norm, cosine ~0.99995; dynamic int8 with 7-bit activations lands near 0.9995. 0.999 is a
# 4.5%-of-norm error: a wrong mask, head or scale drops cosine far below it.
LOW_PRECISION_MIN_COSINE = 0.999
# Precisions whose results are fp32 and checked as fp32: bf16x3 (fp32 GEMMs as three bf16 products) included.
FP32_CHECKED = ("fp32", "bf16x3")


def _rows(out: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor):
    """(out, ref) as fp32 rows of the last dim, real tokens only for per-token outputs."""
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.dim() >= 2 and tuple(out.shape[:2]) == tuple(attention_mask.shape):
        valid = attention_mask.bool().cpu()
        out, ref = out[valid], ref[valid]
    return out.reshape(-1, out.shape[-1] if out.dim() else 1), ref.reshape(-1, ref.shape[-1] if ref.dim() else 1)


def max_error(out: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Max-abs error over valid positions (token outputs), or over everything (pooled outputs like logits)."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = _rows(out, ref, attention_mask)
    return (out - ref).abs().max().item() if out.numel() else 0.0


def min_token_cosine(out: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Lowest cosine similarity between a row of `out` and the same row of `ref` (real tokens only)."""
    if out.shape != ref.shape:
        return float("-inf")
    out, ref = _rows(out, ref, attention_mask)
    if not out.numel():
        return 1.0
    return torch.nn.functional.cosine_similarity(out, ref, dim=-1).min().item()


def check(out: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor, precision: str) -> dict:
    """{"status": "ok" | "WRONG", "check", "limit", "max_abs_err", "min_cosine"}: both errors recorded, the
    precision's own one decides."""
    row = {"max_abs_err": max_error(out, ref, attention_mask), "min_cosine": min_token_cosine(out, ref, attention_mask)}
    if precision in FP32_CHECKED:
        ok = row["max_abs_err"] <= FP32_ATOL
        row.update(check="max_abs", limit=FP32_ATOL)
    else:
        ok = row["min_cosine"] >= LOW_PRECISION_MIN_COSINE
        row.update(check="min_cosine", limit=LOW_PRECISION_MIN_COSINE)
    row["status"] = "ok" if ok else "WRONG"
    return row


def describe(result: dict) -> str:
    """A check's outcome in words, e.g. "max-abs 2.1e-03 (limit 1e-04)"."""
    if result["check"] == "min_cosine":
        return f"min token cosine {result['min_cosine']:.5f} (limit {result['limit']})"
    return f"max-abs {result['max_abs_err']:.1e} (limit {result['limit']:.0e})"


def one_line(exc: BaseException) -> str:
    """The exception's first line: dispatcher errors run to 40 lines and would break the markdown table."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _check_all(built: dict[str, dict], shape: Shape, inputs, reference: torch.Tensor, log) -> list[dict]:
    rows = []
    for name, entry in built.items():
        log(f"    checking {name} against HF fp32 eager (a compiling provider compiles now)")
        row = {"shape": shape.name, "batch": shape.batch, "seqlen": shape.seqlen, "tokens": shape.tokens,
               "provider": name, "precision": entry["precision"], "status": entry["status"], "note": entry["note"]}
        if entry["status"] == "ok":
            try:
                row.update(check(entry["run"](*inputs), reference, inputs[1], entry["precision"]))
            except Exception as exc:
                row.update(status="error", note=one_line(exc))
        rows.append(row)
    return rows


def bench_shape(built: dict[str, dict], shape: Shape, model_summary: dict, device, rounds: int, warmup: int,
                reference_run, log=lambda msg: None, budget_s: float = float("inf"),
                peaks: dict | None = None, warm_calls: int = 0) -> list[dict]:
    """One row per provider at this shape: checked against HF fp32 eager, then the correct ones timed
    interleaved. Rows carry the forward's FLOPs (bench.flops), TFLOP/s and, given `peaks`, the fraction of the
    measured peak of the provider's precision."""
    inputs = shape.inputs(model_summary["vocab_size"], device)
    rows = _check_all(built, shape, inputs, reference_run(*inputs), log)
    ok = {row["provider"]: row for row in rows if row["status"] == "ok"}
    log(f"    timing {len(ok)} providers: {warmup} warm-up + up to {rounds} interleaved rounds")
    runs = {name: (lambda run=built[name]["run"]: run(*inputs)) for name in ok}
    flops = forward_flops(model_summary, shape.seq_lengths)
    for name, seconds in time_interleaved(runs, device, rounds, warmup, budget_s=budget_s,
                                          warm_calls=warm_calls).items():
        row = ok[name]
        row.update(summarize(seconds), samples_ms=[s * 1e3 for s in seconds], flops=flops)
        row["tokens_per_s"] = shape.tokens / (row["median_ms"] / 1e3)
        row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
        peak = (peaks or {}).get(row["precision"], {}).get("tflops")
        if peak:
            row["peak_fraction"] = row["tflops"] / peak
    return rows


def _int8_onednn(n: int, gen):
    """oneDNN's int8 linear (quint8 activations x qint8 weights prepacked once; VNNI/AMX where the CPU has
    them): torch._int_mm does not reach the AMX int8 tiles on every build."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "onednn"
        try:
            x, w = (torch.randn(n, n, generator=gen) for _ in range(2))
            packed = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(w, 0.05, 0, torch.qint8), None)
            qx = torch.quantize_per_tensor(x, 0.05, 0, torch.quint8)
        finally:
            torch.backends.quantized.engine = previous
    return lambda: torch.ops.quantized.linear(qx, packed, 1.0, 0)


def _gemm_candidates(precision: str, n: int) -> dict:
    """method -> a zero-argument call doing one n x n x n GEMM in `precision`."""
    gen = torch.Generator().manual_seed(0)
    if precision == "int8":
        a, b = (torch.randint(-127, 128, (n, n), generator=gen, dtype=torch.int8) for _ in range(2))
        candidates = {f"torch._int_mm int8 x int8 -> int32, {n}^3": lambda: torch._int_mm(a, b)}
        if "onednn" in torch.backends.quantized.supported_engines:
            candidates[f"oneDNN quantized.linear u8 x s8, prepacked, {n}^3"] = _int8_onednn(n, gen)
        # Ours on VNNI blocks (AMX tiles, VNNI dot products or int16 multiply-adds), fp32 in and out: without VNNI,
        # torch._int_mm is a plain loop and oneDNN's int8 GEMM saturates, so ours may be the fastest exact one.
        x = torch.randn(n, n, generator=gen)
        packed, scale = ops.pack_linear_int8(torch.randn(n, n, generator=gen), vnni=True)
        candidates[f"distilkernels linear_int8 (VNNI blocks), fp32 in and out, {n}^3"] = \
            lambda: ops.linear_int8(x, packed, scale, n)
        return candidates
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    candidates = {f"torch.mm {precision}, {n}^3": lambda: torch.mm(a, b)}
    # torch.mm is MKL's GEMM for fp32, which on a CPU MKL does not tune for (seen on an AMD EPYC: half the rate
    # of oneDNN's or ours) is no peak at all; the best of every GEMM we can call is the lower bound that counts.
    if gemms._onednn_available(dtype):
        packed_onednn = gemms._onednn_pack(b)
        candidates[f"oneDNN linear {precision}, prepacked, {n}^3"] = \
            lambda: torch.ops.mkldnn._linear_pointwise(a, packed_onednn, None, "none", [], "")
    packed_ours = gemms._ours_pack(b)
    op = ops.linear_bf16 if dtype == torch.bfloat16 else ops.linear_packed
    candidates[f"distilkernels {op.__name__} {precision}, {n}^3"] = lambda: op(a, packed_ours, n)
    return candidates


def _best_rate(fn, n: int, seconds: float) -> tuple[float, int]:
    """(TFLOP/s of the fastest call, calls made): at least 3 calls, more for up to `seconds`."""
    fn()
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < seconds:
        best, calls = min(best, time_call(fn)), calls + 1
    return 2 * n ** 3 / best / 1e12, calls


def measure_peaks(precisions=("fp32", "bf16", "bf16x3", "int8"), n: int = 2048, seconds: float = 1.0) -> dict:
    """Per precision: {"tflops", "method", "calls", "candidates"}, the best of repeated large square GEMMs on
    this machine with the current torch threads, through the fastest of the GEMMs torch and we offer. The best call,
    not the median: a peak is what the unit can do, and noise only ever slows a call down. A precision torch
    cannot run here gets {"tflops": None, "method": why}."""
    peaks = {}
    for precision in precisions:
        if precision == "bf16x3":  # derived from the bf16 peak below
            continue
        rates, failures = {}, []
        for method, fn in _gemm_candidates(precision, n).items():
            try:
                rates[method] = _best_rate(fn, n, seconds)
            except RuntimeError as exc:
                failures.append(f"{method}: {str(exc).splitlines()[0][:200]}")
        if not rates:
            peaks[precision] = {"tflops": None, "method": "unavailable: " + "; ".join(failures)}
            continue
        method = max(rates, key=lambda m: rates[m][0])
        peaks[precision] = {"tflops": rates[method][0], "method": method, "calls": rates[method][1],
                            "candidates": {m: r for m, (r, _) in rates.items()}}
    if "bf16x3" in precisions:  # fp32 FLOPs done as three bf16 products each: a third of the bf16 peak
        bf16 = peaks.get("bf16") or measure_peaks(("bf16",), n, seconds)["bf16"]
        peaks["bf16x3"] = {"tflops": None if bf16.get("tflops") is None else bf16["tflops"] / 3,
                           "method": f"a third of the bf16 peak ({bf16['method']}): three bf16 products per fp32 one"}
    return peaks


def best_peaks(*measurements: dict) -> dict:
    """Per precision, the measurement with the highest rate (peaks measured before and after a run: a
    neighbour's load during one of them only lowers it)."""
    out = {}
    for peaks in measurements:
        for precision, entry in peaks.items():
            if (entry.get("tflops") or 0) >= (out.get(precision, {}).get("tflops") or 0):
                out[precision] = entry
    return out


def median_per_call(runs: dict, rounds: int, min_seconds: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each of `runs` (CPU), timed round-robin. An op that takes microseconds is
    below the timer's resolution and the loop's overhead for one call, so each sample repeats the call until
    about `min_seconds` have passed and divides."""
    repeats = {}
    for name, fn in runs.items():
        fn()
        once = time_call(lambda fn=fn: [fn() for _ in range(3)]) / 3
        repeats[name] = max(1, int(min_seconds / max(once, 1e-7)))
    loops = {name: (lambda fn=fn, n=repeats[name]: [fn() for _ in range(n)]) for name, fn in runs.items()}
    samples = time_interleaved(loops, "cpu", rounds=rounds, warmup=0, min_rounds=rounds)
    return {name: summarize([s / repeats[name] for s in seconds])["median_ms"] / 1e3
            for name, seconds in samples.items()}
