"""The four GEMMs of a fused encoder block (q|k|v, attention output, lin1 + activation, lin2), and the cache of
weights derived from the block's parameters (a fused q|k|v concatenation, packed panels) that they run on.

`DenseGemms` runs them on the block's own fp32/fp16/bf16 weights; `quant.Int8Gemms` provides the same four
methods in int8. Which kernel each one uses for a given tensor is decided here, in one place, and
`precision_paths()` says which one this CPU takes per precision.

Matrix units: where the CPU's matrix unit takes bf16 / int8 (AMX), the bf16 and int8 GEMMs run our AMX tile loop
(csrc/amx_tiles.h; ATen's brgemm, oneDNN's micro-kernels, at in_features it does not take) on weights packed once
into VNNI blocks, with no contest against oneDNN's linear where the loop runs (amx_loop_runs). Elsewhere bf16 runs
torch's bf16 GEMM on weights transposed once, with the same epilogue, and int8 the faster exact product measured
once per process (int8_blocks): torch's int8 GEMM (oneDNN, VNNI) on weights transposed once, or ours on the VNNI
blocks (AVX512-VNNI dot products, else int16 multiply-adds). `DISTILKERNELS_MATRIX_UNITS=off` (read at each packing,
and by the int8 op on each call) keeps the GEMMs off the tiles, to test the other paths on a CPU that has AMX.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import math
from typing import Callable, NamedTuple

import torch

from . import _env, dispatch, ops
from ._ext import cpu_fact, int8_vector_gemm, load_extension

MATRIX_UNITS_ENV = "DISTILKERNELS_MATRIX_UNITS"


@cpu_fact
def _unit_packs(dtype: str) -> bool:
    ext = load_extension()
    return ext is not None and ext.matrix_unit_packs(dtype)


def use_matrix_unit(dtype: str) -> bool:
    """Whether the `dtype` ("bf16" or "int8") GEMMs pack their weights for this CPU's matrix unit (brgemm on
    AMX): the unit is present and the switch DISTILKERNELS_MATRIX_UNITS (distilkernels._env) is not off."""
    if not _env.read(MATRIX_UNITS_ENV):
        return False
    return _unit_packs(dtype)


def int8_blocks() -> bool:
    """Whether distilkernels.quantize packs the int8 weights in VNNI blocks (ops.pack_linear_int8(vnni=True)):
    on the AMX tiles (use_matrix_unit("int8")), or where this CPU's int8 product without them is ours
    (distilkernels._ext.int8_vector_gemm() "dots" or "madd": torch's int8 GEMM is inexact or slower here than
    ours). Otherwise W^T for torch's int8 GEMM."""
    return use_matrix_unit("int8") or int8_vector_gemm() in ("dots", "madd")


@torch.compiler.assume_constant_result  # a graph traced now keeps what it read then (as for the env switches)
def bf16_attention_products() -> str:
    """Where bf16 attention runs its two products now: "tiles" (AMX), "dots" (AVX512-BF16 dot products, a CPU
    without AMX) or "" (the blocked fp32 core), as the C++ side decides on each call."""
    ext = load_extension()
    return "" if ext is None else ext.bf16_attention_products()


def int8_attention_in_bf16() -> bool:
    """Whether the int8 blocks run attention in bf16 (quant.bf16_attention): where the CPU's matrix unit takes bf16
    (AMX) or, without it, bf16 attention runs on AVX512-BF16 dot products, and DISTILKERNELS_MATRIX_UNITS does not
    turn it off; elsewhere attention stays fp32. On the Zen 5 EPYC (2 threads, 8 x 128 tokens) the attention op
    took 0.63-0.64 ms a call on the dot products against 1.15-1.18 ms in fp32."""
    return use_matrix_unit("bf16") or (_env.read(MATRIX_UNITS_ENV) and bf16_attention_products() == "dots")


def cpu_flags() -> set[str]:
    """The CPU's matrix/vector flags that decide the GEMM paths (distilkernels.machine reads them; empty where
    /proc/cpuinfo cannot be read)."""
    from .machine import isa_flags

    wanted = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
    return wanted & set(isa_flags())


