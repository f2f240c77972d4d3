"""The C++ kernels on every instruction set this CPU has.

The extension picks its inner loops once per process (csrc/vec.h): AVX-512, AVX2+FMA or baseline x86-64, capped
by DISTILKERNELS_ISA=avx2|scalar. The in-process op tests run on the best one (their ids say which: cpp-avx512);
test_cpp_op_tests_under_isa reruns every cpp case of the op files in a fresh process per lower tier, so an AMX
machine also tests what an AVX-512 CPU without AMX (AMD Zen 4, Intel Ice Lake), an AVX2-only CPU (AMD Zen 3) and a
baseline x86-64 CPU run; test_model_tests_under_tier reruns the model-level files under the first two. The avx2
rerun caps the libraries too (AVX2_CAPS: torch's own kernels, MKL, oneDNN, no matrix units), because the tests
compare against torch, whose numbers depend on the instruction set as well: with only our kernels capped, a
bf16 GELU test passed here that failed against torch under MKL's AVX2 code. The AVX-512-without-AMX rerun caps
oneDNN and MKL to the CPU's AVX-512 extensions below AMX and turns our tile loops off. Caps do not reach every
library (torch still reads VNNI from CPUID and picks its int8 GEMM by it), so where the CPU can make CPUID fault,
test_model_tests_under_tier[avx2-cpuid] reruns the model-level files with CPUID itself answering as an AVX2-only
CPU (tests/cpuid_avx2.c).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from distilkernels._ext import load_extension
from distilkernels.machine import isa_flags

pytestmark = pytest.mark.requires_ext

ISAS = ("avx512", "avx2", "scalar")  # best first
OP_TEST_FILES = ("test_attention.py", "test_layer_norm.py", "test_bias_act.py", "test_row_scale.py",
                 "test_linear_bf16x3.py", "test_bad_input.py", "test_dispatch.py")


# What an AVX2-only CPU runs, for every library a test compares against (each reads its cap at start-up).
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "DISTILKERNELS_MATRIX_UNITS": "off", "DISTILKERNELS_AMX": "off"}
# The model-level files rerun under each lower tier: the whole path a CPU of that tier takes (the GEMM kernels the
# contest picks there, the int8 grid, the bf16 GEMMs without tiles), not only the ops. ~75 s a tier on 2 cores.
MODEL_TEST_FILES = ("test_parity.py", "test_quant.py", "test_blocks.py", "test_gemms.py")


def no_amx_caps() -> dict[str, str] | None:
    """What an AVX-512 CPU without AMX tiles runs (AMD Zen 4 and Intel Ice Lake / Cooper Lake kinds: AVX-512 with
    VNNI, and bf16 dot products where the CPU has them), on a CPU with AMX; None elsewhere (the in-process tests
    already run that tier, or the CPU has no AVX-512). oneDNN and MKL are capped to the same instructions."""
    flags = cpu_flags()
    if "amx_tile" not in flags or best_isa() != "avx512":
        return None
    onednn, mkl = (("AVX512_CORE_BF16", "AVX512_E3") if "avx512_bf16" in flags else
                   ("AVX512_CORE_VNNI", "AVX512_E1") if "avx512_vnni" in flags else ("AVX512_CORE", "AVX512"))
    return {"ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl, "DISTILKERNELS_MATRIX_UNITS": "off",
            "DISTILKERNELS_AMX": "off"}


def tier_env(tier: str, tmp_path) -> dict[str, str]:
    """The environment of a rerun under `tier` ("avx2", "scalar": DISTILKERNELS_ISA, the libraries capped for
    avx2; "avx512-no-amx": no_amx_caps(); "avx2-cpuid": cpuid_avx2_caps()), or a skip where this CPU has no such
    lower tier."""
    if "DISTILKERNELS_ISA" in os.environ or "DISTILKERNELS_AMX" in os.environ or \
            "cpuid_avx2" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("already running under a cap (this is the rerun)")
    if tier == "avx512-no-amx":
        caps = no_amx_caps()
        if caps is None:
            pytest.skip("no AMX tiles here: the in-process tests ran this CPU's own tier")
    elif tier == "avx2-cpuid":
        caps = cpuid_avx2_caps(tmp_path)
    else:
        if ISAS.index(tier) <= ISAS.index(best_isa()):
            pytest.skip(f"{tier} is this CPU's best instruction set: the in-process tests ran on it")
        caps = dict(DISTILKERNELS_ISA=tier, **(AVX2_CAPS if tier == "avx2" else {}))
    # Its own inductor cache: torch's on-disk cache does not key on ATEN_CPU_CAPABILITY, and code compiled under
    # one capability and loaded under another gave NaN or corrupted the heap (even for a stock HF model).
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), **caps)
    env.pop("DISTILKERNELS_BACKEND", None)
    return env


def cpuid_shim_missing() -> str | None:
    """Why the CPUID shim (tests/cpuid_avx2.c) cannot run here, or None where it can."""
    if best_isa() != "avx512":
        return "no AVX-512 here: the in-process tests ran this CPU's own tier"
    if "cpuid_fault" not in pathlib.Path("/proc/cpuinfo").read_text().split():
        return "this CPU cannot make CPUID fault (no cpuid_fault flag); the ONEDNN_MAX_CPU_ISA tier ran"
    if shutil.which("gcc") is None:
        return "needs gcc to build tests/cpuid_avx2.c"
    return None


def cpuid_avx2_caps(tmp_path) -> dict[str, str]:
    """An AVX2-only CPU for every library in the process (tests/cpuid_avx2.c preloaded: CPUID answers without
    AVX-512, VNNI, AVX512-BF16 or AMX), or a skip where that cannot run here."""
    missing = cpuid_shim_missing()
    if missing:
        pytest.skip(missing)
    lib = tmp_path / "cpuid_avx2.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(pathlib.Path(__file__).parent.parent /
                    "cpuid_avx2.c")], check=True, capture_output=True, timeout=120)
    return {"LD_PRELOAD": str(lib)}


def run_pytest(env: dict[str, str], files, *args: str) -> str:
    """pytest on `files` (paths under tests/) in a fresh process with `env`; returns its stdout, asserting that it
    passed."""
    tests = pathlib.Path(__file__).parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args,
           *(str(tests / name) for name in files)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=tests.parent)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout.splitlines()[-1], tail
    return result.stdout


def cpu_flags() -> set[str]:
    return set(isa_flags())


def best_isa() -> str:
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "scalar"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
@pytest.mark.skipif("DISTILKERNELS_ISA" in os.environ, reason="DISTILKERNELS_ISA caps the choice")
def test_vector_isa_is_the_best_available():
    assert load_extension().vector_isa() == best_isa()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
@pytest.mark.parametrize("tier", ["avx512-no-amx", *ISAS[1:]])
def test_cpp_op_tests_under_isa(tier, tmp_path):
    """Every cpp case of the op files (tests whose id says cpp), under each tier below this CPU's."""
    out = run_pytest(tier_env(tier, tmp_path), [f"ops/{name}" for name in OP_TEST_FILES], "-k", "cpp")
    isa = "avx512" if tier == "avx512-no-amx" else tier
    assert f"[cpp-{isa}" in out, "the rerun did not run on " + isa + ":\n" + out[-4000:]


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
@pytest.mark.parametrize("tier", ["avx512-no-amx", "avx2", "avx2-cpuid"])
def test_model_tests_under_tier(tier, tmp_path):
    """The model-level files (parity with HF in fp32, bf16 and int8, the blocks, the GEMM choice) under each tier
    below this CPU's, as a CPU of that tier runs them. avx2-cpuid is an AVX2-only CPU as every library sees it
    (CPUID masked): unlike the capped avx2 tier, torch too picks its kernels for AVX2 (its int8 GEMM, for one, is
    then a plain loop, not oneDNN's)."""
    if tier == "avx2" and cpuid_shim_missing() is None:
        # ~75 s of CI: where the shim runs, avx2-cpuid reruns these files as an AVX2-only CPU for every library;
        # the capped libraries' own checks stay (test_bf16_int8_gemms_on_capped_isa, the op files' avx2 tier)
        pytest.skip("the avx2-cpuid tier runs these files here, as an AVX2-only CPU for every library")
    env = tier_env(tier, tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch; from distilkernels._ext import load_extension as l; "
                            "from distilkernels.machine import isa_flags; "
                            "e = l(); print(e.vector_isa(), e.amx_tiles_enabled(), e.int8_vector_gemm(), "
                            "torch.backends.cpu.get_cpu_capability(), ','.join(isa_flags()))"],
                           env=env, capture_output=True, text=True, timeout=300)
    isa, tiles, int8_vector_gemm, capability, flags = probe.stdout.split()
    assert (isa, tiles) == ("avx512" if tier == "avx512-no-amx" else "avx2", "False"), probe.stdout + probe.stderr
    if tier.startswith("avx2"):  # torch's int8 GEMM without VNNI: inexact (oneDNN capped) or a plain loop (CPUID)
        assert int8_vector_gemm == "madd", probe.stdout
    if tier == "avx2-cpuid":  # torch sees the same CPU, and so do the flags that info and the benchmarks report
        assert capability == "AVX2", probe.stdout
        assert {"avx2", "fma"} <= set(flags.split(",")), probe.stdout
        assert not {f for f in flags.split(",") if "avx512" in f or "amx" in f or "vnni" in f}, probe.stdout
    # The CPUID shim answers from a SIGSEGV handler, which pytest's faulthandler would replace
    run_pytest(env, MODEL_TEST_FILES, *(("-p", "no:faulthandler") if tier == "avx2-cpuid" else ()))


