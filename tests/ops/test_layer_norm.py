"""add_layer_norm on every backend (cpp, triton, torch) against an fp64 reference.

Outputs are held to PyTorch's own error in the same dtype (2x, `helpers.lowp_bound`; fp32 included: both we and
torch normalize the same fp32 sum h, and what remains is the error of fp32 statistics, which
(h - mean) * rstd * weight amplifies on rows with a large mean). Statistics are fp32 in every dtype.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from helpers import (DTYPES, LOW_PRECISION, assert_lowp, kernel_of, lowp_bound, magnitude, max_err, num_threads,
                     triton_kernel_runs, ulps)

OPS = torch.ops.distilkernels
requires_ext = pytest.mark.requires_ext


def stats_bounds(h: torch.Tensor, dim: int):
    """mean: a sum of dim fp32 values of magnitude <= max|h|, in any order: ~sqrt(dim) roundings for
    random-sign errors, 2 sqrt(dim) + 8 with margin. rstd: relative, 1e-5 (~170 roundings): the variance of
    (h - mean) inherits the mean's error relative to the row's spread, then one sqrt."""
    return ulps(2 * math.sqrt(dim) + 8, magnitude(h)), 1e-5


def out_bound_from_stats(out64, h, weight, mean, rstd, mean64, rstd64) -> float:
    """fp32 output error explained by the statistics the kernel computed (each held to stats_bounds):
    out = (h - mean) * rstd * w + b moves by |d mean| * rstd * |w| and by |d rstd / rstd| * |x_hat| * |w|; on
    top, the subtract, the two multiplies and the add round once each: 4 roundings at the output's magnitude.
    Summation order differs by instruction set (a sequential scalar sum of 768 values errs more than a 16-lane
    one), so the bound follows the statistics rather than a fixed number."""
    w = weight.double().abs().max().item()
    d_mean = max_err(mean, mean64)
    d_rstd = max_err(rstd / rstd64, torch.ones_like(rstd64))
    x_hat = ((h.double() - mean64.unsqueeze(-1)) * rstd64.unsqueeze(-1)).abs().max().item() if h.numel() else 0.0
    return (d_mean * rstd64.max().item() + d_rstd * x_hat) * w * 1.01 + ulps(4, magnitude(out64))


def check(out, mean, rstd, x, residual, weight, bias, eps, interpreter=False):
    as64 = (lambda t: None if t is None else t.double())
    out64, mean64, rstd64 = reference.add_layer_norm(x.double(), as64(residual), weight.double(), bias.double(), eps)
    same_dtype = reference.add_layer_norm(x, residual, weight, bias, eps)[0]
    assert out.shape == x.shape and out.dtype == x.dtype
    assert mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == rstd.dtype == torch.float32
    h = x.float() if residual is None else x.float() + residual.float()
    bound = lowp_bound(out, out64, [same_dtype], interpreter)
    if out.dtype == torch.float32:
        bound = max(bound, out_bound_from_stats(out64, h, weight, mean, rstd, mean64, rstd64))
    assert max_err(out, out64) <= bound
    mean_bound, rstd_rel = stats_bounds(h, x.shape[-1])
    assert max_err(mean, mean64) <= mean_bound
    assert max_err(rstd / rstd64, torch.ones_like(rstd64)) <= rstd_rel


def test_fp64_reference_is_fp64():
    """The fp64 reference computes in fp64 (statistics included), not in fp32 as it does for fp32/fp16/bf16."""
    g = torch.Generator().manual_seed(11)
    x, r = (torch.randn(5, 37, generator=g, dtype=torch.float64) + 100 for _ in range(2))
    w, b = torch.randn(37, generator=g, dtype=torch.float64), torch.randn(37, generator=g, dtype=torch.float64)
    out, mean, rstd = reference.add_layer_norm(x, r, w, b, 1e-5)
    assert out.dtype == mean.dtype == rstd.dtype == torch.float64
    assert max_err(out, F.layer_norm(x + r, (37,), w, b, 1e-5)) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_backends(backend, with_residual, dtype):
    g = torch.Generator().manual_seed(9)
    x, residual = ((torch.randn(4, 5, 77, generator=g) * 2 + 3).to(dtype) for _ in range(2))
    weight, bias = (torch.randn(77, generator=g).to(dtype) for _ in range(2))
    residual = residual if with_residual else None
    with kernel_of(backend, "add_layer_norm"):
        out, mean, rstd = ops.add_layer_norm(x, residual, weight, bias, 1e-5, return_stats=True)
    check(out, mean, rstd, x, residual, weight, bias, 1e-5, interpreter=backend == "triton")


# ----------------------------------------------------------------------------------------------------------
# cpp


@requires_ext
@pytest.mark.parametrize("shape", [(1, 37), (3, 7, 768), (129, 37), (2, 1, 5)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("mean_shift", [0.0, 100.0])
def test_cpp_add_layer_norm_fp32(shape, with_residual, mean_shift):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 3 + mean_shift
    residual = torch.randn(shape, generator=gen) if with_residual else None
    weight, bias = torch.randn(shape[-1], generator=gen), torch.randn(shape[-1], generator=gen)
    out, mean, rstd = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    h = x if residual is None else x + residual
    ref_out, ref_mean, ref_rstd = reference.add_layer_norm(h.double(), None, weight.double(), bias.double(), 1e-5)
    # Ours must be no worse than torch's own fp32 LayerNorm of the same h (1.5x), or than what our statistics'
    # errors (bounded below) explain.
    torch_err = max_err(F.layer_norm(h, (shape[-1],), weight, bias, 1e-5), ref_out)
    from_stats = out_bound_from_stats(ref_out, h, weight, mean, rstd, ref_mean, ref_rstd)
    assert max_err(out, ref_out) <= max(1.5 * torch_err, from_stats)
    mean_bound, rstd_rel = stats_bounds(h, shape[-1])
    assert max_err(mean, ref_mean) <= mean_bound
    assert max_err(rstd, ref_rstd) <= rstd_rel * ref_rstd.abs().max().item()
    assert mean.shape == shape[:-1] and rstd.dtype == torch.float32


@requires_ext
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [37, 768])
def test_cpp_add_layer_norm_low_precision(dtype, dim):
    gen = torch.Generator().manual_seed(2)
    x, residual = torch.randn(17, dim, generator=gen).to(dtype), torch.randn(17, dim, generator=gen).to(dtype)
    weight, bias = torch.randn(dim, generator=gen).to(dtype), torch.randn(dim, generator=gen).to(dtype)
    out, _, _ = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    ref, _, _ = reference.add_layer_norm(x.double(), residual.double(), weight.double(), bias.double(), 1e-5)
    assert out.dtype == dtype
    assert max_err(out, ref) <= lowp_bound(out, ref, [F.layer_norm(x + residual, (dim,), weight, bias, 1e-5)])


@requires_ext
def test_cpp_add_layer_norm_non_contiguous():
    base = torch.randn(6, 40)
    x, residual = base[:, :37], torch.randn(37, 6).t()
    weight, bias = torch.randn(37), torch.randn(37)
    out, _, _ = OPS.add_layer_norm(x, residual, weight, bias, 1e-12)
    ref, _, _ = reference.add_layer_norm(x.double(), residual.double(), weight.double(), bias.double(), 1e-12)
    assert out.is_contiguous()
    # the fp32 sum h rounds once (1 ulp of |h|), then * rstd * |w|: 8 roundings at the output's magnitude
    assert max_err(out, ref) <= ulps(8, magnitude(ref))


@requires_ext
@pytest.mark.parametrize("dim", [1, 37, 768, 1024])
@pytest.mark.parametrize("with_residual", [True, False])
def test_cpp_add_layer_norm_bf16(dim, with_residual):
    """bf16 in and out, fp32 only in registers and a scratch row: output within 2x torch's bf16 LayerNorm error, floor 1e-6 rather
    than one bf16 rounding: ours rounds an fp32 result once, so where torch is exact ours is too (dim 1:
    out = bias), and elsewhere torch's error is some bf16 rounding; the floor only absorbs the fp64 comparison.
    Statistics are fp32 of an exact fp32 sum of two bf16 values, so fp32-level relative error: 1e-5 (~170
    roundings) of the mean's magnitude (at least 1) and of rstd."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(33, dim, generator=gen) * 4 + 3).bfloat16()
    residual = torch.randn(33, dim, generator=gen).bfloat16() if with_residual else None
    weight, bias = torch.randn(dim, generator=gen).bfloat16(), torch.randn(dim, generator=gen).bfloat16()
    out, mean, rstd = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    r64 = None if residual is None else residual.double()
    ref, ref_mean, ref_rstd = reference.add_layer_norm(x.double(), r64, weight.double(), bias.double(), 1e-5)
    h = x if residual is None else x + residual
    assert out.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    assert_lowp(out, ref, [F.layer_norm(h, (dim,), weight, bias, 1e-5)], floor=1e-6)
    assert max_err(mean, ref_mean) <= 1e-5 * max(1.0, ref_mean.abs().max().item())
    assert max_err(rstd, ref_rstd) <= 1e-5 * ref_rstd.abs().max().item()