def precision_paths() -> dict[str, str]:
    """Which matrix units this CPU has and which kernel path each precision's GEMMs take on CPU tensors."""
    flags = cpu_flags()
    units = [name for name in ("amx_bf16", "amx_int8") if name in flags]
    paths = {"matrix_units": ", ".join(units) or "none",
             "vector_units": ", ".join(sorted(flags - {"amx_tile", "amx_bf16", "amx_int8"})) or "unknown"}
    ext = load_extension()
    if ext is None:
        return dict(paths, fp32="torch linear (C++ extension not loaded)", bf16="torch linear", int8="reference")
    def chosen(dtype):
        got = sorted({k for (d, *_), ks in _WINNER.items() if d == dtype for k in ks})
        return f"; chosen so far: {', '.join(got)}" if got else "; chosen per shape at first use"

    onednn = (f"oneDNN's prepacked linear (rows in chunks of {_CHUNK_ROWS} where that measures faster per bucket "
              "of rows)")
    labels = {"onednn": onednn,
              "mkl": f"MKL's packed GEMM (threaded by MKL or by us over rows in chunks of {_MKL_ROW_CHUNK})"}

    def contest(dtype):
        libraries = [label for name, label in labels.items() if _KERNELS[name].available(dtype)]
        return (f" or {' or '.join(libraries)}, whichever measures faster per shape and row count (a library "
                f"kernel only when {_MARGIN:.0%} faster than ours)" if libraries else "")

    paths["fp32"] = f"distilkernels linear_packed ({ext.vector_isa()}){contest(torch.float32)}{chosen(torch.float32)}"
    precision = torch.get_float32_matmul_precision()
    if use_matrix_unit("bf16"):
        paths["fp32"] += ("; under torch.set_float32_matmul_precision('high' or 'medium'): linear_bf16x3, each GEMM as "
                          "three bf16 products on AMX tiles (within ~1.2e-5 of sum |x w|, ~2x the fp32 rate), and "
                          "attention's two products the same way"
                          f"; now {precision!r}: {'bf16x3' if bf16x3_allowed() else 'fp32'}")
    else:
        paths["fp32"] += ("; torch's float32 matmul precision ('high', 'medium') changes nothing here: no bf16 "
                          "matrix unit")
    bf16_epilogues = ("; where linear_bf16 runs a GEMM, bias + GELU in its epilogue (a fit for bf16 results) and, "
                      "for the attention output and lin2, the residual add + LayerNorm in the same call "
                      "(linear_bf16_add_layer_norm)")
    if use_matrix_unit("bf16"):  # the contest only for in_features our tile loop does not take
        paths["bf16"] = ("linear_bf16: AMX tiles (our tile loop, which prefetches the next weight block; brgemm "
                         "where in_features % 32 != 0), weights packed once (VNNI); no contest with oneDNN's "
                         "linear where the tile loop runs (gemms.amx_loop_runs)" + bf16_epilogues)
    else:
        paths["bf16"] = ("linear_bf16: brgemm's plain bf16 GEMM on weights transposed once" + contest(torch.bfloat16)
                         + chosen(torch.bfloat16) + bf16_epilogues)
    paths["int8"] = ("s8 x s8 -> s32 on AMX tiles (our tile loop; brgemm where in_features % 64 != 0), weights "
                     "packed once (VNNI), per-token scales, fused epilogue"
                     if use_matrix_unit("int8") else
                     ("u8 x s8 -> s32 on AVX512-VNNI dot products (our gemm_u8s8_block)" if ext.int8_dots() else
                      "s8 x s8 -> s32 as int16 multiply-adds (our gemm_s8_block, " + ext.vector_isa() + ")")
                     + ", weights packed once (VNNI blocks), per-token scales, fused epilogue; torch's int8 GEMM "
                     "measured slower or inexact here" if int8_blocks() else
                     "torch _int_mm (oneDNN's int8 GEMM: exact here, VNNI, and faster than ours) on weights "
                     "transposed once, per-token scales, fused epilogue")
    paths["int8"] += ("; attention in fp32" if not int8_attention_in_bf16() else
                      "; q|k|v written in bf16 and attention on the bf16 tiles" if use_matrix_unit("bf16") else
                      "; q|k|v written in bf16 and attention on AVX512-BF16 dot products")
    return paths


# Module types whose `weight` and `bias` are read from their parameter dict (no class attribute of either name):
# nn.Module.__getattr__ took 3 of the ~5 us of a q|k|v DerivedWeights.get, which runs before every GEMM.
_PLAIN_PARAMS: dict[type, bool] = {}


def _param(module, name: str):
    """module.<name> for name "weight" or "bias": from module._parameters where that is what attribute lookup
    finds (no class in the module type's MRO defines the name, as the property of torch.nn.utils.parametrize
    does), else by attribute lookup."""
    plain = _PLAIN_PARAMS.get(type(module))
    if plain is None:
        plain = _PLAIN_PARAMS[type(module)] = not any(n in vars(c) for c in type(module).__mro__
                                                      for n in ("weight", "bias"))
    if plain:
        params = module._parameters
        if name in params and name not in module.__dict__:
            return params[name]
    return getattr(module, name)


