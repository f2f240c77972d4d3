"""attention and varlen_attention on every backend (cpp, triton, torch) against an fp64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from distilkernels._ext import load_extension
from helpers import (DTYPES, LOW_PRECISION, assert_lowp, cu_seqlens_of, fused_qkv, kernel_of, magnitude,
                     lowp_bound, make_mask, matrix_unit_attention, bf16_dots_attention, max_err, triton_kernel_runs, ulps)

OPS = torch.ops.distilkernels
requires_ext = pytest.mark.requires_ext


def fp32_out_bound(v: torch.Tensor) -> float:
    """out is a convex combination of v's rows, so its error is relative to max |v|. The probabilities' relative
    error is the scores' absolute error: each score sums head_dim rounded products (rounding errors of random
    sign: ~sqrt(head_dim) roundings of a score of magnitude <= ~10 here), plus ~2 roundings of exp2 and the
    normalisation over <= 2048 keys (~sqrt(keys) roundings). 128 roundings at max |v| covers all of it on any
    summation order (AVX-512, AVX2, scalar, the interpreter)."""
    return ulps(128, magnitude(v))


def check_lse(lse, ref_lse, n_ulps=128):
    """-inf exactly where the reference has it (rows with no key); elsewhere the fp32 log-sum-exp of scores
    computed as for out: 128 roundings at the lse's magnitude (at least 1: log of a sum >= 1 term)."""
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have lse -inf, only them"
    assert (lse[~finite] == float("-inf")).all()
    if finite.any():
        assert max_err(lse[finite], ref_lse[finite]) <= ulps(n_ulps, max(magnitude(ref_lse[finite]), 1.0))


def eager_attention(q, k, v, mask, scale):
    """Attention as transformers' eager DistilBERT computes it in q's dtype: both matmuls in that dtype,
    softmax in fp32 and cast back. reference.attention upcasts everything, so its "same-dtype" error is
    only the final rounding; a kernel that feeds fp16/bf16 probabilities to the P @ V matmul (like
    FlashAttention) is compared with this too."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, vh).transpose(1, 2)


def attention_references(q, k, v, mask, scale):
    """(out64, lse64, [PyTorch's same-dtype outputs]) for q/k/v/mask on any device."""
    out64, lse64 = reference.attention(q.double(), k.double(), v.double(), mask, scale)
    same_dtype = [reference.attention(q, k, v, mask, scale)[0], eager_attention(q, k, v, mask, scale)]
    return out64, lse64, same_dtype


def check_out(out, out64, v, same_dtype, interpreter=False):
    if out.dtype == torch.float32:
        assert max_err(out, out64) <= fp32_out_bound(v)
    else:
        assert_lowp(out, out64, same_dtype, interpreter)


def test_fp64_reference_is_fp64():
    """The fp64 reference the fp32 bounds hold ours to computes in fp64. In fp32 arithmetic it erred as much as
    the kernels do (4.4e-7 on test_attention_backends' fp32 inputs, ours 4.1e-7: the test measured 7.2e-7, the
    two errors together), through whichever fp32 paths torch takes on the machine at hand."""
    q, k, v = fused_qkv(2, 19, 2, 16, torch.float64, seed=3)
    mask = make_mask("holey", 2, 19)
    out, lse = reference.attention(q, k, v, mask, 0.25)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    assert out.dtype == lse.dtype == torch.float64
    assert max_err(out, torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)) <= 1e-12
    assert max_err(lse, torch.logsumexp(scores, -1)) <= 1e-12
    vout, vlse = reference.varlen_attention(q[0], k[0], v[0], cu_seqlens_of([19]), 19, 0.25)
    assert vout.dtype == vlse.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------
# Every backend, through ops.attention / ops.varlen_attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "holey", "left", "right", "empty_row"])
def test_attention_backends(backend, mask_kind, dtype):
    q, k, v = fused_qkv(3, 37, 2, 16, dtype, seed=7)
    mask = make_mask(mask_kind, 3, 37)
    with kernel_of(backend, "attention"):
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, 16 ** -0.5)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == dtype and lse.shape == (3, 2, 37)
    assert not out.isnan().any()
    check_out(out, out64, v, same_dtype, interpreter=backend == "triton")
    check_lse(lse, lse64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_backends(backend, dtype):
    lengths = (9, 0, 40, 1)
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(sum(lengths), 3, 2, 16, generator=g).to(dtype).unbind(1)
    cu_seqlens = cu_seqlens_of(lengths)
    with kernel_of(backend, "varlen_attention"):
        out, lse = ops.varlen_attention(q, k, v, cu_seqlens, max(lengths), return_lse=True)
    out64, lse64 = reference.varlen_attention(q.double(), k.double(), v.double(), cu_seqlens, 40, 0.25)
    same = reference.varlen_attention(q, k, v, cu_seqlens, 40, 0.25)[0]
    assert out.shape == q.shape and lse.shape == (2, sum(lengths))
    check_out(out, out64, v, [same], interpreter=backend == "triton")
    check_lse(lse, lse64)


# ----------------------------------------------------------------------------------------------------------
# cpp: the C++ kernels called directly (torch.ops.distilkernels.*)


def attention_ref64(q, k, v, mask, scale):
    return reference.attention(q.double(), k.double(), v.double(), mask, scale)


@requires_ext
@pytest.mark.parametrize("batch,seqlen", [(1, 1), (3, 7), (1, 127), (3, 129), (1, 512)])
@pytest.mark.parametrize("head_dim", [8, 32, 64, 128])
@pytest.mark.parametrize("mask_kind", [None, "holey", "left", "right"])
def test_cpp_attention_fp32(batch, seqlen, head_dim, mask_kind):
    q, k, v = fused_qkv(batch, seqlen, 2, head_dim)
    mask = make_mask(mask_kind, batch, seqlen)
    out, lse = OPS.attention(q, k, v, mask, head_dim ** -0.5)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, head_dim ** -0.5)
    assert out.is_contiguous() and out.shape == q.shape and lse.shape == (batch, 2, seqlen)
    assert not out.isnan().any()
    assert max_err(out, ref_out) <= fp32_out_bound(v)
    check_lse(lse, ref_lse)


