"""The README's benchmark table is what the committed results JSON says (no hand-edited numbers)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from distilkernels.benchmarking import markdown_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("run, shapes", [
    ("cpu-2026-11-21", ("1x128", "8x128", "8x512", "32x128", "mixed16x128", "mixed8x512")),
    ("cpu-minilm-2026-11-21", ("32x128", "mixed32x128")),
])
def test_readme_table_reproduced_from_results_json(run, shapes):
    results = json.loads((ROOT / "bench/results" / run / "results.json").read_text())
    table = [line for line in markdown_report(results).splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in table if line.split("|")[1].strip() in shapes]
    assert len(rows) == len(shapes)
    for row in rows:
        assert row in readme, row
    assert (ROOT / "bench/results" / run / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_quant_table_reproduced_from_results_json():
    """The reduced-precision table is bench/quant_timing.py's own rendering of its committed JSON."""
    spec = importlib.util.spec_from_file_location("quant_timing", ROOT / "bench" / "quant_timing.py")
    quant_timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quant_timing)
    results = json.loads((ROOT / "bench/results/cpu-quant-2026-11-21-2t.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for line in quant_timing.markdown(results).splitlines():
        assert line in readme, line
