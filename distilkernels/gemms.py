"""The four GEMMs of a fused encoder block (q|k|v, attention output, lin1 + activation, lin2), and the cache of
weights derived from the block's parameters (a fused q|k|v concatenation, packed panels) that they run on.

`DenseGemms` runs them on the block's own fp32/fp16/bf16 weights; `quant.Int8Gemms` provides the same four
methods in int8. Which kernel each one uses for a given tensor is decided here, in one place, and
`precision_paths()` says which one this CPU takes per precision.

Matrix units: where the CPU's matrix unit takes bf16 / int8 (AMX), the bf16 and int8 GEMMs run ATen's brgemm
(oneDNN's micro-kernels) on weights packed once into VNNI blocks; elsewhere they run torch's bf16 GEMM /
int8 GEMM (oneDNN) on weights transposed once, with the same epilogue. `DISTILKERNELS_MATRIX_UNITS=off`
(read at each packing) forces the second path, to test it on a CPU that has AMX.
"""
from __future__ import annotations

import functools
import os

import torch

from . import ops

MATRIX_UNITS_ENV = "DISTILKERNELS_MATRIX_UNITS"


@functools.lru_cache(maxsize=None)
def _unit_packs(dtype: str) -> bool:
    from ._ext import load_extension

    ext = load_extension()
    return ext is not None and ext.matrix_unit_packs(dtype)


def use_matrix_unit(dtype: str) -> bool:
    """Whether the `dtype` ("bf16" or "int8") GEMMs pack their weights for this CPU's matrix unit (brgemm on
    AMX): the unit is present and DISTILKERNELS_MATRIX_UNITS is not "off"/"0"."""
    if os.environ.get(MATRIX_UNITS_ENV, "").lower() in ("off", "0", "false"):
        return False
    return _unit_packs(dtype)


def cpu_flags() -> set[str]:
    """The CPU's matrix/vector flags that decide the GEMM paths (from /proc/cpuinfo; empty where unreadable)."""
    wanted = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return wanted & set(line.split(":", 1)[-1].split())


def precision_paths() -> dict[str, str]:
    """Which matrix units this CPU has and which kernel path each precision's GEMMs take on CPU tensors."""
    from ._ext import load_extension

    flags = cpu_flags()
    units = [name for name in ("amx_bf16", "amx_int8") if name in flags]
    paths = {"matrix_units": ", ".join(units) or "none",
             "vector_units": ", ".join(sorted(flags - {"amx_tile", "amx_bf16", "amx_int8"})) or "unknown"}
    ext = load_extension()
    if ext is None:
        return dict(paths, fp32="torch linear (C++ extension not loaded)", bf16="torch linear", int8="reference")
    winners = sorted(set(_FP32_WINNER.values())) or ["measured at first use"]
    paths["fp32"] = (f"distilkernels linear_packed ({ext.vector_isa()}) or oneDNN prepacked linear, faster one per "
                     f"shape (this process: {', '.join(winners)}); bias + activation fused")
    paths["bf16"] = ("brgemm on AMX (oneDNN micro-kernel), weights packed once (VNNI), fused epilogue"
                     if use_matrix_unit("bf16") else
                     "torch bf16 mm (oneDNN/MKL) on weights transposed once, fused bias + activation")
    paths["int8"] = ("brgemm s8 x s8 -> s32 on AMX, weights packed once (VNNI), per-token scales, fused epilogue"
                     if use_matrix_unit("int8") else
                     "torch _int_mm (oneDNN int8 GEMM, VNNI where present), per-token scales, fused epilogue")
    return paths


class DerivedWeights:
    """A value derived from the concatenated weights and biases of some linears (one q|k|v projection, an int8
    packing), rebuilt whenever a source parameter is replaced or modified in place (tracked by data pointer
    and version counter), so load_state_dict, optimizer steps and .to() are all seen."""

    def __init__(self, linears, derive=None):
        self.linears = tuple(linears)
        self.derive = concat if derive is None else derive  # a picklable callable: no lambda
        self.key = self.value = None

    def __getstate__(self):  # the derived copy is rebuilt after unpickling, not saved
        return dict(self.__dict__, key=None, value=None)

    def get(self):
        weights = [lin.weight for lin in self.linears]
        biases = [lin.bias for lin in self.linears]
        if torch.compiler.is_compiling():  # traced once per graph; no data pointers on fake tensors
            return self.derive(torch.cat(weights), torch.cat(biases))
        # (inference tensors have no version counter; they cannot change outside inference mode either)
        key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype, p.device)
                    for p in weights + biases)
        if key != self.key:
            with torch.no_grad():
                self.value = self.derive(torch.cat(weights), torch.cat(biases))
            self.key = key
        return self.value


def concat(weight, bias):
    """The concatenated weights and biases themselves."""
    return weight, bias


# ---- fp32: our packed GEMM or oneDNN's prepacked one, whichever measures faster on this CPU -----------------

