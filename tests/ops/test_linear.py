"""The C++ GEMMs: distilkernels.ops.linear (the CPU GEMM split across threads by output columns), linear_packed
(our own fp32 GEMM on weights packed once, bias and activation in its epilogue), and linear_bf16 / linear_int8
(the GEMMs for the CPU's matrix units). Their argument checks that are the same on every backend are rows of
test_bad_input.py's table; the C++ ops' own checks are tested here.

fp32 bounds: a GEMM's rounding error grows with the reduction length K, ~sqrt(K) roundings for random-sign
errors: 1e-5 * sqrt(K) (~170 sqrt(K) roundings, margin for any blocking and FMA contraction) at the output's
magnitude (at least 1). Low precision: helpers' rule, 2x torch's own error in the same dtype.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from helpers import assert_gelu_bf16, assert_lowp, every_finite_bf16, lowp_bound, magnitude, max_err, num_threads, ulps

pytestmark = pytest.mark.requires_ext


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", [
    (1, 8, 1), (7, 37, 129), (128, 64, 200), (128, 96, 2304 // 8), (300, 48, 77),  # 300 > split limit
])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_torch(tokens, in_features, out_features, bias, threads):
    torch.manual_seed(0)
    with num_threads(threads):
        x = torch.randn(tokens, in_features)
        weight = torch.randn(out_features, in_features)
        b = torch.randn(out_features) if bias else None
        with ops.force_backend("cpp"):
            got = ops.linear(x, weight, b)
        ref = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert max_err(got, ref) <= fp32_gemm_bound(ref, in_features)


def fp32_gemm_bound(ref, in_features):
    """See the module docstring: 1e-5 * sqrt(K) at the output's magnitude, at least 1."""
    return 1e-5 * in_features ** 0.5 * max(magnitude(ref), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [128, 300])  # split across threads, and MKL's own threading
