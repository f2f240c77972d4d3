"""The README's benchmark table is what the committed results JSON says (no hand-edited numbers)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is not installed: import it from the checkout

from bench import quant_timing  # noqa: E402
from bench.reports import markdown_report  # noqa: E402


@pytest.mark.parametrize("run, shapes", [
    ("cpu-2026-11-21", ("1x128", "8x128", "8x512", "32x128", "mixed16x128", "mixed8x512")),
    ("cpu-minilm-2026-11-21", ("32x128", "mixed32x128")),
    ("cpu-xeon-amx-2026-12-03-r32", ("1x128", "8x128", "mixed16x128")),
])
def test_readme_table_reproduced_from_results_json(run, shapes):
    results = json.loads((ROOT / "bench/results" / run / "results.json").read_text())
    table = [line for line in markdown_report(results).splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in table if line.split("|")[1].strip() in shapes]
    assert {row.split("|")[1].strip() for row in rows} == set(shapes)  # (ms table, and TFLOP/s where peaks exist)
    for row in rows:
        assert row in readme, row
    assert (ROOT / "bench/results" / run / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_quant_table_reproduced_from_results_json():
    """The reduced-precision table is bench/quant_timing.py's own rendering of its committed JSON."""
    results = json.loads((ROOT / "bench/results/cpu-quant-2026-11-21-2t.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for line in quant_timing.markdown(results).splitlines():
        assert line in readme, line
