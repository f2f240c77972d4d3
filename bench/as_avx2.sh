#!/usr/bin/env bash
# Runs a command as on an AVX2-only CPU (AVX2 + FMA, no AVX-512, VNNI or AMX) for every library in it, through
# tests/cpuid_avx2.c (CPUID faulting; needs a CPU with the cpuid_fault flag). For measuring what the AVX2 paths
# of ours and of each peer do, side by side, on an AVX-512 machine:
#   bench/as_avx2.sh python bench/run.py --threads 2 --shapes 1x128,8x128,8x512 --providers ... --out ...
# Speeds measured so are this machine's at 256-bit width, not those of an AVX2 CPU; say so beside them.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
lib=$(mktemp -d)/cpuid_avx2.so
gcc -O2 -shared -fPIC -o "$lib" "$here/tests/cpuid_avx2.c"
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"