def test_linear_low_precision(tokens, dtype):
    """bf16/fp16 with bias: error vs fp64 within 2x that of torch's own linear in the same dtype."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(tokens, 96), torch.randn(2304 // 8, 96), torch.randn(2304 // 8)
    with num_threads(2):
        with ops.force_backend("cpp"):
            got = ops.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))
        same_dtype = torch.nn.functional.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))
    ref = torch.nn.functional.linear(*(t.to(dtype).double() for t in (x, weight, bias)))
    assert got.dtype == dtype
    # floor: 1e-6 of the output's magnitude (~17 fp32 roundings), far below one bf16/fp16 rounding: torch's own
    # low-precision GEMM of random inputs always errs, so 2x its error is the bound that matters
    assert_lowp(got, ref, [same_dtype], floor=1e-6 * magnitude(ref))


def test_linear_in_inference_mode_and_strided_input():
    x = torch.randn(16, 64).t()  # (64, 16), non-contiguous
    weight, bias = torch.randn(40, 16), torch.randn(40)
    with torch.inference_mode(), ops.force_backend("cpp"):
        got = ops.linear(x, weight, bias)
    assert torch.allclose(got, torch.nn.functional.linear(x, weight, bias), atol=1e-5)


def test_linear_opcheck():
    x, weight, bias = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    torch.library.opcheck(torch.ops.distilkernels.linear.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.distilkernels.linear.default, (x, weight, None))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.randn(5, 6), None), ValueError, "in_features=4"),
    ((torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError, "bias must be None or"),
    ((torch.randn(3, 4), torch.randn(5, 4).double(), None), TypeError, "weight must be float32"),
    ((torch.randn(3, 4), torch.randn(5, 4).half(), None), TypeError, "dtypes must match"),
    ((torch.randn(2, 3, 4), torch.randn(5, 4), None), ValueError, r"x must be \(tokens, in_features\)"),
])
def test_linear_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.linear(*args)


def test_linear_cpp_checks_direct_call():
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.distilkernels.linear(torch.randn(3, 4), torch.randn(5, 6), None)


# ----------------------------------------------------------------------------------------------------------
# linear_packed


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", [
    (1, 8, 1), (13, 32, 37), (7, 37, 129), (128, 64, 200), (300, 48, 77), (200, 800, 64),  # 800 > one k-block
    (1000, 7, 33),  # several row blocks
    (21, 300, 40), (22, 520, 70), (35, 513, 33),  # last row tiles of 9, 10, 11 rows; k in 2-3 blocks of 256
])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_packed_matches_fp64(tokens, in_features, out_features, bias, activation, threads):
    torch.manual_seed(0)
    x, weight = torch.randn(tokens, in_features), torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    with num_threads(threads):
        with ops.force_backend("cpp"):
            packed = ops.pack_linear_weight(weight)
            got = ops.linear_packed(x, packed, out_features, b, activation)
    ref = reference.activate(F.linear(x.double(), weight.double(), None if b is None else b.double()), activation)
    assert got.shape == (tokens, out_features) and got.is_contiguous()
    assert max_err(got, ref) <= fp32_gemm_bound(ref, in_features)


def test_pack_linear_weight_layout():
    """The C++ packing and the torch reference agree element for element; zero past out_features."""
    from distilkernels._C import linear_panel_width

    panel = linear_panel_width()
    weight = torch.randn(2 * panel + 3, 11)
    packed = ops.pack_linear_weight(weight)
    assert packed.shape == (3, 11, panel)
    assert torch.equal(packed, reference.pack_linear_weight(weight, panel))
    assert torch.equal(packed[1, 4, 5], weight[panel + 5, 4]) and not packed[2, :, 3:].any()
    x = torch.randn(5, 11)
    with ops.force_backend("torch"):  # the reference backend reads the same layout
        ref = ops.linear_packed(x, ops.pack_linear_weight(weight), weight.shape[0], None, "gelu")
    got = ops.linear_packed(x, packed, weight.shape[0], None, "gelu")
    assert torch.allclose(got, ref, atol=1e-5)


def test_linear_packed_empty_and_no_reduction():
    packed = ops.pack_linear_weight(torch.randn(6, 0))  # in_features 0: x @ W^T is 0, out = act(bias)
    bias = torch.randn(6)
    assert torch.equal(ops.linear_packed(torch.randn(3, 0), packed, 6, bias, "relu"), F.relu(bias).expand(3, 6))
    got = ops.linear_packed(torch.randn(3, 0), packed, 6, bias, "gelu")  # the kernel's own epilogue ran
    assert torch.allclose(got, F.gelu(bias).expand(3, 6), atol=1e-6, rtol=0)
    assert ops.linear_packed(torch.randn(0, 4), ops.pack_linear_weight(torch.randn(6, 4)), 6).shape == (0, 6)


def test_linear_packed_opcheck():
    x, weight, bias = torch.randn(5, 12), torch.randn(37, 12), torch.randn(37)
    torch.library.opcheck(torch.ops.distilkernels.pack_linear_weight.default, (weight,))
    packed = ops.pack_linear_weight(weight)
    for args in ((x, packed, 37, bias, "gelu"), (x, packed, 37, None, "none")):
        torch.library.opcheck(torch.ops.distilkernels.linear_packed.default, args)


def test_linear_packed_bad_input():
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    packed = ops.pack_linear_weight(weight)
    with pytest.raises(ValueError, match="does not hold a \\(5, 6\\) weight"):
        ops.linear_packed(torch.randn(3, 6), packed, 5)
    with pytest.raises(ValueError, match="does not hold"):
        ops.linear_packed(x, packed, 40)
    with pytest.raises(ValueError, match="bias must be None or a float32 tensor of shape \\(5,\\)"):
        ops.linear_packed(x, packed, 5, torch.randn(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear_packed(x, packed, 5, None, "tanh")
    with pytest.raises(ValueError, match="packed_weight must be a 3-D float32 tensor"):
        ops.linear_packed(x, weight, 5)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.linear_packed(x.half(), packed, 5)
    with pytest.raises(TypeError, match="weight must be float32 to be packed"):
        ops.pack_linear_weight(weight.bfloat16())
    # the C++ op checks on its own too
    with pytest.raises(RuntimeError, match="packed_weight must be \\(1, 6, "):
        torch.ops.distilkernels.linear_packed(torch.randn(3, 6), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="packed_weight must be \\(n_panels, in_features, "):
        torch.ops.distilkernels.linear_packed(x, packed[..., :3].contiguous(), 5, None, "none")
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.distilkernels.linear_packed(x, packed, 5, None, "tanh")
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of size 5"):
        torch.ops.distilkernels.linear_packed(x, packed, 5, torch.randn(3), "none")


# ----------------------------------------------------------------------------------------------------------
# linear_bf16 and linear_int8: the GEMMs for the CPU's matrix units (brgemm's VNNI layout where the CPU has
# AMX, vnni=True; torch's bf16 / int8 GEMM on weight^T elsewhere, vnni=False: tested on every CPU)

def _units(dtype):
    from distilkernels._ext import load_extension

    ext = load_extension()
    return ext is not None and ext.matrix_unit_packs(dtype)


LAYOUTS = [False, pytest.param(True, marks=pytest.mark.skipif(not _units("bf16"), reason="needs AMX (bf16)"))]
# The VNNI blocks run on every CPU: AMX tiles where the unit takes int8, elsewhere our AVX512-VNNI dot products
# where the CPU has them or our int16 multiply-adds (int8_layout sets which).
LAYOUTS_INT8 = [False, True]


@pytest.fixture(params=["plain", "dots", "madd"])
def int8_layout(request, monkeypatch):
    """vnni for pack_linear_int8, with the kernel the VNNI blocks take without AMX set: the plain layout (False),
    or the VNNI blocks (True) on AVX512-VNNI dot products (skipped where the CPU has none) or on the int16
    multiply-adds (DISTILKERNELS_INT8_DOTS=0, read by the op on every call)."""
    from distilkernels._ext import load_extension

    monkeypatch.setenv("DISTILKERNELS_INT8_DOTS", "0" if request.param == "madd" else "1")
    if request.param == "dots" and not load_extension().int8_dots():
        pytest.skip("no AVX512-VNNI here: the multiply-adds ran as 'madd'")
    return request.param != "plain"
# Odd K, N, tails. On AMX, in_features a multiple of 32 takes our tile loop (csrc/linear_bf16.cpp), the others
# brgemm: 16-row groups full, partial (17, 33) and odd in number (130 = 64 + 64 + 2), several weight blocks per
# thread (prefetched ahead), a partial last block (129, 200), superblocks of 256 rows, the last one partial (300).
# in_features 1: a (1, n) packed weight whose strides torch's int8 GEMM misread (csrc/linear_int8.cpp int_product).
SHAPES = [(1, 8, 1), (13, 1, 7), (7, 37, 129), (13, 33, 65), (64, 96, 64), (130, 200, 70), (65, 770, 3), (17, 64, 130),
          (130, 160, 200), (33, 768, 129), (300, 128, 130)]


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, in_features, out_features", SHAPES)
@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16_matches_fp64(tokens, in_features, out_features, bias_dtype, activation, vnni):
    """Error vs an fp64 GEMM of the same bf16 inputs within 2x torch's bf16 linear + activation, or within one
    bf16 rounding of the output's magnitude (u = 2^-8), whichever is larger (torch can be exact by chance: one
    output at (1, 8, 1); ours then still rounds its fp32 result once)."""
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features).bfloat16()
    weight = torch.randn(out_features, in_features).bfloat16()
    bias = None if bias_dtype is None else torch.randn(out_features).to(bias_dtype)
    got = ops.linear_bf16(x, ops.pack_linear_bf16(weight, vnni=vnni), out_features, bias, activation)
    ref = reference.activate(F.linear(x.double(), weight.double(), None if bias is None else bias.double()),
                             activation)
    peer = reference.activate(F.linear(x, weight, None if bias is None else bias.bfloat16()), activation)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out_features)
    bound = max(lowp_bound(got, ref, [peer], floor=0.0), ulps(1, magnitude(ref), torch.bfloat16))
    assert max_err(got, ref) <= bound


@pytest.mark.parametrize("vnni", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_bf16_layouts_agree(vnni, threads):
    """The packed layouts give the same result as the torch reference of the plain one, on 1 and 2 threads."""
    torch.manual_seed(1)
    x, weight, bias = torch.randn(200, 160).bfloat16(), torch.randn(300, 160).bfloat16(), torch.randn(300)
    with num_threads(threads):
        got = ops.linear_bf16(x, ops.pack_linear_bf16(weight, vnni=vnni), 300, bias, "gelu")
    ref = reference.linear_bf16(x, reference.pack_linear_bf16(weight, False), 300, bias, "gelu")
    # both round one fp32 result to bf16 (the plain path twice): at most 2 bf16 ulps apart, 2^-7 relative
    assert ((got.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-3).all()


def _bf16_ties(n: int, gen) -> torch.Tensor:
    """n fp32 values: bf16 values, halfway between two of them (ties, which round to even), and just off the
    ties, over a wide range of magnitudes and both signs."""
    base = (torch.randn(n, generator=gen) * 2.0 ** torch.randint(-20, 20, (n,), generator=gen)).bfloat16().float()
    bits = base.view(torch.int32)
    offset = torch.tensor([0, 0x8000, 0x7FFF, 0x8001], dtype=torch.int32).repeat(n // 4 + 1)[:n]
    return (bits + offset).view(torch.float32)


@pytest.mark.parametrize("in_features", [64, 40])  # a multiple of 32 (our AMX loop where there is one), brgemm's
@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16_epilogue_rounds_like_torch(in_features, vnni):
    """With zero weights the output is bf16(activation(bias)) of the fp32 bias: the epilogue's rounding alone,
    bit for bit torch's (to nearest, ties to even), on bias values at and next to the ties, on whichever
    conversion the CPU runs (AVX512-BF16's instruction, or the emulated one)."""
    gen = torch.Generator().manual_seed(7)
    out_features = 200
    bias = _bf16_ties(out_features, gen)
    packed = ops.pack_linear_bf16(torch.zeros(out_features, in_features), vnni=vnni)
    x = torch.randn(37, in_features, generator=gen).bfloat16()
    for activation, act in (("none", lambda t: t), ("relu", torch.relu)):
        got = ops.linear_bf16(x, packed, out_features, bias, activation)
        assert torch.equal(got.view(torch.int16), act(bias).bfloat16().expand(37, -1).view(torch.int16))


@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16_gelu_epilogue_every_input(vnni):
    """With zero weights the output is the epilogue's GELU of the bias: every finite bf16 value, checked value by
    value (the bound is test_bias_act's; on AMX this is the tile loop's epilogue, elsewhere the row kernel)."""
    y = every_finite_bf16()
    packed = ops.pack_linear_bf16(torch.zeros(y.numel(), 64), vnni=vnni)
    got = ops.linear_bf16(torch.randn(3, 64).bfloat16(), packed, y.numel(), y.float(), "gelu")
    for row in got:
        assert_gelu_bf16(row, y)


# linear_bf16_add_layer_norm: LayerNorm(linear_bf16(x) + residual) in one call. Its rows are normalized by the
# thread whose tiles made them (AMX: 1024 rows over 2 threads, every row) or after the GEMM (rows shared between
# threads: 128 rows; 3 threads, some superblocks; every other path): bit for bit the two ops either way.
@pytest.mark.parametrize("tokens", [1, 63, 129, 1024])
@pytest.mark.parametrize("in_features", [64, 3072, 40])  # short and long rows of our tile loop; brgemm's path
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16_add_layer_norm_is_the_two_ops(tokens, in_features, threads, vnni):
    if tokens == 1024 and in_features == 3072 and threads != 2:
        pytest.skip("the long-row superblocks at 1024 rows are covered with 2 threads")
    gen = torch.Generator().manual_seed(tokens + in_features)
    out_features = 96
    x = torch.randn(tokens, in_features, generator=gen).bfloat16()
    packed = ops.pack_linear_bf16(torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5,
                                  vnni=vnni)
    bias, residual = torch.randn(out_features, generator=gen).bfloat16(), torch.randn(tokens, out_features).bfloat16()
    weight, ln_bias = torch.randn(out_features, generator=gen), torch.randn(out_features, generator=gen).bfloat16()
    with num_threads(threads):
        got = ops.linear_bf16_add_layer_norm(x, packed, out_features, bias, residual, weight, ln_bias, 1e-5,
                                             return_stats=True)
        want = ops.add_layer_norm(ops.linear_bf16(x, packed, out_features, bias), residual, weight, ln_bias, 1e-5,
                                  return_stats=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_linear_bf16_add_layer_norm_against_the_reference():
    """The C++ op against the torch backend's composition (reference linear_bf16, then add_layer_norm): the GEMMs
    sum in different orders, so their bf16 outputs may differ by an ulp or two, which the LayerNorm scales by
    rstd * weight; the statistics agree to fp32 rounding of those sums."""
    gen = torch.Generator().manual_seed(11)
    x, weight = torch.randn(70, 48, generator=gen).bfloat16(), torch.randn(33, 48, generator=gen) / 7
    packed = ops.pack_linear_bf16(weight, vnni=False)
    residual, lnw, lnb = torch.randn(70, 33, generator=gen).bfloat16(), torch.rand(33) + 0.5, torch.randn(33)
    got = ops.linear_bf16_add_layer_norm(x, packed, 33, None, residual, lnw, lnb, return_stats=True)
    with ops.force_backend("torch"):
        want = ops.linear_bf16_add_layer_norm(x, packed, 33, None, residual, lnw, lnb, return_stats=True)
    # 2 bf16 ulps (2^-7 relative) of the GEMM's output, times rstd * max|weight|, plus the output's own rounding
    gemm = ops.linear_bf16(x, packed, 33).float()
    bound = 2 * 2.0 ** -7 * gemm.abs().max() * want[2].max() * lnw.max() + ulps(1, magnitude(want[0].double()),
                                                                                  torch.bfloat16)
    assert max_err(got[0], want[0].double()) <= bound
    assert torch.allclose(got[1], want[1], atol=2.0 ** -7 * gemm.abs().max(), rtol=0)


@pytest.mark.requires_ext
def test_linear_bf16_add_layer_norm_raw_op_checks():
    """The C++ op's own checks (called directly, without distilkernels.ops) name the argument."""
    op = torch.ops.distilkernels.linear_bf16_add_layer_norm
    x, packed = torch.randn(3, 4).bfloat16(), ops.pack_linear_bf16(torch.randn(5, 4), vnni=False)
    res, w, b = torch.randn(3, 5).bfloat16(), torch.ones(5), torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"residual must be \(tokens, out_features\) = \(3, 5\)"):
        op(x, packed, 5, None, res[:, :4], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="residual has dtype Float but x has BFloat16"):
        op(x, packed, 5, None, res.float(), w, b, 1e-5)
    with pytest.raises(RuntimeError, match="ln_bias"):
        op(x, packed, 5, None, res, w, b[:4], 1e-5)
    with pytest.raises(RuntimeError, match="out_features must be > 0"):
        op(x, ops.pack_linear_bf16(torch.randn(0, 4), vnni=False), 0, None, res[:, :0], w[:0], b[:0], 1e-5)


def test_linear_bf16_empty_and_zero_k():
    bias = torch.randn(6).bfloat16()
    packed = ops.pack_linear_bf16(torch.randn(6, 0), vnni=False)
    assert torch.equal(ops.linear_bf16(torch.randn(3, 0).bfloat16(), packed, 6, bias, "relu"),
                       F.relu(bias).expand(3, 6))
    packed = ops.pack_linear_bf16(torch.randn(6, 4), vnni=False)
    assert ops.linear_bf16(torch.randn(0, 4).bfloat16(), packed, 6, bias).shape == (0, 6)


def test_linear_bf16_opcheck():
    x, weight, bias = torch.randn(5, 12).bfloat16(), torch.randn(37, 12), torch.randn(37).bfloat16()
    for vnni in (False, True) if _units("bf16") else (False,):
        torch.library.opcheck(torch.ops.distilkernels.pack_linear_bf16.default, (weight, vnni))
        packed = ops.pack_linear_bf16(weight, vnni)
        for args in ((x, packed, 37, bias, "gelu"), (x, packed, 37, None, "none")):
            torch.library.opcheck(torch.ops.distilkernels.linear_bf16.default, args)


def test_linear_bf16_bad_input():
    """The C++ op's own checks (the Python ones, the same on every backend, are rows of test_bad_input.py)."""
    x, weight = torch.randn(3, 4).bfloat16(), torch.randn(5, 4)
    packed = ops.pack_linear_bf16(weight)
    with pytest.raises(RuntimeError, match="packed_weight must be \\(in_features=6, out_features=5\\)"):
        torch.ops.distilkernels.linear_bf16(torch.randn(3, 6).bfloat16(), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of size 5"):
        torch.ops.distilkernels.linear_bf16(x, packed, 5, torch.randn(3), "none")
    if _units("bf16"):
        vnni = ops.pack_linear_bf16(weight, vnni=True)
        with pytest.raises(RuntimeError, match="packed_weight must be \\(2, 4, 64\\) for out_features=70"):
            torch.ops.distilkernels.linear_bf16(x, vnni, 70, None, "none")
    else:
        with pytest.raises(RuntimeError, match="vnni=True needs a CPU whose matrix unit takes bf16"):
            torch.ops.distilkernels.pack_linear_bf16(weight, True)


def _int8_peer(x, weight, bias):
    """torch's own dynamic int8 linear (one activation scale per call), the accuracy a user has today."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        return q(x)


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", SHAPES)
def test_linear_int8_matches_reference(tokens, in_features, out_features, bias, activation, int8_layout):
    """Against the torch reference of the same quantization (integer product exact in fp64): equal up to fp32
    rounding of the dequantization and the GELU approximation (~1e-6 relative); against fp64 of the unquantized
    inputs no worse than 2x torch's dynamic int8 linear."""
    vnni = int8_layout
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features) * torch.rand(tokens, 1) * 4  # tokens of different magnitudes
    weight, b = torch.randn(out_features, in_features) * 0.1, (torch.randn(out_features) if bias else None)
    packed, scale = ops.pack_linear_int8(weight, vnni=vnni)
    got = ops.linear_int8(x, packed, scale, out_features, b, activation)
    ref = reference.linear_int8(x, *reference.pack_linear_int8(weight, False), out_features, b, activation)
    assert got.shape == (tokens, out_features) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1)
    exact = reference.activate(F.linear(x.double(), weight.double(), None if b is None else b.double()), activation)
    peer = reference.activate(_int8_peer(x, weight, b).double(), activation)
    assert (got.double() - exact).abs().max() <= 2 * (peer - exact).abs().max() + 1e-6