@requires_ext
@pytest.mark.parametrize("dim", [37, 768])
def test_cpp_add_layer_norm_bf16_rounds_like_torch(dim):
    """With a zero weight the output is bf16(bias) of the fp32 bias (the normalized row times 0, plus bias, is
    exact): the output's rounding alone, bit for bit torch's (to nearest, ties to even) on bias values at and
    next to the ties, on whichever conversion the CPU runs (AVX512-BF16's instruction, or the emulated one)."""
    gen = torch.Generator().manual_seed(8)
    base = (torch.randn(dim, generator=gen) * 2.0 ** torch.randint(-20, 20, (dim,), generator=gen)).bfloat16()
    offset = torch.tensor([0, 0x8000, 0x7FFF, 0x8001], dtype=torch.int32).repeat(dim // 4 + 1)[:dim]
    bias = (base.float().view(torch.int32) + offset).view(torch.float32)
    x = torch.randn(5, dim, generator=gen).bfloat16()
    out, _, _ = OPS.add_layer_norm(x, x, torch.zeros(dim), bias, 1e-5)
    assert torch.equal(out.view(torch.int16), bias.bfloat16().expand(5, -1).view(torch.int16))


# ----------------------------------------------------------------------------------------------------------
# triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dim", [37, 768, 4096])
def test_triton_add_layer_norm(device, dim, with_residual, dtype):
    g = torch.Generator().manual_seed(4)
    x, residual = ((torch.randn(2, 3, dim, generator=g) * 2 + 1).to(device=device, dtype=dtype) for _ in range(2))
    weight, bias = (torch.randn(dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    residual = residual if with_residual else None
    with triton_kernel_runs("add_layer_norm"):
        out, mean, rstd = ops.add_layer_norm(x, residual, weight, bias, 1e-12, return_stats=True)
    check(out, mean, rstd, x, residual, weight, bias, 1e-12, interpreter=device.type == "cpu")


# ----------------------------------------------------------------------------------------------------------
# embed_layer_norm: an embedding layer's gathers, sum and LayerNorm in one pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_types", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_embed_layer_norm_matches_fp64(backend, dtype, token_types, threads):
    """Against the fp64 LayerNorm of what HF sums: word (+ token type, that sum rounded to the tables' dtype as
    HF rounds it) + position. Odd sizes; position ids shared by the batch (1, seqlen) and shifted; repeated ids.
    Held to add_layer_norm's bounds (check above), which the same sum and normalization obey."""
    g = torch.Generator().manual_seed(5)
    dim, batch, seqlen = 37, 3, 11
    word = (torch.randn(23, dim, generator=g) * 2).to(dtype)
    position = torch.randn(17, dim, generator=g).to(dtype)
    token_type = torch.randn(3, dim, generator=g).to(dtype) if token_types else None
    ids = torch.randint(0, 23, (batch, seqlen), generator=g)
    ids[1, :4] = ids[0, :4]  # repeated rows
    position_ids = torch.arange(4, 4 + seqlen)[None]
    type_ids = torch.randint(0, 3, (batch, seqlen), generator=g) if token_types else None
    weight, bias = (torch.randn(dim, generator=g).to(dtype) for _ in range(2))
    with num_threads(threads), ops.force_backend(backend):
        out, mean, rstd = ops.embed_layer_norm(word, ids, position, position_ids, token_type, type_ids, weight,
                                               bias, 1e-5, return_stats=True)
    x = F.embedding(ids, word)
    if token_types:
        x = x + F.embedding(type_ids, token_type)
    residual = F.embedding(position_ids.expand(batch, seqlen), position)
    assert out.shape == (batch, seqlen, dim)
    check(out, mean, rstd, x, residual, weight, bias, 1e-5)


@requires_ext
def test_embed_layer_norm_int32_ids(backend):
    """int32 ids (torch.nn.Embedding takes them too) give what int64 ids give, bit for bit, through the op and
    through the raw C++ op, whose range check sees them as well."""
    g = torch.Generator().manual_seed(6)
    word, position, token_type = torch.randn(23, 8, generator=g), torch.randn(9, 8), torch.randn(2, 8)
    ids, pos, types = torch.randint(0, 23, (2, 9), generator=g), torch.arange(9)[None], torch.ones(2, 9).long()
    ln = (torch.randn(8, generator=g), torch.randn(8, generator=g))
    with ops.force_backend(backend):
        want = ops.embed_layer_norm(word, ids, position, pos, token_type, types, *ln)
        got = ops.embed_layer_norm(word, ids.int(), position, pos.int(), token_type, types.int(), *ln)
    assert torch.equal(got, want)
    if backend == "cpp":
        raw = OPS.embed_layer_norm(word, ids.int(), position, pos.int().expand(2, 9), token_type, types.int(), *ln,
                                   1e-12)[0]
        assert torch.equal(raw, want)
        past = ids.int().clone()
        past[1, 3] = 23
        with pytest.raises(IndexError, match="input_ids holds 23, out of range"):
            OPS.embed_layer_norm(word, past, position, pos.expand(2, 9), None, None, *ln, 1e-12)


def test_embed_layer_norm_raw_op_rejects_indices_past_the_table():
    """The C++ op checks every index itself (a raw call skips distilkernels.ops' checks): an index past a table
    would read beyond it."""
    word, ids, ln = torch.randn(5, 6), torch.tensor([[0, 4]]), (torch.ones(6), torch.zeros(6))
    for bad_ids, bad_positions, message in ((ids + 1, ids, "input_ids holds 5, out of range for the 5 rows of word"),
                                            (ids, ids - 1, "position_ids holds -1, out of range for the 5 rows")):
        with pytest.raises(IndexError, match=message):
            OPS.embed_layer_norm(word, bad_ids, word, bad_positions, None, None, *ln, 1e-5)
    with pytest.raises(IndexError, match="token_type_ids holds 2, out of range for the 2 rows of token_type"):
        OPS.embed_layer_norm(word, ids, word, ids, torch.randn(2, 6), ids.clamp(max=2), *ln, 1e-5)