@requires_ext
def test_cpp_attention_fully_masked_rows():
    q, k, v = fused_qkv(2, 9, 3, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out, lse = OPS.attention(q, k, v, mask, 0.25)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert not out.isnan().any() and torch.isfinite(lse[0]).all()


@requires_ext
def test_cpp_attention_long_sequence():
    """2048 keys: several key blocks, online softmax rescaling across them."""
    q, k, v = fused_qkv(1, 2048, 1, 64)
    mask = make_mask("holey", 1, 2048)
    out, lse = OPS.attention(q * 3, k, v, mask, 0.125)  # sharper softmax: the running max changes often
    ref_out, ref_lse = attention_ref64(q * 3, k, v, mask, 0.125)
    assert max_err(out, ref_out) <= fp32_out_bound(v)
    check_lse(lse, ref_lse)


def widely_spread_qkv(dtype, seqlen=96, head_dim=16):
    """Integer q and k (exact in fp32 and bf16, and so are their dot products) whose scores in a row spread over
    ~190 natural-log units: past 2^126 in the kernels' log2 units, where exp2 must give exactly 0, not a
    denormal (nor NaN); v in [-1, 1]. Each row's max score is exact, so the kernels' error stays at rounding."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-3, 4, (1, seqlen, 2, head_dim), generator=g).float()
    k = torch.randint(-3, 4, (1, seqlen, 2, head_dim), generator=g).float()
    k[:, ::3] *= -3  # every third key far below the others for some queries, far above for the rest
    v = torch.rand(1, seqlen, 2, head_dim, generator=g) * 2 - 1
    return (t.to(dtype) for t in (q, k, v))


@requires_ext
@pytest.mark.parametrize("mask_kind", [None, "holey"])
def test_cpp_attention_fp32_widely_spread_scores(mask_kind):
    q, k, v = widely_spread_qkv(torch.float32)
    mask = make_mask(mask_kind, 1, q.shape[1])
    out, lse = OPS.attention(q, k, v, mask, 1.0)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, 1.0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    assert (scores.amax(-1) - scores.amin(-1)).max() > 130, "the scores must spread past 2^126 in log2 units"
    assert not out.isnan().any()
    assert max_err(out, ref_out) <= fp32_out_bound(v)
    check_lse(lse, ref_lse)


@requires_ext
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("mask_kind", [None, "holey"])
def test_cpp_attention_low_precision(dtype, head_dim, mask_kind):
    q, k, v = fused_qkv(2, 129, 3, head_dim, dtype=dtype)
    mask = make_mask(mask_kind, 2, 129)
    out, lse = OPS.attention(q, k, v, mask, head_dim ** -0.5)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, head_dim ** -0.5)
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    torch_out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask)
    assert out.dtype == dtype
    assert_lowp(out, ref_out, [torch_out.transpose(1, 2)])
    check_lse(lse, ref_lse)  # fp32 math on exactly representable inputs: fp32-level error


@requires_ext
def test_cpp_attention_strided_and_contiguous_agree():
    q, k, v = fused_qkv(3, 33, 4, 32)
    mask = make_mask("holey", 3, 33)
    strided = OPS.attention(q, k, v, mask, 0.2)
    dense = OPS.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, 0.2)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


@requires_ext
@pytest.mark.parametrize("lengths", [[1], [7, 0, 129], [64, 65, 3, 512]])
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_varlen_attention(lengths, head_dim, dtype):
    total, n_heads = sum(lengths), 3
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(total, 3, n_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.unbind(1)  # strided (total, n_heads, head_dim) views
    cu_seqlens = cu_seqlens_of(lengths)
    out, lse = OPS.varlen_attention(q, k, v, cu_seqlens, max(lengths), head_dim ** -0.5)
    ref_out, ref_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_seqlens, max(lengths),
                                                  head_dim ** -0.5)
    assert out.shape == q.shape and lse.shape == (n_heads, total)
    if dtype == torch.float32:
        assert max_err(out, ref_out) <= fp32_out_bound(v)
    else:  # fp32 math, one rounding to bf16 at the end (PyTorch's reference in bf16 does the same)
        assert_lowp(out, ref_out, [reference.varlen_attention(q, k, v, cu_seqlens, max(lengths), head_dim ** -0.5)[0]])
    check_lse(lse, ref_lse)


@requires_ext
def test_cpp_varlen_matches_padded():
    """The same sequences padded into a batch give the same numbers: one kernel core serves both ops."""
    q, k, v = fused_qkv(2, 40, 2, 32)
    lengths = [40, 23]
    mask = torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]
    out, _ = OPS.attention(q, k, v, mask, 0.3)
    packed = [torch.cat([t[0, :40], t[1, :23]]) for t in (q, k, v)]
    vout, _ = OPS.varlen_attention(*packed, cu_seqlens_of(lengths), 40, 0.3)
    assert torch.equal(vout[:40], out[0]) and torch.equal(vout[40:], out[1, :23])


# ----------------------------------------------------------------------------------------------------------
# cpp in bf16: the matrix unit (AMX tiles), the same core on AVX512-BF16 dot products (a CPU without AMX: AMD
# Zen 4 and 5) and the blocked fallback an AVX2-only CPU takes. All run in one process: DISTILKERNELS_AMX=0 and
# DISTILKERNELS_BF16_DOTS=0 (read on every call) turn the first two off. Calls with fewer than 8 keys in their
# longest segment take the fallback on all (test_cpp_matrix_unit_min_keys).

# The bf16 bound is assert_lowp's 2x PyTorch's own bf16 error, with an absolute floor of 1e-6 instead of one
# bf16 rounding: both paths round an fp32 result once, so where torch is exact ours is too (seqlen 1: out = v,
# error 0 on both sides), and elsewhere torch's error on random inputs is some bf16 rounding; the floor only
# absorbs the fp64 comparison's own rounding. Measured: ours sits at 0.4-0.5 of the bound, and a one-ulp
# (2^-7 relative) perturbation of the output exceeds it.
BF16_FLOOR = 1e-6
# lse in bf16: fp32 sums of exact bf16 products (no input rounding beyond bf16 itself), so fp32-level error:
# 67 roundings (~4e-6 relative) at the lse's magnitude, stricter than the fp32 tests' 128, where q/k/v
# products themselves round.
BF16_LSE_ULPS = 67
NO_MATRIX_UNIT = "no AMX bf16 tiles or AVX-512 kernels here (DISTILKERNELS_ISA may cap the last)"
NO_DOTS = "no AVX512-BF16 or AVX-512 kernels here (DISTILKERNELS_ISA may cap the last)"


def use_bf16_path(monkeypatch, path: str) -> None:
    """Sets the switches so bf16 attention takes `path`: "matrix_unit" (AMX tiles), "dots" (AVX512-BF16 dot
    products) or "fallback" (the blocked core), skipping where this CPU has no such path."""
    if path == "matrix_unit" and not matrix_unit_attention():
        pytest.skip(NO_MATRIX_UNIT)
    if path == "dots" and not bf16_dots_attention():
        pytest.skip(NO_DOTS)
    for name, on in (("DISTILKERNELS_AMX", path == "matrix_unit"), ("DISTILKERNELS_BF16_DOTS", path == "dots")):
        monkeypatch.setenv(name, "1" if on else "0")


@pytest.fixture(params=["matrix_unit", "dots", "fallback"])
def bf16_path(request, monkeypatch):
    use_bf16_path(monkeypatch, request.param)
    return request.param


def torch_bf16_attention(q, k, v, mask, scale):
    """torch's own bf16 attention (SDPA); fully masked rows (NaN in torch, 0 in ours) are left out by the
    callers through `keep`."""
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask, scale=scale)
    return out.transpose(1, 2)


def assert_bf16_attention(out, ref_out, q, k, v, mask, scale):
    """Every row of ours (fully masked ones included: 0 in both) within the bound from torch's attended rows."""
    keep = mask.any(1) if mask is not None else slice(None)
    bound = lowp_bound(out[keep], ref_out[keep], [torch_bf16_attention(q, k, v, mask, scale)[keep]],
                       floor=BF16_FLOOR)
    assert max_err(out, ref_out) <= bound


@requires_ext
@pytest.mark.parametrize("batch,seqlen,head_dim", [(1, 1, 64), (3, 7, 64), (2, 129, 64), (1, 300, 64),
                                                   (2, 77, 32), (2, 50, 80), (1, 33, 8), (2, 20, 13),
                                                   (2, 45, 96), (2, 40, 128), (1, 24, 256)])
@pytest.mark.parametrize("mask_kind", [None, "holey", "left", "right"])
def test_cpp_attention_bf16(bf16_path, batch, seqlen, head_dim, mask_kind):
    q, k, v = fused_qkv(batch, seqlen, 3, head_dim, torch.bfloat16)
    mask = make_mask(mask_kind, batch, seqlen)
    scale = head_dim ** -0.5
    out, lse = OPS.attention(q, k, v, mask, scale)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, scale)
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == q.shape
    assert not out.isnan().any()
    if mask is not None and not mask.any(1).all():
        assert (out[~mask.any(1)] == 0).all()
    assert_bf16_attention(out, ref_out, q, k, v, mask, scale)
    check_lse(lse, ref_lse, BF16_LSE_ULPS)