@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("tokens, in_features, out_features", SHAPES)
@pytest.mark.parametrize("vnni", LAYOUTS_INT8)
def test_linear_int8_bf16_io(tokens, in_features, out_features, activation, x_dtype, out_dtype, vnni):
    """bf16 x (quantized from its exact fp32 value) and a bf16 output (out_dtype, by default x's): the reference's
    fp32 result, to which ours is equal up to ~1e-5 relative (test above), rounded once to bf16, so at most one
    bf16 rounding (2^-8 relative) apart; fp32 output as above."""
    torch.manual_seed(1)
    x = (torch.randn(tokens, in_features) * torch.rand(tokens, 1) * 4).to(x_dtype)
    weight, b = torch.randn(out_features, in_features) * 0.1, torch.randn(out_features)
    packed, scale = ops.pack_linear_int8(weight, vnni=vnni)
    got = ops.linear_int8(x, packed, scale, out_features, b, activation, out_dtype)
    want_dtype = out_dtype or x_dtype
    ref = reference.linear_int8(x.float(), *reference.pack_linear_int8(weight, False), out_features, b, activation)
    assert got.shape == (tokens, out_features) and got.dtype == want_dtype
    assert torch.equal(reference.linear_int8(x, *reference.pack_linear_int8(weight, False), out_features, b,
                                             activation, out_dtype), ref.to(want_dtype))
    slack = 1e-5 * ref.abs().max().clamp_min(1)
    if want_dtype == torch.bfloat16:
        assert ((got.float() - ref).abs() <= 2 ** -8 * ref.abs() + slack).all()
    else:
        assert (got - ref).abs().max() <= slack