def test_scalar_fallback_matches():
    """A quick check of the baseline-x86-64 build of the inner loops, forced through DISTILKERNELS_ISA."""
    script = (
        "import torch, distilkernels, torch.nn.functional as F\n"
        "from distilkernels import _C, reference\n"
        "assert _C.vector_isa() == 'scalar', _C.vector_isa()\n"
        "x = torch.randn(5, 37) * 4; b = torch.randn(37); y = x.clone()\n"
        "torch.ops.distilkernels.bias_act_(y, b, 'gelu')\n"
        "assert (y - F.gelu(x + b)).abs().max() < 1e-5\n"
        "o = torch.ops.distilkernels.add_layer_norm(x, b.expand(5, 37), b, b, 1e-5)[0]\n"
        "assert (o - F.layer_norm(x + b, (37,), b, b, 1e-5)).abs().max() < 1e-4\n"
        "q = torch.randn(2, 70, 2, 12); m = torch.rand(2, 70) > 0.3\n"
        "o, l = torch.ops.distilkernels.attention(q, q * 2, q + 1, m, 0.3)\n"
        "r, rl = reference.attention(q.double(), q.double() * 2, q.double() + 1, m, 0.3)\n"
        "assert (o - r).abs().max() < 1e-4 and (l - rl).abs().max() < 1e-4\n"
        "n, s = torch.ops.distilkernels.normalize_rows(x)\n"
        "assert torch.equal(s, x.abs().amax(1)) and (n * s[:, None] - x).abs().max() < 1e-5\n"
        "torch.ops.distilkernels.scale_rows_(n, s, b)\n"
        "assert (n - (x + b)).abs().max() < 1e-4\n"
        "w = torch.randn(37, 37); p = torch.ops.distilkernels.pack_linear_weight(w)\n"
        "assert p.shape == (19, 37, 2), p.shape\n"
        "y = torch.ops.distilkernels.linear_packed(x, p, 37, b, 'gelu')\n"
        "assert (y - F.gelu(x @ w.t() + b)).abs().max() < 1e-3\n"
    )
    # Loose bounds on purpose (outputs up to ~100): this is a smoke test that the scalar build loads and
    # computes; test_cpp_op_tests_under_isa[scalar] holds it to the op tests' derived bounds.
    env = dict(os.environ, DISTILKERNELS_ISA="scalar")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_parallel_threads_used():
    ext = load_extension()
    if torch.get_num_threads() < 2 or not ext.openmp_enabled():
        pytest.skip("needs >= 2 torch threads and an OpenMP build")
    assert ext.parallel_threads_used() == min(2, torch.get_num_threads())