@requires_ext
def test_cpp_attention_bf16_widely_spread_scores(bf16_path):
    q, k, v = widely_spread_qkv(torch.bfloat16)
    out, lse = OPS.attention(q, k, v, None, 1.0)
    ref_out, ref_lse = attention_ref64(q, k, v, None, 1.0)
    assert not out.isnan().any()
    assert_bf16_attention(out, ref_out, q, k, v, None, 1.0)
    check_lse(lse, ref_lse, BF16_LSE_ULPS)


@requires_ext
def test_cpp_attention_bf16_long_sequence(bf16_path):
    """2048 keys (16 key blocks): the running max moves often under a sharp softmax."""
    q, k, v = fused_qkv(1, 2048, 2, 64, torch.bfloat16)
    q = q * 3
    mask = make_mask("holey", 1, 2048)
    out, lse = OPS.attention(q, k, v, mask, 0.125)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, 0.125)
    assert_bf16_attention(out, ref_out, q, k, v, mask, 0.125)
    check_lse(lse, ref_lse, BF16_LSE_ULPS)


@requires_ext
@pytest.mark.parametrize("seqlen", [520, 600, 1040])
@pytest.mark.parametrize("head_dim", [64, 80, 13])
@pytest.mark.parametrize("mask_kind", [None, "holey"])
def test_cpp_attention_bf16_key_blocks(bf16_path, seqlen, head_dim, mask_kind):
    """More keys than one 512-key block of the matrix unit (whole blocks of V read in place when unmasked): a
    last block of 8, 88 or 16 keys (padded to 32); head_dim 80 packs V in two column chunks, 13 pads K and V."""
    q, k, v = fused_qkv(1, seqlen, 2, head_dim, torch.bfloat16, seed=seqlen)
    mask = make_mask(mask_kind, 1, seqlen)
    scale = head_dim ** -0.5
    out, lse = OPS.attention(q, k, v, mask, scale)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, scale)
    assert_bf16_attention(out, ref_out, q, k, v, mask, scale)
    check_lse(lse, ref_lse, BF16_LSE_ULPS)