@pytest.mark.parametrize("vnni", LAYOUTS_INT8)
def test_linear_int8_strided_scales(vnni):
    """weight_scale and bias are read as their values whatever their strides (a strided scale was once read as
    if contiguous: wrong numbers, and past its buffer when expanded), on every backend alike."""
    torch.manual_seed(2)
    x, weight, bias = torch.randn(5, 40), torch.randn(70, 40), torch.randn(70)
    packed, scale = ops.pack_linear_int8(weight, vnni=vnni)
    want = ops.linear_int8(x, packed, scale, 70, bias, "gelu")
    strided = torch.stack([scale, torch.full_like(scale, float("nan"))], 1)[:, 0]
    bias_strided = torch.stack([bias, torch.full_like(bias, float("nan"))], 1)[:, 0]
    assert torch.equal(ops.linear_int8(x, packed, strided, 70, bias_strided, "gelu"), want)
    one = torch.full((1,), 0.01)
    expanded = ops.linear_int8(x, packed, one.expand(70), 70, bias, "gelu")
    assert torch.equal(expanded, ops.linear_int8(x, packed, one.expand(70).contiguous(), 70, bias, "gelu"))
    if vnni:  # the torch backend takes the plain layout only
        return
    with ops.force_backend("torch"):
        assert (ops.linear_int8(x, packed, strided, 70, bias_strided, "gelu") - want).abs().max() <= 1e-5 * (
            want.abs().max().clamp_min(1))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vnni", LAYOUTS_INT8)
