"""Results of a run on disk: results.json (everything, every sample), report.md (the tables) and speedup.png.

report.md has two tables with a row per shape and a column per provider: median ms ± IQR (speedup over
hf_sdpa), then TFLOP/s of the forward's real FLOPs (bench.flops) and the fraction of the measured peak of the
unit the provider uses (results["peaks"]); then a note per provider: its check and worst error.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from bench.providers import BASELINE


def write_outputs(results: dict, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown_report(results))
    plot_speedup(results, out / "speedup.png")


def _by_shape(results: dict) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    shapes = list(dict.fromkeys(r["shape"] for r in results["results"]))
    providers = list(dict.fromkeys(r["provider"] for r in results["results"]))
    return shapes, providers, {(r["shape"], r["provider"]): r for r in results["results"]}


def _speedup(cells, shape: str, provider: str) -> float | None:
    base, row = cells.get((shape, BASELINE)), cells.get((shape, provider))
    if not (base and row and row["status"] == "ok" and base.get("median_ms") and row.get("median_ms")):
        return None
    return base["median_ms"] / row["median_ms"]


def _not_timed(row: dict | None) -> str | None:
    """Why a cell has no time, or None when it has one."""
    if row is None:
        return "-"
    if row["status"] == "WRONG":
        if row.get("check") == "min_cosine":
            return f"WRONG (cos {row['min_cosine']:.4f})"
        return f"WRONG (err {row['max_abs_err']:.1e})"
    return None if row["status"] == "ok" else row["status"]


def _ms_cell(cells, shape: str, provider: str) -> str:
    row = cells.get((shape, provider))
    why = _not_timed(row)
    if why is not None:
        return why
    speedup = _speedup(cells, shape, provider)
    return f"{row['median_ms']:.2f} ± {row['iqr_ms']:.2f}" + ("" if speedup is None else f" ({speedup:.2f}x)")


def _rate_cell(cells, shape: str, provider: str) -> str:
    row = cells.get((shape, provider))
    why = _not_timed(row)
    if why is not None:
        return why
    fraction = row.get("peak_fraction")
    return f"{row['tflops']:.3f}" + ("" if fraction is None else f" ({100 * fraction:.0f}% {row['precision']})")


def _caption(results: dict) -> str:
    env, m = results["env"], results.get("model", {})
    load = f", load avg {env['load_avg_1m']:.1f}" if env.get("load_avg_1m") is not None else ""
    return (f"{env['device']} ({env['device_type']}), {env['threads']} threads{load}, commit {env.get('commit')}, "
            f"torch {env['versions'].get('torch')}, {m.get('class', 'model')} dim={m.get('dim')} "
            f"layers={m.get('n_layers')}")


def _machine_lines(results: dict) -> list[str]:
    """ISA flags, versions and peaks: absent from results written before they were recorded."""
    env, lines = results["env"], []
    if env.get("isa") is not None:
        lines.append(f"CPU flags: {' '.join(env['isa']) or 'none recorded'}.")
    if env.get("isa_caps"):
        caps = ", ".join(f"{k}={v}" for k, v in env["isa_caps"].items())
        lines.append(f"Instruction sets capped by {caps}: the flags above are the CPU's, not what every kernel used.")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    if versions:
        lines.append(f"Versions: {versions}.")
    peaks = results.get("peaks")
    if peaks:
        lines.append("Measured peaks: " + "; ".join(
            f"{p} {v['tflops']:.3f} TFLOP/s ({v['method']})" if v.get("tflops") else f"{p} {v['method']}"
            for p, v in peaks.items()) + ".")
    return lines


def _table(header: str, shapes, providers, cell) -> list[str]:
    lines = [f"| {header} | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    return lines + [f"| {s} | " + " | ".join(cell(s, p) for p in providers) + " |" for s in shapes]


def _worst(rows: list[dict]) -> str:
    if rows[0].get("check") == "min_cosine":
        values = [r["min_cosine"] for r in rows if "min_cosine" in r]
        return f"min cosine {min(values):.5f}" if values else "-"
    values = [r["max_abs_err"] for r in rows if "max_abs_err" in r]
    return f"max-abs {max(values):.1e}" if values else "-"


def markdown_report(results: dict) -> str:
    shapes, providers, cells = _by_shape(results)
    lines = ["# distilkernels end-to-end benchmark", "", _caption(results), "", *_machine_lines(results), "",
             f"Median ms ± IQR over up to {results.get('rounds')} interleaved rounds"
             + (f", each timed call after {results['warm_calls']} untimed call(s) of the same provider"
                if results.get("warm_calls") else "")
             + f"; (speedup vs {BASELINE}). "
             "WRONG = outside its check vs HF fp32 eager (fp32: max-abs on real tokens; bf16/int8: min token "
             "cosine), not timed.", ""]
    lines += _table("shape", shapes, providers, lambda s, p: _ms_cell(cells, s, p))
    if any("tflops" in r for r in results["results"]):
        lines += ["", "TFLOP/s of the forward's real FLOPs (GEMMs + attention on real tokens, counted once in "
                      "bench/flops.py) and, in brackets, the fraction of the measured peak of the unit used.", ""]
        lines += _table("TFLOP/s", shapes, providers, lambda s, p: _rate_cell(cells, s, p))
    lines += ["", "| provider | precision | check (worst shape) | limit | note |", "|---|---|---|---|---|"]
    for p in providers:
        rows = [cells[(s, p)] for s in shapes if (s, p) in cells]
        limit = rows[0].get("limit", rows[0].get("atol"))
        limit_text = "-" if limit is None else f"{limit:.0e}" if limit < 1e-2 else f"{limit}"
        lines.append(f"| {p} | {rows[0].get('precision', 'fp32')} | {_worst(rows)} | {limit_text} | "
                     f"{rows[0]['note']} |")
    return "\n".join(lines) + "\n"


def plot_speedup(results: dict, path) -> None:
    """Grouped bars: speedup over hf_sdpa, one group per shape, one bar per provider (WRONG/unavailable: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, providers, cells = _by_shape(results)
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 0.25 * len(providers) + 2), 4.5))
    for i, p in enumerate(providers):
        xs = [s_i + (i - (len(providers) - 1) / 2) * width for s_i in range(len(shapes))]
        speedups = [_speedup(cells, s, p) for s in shapes]
        ax.bar(xs, [v or 0.0 for v in speedups], width, label=p)
        for x, v, s in zip(xs, speedups, shapes):
            if v is None:  # say why there is no bar: WRONG, unavailable, error, or not run
                status = cells[(s, p)]["status"] if (s, p) in cells else "not run"
                ax.text(x, 0.02, status, rotation=90, ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel(f"speedup over {BASELINE} (higher is better)")
    ax.set_title(textwrap.fill(_caption(results), 110), fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