_FP32_WINNER: dict[tuple[int, int], str] = {}  # (in_features, out_features) -> "packed" | "onednn"
# Below this many weights a GEMM takes microseconds and oneDNN's per-call set-up outweighs any gain: no contest.
_MIN_ONEDNN_WEIGHT = 256 * 256


def _onednn_fp32() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x, weight, bias, activation):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


def _median_time(fn, reps: int = 5) -> float:
    import time

    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[reps // 2]


def fp32_kernel(in_features: int, out_features: int, tokens: int = 128) -> str:
    """"packed" (linear_packed) or "onednn" (oneDNN's prepacked fp32 linear, what torch's inductor freezing
    runs), measured once per process per (in_features, out_features) at first use, on `tokens` random rows:
    interleaved medians of 5 calls each. Which is faster depends on the CPU (oneDNN's AVX-512 kernels run at
    ~95% of the FMA peak; on AVX2 our packed GEMM's fused epilogue can win), so neither is assumed."""
    key = (in_features, out_features)
    if key not in _FP32_WINNER:
        if not _onednn_fp32() or in_features * out_features < _MIN_ONEDNN_WEIGHT:
            _FP32_WINNER[key] = "packed"
            return "packed"
        with torch.no_grad():
            x = torch.randn(max(tokens, 1), in_features)
            weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
            panels = ops.pack_linear_weight(weight)
            onednn = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            candidates = {"packed": lambda: ops.linear_packed(x, panels, out_features, bias, "gelu"),
                          "onednn": lambda: _onednn_linear(x, onednn, bias, "gelu")}
            for fn in candidates.values():
                fn()  # warm-up: kernel generation, first-touch of the output
            times = {name: _median_time(fn) for name, fn in candidates.items()}
        _FP32_WINNER[key] = min(times, key=times.get)
    return _FP32_WINNER[key]


def pack_fp32(weight, bias):
    """(kernel name, weight packed for it, bias): fp32_kernel's choice for this shape."""
    if fp32_kernel(weight.shape[1], weight.shape[0]) == "onednn":
        return "onednn", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), bias
    return "packed", ops.pack_linear_weight(weight), bias


def pack_bf16(weight, bias):
    """(weight for linear_bf16: VNNI blocks on a matrix unit, else W^T; bias)."""
    return ops.pack_linear_bf16(weight, vnni=use_matrix_unit("bf16")), bias


class DenseGemms:
    """The block's four GEMMs on its own (fp32/fp16/bf16) weights. Another implementation (int8, say)
    provides the same four methods and replaces `parts.gemms`.

    fp32 and bf16 on the C++ backend run `linear_packed` / `linear_bf16` on weights packed once (rebuilt when
    a weight changes), with the bias and lin1's activation in the GEMM's epilogue; fp16 and other backends run
    `linear` + `bias_act_`."""

    def __init__(self, parts):
        self.parts = parts
        self.fused_qkv = DerivedWeights((parts.q, parts.k, parts.v))
        groups = (("qkv", (parts.q, parts.k, parts.v)), ("out", (parts.out,)), ("lin1", (parts.lin1,)),
                  ("lin2", (parts.lin2,)))
        self.packed = {name: DerivedWeights(linears, pack_fp32) for name, linears in groups}
        self.packed_bf16 = {name: DerivedWeights(linears, pack_bf16) for name, linears in groups}

    @staticmethod
    def _use_packed(x) -> bool:
        return (x.dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling()
                and ops.backend_for(x.device) == "cpp")

    def _packed(self, name, x, activation="none"):
        if x.dtype == torch.bfloat16:
            packed, bias = self.packed_bf16[name].get()
            return ops.linear_bf16(x, packed, bias.shape[0], bias, activation)
        kernel, packed, bias = self.packed[name].get()
        if kernel == "onednn":
            return _onednn_linear(x.contiguous(), packed, bias, activation)
        return ops.linear_packed(x, packed, bias.shape[0], bias, activation)

    def qkv(self, x):  # (tokens, dim) -> (tokens, 3*dim), bias included: one GEMM for q|k|v
        if self._use_packed(x):
            return self._packed("qkv", x)
        weight, bias = self.fused_qkv.get()
        return ops.linear(x, weight, bias)

    def out(self, x):  # (tokens, dim) -> (tokens, dim), bias included
        if self._use_packed(x):
            return self._packed("out", x)
        return ops.linear(x, self.parts.out.weight, self.parts.out.bias)

    def lin1_act(self, x, activation):  # (tokens, dim) -> activation(lin1(x)), (tokens, hidden_dim)
        if self._use_packed(x):
            return self._packed("lin1", x, activation)
        f = ops.linear(x, self.parts.lin1.weight)  # without bias: bias_act_ adds it, in place
        ops.bias_act_(f, self.parts.lin1.bias, activation)
        return f

    def lin2(self, x):  # (tokens, hidden_dim) -> (tokens, dim), bias included
        if self._use_packed(x):
            return self._packed("lin2", x)
        return ops.linear(x, self.parts.lin2.weight, self.parts.lin2.bias)