def test_linear_int8_nan_rows(vnni, x_dtype):
    """A NaN in a token gives NaN in every output of that token, as an fp32 linear does (the quantization's max
    once dropped it and the token came out finite); the other tokens are as without it."""
    torch.manual_seed(3)
    x, weight, bias = torch.randn(4, 70).to(x_dtype), torch.randn(9, 70), torch.randn(9)
    packed, scale = ops.pack_linear_int8(weight, vnni=vnni)
    want = ops.linear_int8(x, packed, scale, 9, bias, "gelu", torch.float32)
    bad = x.clone()
    bad[1, 69] = float("nan")  # in the tail past the vectors
    bad[2, 3] = float("nan")
    got = ops.linear_int8(bad, packed, scale, 9, bias, "gelu", torch.float32)
    assert got[1].isnan().all() and got[2].isnan().all()
    assert torch.equal(got[[0, 3]], want[[0, 3]])


@pytest.mark.parametrize("vnni", LAYOUTS_INT8)
def test_linear_int8_zero_rows_and_empty(vnni):
    x = torch.randn(4, 40)
    x[1] = 0  # an all-zero token: its scale is clamped, its output is the bias
    weight, bias = torch.randn(9, 40), torch.randn(9)
    packed, scale = ops.pack_linear_int8(weight, vnni=vnni)
    got = ops.linear_int8(x, packed, scale, 9, bias, "none")
    assert torch.equal(got[1], bias) and torch.isfinite(got).all()
    assert ops.linear_int8(torch.randn(0, 40), packed, scale, 9, bias).shape == (0, 9)
    packed0, scale0 = ops.pack_linear_int8(torch.randn(9, 0), vnni=False)
    assert torch.equal(ops.linear_int8(torch.randn(2, 0), packed0, scale0, 9, bias, "relu"), F.relu(bias).expand(2, 9))