@requires_ext
@pytest.mark.parametrize("seqlen", [33, 530])
def test_cpp_attention_bf16_strided_and_contiguous_agree(bf16_path, seqlen):
    """Q read in place and V packed in place (strided views of a fused projection) give the bits that
    contiguous copies give."""
    q, k, v = fused_qkv(3, seqlen, 2, 64, torch.bfloat16, seed=4)
    strided = OPS.attention(q, k, v, None, 0.125)
    dense = OPS.attention(q.contiguous(), k.contiguous(), v.contiguous(), None, 0.125)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


@requires_ext
@pytest.mark.parametrize("row_stride", [0, 32])
def test_cpp_attention_bf16_overlapping_rows(bf16_path, row_stride):
    """q and v whose token rows overlap (a broadcast row, a stride below head_dim) give the bits of their
    contiguous copies: such rows are copied before the matrix unit reads them."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(4096, generator=g).bfloat16()
    q = base.as_strided((2, 40, 3, 64), (7, row_stride, 64, 1))
    v = base[100:].as_strided((2, 40, 3, 64), (5, row_stride, 64, 1))
    k = torch.randn(2, 40, 3, 64, generator=g).bfloat16()
    strided = OPS.attention(q, k, v, None, 0.125)
    dense = OPS.attention(q.contiguous(), k, v.contiguous(), None, 0.125)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


@requires_ext
@pytest.mark.parametrize("lengths", [[1], [7, 0, 129], [64, 65, 3, 512], [16, 17, 128, 8, 100]])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_cpp_varlen_attention_bf16(bf16_path, lengths, head_dim):
    total, n_heads = sum(lengths), 3
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(total, 3, n_heads, head_dim, generator=gen).bfloat16().unbind(1)
    cu = cu_seqlens_of(lengths)
    scale = head_dim ** -0.5
    out, lse = OPS.varlen_attention(q, k, v, cu, max(lengths), scale)
    ref_out, ref_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu, max(lengths), scale)
    assert out.shape == q.shape and lse.shape == (n_heads, total)
    same_dtype = torch.zeros_like(q)  # torch's bf16 attention, sequence by sequence
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end > start:
            same_dtype[start:end] = torch_bf16_attention(*(t[None, start:end] for t in (q, k, v)), None, scale)[0]
    assert_lowp(out, ref_out, [same_dtype], floor=BF16_FLOOR)
    check_lse(lse, ref_lse, BF16_LSE_ULPS)


@requires_ext
def test_cpp_varlen_matches_padded_bf16(bf16_path):
    """One kernel core per path serves both ops: the same sequences padded into a batch give the same bits."""
    lengths = [5, 70, 33]
    q, k, v = fused_qkv(3, 70, 2, 64, torch.bfloat16, seed=3)
    mask = torch.arange(70)[None, :] < torch.tensor(lengths)[:, None]
    out, lse = OPS.attention(q, k, v, mask, 0.125)
    cu = cu_seqlens_of(lengths)
    packed = [torch.cat([t[b, :n] for b, n in enumerate(lengths)]) for t in (q, k, v)]
    vout, vlse = OPS.varlen_attention(*packed, cu, 70, 0.125)
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, :n], vout[cu[b]:cu[b + 1]])
        assert torch.equal(lse[b, :, :n], vlse[:, cu[b]:cu[b + 1]])


@requires_ext
@pytest.mark.parametrize("path", ["matrix_unit", "dots"])
def test_cpp_matrix_unit_path_is_taken(monkeypatch, path):
    """The matrix-unit core rounds differently from the blocked one (P in bf16): different bits show the switch
    works. 0.05 (a few bf16 roundings of outputs of magnitude ~1) and 1e-4 on the lse (fp32 sums of the same
    products, in another order) say the two still compute the same thing. Tiles and dot products differ only in
    the order of their fp32 sums: within one bf16 rounding of each other."""
    q, k, v = fused_qkv(2, 128, 4, 64, torch.bfloat16)
    use_bf16_path(monkeypatch, path)
    out, lse = (t.clone() for t in OPS.attention(q, k, v, None, 0.125))
    use_bf16_path(monkeypatch, "fallback")
    ref_out, ref_lse = OPS.attention(q, k, v, None, 0.125)
    assert not torch.equal(out, ref_out)
    assert max_err(out, ref_out) < 0.05 and max_err(lse, ref_lse) < 1e-4
    if path == "dots" and matrix_unit_attention():
        use_bf16_path(monkeypatch, "matrix_unit")
        tiles_out, tiles_lse = OPS.attention(q, k, v, None, 0.125)
        assert max_err(out, tiles_out) <= 2 ** -8 * out.abs().max().item() and max_err(lse, tiles_lse) < 1e-5


@requires_ext
@pytest.mark.parametrize("path", ["matrix_unit", "dots"])
@pytest.mark.parametrize("seqlen,matrix_unit", [(7, False), (8, True)])
def test_cpp_matrix_unit_min_keys(monkeypatch, path, seqlen, matrix_unit):
    """Calls whose longest segment has fewer than 8 keys take the blocked core (same bits with the switch on
    or off); from 8 keys on the matrix unit (different rounding of P)."""
    q, k, v = fused_qkv(2, seqlen, 3, 64, torch.bfloat16)
    use_bf16_path(monkeypatch, path)
    default = OPS.attention(q, k, v, None, 0.125)[0].clone()
    use_bf16_path(monkeypatch, "fallback")
    blocked = OPS.attention(q, k, v, None, 0.125)[0]
    assert torch.equal(default, blocked) != matrix_unit


@requires_ext
def test_cpp_attention_fp16_unchanged_by_switch(monkeypatch):
    """fp16 never takes the matrix-unit path: the switches do not change a bit."""
    q, k, v = fused_qkv(2, 65, 2, 64, torch.float16)
    monkeypatch.delenv("DISTILKERNELS_AMX", raising=False)
    monkeypatch.delenv("DISTILKERNELS_BF16_DOTS", raising=False)
    a = [t.clone() for t in OPS.attention(q, k, v, None, 0.125)]
    use_bf16_path(monkeypatch, "fallback")
    b = OPS.attention(q, k, v, None, 0.125)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------
# triton: on CPU tensors under the interpreter, and on a GPU at DistilBERT's real sizes (requires_cuda)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "holey", "left", "empty_row"])
@pytest.mark.parametrize("batch, seqlen, n_heads, head_dim",
                         [(1, 1, 4, 16), (3, 7, 2, 8), (2, 127, 1, 32), (1, 129, 3, 64)])
def test_triton_attention(device, batch, seqlen, n_heads, head_dim, mask_kind, dtype):
    q, k, v = fused_qkv(batch, seqlen, n_heads, head_dim, dtype, device)
    mask = make_mask(mask_kind, batch, seqlen, device)
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, head_dim ** -0.5)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (batch, n_heads, seqlen)
    assert not out.isnan().any()
    check_out(out, out64, v, same_dtype, interpreter=device.type == "cpu")
    check_lse(lse, lse64)
    if mask_kind == "empty_row":
        assert (out[0] == 0).all(), "a query with no key to attend must get zeros"


@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
def test_triton_attention_layouts(device, layout):
    """q/k/v that are not views of one fused tensor: separate contiguous tensors, and (batch, n_heads,
    seqlen, head_dim) storage seen as (batch, seqlen, n_heads, head_dim)."""
    batch, seqlen, n_heads, head_dim = 2, 33, 3, 16
    g = torch.Generator().manual_seed(1)
    shape = (batch, seqlen, n_heads, head_dim) if layout == "contiguous" else (batch, n_heads, seqlen, head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    if layout == "heads_major":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = make_mask("holey", batch, seqlen, device)
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, softmax_scale=0.3, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, 0.3)
    check_out(out, out64, v, same_dtype)
    check_lse(lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads, head_dim", [(1, 8), (2, 64)])
@pytest.mark.parametrize("seqlens", [(1, 17, 50), (5, 0, 3), (0,)])
def test_triton_varlen_attention(device, seqlens, n_heads, head_dim, dtype):
    total = sum(seqlens)
    cu_seqlens = cu_seqlens_of(seqlens, device)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(total, 3, n_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.unbind(1)  # strided views: token stride 3 * n_heads * head_dim
    scale = head_dim ** -0.5
    with triton_kernel_runs("varlen_attention") if total else ops.force_backend("triton"):
        out, lse = ops.varlen_attention(q, k, v, cu_seqlens, max(seqlens), return_lse=True)
    out64, lse64 = reference.varlen_attention(q.double(), k.double(), v.double(), cu_seqlens, max(seqlens), scale)
    same_dtype = [reference.varlen_attention(q, k, v, cu_seqlens, max(seqlens), scale)[0]]
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if end > start:
            same_dtype.append(torch.cat([same_dtype[0][:start],
                                         eager_attention(q[None, start:end], k[None, start:end],
                                                         v[None, start:end], None, scale)[0],
                                         same_dtype[0][end:]]))
    assert out.shape == q.shape and lse.shape == (n_heads, total)
    check_out(out, out64, v, same_dtype, interpreter=device.type == "cpu")
    check_lse(lse, lse64)


def test_triton_varlen_matches_padded(device):
    """Packed sequences give what the padded batch with a right-padding mask gives, token for token."""
    seqlens, n_heads, head_dim = (9, 40, 23), 2, 32
    q, k, v = fused_qkv(len(seqlens), max(seqlens), n_heads, head_dim, torch.float32, device, seed=3)
    mask = torch.arange(max(seqlens), device=device)[None, :] < torch.tensor(seqlens, device=device)[:, None]
    with triton_kernel_runs("attention"), triton_kernel_runs("varlen_attention"):
        padded = ops.attention(q, k, v, mask)
        packed = ops.varlen_attention(q[mask], k[mask], v[mask], cu_seqlens_of(seqlens, device), max(seqlens))
    # one tile loop, but the padded launch visits masked key blocks the packed one skips: rounding may differ
    assert max_err(packed, padded[mask]) <= fp32_out_bound(v)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [128, 512])
def test_triton_real_sizes(device, seqlen, dtype):
    """distilbert-base at batch 32: 12 heads of 64, dim 768, hidden_dim 3072."""
    batch, n_heads, head_dim = 32, 12, 64
    q, k, v = fused_qkv(batch, seqlen, n_heads, head_dim, dtype, device)
    mask = make_mask("holey", batch, seqlen, device)
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, head_dim ** -0.5)
    assert_lowp(out, out64, same_dtype)
    check_lse(lse, lse64)

    x = torch.randn(batch, seqlen, 768, device=device, dtype=dtype)
    weight, bias = torch.randn(768, device=device, dtype=dtype), torch.randn(768, device=device, dtype=dtype)
    with triton_kernel_runs("add_layer_norm"):
        ln = ops.add_layer_norm(x, out.flatten(2), weight, bias, 1e-12)
    ln64 = reference.add_layer_norm(x.double(), out.flatten(2).double(), weight.double(), bias.double(), 1e-12)[0]
    assert_lowp(ln, ln64, [reference.add_layer_norm(x, out.flatten(2), weight, bias, 1e-12)[0]])


# ---- fp32 under torch's "high" float32 matmul precision: the two products as bf16x3 on the AMX tiles ----------

X3_SPLIT_TERMS = 3 * 2.0 ** -18  # per product: what bf16x3 leaves out (tests/ops/test_linear_bf16x3.py)


def x3_out_bound(q, k, v, mask, scale) -> float:
    """out's error under bf16x3 (where the AMX tiles run it; elsewhere fp32's, far inside). Each score (log2
    units, q scaled first) is within X3_SPLIT_TERMS * sum_d |q_d k_d| * scale * log2 e of the exact one, which
    moves each probability by that times ln 2 relative, and out (a convex combination of v's rows) by twice it
    at max |v| (numerator and normaliser); P's own split moves out by X3_SPLIT_TERMS at max |v|. On top, the
    fp32 bound (fp32_out_bound) for the rest of the arithmetic."""
    sums = torch.einsum("bqhd,bkhd->bhqk", q.double().abs(), k.double().abs()) * scale * 1.4426950408889634
    if mask is not None:
        sums = sums.masked_fill(~mask[:, None, None, :], 0.0)
    score_err = X3_SPLIT_TERMS * (sums.max().item() if sums.numel() else 0.0)
    return (2 * 0.6931471805599453 * score_err + X3_SPLIT_TERMS) * magnitude(v) + fp32_out_bound(v)


@pytest.mark.parametrize("batch,seqlen,head_dim", [(1, 1, 64), (3, 7, 64), (2, 129, 64), (1, 300, 64),
                                                   (2, 77, 36), (1, 600, 64), (2, 40, 13)])
@pytest.mark.parametrize("mask_kind", [None, "holey", "left", "right"])
def test_cpp_attention_fp32_under_high_matmul_precision(fp32_matmul_precision, batch, seqlen, head_dim,
                                                        mask_kind):
    """Under "high", fp32 attention may run its two products as bf16x3 (csrc/attention_amx.cpp, where AMX and
    AVX-512 run): out within x3_out_bound of fp64, lse as fp32's bound allows plus the same score error, rows
    without keys as in fp32. Where it ran (a CPU with AMX, 8 keys or more) the result differs from strict fp32's:
    the bound is not met by an unchanged kernel alone."""
    fp32_matmul_precision("high")
    torch.manual_seed(11)
    q, k, v = fused_qkv(batch, seqlen, 4, head_dim)
    mask = None if mask_kind is None else make_mask(mask_kind, batch, seqlen, seed=3)
    scale = head_dim ** -0.5
    out, lse = OPS.attention(q, k, v, mask, scale)
    out64, lse64 = reference.attention(q.double(), k.double(), v.double(), mask, scale)
    valid = torch.ones(batch, seqlen, dtype=torch.bool) if mask is None else mask.any(1, keepdim=True).expand(-1, seqlen)
    assert max_err(out[valid], out64[valid]) <= x3_out_bound(q, k, v, mask, scale)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        score_err = x3_out_bound(q, k, v, mask, scale) / max(magnitude(v), 1e-30)
        assert max_err(lse[finite], lse64[finite]) <= ulps(128, max(magnitude(lse64[finite]), 1.0)) + score_err
    fp32_matmul_precision("highest")
    strict, _ = OPS.attention(q, k, v, mask, scale)
    fp32_matmul_precision("high")
    amx_on = matrix_unit_attention() and load_extension().amx_tiles_enabled()  # DISTILKERNELS_AMX as C++ reads it
    if amx_on and seqlen >= 8 and (mask is None or mask.sum(1).max() >= 8):
        assert not torch.equal(out, strict)


def test_cpp_varlen_attention_fp32_under_high_matmul_precision(fp32_matmul_precision):
    fp32_matmul_precision("high")
    lengths = [64, 65, 3, 512, 0, 9]
    torch.manual_seed(12)
    q, k, v = (torch.randn(sum(lengths), 4, 64) for _ in range(3))
    cu = cu_seqlens_of(lengths)
    out, lse = OPS.varlen_attention(q, k, v, cu, max(lengths), 0.125)
    start = 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            ref, _ = reference.attention(q[None, sl].double(), k[None, sl].double(), v[None, sl].double(), None, 0.125)
            assert max_err(out[sl], ref[0]) <= x3_out_bound(q[None, sl], k[None, sl], v[None, sl], None, 0.125)
        start += n
