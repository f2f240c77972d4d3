"""The benchmark harness of distilkernels (not installed with the package; run from a checkout).

    workload.py     shapes (full and mixed-length batches), grids, the benchmarked models and their sizes
    flops.py        the one count of FLOPs and bytes per op and per forward
    providers.py    end-to-end providers: HF, torch.compile, torch bf16/int8, ONNX Runtime, OpenVINO, ours
    onnx_models.py  the ONNX export shared by ONNX Runtime and OpenVINO, and their sessions
    cases.py        the per-op case table (attention, varlen attention, add + LayerNorm, bias + GELU)
    timing.py       checking providers against the fp32 reference, interleaved timing, the GEMM peaks
    environment.py  the machine, threads, versions and commit every result file carries
    reports.py      results.json, report.md and the speedup plot
    run.py          the command line: `python bench/run.py --threads 2 --quick --out bench/out`

Scripts and the pytest-benchmark suite (test_e2e.py, test_ops.py) import these as `bench.<module>`: scripts
put the repository root on sys.path themselves; pytest puts it there because bench/ is a package (its default
"prepend" import mode inserts the directory above the top package), and tests/ inserts it explicitly.
"""