@pytest.mark.parametrize("tokens, in_features, out_features",
                         [(1, 768, 64), (13, 768, 130), (25, 257, 67), (70, 1, 3), (7, 6, 64)])
def test_linear_int8_product_exact_at_grid_ends(tokens, in_features, out_features, int8_layout):
    """Integer-valued x and weights whose rows reach +-127 get scales of exactly 1, so the output is the integer
    product itself, exact in fp32 while |sum| < 2^24 (768 * 127^2 = 1.24e7). Rows of +-127 throughout are where
    16-bit pair sums of u8 x s8 products saturate (oneDNN's int8 GEMM without VNNI: 2 * 255 * 127 > 2^15). Shapes:
    the row tiles' tails (13 = 12 + 1 = 6 + 6 + 1), partial column blocks (67, 130, 3), in_features padded to 4."""
    vnni = int8_layout
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-127, 128, (tokens, in_features), generator=g).float()
    w = torch.randint(-127, 128, (out_features, in_features), generator=g).float()
    x[:, 0], w[:, 0] = 127, -127  # every row reaches the grid's end
    x[0], w[0], w[-1] = 127, 127, -127
    packed, scale = ops.pack_linear_int8(w, vnni=vnni)
    assert torch.equal(scale, torch.ones(out_features))
    got = ops.linear_int8(x, packed, scale, out_features)
    assert torch.equal(got.double(), x.double() @ w.double().t())


def test_linear_int8_vnni_layout():
    """pack_linear_int8(vnni=True) is W^T in blocks of 64 columns, each (in_features / 4, 64, 4), zero padded: on
    AMX brgemm's own packing, elsewhere ours; the int16 multiply-adds read this layout (gemm_s8_block), so on AMX
    this checks that the two agree."""
    torch.manual_seed(6)
    w = torch.randn(70, 10)
    packed, scale = ops.pack_linear_int8(w, vnni=True)
    q, ref_scale = reference.pack_linear_int8(w, False)  # (10, 70)
    padded = torch.zeros(12, 128, dtype=torch.int8)
    padded[:10, :70] = q
    assert torch.equal(scale, ref_scale)
    assert torch.equal(packed, padded.view(3, 4, 2, 64).permute(2, 0, 3, 1).reshape(2, 12, 64))


def test_linear_int8_opcheck():
    x, weight, bias = torch.randn(5, 12), torch.randn(37, 12), torch.randn(37)
    for vnni in (False, True):
        torch.library.opcheck(torch.ops.distilkernels.pack_linear_int8.default, (weight, vnni))
        packed, scale = ops.pack_linear_int8(weight, vnni)
        for args in ((x, packed, scale, 37, bias, "gelu"), (x, packed, scale, 37, None, "none"),
                     (x, packed, scale, 37, bias, "none", torch.bfloat16), (x.bfloat16(), packed, scale, 37, bias,
                                                                             "relu", torch.float32)):
            torch.library.opcheck(torch.ops.distilkernels.linear_int8.default, args)


def test_linear_int8_bad_input():
    """The C++ op's own checks (the Python ones, the same on every backend, are rows of test_bad_input.py)."""
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    packed, scale = ops.pack_linear_int8(weight)
    with pytest.raises(RuntimeError, match="packed_weight must be \\(in_features=6, out_features=5\\)"):
        torch.ops.distilkernels.linear_int8(torch.randn(3, 6), packed, scale, 5, None, "none")
    with pytest.raises(RuntimeError, match="weight_scale must be \\(out_features,\\) = \\(5,\\)"):
        torch.ops.distilkernels.linear_int8(x, packed, scale[:3], 5, None, "none")
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.distilkernels.linear_int8(x, packed, scale, 5, None, "tanh")
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        torch.ops.distilkernels.linear_int8(x.half(), packed, scale, 5, None, "none")
    with pytest.raises(RuntimeError, match="out_dtype must be float32 or bfloat16, got Half"):
        torch.ops.distilkernels.linear_int8(x, packed, scale, 5, None, "none", torch.float16)
    blocks, _ = ops.pack_linear_int8(weight, vnni=True)  # (1, 4, 64)
    with pytest.raises(RuntimeError, match="packed_weight must be \\(1, 8, 64\\) for out_features=5 and in_features=6"):
        torch.ops.distilkernels.linear_int8(torch.randn(3, 6), blocks, scale, 5, None, "none")