class DerivedWeights:
    """A value derived from the concatenated weights and biases of some linears (one q|k|v projection, an int8
    packing), rebuilt whenever a source parameter is replaced or modified in place (tracked by data pointer
    and version counter), so load_state_dict, optimizer steps and .to() are all seen. Writes torch does not
    version (through .data; to inference tensors inside inference_mode) need distilkernels.refresh(model)."""

    def __init__(self, linears, derive=None):
        self.linears = tuple(linears)
        self.derive = concat if derive is None else derive  # a picklable callable: no lambda
        self.key = self.value = None

    def __getstate__(self):  # the derived copy is rebuilt after unpickling, not saved
        return dict(self.__dict__, key=None, value=None)

    def forget(self) -> None:
        """Drop the derived value: the next get() derives it again."""
        self.key = self.value = None

    def get(self):
        weights = [_param(lin, "weight") for lin in self.linears]
        biases = [_param(lin, "bias") for lin in self.linears]
        if torch.compiler.is_compiling():  # traced once per graph; no data pointers on fake tensors
            return self.derive(torch.cat(weights), torch.cat(biases))
        key = params_key(weights + biases)
        if key != self.key:
            with torch.no_grad():
                self.value = self.derive(torch.cat(weights), torch.cat(biases))
            self.key = key
        return self.value


def params_key(params) -> tuple:
    """What identifies the values of `params` (tensors): a value derived from them is current while this is
    unchanged (a replaced tensor has another data pointer, an in-place change bumps the version counter).
    Inference tensors have no version counter: an in-place write to one inside inference_mode is not seen
    here, nor is a write through .data (distilkernels.refresh drops what was derived)."""
    return tuple([(p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype, p.device) for p in params])


def linears_params(linears) -> list:
    """The weights and biases of `linears`, as the GEMMs read them."""
    return [_param(lin, name) for lin in linears for name in ("weight", "bias")]


class GemmCalls(NamedTuple):
    """A block's four GEMMs bound to their weights for one kind of call (input dtype, bucket of row counts):
    each takes x (tokens, in_features)."""

    qkv: Callable  # -> (tokens, 3*dim), bias included
    out: Callable  # -> (tokens, dim), bias included
    lin1_act: Callable  # -> activation(lin1(x)), (tokens, hidden_dim)
    lin2: Callable  # -> (tokens, dim), bias included
    # (x, residual, ln_weight, ln_bias, eps) -> LayerNorm(out(x) + residual), (tokens, dim), in one op; None where
    # the GEMM has no such op (everything but our bf16 GEMM): the block then calls out and add_layer_norm
    out_add_ln: Callable | None = None
    lin2_add_ln: Callable | None = None  # the same for lin2


class BoundOp:
    """A GEMM bound for one kind of call: op(x, *args), or, with add_ln (a GEMM with the residual add + LayerNorm
    in its call), op(x, *args, residual, ln_weight, ln_bias, eps)[0]. Called from Python like any GemmCalls entry,
    and handed to the C++ block loop as one (modules.run_blocks; csrc/blocks.cpp), which calls `op` through the
    dispatcher with no Python in between where it is a dispatcher op (torch.ops.<ns>.<name>.<overload>)."""

    __slots__ = ("op", "args", "add_ln")

    def __init__(self, op, args: tuple, add_ln: bool = False):
        self.op, self.args, self.add_ln = op, tuple(args), add_ln

    def __call__(self, x, *inputs):
        out = self.op(x, *self.args, *inputs)
        return out[0] if self.add_ln else out

    def to_cpp(self, ext):
        """This GEMM for the C++ block loop (ext: the loaded extension)."""
        if isinstance(self.op, torch._ops.OpOverload):
            return cpp_op(ext, self.op, self.args, 1)
        return cpp_op(ext, self)  # called back in Python, which appends self.args


def cpp_op(ext, fn, bound: tuple = (), bound_at: int = 0):
    """fn for the C++ block loop (csrc/blocks.cpp, BlockOp): a dispatcher op (torch.ops.<ns>.<name>.<overload>)
    with `bound` as its arguments from index `bound_at` on, called there with no Python; any other callable is
    called back in Python."""
    if isinstance(fn, torch._ops.OpOverload):
        return ext.BlockOp(fn._schema.name, fn._schema.overload_name, list(bound), bound_at)
    return ext.BlockOp(fn)


class BoundCalls(dict):
    """key -> (params_key of a block's linears, GemmCalls): the bindings bound_calls keeps. Derived state holding
    closures over packed weights: pickled and deep-copied empty, rebuilt on the next call."""

    def __reduce__(self):
        return (BoundCalls, ())


