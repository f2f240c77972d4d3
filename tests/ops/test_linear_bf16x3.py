"""linear_bf16x3: an fp32 GEMM as three bf16 products (x_hi w_lo + x_lo w_hi + x_hi w_hi, fp32 accumulation) on
every backend, against fp64.

Bound, per output: each value v is split into hi = bf16(v) and lo = bf16(v - hi); v - hi - lo is lo's rounding,
at most 2^-9 |v - hi| <= 2^-18 |v|. The GEMM leaves out x_lo w_lo and both remainders, at most 3 * 2^-18 |x w|
per product, so |ours - exact| <= 3 * 2^-18 sum_k |x_k w_k| plus the fp32 accumulation's error, which is bounded
here by twice torch's fp32 linear's (the same fp32 sums, three times as many terms: torch's error times sqrt(3)
for random rounding, well within 2x), plus a few fp32 roundings at the output's magnitude (bias add, GELU's
erf polynomial: test_bias_act). GELU's slope is at most 1.13. A single bf16 product (2^-9 per factor) would be
off by ~2^-8 / sqrt(K) of sum |x w| per output: 10-40x this bound at these sizes, so the bound tells them apart.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from helpers import magnitude, max_err, num_threads, ulps


def _units_bf16() -> bool:
    from distilkernels._ext import load_extension

    ext = load_extension()
    return ext is not None and ext.matrix_unit_packs("bf16")


# vnni=True: the matrix unit's layout (our AMX tile loop); vnni=False: brgemm's plain bf16 GEMM, every CPU
LAYOUTS = [False, pytest.param(True, marks=pytest.mark.skipif(not _units_bf16(), reason="needs AMX (bf16)"))]
# Odd K, N; in_features not a multiple of 32 (segments padded in the VNNI layout), several weight blocks and
# 16-row groups, partial ones, superblocks of rows, the tile loop's k chunks, in_features in parts (over 1024 in
# the VNNI layout: 1100 in two, 2050 in three of 684, 684 and 682).
SHAPES = [(1, 8, 1), (7, 37, 129), (13, 33, 65), (64, 96, 64), (130, 200, 70), (33, 768, 129), (300, 128, 130),
          (65, 1100, 67), (40, 2050, 70)]
SPLIT_TERMS = 3 * 2.0 ** -18
GELU_SLOPE = 1.13


def _case(tokens, in_features, out_features, bias_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g) / max(in_features, 1) ** 0.5
    bias = None if bias_dtype is None else torch.randn(out_features, generator=g).to(bias_dtype)
    return x, weight, bias


def _bound(x, weight, bias, activation, ref):
    """Per-output bound (module docstring)."""
    sum_abs = x.double().abs() @ weight.double().abs().T
    peer = F.linear(x, weight, None if bias is None else bias.float())
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    fp32_err = max_err(peer, exact)
    slope = GELU_SLOPE if activation == "gelu" else 1.0
    return slope * (SPLIT_TERMS * sum_abs + 2 * fp32_err) + ulps(4, magnitude(ref))


def _check_fp64(tokens, in_features, out_features, bias_dtype, activation, vnni):
    x, weight, bias = _case(tokens, in_features, out_features, bias_dtype)
    got = ops.linear_bf16x3(x, ops.pack_linear_bf16x3(weight, vnni=vnni), out_features, bias, activation)
    ref = reference.activate(F.linear(x.double(), weight.double(), None if bias is None else bias.double()),
                             activation)
    assert got.dtype == torch.float32 and got.shape == (tokens, out_features)
    bound = _bound(x, weight, bias, activation, ref)
    excess = (got.double() - ref).abs() - bound
    assert excess.max().item() <= 0, f"max error over the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, in_features, out_features", SHAPES)
def test_linear_bf16x3_matches_fp64(backend, tokens, in_features, out_features, bias_dtype, activation):
    """The plain layout, every backend."""
    with ops.force_backend(backend):
        _check_fp64(tokens, in_features, out_features, bias_dtype, activation, vnni=False)


@pytest.mark.skipif(not _units_bf16(), reason="needs AMX (bf16)")
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, in_features, out_features", SHAPES)
def test_linear_bf16x3_cpp_vnni_matches_fp64(tokens, in_features, out_features, bias_dtype, activation):
    """The matrix unit's layout (our AMX tile loop), C++ only."""
    _check_fp64(tokens, in_features, out_features, bias_dtype, activation, vnni=True)


