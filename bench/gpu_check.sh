#!/usr/bin/env bash
# Everything about the Triton kernels that needs a CUDA GPU, in one call of at most 9.5 minutes (a lent
# machine gives 15 device-minutes, start-up included). Steps run most important first, each under its own
# time limit, so a slow one cannot starve the rest:
#   compile      tests/test_triton_compile.py: the AOT compile check (sm_80, sm_90) with this machine's triton,
#                and one launch of 6,000 sequences x 12 heads (past CUDA's 65,535 on a grid's axes 1 and 2)
#   triton_ops   tests/test_triton_ops.py on the GPU: compiled kernels against fp64 at DistilBERT's sizes
#   timing       bench/triton_timing.py: attention vs torch SDPA, add_layer_norm and bias_act_ vs torch
#   suite        the whole test suite (python -m pytest -q), as CI runs it
#   bench        the pytest-benchmark suite (quick grid) on the GPU
# Results go under "$OUT" (default ./bench/out): STEP.log and STEP.xml (junit) per step, triton_timing.json,
# bench.json, nvidia-smi.txt, and gpu_check.json (device, versions, commit, each step's status and seconds).
# On the lent machine: run(command="bash bench/gpu_check.sh", timeout_s=600); OUT is set there.
# Usage, from the repository root: bash bench/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench/out}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # compiled kernels: the test files default to the interpreter otherwise
export HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT/steps.txt"
: > "$STATUS"

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, record status and time
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - start ))" >> "$STATUS"
  tail -n 15 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
pytest_args=(-q -p no:cacheprovider)

step compile 150 python -m pytest tests/test_triton_compile.py "${pytest_args[@]}" --junitxml="$OUT/compile.xml"
step triton_ops 110 python -m pytest tests/test_triton_ops.py -k cuda "${pytest_args[@]}" \
  --junitxml="$OUT/triton_ops.xml"
step timing 90 python bench/triton_timing.py --out "$OUT/triton_timing.json"
step suite 140 python -m pytest "${pytest_args[@]}" --junitxml="$OUT/suite.xml"
step bench 60 python -m pytest bench --benchmark-only --benchmark-json="$OUT/bench.json" "${pytest_args[@]}"

python - "$OUT/gpu_check.json" "$STATUS" <<'PY'
import json, subprocess, sys
import torch, triton
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except Exception:
    commit = "unknown"
steps = {}
for line in open(sys.argv[2]):
    name, rc, seconds = line.split()
    steps[name] = {"exit_status": int(rc), "seconds": int(seconds), "timed_out": int(rc) in (124, 137)}
json.dump({
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
    "commit": commit,
    "steps": steps,
}, open(sys.argv[1], "w"), indent=2)
print(json.dumps(steps, indent=2))
PY
echo "results in $OUT"
! grep -qv " 0 " "$STATUS"
