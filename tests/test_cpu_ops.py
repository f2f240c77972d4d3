"""The C++ CPU kernels (torch.ops.distilkernels.*) against distilkernels.reference run in fp64.

fp32: our max-abs error vs the fp64 reference is bounded by an absolute tolerance with a comment on why.
bf16/fp16: our error vs fp64 must be <= 2x the error of PyTorch's own computation in the same dtype (plus a
floor of one fp32-level rounding, so an exact torch result does not demand an exact one from us).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from distilkernels._ext import load_extension

pytestmark = pytest.mark.requires_ext

OPS = torch.ops.distilkernels
LOW_PRECISION = (torch.bfloat16, torch.float16)


def fused_qkv(batch, seqlen, n_heads, head_dim, dtype=torch.float32, seed=0):
    """q, k, v: (batch, seqlen, n_heads, head_dim) strided views of one (batch * seqlen, 3 * dim) projection."""
    gen = torch.Generator().manual_seed(seed)
    dim = n_heads * head_dim
    qkv = torch.randn(batch * seqlen, 3 * dim, generator=gen).to(dtype)
    return tuple(t.view(batch, seqlen, n_heads, head_dim) for t in qkv.split(dim, dim=1))


def make_mask(kind, batch, seqlen, seed=0):
    """(batch, seqlen) bool, True = attend. Row 0 always keeps at least one key."""
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "holes":  # any 0/1 pattern
        mask = torch.rand(batch, seqlen, generator=gen) > 0.4
        mask[:, 0] = True
    elif kind == "left":  # left padding
        starts = torch.randint(0, seqlen, (batch,), generator=gen)
        mask = torch.arange(seqlen)[None, :] >= starts[:, None]
    else:  # right padding with one fully masked row (when batch > 1)
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
        mask = torch.arange(seqlen)[None, :] < lengths[:, None]
        mask[-1] = batch == 1
    return mask


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# add_layer_norm


@pytest.mark.parametrize("shape", [(1, 37), (3, 7, 768), (129, 37), (2, 1, 5)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("mean_shift", [0.0, 100.0])
def test_add_layer_norm_fp32(shape, with_residual, mean_shift):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 3 + mean_shift
    residual = torch.randn(shape, generator=gen) if with_residual else None
    weight, bias = torch.randn(shape[-1], generator=gen), torch.randn(shape[-1], generator=gen)
    out, mean, rstd = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    h = x if residual is None else x + residual
    ref_out, ref_mean, ref_rstd = reference.add_layer_norm(h.double(), None, weight.double(), bias.double(), 1e-5)
    # Both we and torch normalize the same fp32 sum h; what remains is the error of fp32 statistics, which
    # (h - mean) * rstd * weight amplifies on rows with a large mean. Ours must be no worse than torch's.
    torch_err = max_err(F.layer_norm(h, (shape[-1],), weight, bias, 1e-5), ref_out)
    assert max_err(out, ref_out) <= 1.5 * max(torch_err, 1e-6)
    assert max_err(mean, ref_mean) <= 2e-6 * (1 + mean_shift)  # ~2 ulps of the row mean in fp32
    assert max_err(rstd, ref_rstd) <= 1e-5 * ref_rstd.abs().max().item()  # fp32 sqrt of an fp32 variance
    assert mean.shape == shape[:-1] and rstd.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [37, 768])
def test_add_layer_norm_low_precision(dtype, dim):
    gen = torch.Generator().manual_seed(2)
    x, residual = torch.randn(17, dim, generator=gen).to(dtype), torch.randn(17, dim, generator=gen).to(dtype)
    weight, bias = torch.randn(dim, generator=gen).to(dtype), torch.randn(dim, generator=gen).to(dtype)
    out, _, _ = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    ref, _, _ = reference.add_layer_norm(x.double(), residual.double(), weight.double(), bias.double(), 1e-5)
    torch_err = max_err(F.layer_norm(x + residual, (dim,), weight, bias, 1e-5), ref)
    assert out.dtype == dtype
    assert max_err(out, ref) <= 2 * torch_err + 1e-6  # flash-attention's rule: <= 2x torch's own error


def test_add_layer_norm_non_contiguous():
    base = torch.randn(6, 40)
    x, residual = base[:, :37], torch.randn(37, 6).t()
    weight, bias = torch.randn(37), torch.randn(37)
    out, _, _ = OPS.add_layer_norm(x, residual, weight, bias, 1e-12)
    ref, _, _ = reference.add_layer_norm(x.double(), residual.double(), weight.double(), bias.double(), 1e-12)
    assert out.is_contiguous()
    assert max_err(out, ref) <= 1e-5  # fp32 sum h rounds to 1 ulp (~5e-7 here) times |w| * rstd


# ----------------------------------------------------------------------------------------------------------
# bias_act_


@pytest.mark.parametrize("shape", [(1, 7), (5, 3072), (3, 2, 37)])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_bias_act_fp32(shape, activation):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 4  # covers both erf branches (|x| < 0.75 and beyond) and the tails
    bias = torch.randn(shape[-1], generator=gen)
    expected = F.gelu(x + bias) if activation == "gelu" else torch.relu(x + bias)
    y = x.clone()
    OPS.bias_act_(y, bias, activation)
    # erf is a fitted polynomial with max abs error 1.2e-7; gelu(y) = y * Phi(y) scales it by |y| <= ~15.
    assert max_err(y, expected) <= 1e-6


def test_gelu_wide_range():
    x = torch.linspace(-20, 20, 100_003)
    y = x.clone()
    OPS.bias_act_(y, torch.zeros(100_003), "gelu")
    exact = F.gelu(x.double())
    # Relative to fp32 rounding of values up to 20 (ulp 1.9e-6): 1 ulp plus the erf fit error times |x|.
    assert max_err(y, exact) <= 2e-6
    assert not y.isnan().any()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_bias_act_low_precision(dtype, activation):
    gen = torch.Generator().manual_seed(4)
    x, bias = (torch.randn(9, 3072, generator=gen) * 3).to(dtype), torch.randn(3072, generator=gen).to(dtype)
    act = F.gelu if activation == "gelu" else torch.relu
    ref = act(x.double() + bias.double())
    torch_err = max_err(act(x + bias), ref)
    y = x.clone()
    OPS.bias_act_(y, bias, activation)
    assert max_err(y, ref) <= 2 * torch_err + 1e-6  # ours rounds once (fp32 math), torch rounds x + b too


# ----------------------------------------------------------------------------------------------------------
# attention


def attention_ref64(q, k, v, mask, scale):
    return reference.attention(q.double(), k.double(), v.double(), mask, scale)


def check_lse(lse, ref_lse, atol):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    if finite.any():
        assert max_err(lse[finite], ref_lse[finite]) <= atol


@pytest.mark.parametrize("batch,seqlen", [(1, 1), (3, 7), (1, 127), (3, 129), (1, 512)])
@pytest.mark.parametrize("head_dim", [8, 32, 64, 128])
@pytest.mark.parametrize("mask_kind", [None, "holes", "left", "right"])
def test_attention_fp32(batch, seqlen, head_dim, mask_kind):
    q, k, v = fused_qkv(batch, seqlen, 2, head_dim)
    mask = make_mask(mask_kind, batch, seqlen)
    out, lse = OPS.attention(q, k, v, mask, head_dim ** -0.5)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, head_dim ** -0.5)
    assert out.is_contiguous() and out.shape == q.shape and lse.shape == (batch, 2, seqlen)
    assert not out.isnan().any()
    # fp32 scores with exp2 (rel. error ~2e-7) over <= 512 keys of unit-variance values: ~1e-6 observed.
    assert max_err(out, ref_out) <= 1e-5
    check_lse(lse, ref_lse, 1e-5)


def test_attention_fully_masked_rows():
    q, k, v = fused_qkv(2, 9, 3, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out, lse = OPS.attention(q, k, v, mask, 0.25)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert not out.isnan().any() and torch.isfinite(lse[0]).all()


def test_attention_long_sequence():
    """2048 keys: several key blocks, online softmax rescaling across them."""
    q, k, v = fused_qkv(1, 2048, 1, 64)
    mask = make_mask("holes", 1, 2048)
    out, lse = OPS.attention(q * 3, k, v, mask, 0.125)  # sharper softmax: the running max changes often
    ref_out, ref_lse = attention_ref64(q * 3, k, v, mask, 0.125)
    assert max_err(out, ref_out) <= 1e-5  # as in test_attention_fp32
    check_lse(lse, ref_lse, 1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("mask_kind", [None, "holes"])
def test_attention_low_precision(dtype, head_dim, mask_kind):
    q, k, v = fused_qkv(2, 129, 3, head_dim, dtype=dtype)
    mask = make_mask(mask_kind, 2, 129)
    out, lse = OPS.attention(q, k, v, mask, head_dim ** -0.5)
    ref_out, ref_lse = attention_ref64(q, k, v, mask, head_dim ** -0.5)
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    torch_out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask)
    torch_err = max_err(torch_out.transpose(1, 2), ref_out)
    assert out.dtype == dtype
    assert max_err(out, ref_out) <= 2 * torch_err + 1e-6  # flash-attention's rule
    check_lse(lse, ref_lse, 1e-5)  # fp32 math on exactly representable inputs: fp32-level error


def test_attention_strided_and_contiguous_agree():
    q, k, v = fused_qkv(3, 33, 4, 32)
    mask = make_mask("holes", 3, 33)
    strided = OPS.attention(q, k, v, mask, 0.2)
    dense = OPS.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, 0.2)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])


# ----------------------------------------------------------------------------------------------------------
# varlen_attention


@pytest.mark.parametrize("lengths", [[1], [7, 0, 129], [64, 65, 3, 512]])
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention(lengths, head_dim, dtype):
    total, n_heads = sum(lengths), 3
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(total, 3, n_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.unbind(1)  # strided (total, n_heads, head_dim) views
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out, lse = OPS.varlen_attention(q, k, v, cu_seqlens, max(lengths), head_dim ** -0.5)
    ref_out, ref_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu_seqlens, max(lengths),
                                                  head_dim ** -0.5)
    assert out.shape == q.shape and lse.shape == (n_heads, total)
    # fp32: as test_attention_fp32; bf16: the output rounds once to bf16 (half an ulp of |out| <= ~2: 4e-3).
    assert max_err(out, ref_out) <= (1e-5 if dtype == torch.float32 else 8e-3)
    check_lse(lse, ref_lse, 1e-5)


def test_varlen_matches_padded():
    """The same sequences padded into a batch give the same numbers: one kernel core serves both ops."""
    q, k, v = fused_qkv(2, 40, 2, 32)
    lengths = [40, 23]
    mask = torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]
    out, _ = OPS.attention(q, k, v, mask, 0.3)
    packed = [torch.cat([t[0, :40], t[1, :23]]) for t in (q, k, v)]
    cu_seqlens = torch.tensor([0, 40, 63], dtype=torch.int32)
    vout, _ = OPS.varlen_attention(*packed, cu_seqlens, 40, 0.3)
    assert torch.equal(vout[:40], out[0]) and torch.equal(vout[40:], out[1, :23])


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (128, 768), (3, 3072), (0, 4), (2, 0)])
def test_normalize_and_scale_rows(shape):
    """Per-token int8 scaling: rows scaled to max-abs 1 and back (exact up to one fp32 rounding each way)."""
    def max_err(a, b):
        return (a.double() - b).abs().max().item() if a.numel() else 0.0

    x = torch.randn(shape) * 3
    if shape[0] > 1:
        x[1] = 0  # an all-zero row gets the floor scale, not a division by zero
    out, scale = OPS.normalize_rows(x)
    assert scale.shape == (shape[0],) and out.shape == x.shape
    assert torch.equal(scale, reference.normalize_rows(x)[1])  # a max is exact
    assert max_err(out, x.double() / scale.double()[:, None]) <= 2 ** -23  # |out| <= 1: one rounding
    if shape[0] > 1 and shape[1] > 0:
        assert scale[1].item() == pytest.approx(1e-12) and (out[1] == 0).all()
        assert out[0].abs().max().item() == pytest.approx(1.0, abs=2 ** -23)
    for bias in (None, torch.randn(shape[1])):
        y = torch.randn(shape)
        ref = y.double() * scale.double()[:, None] + (0 if bias is None else bias.double())
        got = y.clone()
        OPS.scale_rows_(got, scale, bias)
        assert max_err(got, ref) <= 4 * 2 ** -24 * (ref.abs().max().item() + 1 if ref.numel() else 1)


def test_bad_inputs():
    q, k, v = fused_qkv(2, 5, 2, 8)
    with pytest.raises(RuntimeError, match="key_padding_mask must be \\(batch, seqlen\\)"):
        OPS.attention(q, k, v, torch.ones(2, 4, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        OPS.attention(q, k, v, torch.ones(2, 5), 1.0)
    with pytest.raises(RuntimeError, match="dtypes must match"):
        OPS.attention(q, k.double().float().half(), v, None, 1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        OPS.attention(q, k, torch.randn(2, 5, 2, 16)[..., ::2], None, 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        OPS.attention(q, k[:, :4], v, None, 1.0)
    with pytest.raises(RuntimeError, match="4 dims"):
        OPS.attention(q[0], k[0], v[0], None, 1.0)
    with pytest.raises(RuntimeError, match="head_dim"):
        big = torch.randn(1, 2, 1, 257)
        OPS.attention(big, big, big, None, 1.0)
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor of size 6"):
        OPS.add_layer_norm(x, None, torch.ones(5), torch.zeros(6), 1e-5)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        OPS.add_layer_norm(x, x.half(), torch.ones(6), torch.zeros(6), 1e-5)
    with pytest.raises(RuntimeError, match="activation must be"):
        OPS.bias_act_(x, torch.zeros(6), "tanh")
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.bias_act_(x.t(), torch.zeros(4), "relu")
    with pytest.raises(RuntimeError, match="bias has dtype"):
        OPS.bias_act_(x, torch.zeros(6, dtype=torch.bfloat16), "relu")
    with pytest.raises(RuntimeError, match="x must be float32"):
        OPS.normalize_rows(x.bfloat16())
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        OPS.normalize_rows(x[0])
    with pytest.raises(RuntimeError, match="scale must be a 1-D tensor of size 4"):
        OPS.scale_rows_(x, torch.ones(6), None)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of size 6"):
        OPS.scale_rows_(x, torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.scale_rows_(x.t(), torch.ones(6), None)
    with pytest.raises(ValueError, match="scale must be a float32 tensor of shape \\(4,\\)"):
        ops.scale_rows_(x, torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be float32"):
        ops.normalize_rows(x.half())


def test_bad_inputs_meta_device():
    # A meta tensor sends the raw op to its fake kernel (the dispatcher's choice), so mixed devices are caught
    # by the functional API before any kernel runs.
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        ops.add_layer_norm(x, None, torch.ones(6, device="meta"), torch.zeros(6), 1e-5)
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="device"):
        ops.attention(q, q.to("meta"), q)


@pytest.mark.parametrize("bounds,message", [
    ([0, 3, 2, 5], "non-decreasing"),
    ([0, 2, 4], "must equal total_tokens"),
    ([1, 5], "cu_seqlens\\[0\\] must be 0"),
    ([0, 3, 9], "must equal total_tokens"),
])
def test_bad_cu_seqlens(bounds, message):
    q = torch.randn(5, 2, 8)
    with pytest.raises(RuntimeError, match=message):
        OPS.varlen_attention(q, q, q, torch.tensor(bounds, dtype=torch.int32), 5, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        OPS.varlen_attention(q, q, q, torch.tensor([0, 5]), 5, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Registration, compile, build and dispatch


def opcheck_cases():
    q, k, v = fused_qkv(2, 9, 2, 8)
    mask = make_mask("holes", 2, 9)
    x = torch.randn(3, 5, 37)
    return [
        (OPS.add_layer_norm, (x, torch.randn(3, 5, 37), torch.randn(37), torch.randn(37), 1e-5)),
        (OPS.add_layer_norm, (x.bfloat16(), None, torch.randn(37), torch.randn(37), 1e-5)),
        (OPS.bias_act_, (torch.randn(4, 37), torch.randn(37), "gelu")),
        (OPS.attention, (q, k, v, mask, 0.3)),
        (OPS.attention, (q.contiguous(), k.contiguous(), v.contiguous(), None, 0.3)),
        (OPS.varlen_attention, (q[0], k[0], v[0], torch.tensor([0, 4, 9], dtype=torch.int32), 5, 0.3)),
        (OPS.normalize_rows, (torch.randn(4, 37),)),
        (OPS.scale_rows_, (torch.randn(4, 37), torch.rand(4), torch.randn(37))),
        (OPS.scale_rows_, (torch.randn(4, 37), torch.rand(4), None)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, residual, weight, bias, q, k, v, mask):
        h = ops.add_layer_norm(x, residual, weight, bias, 1e-12)
        return ops.attention(q, k, v, mask) + h.view(q.shape)

    q, k, v = fused_qkv(2, 7, 2, 8)
    x, residual = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    weight, bias = torch.randn(16), torch.randn(16)
    mask = make_mask("holes", 2, 7)
    expected = OPS.attention(q, k, v, mask, 8 ** -0.5)[0] + \
        OPS.add_layer_norm(x, residual, weight, bias, 1e-12)[0].view(q.shape)
    assert torch.equal(block(x, residual, weight, bias, q, k, v, mask), expected)


def test_parallel_threads_used():
    ext = load_extension()
    if torch.get_num_threads() < 2 or not ext.openmp_enabled():
        pytest.skip("needs >= 2 torch threads and an OpenMP build")
    assert ext.parallel_threads_used() == min(2, torch.get_num_threads())


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
@pytest.mark.skipif("DISTILKERNELS_ISA" in os.environ, reason="DISTILKERNELS_ISA caps the choice")
def test_vector_isa_is_the_best_available():
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        best = "avx512"
    elif {"avx2", "fma"} <= flags:
        best = "avx2"
    else:
        best = "scalar"
    assert load_extension().vector_isa() == best


def test_scalar_fallback_matches():
    """The baseline-x86-64 build of the inner loops, forced through DISTILKERNELS_ISA, in a fresh process."""
    script = (
        "import torch, distilkernels, torch.nn.functional as F\n"
        "from distilkernels import _C, reference\n"
        "assert _C.vector_isa() == 'scalar', _C.vector_isa()\n"
        "x = torch.randn(5, 37) * 4; b = torch.randn(37); y = x.clone()\n"
        "torch.ops.distilkernels.bias_act_(y, b, 'gelu')\n"
        "assert (y - F.gelu(x + b)).abs().max() < 1e-6\n"
        "o = torch.ops.distilkernels.add_layer_norm(x, b.expand(5, 37), b, b, 1e-5)[0]\n"
        "assert (o - F.layer_norm(x + b, (37,), b, b, 1e-5)).abs().max() < 1e-5\n"
        "q = torch.randn(2, 70, 2, 12); m = torch.rand(2, 70) > 0.3\n"
        "o, l = torch.ops.distilkernels.attention(q, q * 2, q + 1, m, 0.3)\n"
        "r, rl = reference.attention(q.double(), q.double() * 2, q.double() + 1, m, 0.3)\n"
        "assert (o - r).abs().max() < 1e-5 and (l - rl).abs().max() < 1e-5\n"
        "n, s = torch.ops.distilkernels.normalize_rows(x)\n"
        "assert torch.equal(s, x.abs().amax(1)) and (n * s[:, None] - x).abs().max() < 1e-5\n"
        "torch.ops.distilkernels.scale_rows_(n, s, b)\n"
        "assert (n - (x + b)).abs().max() < 1e-5\n"
        "w = torch.randn(37, 37); p = torch.ops.distilkernels.pack_linear_weight(w)\n"
        "assert p.shape == (19, 37, 2), p.shape\n"
        "y = torch.ops.distilkernels.linear_packed(x, p, 37, b, 'gelu')\n"
        "assert (y - F.gelu(x @ w.t() + b)).abs().max() < 1e-4\n"
    )
    env = dict(os.environ, DISTILKERNELS_ISA="scalar")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# The caching allocator behind the ops' outputs


@pytest.fixture
def cpu_cache():
    limit = ops.cpu_cache_stats()["limit_bytes"]
    ops.set_cpu_cache_limit(64 << 20)
    ops.empty_cpu_cache()
    yield
    ops.set_cpu_cache_limit(limit)


def test_cpu_cache_hands_freed_blocks_out_again(cpu_cache):
    x, w = torch.randn(512, 96), torch.randn(768, 96)  # out: 512 x 768 fp32 = 1.5 MiB, cached
    expected = x.double() @ w.double().T
    a = ops.linear(x, w)
    ptr, before = a.data_ptr(), ops.cpu_cache_stats()
    assert before["live_bytes"] >= a.nbytes
    b = ops.linear(x, w)  # `a` is alive: another block
    assert b.data_ptr() != ptr
    del a
    assert ops.cpu_cache_stats()["cached_bytes"] >= 512 * 768 * 4
    c = ops.linear(x * 2, w)  # the same size class as `a`: its block, with new contents
    assert c.data_ptr() == ptr
    assert ops.cpu_cache_stats()["hits"] == before["hits"] + 1
    assert max_err(c, 2 * expected) < 1e-3 and max_err(b, expected) < 1e-3
    c.resize_(1024, 768)  # a cached output is an ordinary resizable tensor
    c[512:] = 1
    assert torch.equal(c[512:], torch.ones(512, 768))
    del b, c
    freed = ops.empty_cpu_cache()
    assert freed >= 512 * 768 * 4 and ops.cpu_cache_stats()["cached_bytes"] == 0


def test_cpu_cache_limit_and_small_outputs(cpu_cache):
    x, w = torch.randn(512, 64), torch.randn(768, 64)
    ops.set_cpu_cache_limit(2 << 20)  # room for one 1.5 MiB block
    outs = [ops.linear(x, w) for _ in range(3)]
    del outs
    stats = ops.cpu_cache_stats()
    assert 0 < stats["cached_bytes"] <= 2 << 20
    ops.set_cpu_cache_limit(0)  # off: freed blocks go straight back
    assert ops.cpu_cache_stats()["cached_bytes"] == 0
    ops.linear(x, w)
    assert ops.cpu_cache_stats()["cached_bytes"] == 0
    ops.set_cpu_cache_limit(64 << 20)
    small = ops.linear(x[:4], w)  # 12 KiB: PyTorch's own allocator, not counted
    before = ops.cpu_cache_stats()
    del small
    assert ops.cpu_cache_stats() == before
    with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
        ops.set_cpu_cache_limit(-1)


@pytest.mark.parametrize("value, limit, warns", [("7", 7 << 20, False), ("0", 0, False),
                                                 ("lots", 512 << 20, True)])
def test_cpu_cache_limit_from_environment(value, limit, warns):
    script = "import distilkernels\nprint(distilkernels.ops.cpu_cache_stats()['limit_bytes'])\n"
    env = dict(os.environ, DISTILKERNELS_CPU_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == limit
    assert ("DISTILKERNELS_CPU_CACHE_MB must be a non-negative integer" in result.stderr) == warns