@pytest.mark.parametrize("isa, onednn", [("scalar", None), ("avx2", None), ("avx2", "AVX2")])
def test_bf16_int8_gemms_on_capped_isa(isa, onednn):
    """The instruction-set branches of the epilogues (bf16 rounding, per-token quantization), forced through
    DISTILKERNELS_ISA in a fresh process, against the torch reference. With oneDNN capped to AVX2 as well (a CPU
    without VNNI, whose int8 GEMM in oneDNN saturates 16-bit pair sums), the int8 product must still be exact."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from distilkernels import ops, reference\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(70, 64) * 3; w = torch.randn(67, 64); b = torch.randn(67)\n"
        "for vnni in (False, True) if ops._extension().matrix_unit_packs('bf16') else (False,):\n"
        "    got = ops.linear_bf16(x.bfloat16(), ops.pack_linear_bf16(w, vnni), 67, b, 'gelu').float()\n"
        "    ref = reference.linear_bf16(x.bfloat16(), reference.pack_linear_bf16(w, False), 67, b, 'gelu').float()\n"
        "    assert ((got - ref).abs() <= 2 ** -7 * ref.abs() + 1e-3).all(), (vnni, (got - ref).abs().max())\n"
        "for vnni in (False, True):\n"
        "    got = ops.linear_int8(x, *ops.pack_linear_int8(w, vnni), 67, b, 'relu')\n"
        "    ref = reference.linear_int8(x, *reference.pack_linear_int8(w, False), 67, b, 'relu')\n"
        "    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (vnni, (got - ref).abs().max())\n"
        "    got = ops.linear_int8(x.bfloat16(), *ops.pack_linear_int8(w, vnni), 67, b, 'relu').float()\n"
        "    ref = reference.linear_int8(x.bfloat16().float(), *reference.pack_linear_int8(w, False), 67, b, 'relu')\n"
        "    assert ((got - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all(), vnni\n"
        # the product exact at the grid's ends (scales of 1: the output is the integer product), odd tails
        "xi = torch.randint(-127, 128, (13, 257)).float(); wi = torch.randint(-127, 128, (67, 257)).float()\n"
        "xi[:, 0], wi[:, 0] = 127, -127; xi[0], wi[0] = 127, 127\n"
        "for vnni in (False, True):\n"
        "    got = ops.linear_int8(xi, *ops.pack_linear_int8(wi, vnni), 67)\n"
        "    assert torch.equal(got.double(), xi.double() @ wi.double().t()), vnni\n"
        "print(ops._extension().vector_isa())\n"
    )
    import os

    env = dict(os.environ, DISTILKERNELS_ISA=isa)
    if onednn:
        env.update(ONEDNN_MAX_CPU_ISA=onednn, DISTILKERNELS_MATRIX_UNITS="off")
        script += ("from distilkernels._C import int8_vector_gemm\n"
                   # oneDNN's int8 GEMM without VNNI saturates 16-bit pair sums: inexact on the full grid, so the
                   # model's GEMMs take the VNNI blocks on our multiply-adds
                   "assert int8_vector_gemm() == 'madd', 'oneDNN capped to AVX2 gave an exact int8 GEMM?'\n"
                   "x = torch.randn(70, 768) * 3; w = torch.randn(67, 768); w[5, 7] = 50\n"
                   "for vnni in (False, True):\n"
                   "    got = ops.linear_int8(x, *ops.pack_linear_int8(w, vnni), 67, b, 'relu')\n"
                   "    ref = reference.linear_int8(x, *reference.pack_linear_int8(w, False), 67, b, 'relu')\n"
                   "    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (vnni, (got - ref).abs().max())\n"
                   "print(ops._extension().vector_isa())\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] in (isa, "scalar")  # a CPU without AVX2 caps avx2 to scalar


# ----------------------------------------------------------------------------------------------------------
# linear_mkl (MKL's packed GEMM, one of the kernels distilkernels.gemms measures; internal op)


def _mkl_or_skip():
    from distilkernels._C import mkl_packs

    if not mkl_packs():
        pytest.skip("this torch build does not export MKL's packed GEMM")


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", [
    (1, 8, 1), (37, 37, 129), (128, 64, 200), (300, 800, 64), (1100, 96, 77),  # row counts on both sides of 128
])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row_chunk", [0, 128, 100])  # MKL's threading; ours over rows (even, ragged chunks)
@pytest.mark.parametrize("pack_rows", [128, 512, 1024])
def test_linear_mkl_matches_fp64(tokens, in_features, out_features, bias, activation, threads, row_chunk, pack_rows):
    """The weight is packed once (for pack_rows rows) and used for every row count."""
    _mkl_or_skip()
    torch.manual_seed(0)
    x, weight = torch.randn(tokens, in_features), torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    with num_threads(threads):
        packed = torch.ops.distilkernels.pack_linear_mkl(weight, pack_rows)
        got = torch.ops.distilkernels.linear_mkl(x, packed, out_features, b, activation, row_chunk)
        again = torch.ops.distilkernels.linear_mkl(x[:5], packed, out_features, b, activation, row_chunk)
    ref = reference.activate(F.linear(x.double(), weight.double(), None if b is None else b.double()), activation)
    assert got.shape == (tokens, out_features) and got.is_contiguous()
    assert max_err(got, ref) <= fp32_gemm_bound(ref, in_features)
    assert max_err(again, ref[:5]) <= fp32_gemm_bound(ref, in_features)


_DIRTY_PACK = """
import sys, torch, torch.nn.functional as F, distilkernels
from distilkernels._C import mkl_packed_floats
torch.manual_seed(0)
n, k = int(sys.argv[1]), int(sys.argv[2])
x, weight, bias = torch.randn(200, k), torch.randn(n, k), torch.randn(n)
packed = torch.ops.distilkernels.pack_linear_mkl(weight)
# glibc filled the new block with 0x5a bytes, and they are still there where MKL did not write
assert mkl_packed_floats(n, k) == packed.numel()
assert bool((packed.view(torch.int32) == 0x5A5A5A5A).any()), (n, k, "the packing's block was not filled")
got = torch.ops.distilkernels.linear_mkl(x, packed, n, bias, "none", 0).double()
ref = F.linear(x.double(), weight.double(), bias.double())
bound = 8 * 2.0 ** -24 * k ** 0.5 * (x.double().abs() @ weight.double().abs().T).max().item()
assert (got - ref).abs().max().item() <= bound, (n, k, (got - ref).abs().max().item(), bound)
print("ok")
"""


@pytest.mark.parametrize("out_features, in_features", [(3072, 768), (768, 768), (67, 33)])
def test_linear_mkl_packs_into_dirty_memory(out_features, in_features):
    """pack_linear_mkl does not zero its buffer (MKL writes ~1.1x the weight of the 2.2-4.9x it asks for, and the
    rest of a fresh allocation never becomes resident): a packing made in a dirty block must give the same
    numbers. In a fresh process where glibc fills every block it hands out with 0x5a bytes (MALLOC_PERTURB_) and
    serves these sizes from its heap, where that fill applies (MALLOC_MMAP_THRESHOLD_). Bound: ~sqrt(K) fp32
    roundings of sum |x w|, with a margin of 8."""
    import os
    import platform
    import subprocess
    import sys

    _mkl_or_skip()
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is glibc's")
    env = dict(os.environ, MALLOC_PERTURB_="165", MALLOC_MMAP_THRESHOLD_=str(1 << 30))
    run = subprocess.run([sys.executable, "-c", _DIRTY_PACK, str(out_features), str(in_features)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[-1] == "ok", run.stderr[-2000:]


def test_linear_mkl_fake_and_empty():
    """The fake kernels give the real shapes (opcheck runs ops on copies of their inputs, which an MKL packing
    refuses: see test_linear_mkl_bad_input)."""
    _mkl_or_skip()
    x, weight, bias = torch.randn(5, 12), torch.randn(37, 12), torch.randn(37)
    packed = torch.ops.distilkernels.pack_linear_mkl(weight)
    for rows in (128, 512):
        torch.library.opcheck(torch.ops.distilkernels.pack_linear_mkl.default, (weight, rows),
                              test_utils=("test_faketensor",))
    meta = torch.ops.distilkernels.linear_mkl(x.to("meta"), packed.to("meta"), 37, bias.to("meta"), "gelu")
    assert meta.shape == torch.ops.distilkernels.linear_mkl(x, packed, 37, bias, "gelu").shape == (5, 37)
    assert torch.ops.distilkernels.linear_mkl(torch.randn(0, 12), packed, 37, bias, "gelu").shape == (0, 37)


def test_linear_mkl_bad_input():
    _mkl_or_skip()
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    packed = torch.ops.distilkernels.pack_linear_mkl(weight)
    linear_mkl = torch.ops.distilkernels.linear_mkl
    with pytest.raises(RuntimeError, match="pack_linear_mkl\\(weight\\) of a \\(6, 4\\) weight.*from a \\(5, 4\\)"):
        linear_mkl(x, packed, 6, None, "none")
    with pytest.raises(RuntimeError, match="of a \\(5, 7\\) weight"):
        linear_mkl(torch.randn(3, 7), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="x must be float32"):
        linear_mkl(x.double(), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="bias"):
        linear_mkl(x, packed, 5, torch.randn(4), "none")
    with pytest.raises(RuntimeError, match="activation must be one of"):
        linear_mkl(x, packed, 5, None, "tanh")
    with pytest.raises(RuntimeError, match="row_chunk must be >= 0"):
        linear_mkl(x, packed, 5, None, "none", -1)
    for copied in (packed.clone(), copy.deepcopy(packed), torch.empty(packed.numel() + 1)[1:].copy_(packed)):
        with pytest.raises(RuntimeError, match="cannot be moved or copied"):  # MKL itself would crash
            linear_mkl(x, copied, 5, None, "none")
    with pytest.raises(RuntimeError, match="weight must be float32"):
        torch.ops.distilkernels.pack_linear_mkl(weight.double())
    with pytest.raises(RuntimeError, match="both > 0"):
        torch.ops.distilkernels.pack_linear_mkl(torch.randn(5, 0))
    for rows in (0, -3, (1 << 20) + 1):
        with pytest.raises(RuntimeError, match=r"rows \(the row count to pack for\) must be in 1\.\.1048576"):
            torch.ops.distilkernels.pack_linear_mkl(weight, rows)


@pytest.mark.skipif(not (_units("bf16") and _units("int8")), reason="needs AMX (bf16 and int8)")
@pytest.mark.parametrize("tokens, in_features, out_features", [(1, 64, 64), (17, 128, 130), (130, 192, 200),
                                                               (200, 768, 129), (300, 64, 130), (600, 256, 200),
                                                               (530, 2304, 70), (200, 3072, 70), (130, 3072, 70),
                                                               (70, 3104, 64)])
def test_amx_tile_loop_matches_brgemm(monkeypatch, tokens, in_features, out_features):
    """Our AMX tile loop (csrc/amx_tiles.h) accumulates in brgemm's order: on the same packed weights both give
    the same bits, with bf16 (in_features % 32 == 0) and int8 (% 64 == 0) inputs; DISTILKERNELS_AMX=0, read
    on every call, sends the GEMMs to brgemm. Rows of x longer than the loop's k chunk (bf16 in_features > 1536)
    run in chunks: 2304 and 3072 in two, 3104 in three of unequal length; at 130 tokens on 2 threads a thread's
    tiles of one weight block in a superblock are split between the threads."""
    torch.manual_seed(2)
    x, weight, bias = torch.randn(tokens, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    packed_bf16 = ops.pack_linear_bf16(weight, vnni=True)
    packed_int8 = ops.pack_linear_int8(weight, vnni=True)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DISTILKERNELS_AMX", flag)
        outs[flag] = (ops.linear_bf16(x.bfloat16(), packed_bf16, out_features, bias, "gelu"),
                      ops.linear_int8(x, *packed_int8, out_features, bias, "relu"))
    assert torch.equal(outs["1"][0], outs["0"][0])
    assert torch.equal(outs["1"][1], outs["0"][1])