def test_bf16_kernels_on_avx2_and_scalar():
    """The AVX2 and baseline builds of the bf16 row kernels, and the attention fallback an AVX2-only CPU takes,
    in fresh processes capped by DISTILKERNELS_ISA: a quick check independent of the op files' rerun. Bounds:
    2x torch's own bf16 error + 1e-6 (torch's error on these random inputs is never 0); ReLU bit for bit (one
    rounding of an exact fp32 sum); the lse 1e-4 (fp32 sums of exact bf16 products, values ~10)."""
    script = (
        "import torch, torch.nn.functional as F\n"
        "import distilkernels\n"
        "from distilkernels import _C, reference\n"
        "import sys\n"
        "assert _C.vector_isa() == sys.argv[1], _C.vector_isa()\n"
        "e = lambda a, b: (a.double() - b.double()).abs().max().item()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = (torch.randn(5, 37, generator=g) * 3).bfloat16(); b = torch.randn(37, generator=g).bfloat16()\n"
        "y = x.clone(); torch.ops.distilkernels.bias_act_(y, b, 'gelu')\n"
        "r = F.gelu(x.double() + b.double())\n"
        "assert e(y, r) <= 2 * e(F.gelu(x + b), r) + 1e-6\n"
        "y = x.clone(); torch.ops.distilkernels.bias_act_(y, b, 'relu')\n"
        "assert torch.equal(y, (x.float() + b.float()).relu().bfloat16())\n"
        "o = torch.ops.distilkernels.add_layer_norm(x, x, b, b, 1e-5)[0]\n"
        "r = reference.add_layer_norm(x.double(), x.double(), b.double(), b.double(), 1e-5)[0]\n"
        "assert e(o, r) <= 2 * e(F.layer_norm(x + x, (37,), b, b, 1e-5), r) + 1e-6\n"
        "q = torch.randn(2, 70, 2, 64, generator=g).bfloat16(); m = torch.rand(2, 70, generator=g) > 0.3\n"
        "o, l = torch.ops.distilkernels.attention(q, q * 2, q + 1, m, 0.125)\n"
        "r, rl = reference.attention(q.double(), (q * 2).double(), (q + 1).double(), m, 0.125)\n"
        "t = F.scaled_dot_product_attention(q.transpose(1, 2), (q * 2).transpose(1, 2), (q + 1).transpose(1, 2),"
        " attn_mask=m[:, None, None, :], scale=0.125).transpose(1, 2)\n"
        "assert e(o, r) <= 2 * e(t, r) + 1e-6 and e(l, rl) < 1e-4\n"
    )
    for isa in ("avx2", "scalar") if {"avx2", "fma"} <= cpu_flags() else ("scalar",):
        env = dict(os.environ, DISTILKERNELS_ISA=isa)
        result = subprocess.run([sys.executable, "-c", script, isa], env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{isa}: {result.stderr[-2000:]}"