def bound_calls(bound: BoundCalls, key, linears, bind: Callable, activation: str) -> GemmCalls:
    """The GemmCalls kept in `bound` under `key` while the weights and biases of `linears` are the same tensors,
    unchanged (one check of them all); otherwise bind(name, activation) for each GEMM ("qkv", "out", "lin1" with
    `activation`, "lin2", and "out+ln", "lin2+ln": the GEMM with the residual add and LayerNorm after it, or
    None), kept in its place, and every binding of older weights dropped from `bound`. While torch.compile traces,
    bound afresh and not kept: the graph is traced once, and fake tensors have no data pointers to key on (the
    int8 GEMMs then pack inside the graph, as DerivedWeights.get does)."""
    def bind_all():
        return GemmCalls(*(bind(name, act) for name, act in (
            ("qkv", "none"), ("out", "none"), ("lin1", activation), ("lin2", "none"), ("out+ln", "none"),
            ("lin2+ln", "none"))))

    if torch.compiler.is_compiling():
        return bind_all()
    params = params_key(linears_params(linears))
    hit = bound.get(key)
    if hit is not None and hit[0] == params:
        return hit[1]
    calls = bind_all()
    for stale in [k for k, (p, _) in bound.items() if p != params]:
        del bound[stale]
    bound[key] = (params, calls)
    return calls


def concat(weight, bias):
    """The concatenated weights and biases themselves."""
    return weight, bias


# ---- fp32 and bf16: our packed GEMM, oneDNN's or MKL's prepacked one, whichever measures faster ----------

# Below this many weights a GEMM takes microseconds and a library's per-call set-up outweighs any gain: no contest.
_MIN_CONTEST_WEIGHT = 256 * 256
# A measured choice (a library kernel over ours, row chunks over one call) is taken only when it is faster by
# more than this fraction; closer than that, the default stays. The choices are made once per process from a
# few calls, and on a shared machine near-ties flipped from one process to the next (in bf16, oneDNN's and our
# 768 x 768 GEMM; oneDNN's row chunks), which made whole runs differ by up to 15% at 8 x 128.
_MARGIN = 0.05


class _Kernel(NamedTuple):
    """A GEMM kernel: its packing, and either a dispatcher op per input dtype (`op`; runnable from the C++ block
    loop) or a Python callable (`call`), both taking (x, packed, out_features, bias, activation, *args) and
    returning activation(x @ weight^T + bias)."""

    available: Callable[[torch.dtype], bool]
    pack: Callable  # weight (out_features, in_features) -> the packed weight this kernel reads
    op: Callable[[torch.dtype], Callable] | None = None  # input dtype -> the dispatcher op
    call: Callable | None = None  # where there is no op
    args: tuple = ()  # the kernel's own arguments after the common five
    packing: str | None = None  # another kernel whose packing this one reads (one packing kept for both)

    def run(self, x, packed, out_features, bias, activation):
        fn = self.call if self.op is None else self.op(x.dtype)
        return fn(x, packed, out_features, bias, activation, *self.args)


def _ours_pack(weight):
    if weight.dtype == torch.bfloat16:
        return ops.pack_linear_bf16(weight, vnni=use_matrix_unit("bf16"))
    return ops.pack_linear_weight(weight)


def _ours_op(dtype):
    # The C++ ops' table entries (DenseGemms runs packed kernels on the C++ backend only): checks in C++ only.
    return dispatch.implementation("linear_bf16" if dtype == torch.bfloat16 else "linear_packed", "cpp")


