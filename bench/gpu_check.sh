#!/usr/bin/env bash
# Triton kernels on a CUDA GPU: the tests of tests/test_triton_ops.py compiled (not interpreted), including
# the distilbert-base sizes (batch 32 x seqlen 128 / 512, 12 heads of 64), then a timing of attention vs
# torch SDPA, add_layer_norm vs torch and bias_act_ vs torch. Results go under "$OUT" (default ./bench/out):
#   gpu_check.json      device, versions, commit, pytest exit status
#   pytest.xml / .log   the test run
#   triton_timing.json  the timings
# Usage, from the repository root: bash bench/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench/out}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # compiled kernels: the test file defaults to the interpreter otherwise

python -m pytest tests/test_triton_ops.py -q -k cuda -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
  2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

python bench/triton_timing.py --out "$OUT/triton_timing.json" 2>&1 | tee "$OUT/timing.log"
timing_rc=${PIPESTATUS[0]}

python - "$OUT/gpu_check.json" "$tests_rc" "$timing_rc" <<'PY'
import json, subprocess, sys
import torch, triton
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except Exception:
    commit = "unknown"
json.dump({
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
    "commit": commit,
    "pytest_exit_status": int(sys.argv[2]),
    "timing_exit_status": int(sys.argv[3]),
}, open(sys.argv[1], "w"), indent=2)
PY
echo "results in $OUT"
exit $(( tests_rc != 0 || timing_rc != 0 ))