def test_linear_bf16x3_is_closer_than_one_bf16_product(backend):
    """The bound above holds for three products and not for one: a single bf16 GEMM of the same inputs breaks it
    (so the bound can fail), while ours is within it."""
    x, weight, bias = _case(64, 512, 96, None, seed=3)
    ref = F.linear(x.double(), weight.double())
    bound = _bound(x, weight, None, "none", ref)
    one_product = F.linear(x.bfloat16().float(), weight.bfloat16().float())
    assert ((one_product.double() - ref).abs() > bound).any()
    with ops.force_backend(backend):
        got = ops.linear_bf16x3(x, ops.pack_linear_bf16x3(weight), 96)
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("vnni", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_bf16x3_cpp_layouts_agree(vnni, threads):
    """Packed layouts and threads against the reference: the same exact products summed in another order (3 K
    fp32 additions at most, each off by 2^-24 of a partial sum no larger than sum |x w|)."""
    x, weight, bias = _case(200, 160, 300, torch.float32, seed=1)
    with num_threads(threads):
        got = ops.linear_bf16x3(x, ops.pack_linear_bf16x3(weight, vnni=vnni), 300, bias, "gelu")
    want = reference.linear_bf16x3(x, reference.pack_linear_bf16x3(weight, False), 300, bias, "gelu")
    sum_abs = x.abs() @ weight.abs().T + bias.abs()
    assert ((got - want).abs() <= GELU_SLOPE * 3 * 160 * 2.0 ** -24 * sum_abs + ulps(4, magnitude(want))).all()


def _split_inputs(n: int, gen) -> torch.Tensor:
    """fp32 values over a wide range of normal magnitudes, both signs, including bf16 values, values exactly
    halfway between two bf16 values (ties: to even) and just off them."""
    base = (torch.randn(n, generator=gen) * 2.0 ** torch.randint(-30, 30, (n,), generator=gen)).bfloat16().float()
    bits = base.view(torch.int32)
    offset = torch.tensor([0, 0x8000, 0x7FFF, 0x8001, 0x1234, 0x4000], dtype=torch.int32).repeat(n // 6 + 1)[:n]
    return (bits + offset).view(torch.float32)


@pytest.mark.parametrize("in_features", [64, 45])
@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16x3_cpp_split_exact(in_features, vnni):
    """With an identity weight (hi = 1, lo = 0) the output is x_hi + x_lo, exact in fp32: the split itself, bit
    for bit the reference's (round to nearest even), on whichever bf16 conversion the CPU runs."""
    gen = torch.Generator().manual_seed(5)
    x = _split_inputs(37 * in_features, gen).view(37, in_features)
    got = ops.linear_bf16x3(x, ops.pack_linear_bf16x3(torch.eye(in_features), vnni=vnni), in_features)
    hi, lo = reference.split_bf16x3(x)
    assert torch.equal(got, hi.float() + lo.float())
    assert ((got.double() - x.double()).abs() <= 2.0 ** -17 * x.double().abs()).all()


@pytest.mark.parametrize("vnni", LAYOUTS)
def test_linear_bf16x3_cpp_non_finite_inputs(vnni):
    """A row of x holding inf or NaN gives non-finite outputs where an fp32 GEMM does (inf * 0 is NaN in both)
    and leaves the other rows as they are without it."""
    x, weight, bias = _case(5, 64, 70, torch.float32, seed=2)
    packed = ops.pack_linear_bf16x3(weight, vnni=vnni)
    clean = ops.linear_bf16x3(x, packed, 70, bias)
    x[1, 3], x[3, 10] = float("inf"), float("nan")
    got = ops.linear_bf16x3(x, packed, 70, bias)
    fp32 = F.linear(x, weight, bias)
    assert torch.equal(got[[0, 2, 4]], clean[[0, 2, 4]])
    assert not got[[1, 3]].isfinite().any() and not fp32[[1, 3]].isfinite().any()


def test_linear_bf16x3_cpp_opcheck():
    x, weight, bias = torch.randn(5, 12), torch.randn(37, 12), torch.randn(37)
    for vnni in (False, True) if _units_bf16() else (False,):
        torch.library.opcheck(torch.ops.distilkernels.pack_linear_bf16x3.default, (weight, vnni))
        packed = ops.pack_linear_bf16x3(weight, vnni)
        for args in ((x, packed, 37, bias, "gelu"), (x, packed, 37, None, "none")):
            torch.library.opcheck(torch.ops.distilkernels.linear_bf16x3.default, args)


def test_linear_bf16x3_cpp_bad_input():
    """The C++ op's own checks (the Python ones, the same on every backend, are rows of test_bad_input.py)."""
    op = torch.ops.distilkernels
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    packed = op.pack_linear_bf16x3(weight, False)
    with pytest.raises(RuntimeError, match="x must be float32, got BFloat16"):
        op.linear_bf16x3(x.bfloat16(), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="packed_weight must be \\(2 \\* in_features=12, out_features=5\\)"):
        op.linear_bf16x3(torch.randn(3, 6), packed, 5, None, "none")
    with pytest.raises(RuntimeError, match="packed_weight must be bfloat16"):
        op.linear_bf16x3(x, packed.float(), 5, None, "none")
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of size 5"):
        op.linear_bf16x3(x, packed, 5, torch.randn(3), "none")
    if _units_bf16():
        vnni = op.pack_linear_bf16x3(weight, True)
        with pytest.raises(RuntimeError, match="packed_weight must be \\(2, 64, 64\\) for out_features=70"):
            op.linear_bf16x3(x, vnni, 70, None, "none")
    else:
        with pytest.raises(RuntimeError, match="vnni=True needs a CPU whose matrix unit takes bf16"):
            op.pack_linear_bf16x3(weight, True)