def _onednn_available(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_pack(weight):
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _onednn_call(x, weight, bias, activation):  # oneDNN's linear with bias + activation as post-ops
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


def _mkl_available(dtype: torch.dtype) -> bool:
    ext = load_extension()
    return dtype == torch.float32 and ext is not None and ext.mkl_packs()


# The row count MKL's packing is laid out for (pack_linear_mkl's `rows`; any row count can use it). It decides how
# MKL threads and blocks a call, and a packing for one row count can run others at half speed. On the 2-core AMX
# Xeon (2 threads, linear_mkl with bias, every DistilBERT shape, 128-4096 rows, packings for 128, 256, 512 and
# 1024 rows): for 1024 rows ran the 768-column shapes at 1.3-2x the best time wherever the rows were not a
# multiple of 1024 (and 4096 rows every shape at 2x); for 512 rows was never more than 4% off the best, against
# 15% for 128. In distilbert-base fp32 at 8 x 128 (interleaved, 21 rounds): MKL's threading on packings for 512
# rows 1.017x the speed of our row chunks on packings for 128 (the contest's pick there), for 1024 rows 1.035x.
_MKL_PACK_ROWS = 512


def _mkl_pack(weight):
    return torch.ops.distilkernels.pack_linear_mkl(weight.detach(), _MKL_PACK_ROWS)


def _mkl_op(dtype):
    return torch.ops.distilkernels.linear_mkl.default


# linear_mkl's row_chunk for the "mkl_rows" kernel. On the 2-core AMX Xeon (2 MiB L2 per core), weights not in
# cache, 256-1024 rows, against MKL's own threading: q|k|v +2-4%, attention output (768 x 768) +13-17%, lin1 +
# GELU +1-4%, lin2 even; chunks of 128 rows with 128 rows in all (no split) were 20% slower. The contest
# measures the two on the CPU at hand.
_MKL_ROW_CHUNK = 128


# oneDNN picks its blocking from the number of rows, and some row counts fall off a cliff: in bf16 on a 2-core
# AMX Xeon, out_features=768 ran at 1.1-1.4 TFLOP/s with 512-1024 rows in one call but 2.1 in calls of 256 rows
# (2.4-2.7 again at 2048), while q|k|v and lin1 ran fastest in one call. So above _CHUNK_ROWS rows, whether to
# feed the rows in chunks of _CHUNK_ROWS is measured once per process per (dtype, shape, power-of-two bucket of
# rows), on the first real call of that bucket (its own inputs, interleaved medians of 5 calls each); chunks are
# taken when _MARGIN faster.
_CHUNK_ROWS = 256
_ROW_CHUNK: dict[tuple[torch.dtype, int, int, int], int] = {}  # -> rows per call; 0 = all rows in one call


def _onednn_chunked(x, weight, bias, activation, rows: int):
    if rows == 0 or x.shape[0] <= rows:
        return _onednn_call(x, weight, bias, activation)
    return torch.cat([_onednn_call(part, weight, bias, activation) for part in x.split(rows)])


def onednn_row_chunk(x, weight, bias, activation) -> int:
    """Rows per oneDNN call for x on this packed weight (out_features, in_features) (see _CHUNK_ROWS), measured
    at the first call of its bucket."""
    tokens = x.shape[0]
    if tokens <= _CHUNK_ROWS:
        return 0
    key = (x.dtype, x.shape[1], weight.shape[0], 1 << (tokens - 1).bit_length())
    if key not in _ROW_CHUNK:
        _ROW_CHUNK[key] = 0
        times = _interleaved_medians({rows: functools.partial(_onednn_chunked, x, weight, bias, activation, rows)
                                      for rows in (0, _CHUNK_ROWS)}, rounds=5)
        _ROW_CHUNK[key] = _CHUNK_ROWS if times[_CHUNK_ROWS] < (1 - _MARGIN) * times[0] else 0
    return _ROW_CHUNK[key]


def _onednn_linear(x, packed, out_features, bias, activation):
    x = x.contiguous()
    return _onednn_chunked(x, packed, bias, activation, onednn_row_chunk(x, packed, bias, activation))


def bf16x3_allowed() -> bool:
    """Whether fp32 GEMMs may run as three bf16 products (linear_bf16x3): torch's float32 matmul precision is
    "high" or "medium" (torch.set_float32_matmul_precision; "high" permits exactly this, "each float32 number
    as the sum of two bfloat16 numbers", "medium" less), and the CPU's matrix unit takes bf16 (AMX). Under
    "highest", torch's default, fp32 GEMMs are fp32 throughout."""
    return torch.get_float32_matmul_precision() != "highest" and use_matrix_unit("bf16")


def _bf16x3_pack(weight):
    return ops.pack_linear_bf16x3(weight, vnni=True)


_KERNELS: dict[str, _Kernel] = {
    "packed": _Kernel(lambda dtype: True, _ours_pack, _ours_op),  # linear_packed (fp32) / linear_bf16
    # what inductor freezing runs for bf16
    "onednn": _Kernel(_onednn_available, _onednn_pack, call=_onednn_linear),
    # what inductor freezing runs for fp32 (csrc/linear_mkl.cpp): MKL's threading over the whole GEMM, or
    # (mkl_rows) each thread its own rows in chunks of _MKL_ROW_CHUNK, the bias/activation pass on each chunk
    # while it is in cache
    "mkl": _Kernel(_mkl_available, _mkl_pack, _mkl_op, args=(0,)),
    "mkl_rows": _Kernel(_mkl_available, _mkl_pack, _mkl_op, args=(_MKL_ROW_CHUNK,), packing="mkl"),
    # fp32 as three bf16 products on AMX, where torch's float32 matmul precision permits (bf16x3_allowed); not in
    # the contest: taken wherever allowed, on every GEMM large enough to be contested (dense_kernel)
    "bf16x3": _Kernel(lambda dtype: False, _bf16x3_pack,  # csrc/linear_bf16.cpp
                      lambda dtype: dispatch.implementation("linear_bf16x3", "cpp")),
}
# (dtype, in, out features, activation) -> the winner at each of _CONTEST_ROWS
_WINNER: dict[tuple[torch.dtype, int, int, str], tuple[str, ...]] = {}


def _interleaved_medians(candidates: dict, rounds: int = 5) -> dict:
    import time

    samples = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up: kernel generation, first touch of the output
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(t)[rounds // 2] for name, t in samples.items()}


class _Rotating:
    """kernel.run on x with the next of several packed copies of one weight, in turn."""

    def __init__(self, kernel, packs, out_features, bias, activation):
        self.kernel, self.packs, self.i = kernel, packs, 0
        self.args = (out_features, bias, activation)

    def __call__(self, x):
        self.i = (self.i + 1) % len(self.packs)
        return self.kernel.run(x, self.packs[self.i], *self.args)


def _agrees(got, want, in_features: int) -> bool:
    """A candidate's output is our kernel's up to GEMM rounding: ~sqrt(K) roundings of the dtype at the output's
    magnitude, with a 100x margin for any blocking order (a wrong kernel is off by O(magnitude))."""
    eps = torch.finfo(want.dtype).eps
    scale = max(1.0, want.float().abs().max().item())
    return bool((got.float() - want.float()).abs().max().item() <= 100 * eps * in_features ** 0.5 * scale)


# Row counts the contest runs at: one sequence, and a batch of eight (the README's 1x128 and 8x128).
_CONTEST_ROWS = (128, 1024)
# The contest times each kernel on as many packed copies of the weight as fill this much memory, one copy per
# call in turn, so each call reads its weight from beyond the cache as a forward of a model this size does
# (distilbert-base: 85 MB of weights in bf16, 170 MB in fp32; ~32 MB stayed in cache on the 2-core AMX Xeon).
# With the weight in cache every call, the contest favoured kernels that are fast on cached weights only: in
# bf16 it gave q|k|v and lin1 to oneDNN, and the model ran 10-13% slower at 1x128 than with our AMX loop,
# which overlaps the weight streaming, at the same speed at 8x128.
_CONTEST_BYTES = 64 << 20
# A call takes the pick of the contest row count nearest its own in ratio: the edges between neighbours are their
# geometric means.
_BUCKET_EDGES = [math.sqrt(a * b) for a, b in zip(_CONTEST_ROWS, _CONTEST_ROWS[1:])]
_CONTEST_MAX_COPIES = 64


def dense_kernel(dtype: torch.dtype, in_features: int, out_features: int, activation: str = "none",
                 rows: int = _CONTEST_ROWS[0]) -> str:
    """The _KERNELS entry for an fp32/bf16 GEMM of this shape and epilogue activation on `rows` rows: "packed" (our
    linear_packed / linear_bf16), "onednn" (oneDNN's prepacked linear, fused post-ops), "mkl" or "mkl_rows" (MKL's
    packed GEMM, fp32, threaded by MKL or by us over chunks of rows), measured once per process at first use, among
    the kernels this torch build has that compute what ours computes (checked on another row count first). Each runs
    on random inputs of every row count in _CONTEST_ROWS (interleaved medians of 5 calls), on packed copies of the
    weight filling _CONTEST_BYTES, so that, as in a forward, the weight comes from beyond the cache. The shape's
    kernel has the least sum of its times relative to the fastest at each row count, if that sum is _MARGIN below
    ours (else ours); a row count takes another kernel where that one is _MARGIN faster there, and a call takes the
    pick of the contest row count nearest its own (in ratio): one sequence and a batch can differ. Which wins
    depends on the CPU and shape, so none is assumed: at the DistilBERT shapes on the AMX Xeon, oneDNN led ours in
    fp32 by 3-14% per GEMM, and MKL led oneDNN in the model by ~9% at 1 x 128 (weights streamed from memory); with
    oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) linear_packed's AVX2 build led oneDNN by 4-16%. bf16 GEMMs that
    our AMX tile loop runs are not contested (amx_loop_runs), nor fp32 ones where torch's float32 matmul precision
    lets them run as three bf16 products (bf16x3_allowed: "bf16x3", ~2x the fp32 kernels' rate on AMX)."""
    if (dtype == torch.float32 and in_features * out_features >= _MIN_CONTEST_WEIGHT and in_features > 0
            and bf16x3_allowed()):
        return "bf16x3"
    key = (dtype, in_features, out_features, activation)
    if key not in _WINNER:
        _WINNER[key] = ("packed",) * len(_CONTEST_ROWS)
        if in_features * out_features >= _MIN_CONTEST_WEIGHT and not amx_loop_runs(dtype, in_features):
            _WINNER[key] = _contest(dtype, in_features, out_features, activation)
            _return_freed_memory()
    return _WINNER[key][bisect.bisect(_BUCKET_EDGES, rows)]


def _return_freed_memory() -> None:
    """Hands the memory the contest freed (its packed weight copies, _CONTEST_BYTES per packing) back to the OS.
    glibc keeps freed heap memory mapped (its mmap threshold grows after large frees), which left a patched
    distilbert-base ~0.6 GB larger after its first fp32 forward. A no-op where malloc_trim is not there."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # no such C library (TypeError: CDLL(None) on Windows)
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def amx_loop_runs(dtype: torch.dtype, in_features: int) -> bool:
    """Whether our AMX tile loop runs this GEMM (bf16, in_features a multiple of 32, the CPU's matrix unit takes
    bf16): then it runs without a contest. In distilbert-base bf16 at 8 x 128 tokens on the 2-core AMX Xeon (2
    threads, us per call in the model, seven processes), ours against oneDNN's prepacked linear: q|k|v
    1373-1399 against 1318-1650, and 2993-3052 in two of the seven processes (the same picks, the same code);
    attention output 495-557 against 644-692 (in 256-row chunks); lin1 + GELU 2121-2243 against 4464-4707;
    lin2 1992-2066 against 2680-2750 (chunks). At 128 rows the contest already picked ours for all four. The
    contest itself, timed outside the model on weights from beyond the cache, had given oneDNN q|k|v, and in
    some processes lin1, at 1024 rows."""
    return dtype == torch.bfloat16 and in_features % 32 == 0 and use_matrix_unit("bf16")


def _contest(dtype, in_features, out_features, activation) -> tuple[str, ...]:
    with torch.no_grad():
        weight = torch.randn(out_features, in_features).to(dtype)
        bias = torch.randn(out_features).to(dtype)
        inputs = [torch.randn(rows, in_features).to(dtype) for rows in _CONTEST_ROWS]
        check_rows = inputs[0][: _CONTEST_ROWS[0] // 3]
        calls, packs = {}, {}  # packs: packing name -> the copies (kernels that share a packing share them)
        copies = min(_CONTEST_MAX_COPIES, -(-_CONTEST_BYTES // (weight.numel() * weight.element_size())))
        for name, kernel in _KERNELS.items():
            if not kernel.available(dtype):
                continue
            packing = kernel.packing or name
            if packing not in packs:
                packs[packing] = [_KERNELS[packing].pack(weight) for _ in range(copies)]
            run = _Rotating(kernel, packs[packing], out_features, bias, activation)
            if name != "packed" and not _agrees(run(check_rows), calls["packed"](check_rows), in_features):
                continue
            calls[name] = run
        times = [_interleaved_medians({name: functools.partial(run, x) for name, run in calls.items()})
                 for x in inputs]
        # The shape's kernel: the least sum of times relative to the fastest at each row count, if _MARGIN below
        # ours' (else ours). A row count takes another kernel only where that one is _MARGIN faster than the
        # shape's kernel at that row count: per-row-count picks alone flipped between processes where two
        # kernels were within a few percent (fp32 at 128 rows: MKL's and ours).
        score = {name: sum(t[name] / min(t.values()) for t in times) for name in calls}
        best = min(score, key=score.get)
        default = best if score[best] < (1 - _MARGIN) * score["packed"] else "packed"
        winners = []
        for t in times:
            fastest = min(t, key=t.get)
            winners.append(fastest if t[fastest] < (1 - _MARGIN) * t[default] else default)
        return tuple(winners)


def pack_dense(weight, bias, kernel: str = "packed", dtype: torch.dtype | None = None):
    """(kernel name, weight packed for it, bias), weight and bias cast to `dtype` first where given (bf16
    packings of fp32 weights, for CPU autocast)."""
    if dtype is not None:
        weight, bias = weight.to(dtype), bias.to(dtype)
    return kernel, _KERNELS[kernel].pack(weight), bias


def gemm_groups(parts) -> dict:
    """The block's four GEMMs, name -> the Linear modules whose weights one call multiplies (q|k|v as one GEMM),
    in the order a block runs them; every implementation of them (DenseGemms, quant.Int8Gemms) keys on these."""
    return {"qkv": (parts.q, parts.k, parts.v), "out": (parts.out,), "lin1": (parts.lin1,), "lin2": (parts.lin2,)}


class DenseGemms:
    """The block's four GEMMs on its own (fp32/fp16/bf16) weights. Another implementation (int8, say)
    provides the same four methods and replaces `parts.gemms`.

    fp32 and bf16 on the C++ backend run `linear_packed` / `linear_bf16` on weights packed once (rebuilt when
    a weight changes), with the bias and lin1's activation in the GEMM's epilogue; fp16 and other backends run
    `linear` + `bias_act_`. bf16 inputs on fp32 weights (a block under CPU autocast) run `linear_bf16` on a bf16
    packing of the weights, kept beside the fp32 one."""

    def __init__(self, parts):
        self.parts = parts
        self.fused_qkv = DerivedWeights((parts.q, parts.k, parts.v))
        # Packed for the weights' own dtype (fp32 or bf16: a dtype change repacks); the contest times each GEMM
        # with the activation its epilogue applies (lin1's only). A GEMM is packed for each kernel its calls have
        # taken (dense_kernel: per row count), on first use: two packings only where one sequence and a batch
        # have different winners and both kinds of call have run.
        # name -> (linears, activation, in_features, out_features): the contest's key
        self.groups = {name: (linears, (parts.act or "none") if name == "lin1" else "none", linears[0].weight.shape[1],
                              sum(lin.weight.shape[0] for lin in linears))
                       for name, linears in gemm_groups(parts).items()}
        self.packed = {name: {} for name in self.groups}  # name -> {kernel: DerivedWeights}
        # Calls in another dtype than the weights' (bf16 under CPU autocast: FusedBlock casts x) run on packings
        # of the weights cast to it: (dtype, name) -> {kernel: DerivedWeights}.
        self.cast_packed = {}
        self.packed_dtype = None
        self.linears = tuple(lin for linears, *_ in self.groups.values() for lin in linears)
        # calls(): (x dtype, activation, row bucket, our op) -> (params_key of the block's linears, GemmCalls)
        self.bound = BoundCalls()

    def calls(self, x, activation: str) -> GemmCalls:
        """The four GEMMs for inputs like x (its dtype and row count), lin1's with `activation`, bound to their
        packed weights: resolved once per kind of call and kept while the block's weights and biases are the
        same tensors, unchanged: one check of them all per block call, not one per GEMM, and no lookups per
        GEMM (a block of a tiny model at 1 x 128 on 2 cores: 116 -> 99 us a call; see
        FusedBlock._forward_tokens_python for why those microseconds count)."""
        if not self._use_packed(x):
            return GemmCalls(self.qkv, self.out, functools.partial(self.lin1_act, activation=activation), self.lin2)
        ours = _ours_op(x.dtype)
        precision = torch.get_float32_matmul_precision() if x.dtype == torch.float32 else None
        key = (x.dtype, activation, bisect.bisect(_BUCKET_EDGES, x.shape[0]), ours, precision)
        return bound_calls(self.bound, key, self.linears, functools.partial(self._bind, x=x), activation)

    def _bind(self, name, activation, *, x):
        if name.endswith("+ln"):
            kernel, packed, bias = self._packing(name[:-3], x)
            if kernel != "packed" or x.dtype != torch.bfloat16:
                return None
            fused = dispatch.implementation("linear_bf16_add_layer_norm", "cpp")
            return BoundOp(fused, (packed, bias.shape[0], bias), add_ln=True)
        kernel, packed, bias = self._packing(name, x)
        k = _KERNELS[kernel]
        if k.op is not None:  # one op of the dispatcher: runnable from C++ (BoundOp)
            return BoundOp(k.op(x.dtype), (packed, bias.shape[0], bias, activation, *k.args))
        return functools.partial(k.run, packed=packed, out_features=bias.shape[0], bias=bias, activation=activation)

    @staticmethod
    def _use_packed(x) -> bool:
        if torch.compiler.is_compiling():
            return False
        return dispatch.has_kernel("linear_bf16" if x.dtype == torch.bfloat16 else "linear_packed", x)

    def _packed(self, name, x, activation="none"):
        kernel, packed, bias = self._packing(name, x)
        return _KERNELS[kernel].run(x, packed, bias.shape[0], bias, activation)

    def _packing(self, name, x):
        """(kernel name, packed weight, bias) of GEMM `name` for inputs like x, packed on first use and
        repacked when a weight or bias changed."""
        linears, act, in_features, out_features = self.groups[name]
        weight_dtype = linears[0].weight.dtype
        if weight_dtype != self.packed_dtype:  # packings of weights of another dtype are dropped, not kept alive
            self.packed = {group: {} for group in self.groups}
            self.cast_packed = {}
            self.packed_dtype = weight_dtype
        dtype = x.dtype
        cast = None if dtype == weight_dtype else dtype
        packs = self.packed[name] if cast is None else self.cast_packed.setdefault((dtype, name), {})
        kernel = dense_kernel(dtype, in_features, out_features, act, x.shape[0])
        packing = _KERNELS[kernel].packing or kernel
        if packing not in packs:
            packs[packing] = DerivedWeights(linears, functools.partial(pack_dense, kernel=packing, dtype=cast))
        _, packed, bias = packs[packing].get()
        return kernel, packed, bias

    def forget(self) -> None:
        """Drop every packing and binding of the weights (distilkernels.refresh): the next call packs again."""
        self.packed = {name: {} for name in self.groups}
        self.cast_packed = {}
        self.fused_qkv.forget()
        self.bound.clear()

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
