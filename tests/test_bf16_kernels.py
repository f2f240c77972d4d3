"""The bf16 CPU kernels: attention and varlen_attention on the matrix unit (AMX through ATen's brgemm) and on
the blocked fallback, add_layer_norm and bias_act_ reading and writing bf16 with fp32 only in registers.

Both attention paths are tested in one process: DISTILKERNELS_AMX=0 (read on every call) forces the fallback,
the one an AVX2-only CPU takes. Accuracy rule (FlashAttention's): error vs an fp64 reference <= 2x the error of
torch's own bf16 computation on the same inputs, plus a floor of one fp32-level rounding.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distilkernels import reference
from distilkernels._ext import load_extension

pytestmark = pytest.mark.requires_ext

OPS = torch.ops.distilkernels


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def amx_available() -> bool:
    """Whether bf16 attention can take the matrix-unit path here: AMX bf16 tiles, oneDNN, AVX-512 kernels."""
    return ({"amx_tile", "amx_bf16"} <= cpu_flags() and torch.backends.mkldnn.is_available()
            and load_extension().vector_isa() == "avx512")


@pytest.fixture(params=["matrix_unit", "fallback"])
def path(request, monkeypatch):
    if request.param == "matrix_unit":
        if not amx_available():
            pytest.skip("this CPU has no AMX tiles: bf16 attention takes the fallback only")
        monkeypatch.delenv("DISTILKERNELS_AMX", raising=False)
    else:
        monkeypatch.setenv("DISTILKERNELS_AMX", "0")
    return request.param


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def fused_qkv(batch, seqlen, n_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = n_heads * head_dim
    qkv = torch.randn(batch * seqlen, 3 * dim, generator=gen).to(dtype)
    return tuple(t.view(batch, seqlen, n_heads, head_dim) for t in qkv.split(dim, dim=1))


def make_mask(kind, batch, seqlen, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "holes":
        mask = torch.rand(batch, seqlen, generator=gen) > 0.4
        mask[:, 0] = True
    elif kind == "left":
        starts = torch.randint(0, seqlen, (batch,), generator=gen)
        mask = torch.arange(seqlen)[None, :] >= starts[:, None]
    else:  # right padding, the last row fully masked when batch > 1
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
        mask = torch.arange(seqlen)[None, :] < lengths[:, None]
        mask[-1] = batch == 1
    return mask


def check_lse(lse, ref_lse):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    if finite.any():
        # fp32 sums of exact bf16 products: a few fp32 ulps of the largest |score| and of log(n_keys).
        assert max_err(lse[finite], ref_lse[finite]) <= 4e-6 * max(1.0, ref_lse[finite].abs().max().item())


def torch_bf16_error(q, k, v, mask, scale, ref_out):
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask, scale=scale)
    out = out.transpose(1, 2)
    if mask is not None:  # torch gives NaN on fully masked rows; ours gives 0 there: compare attended rows only
        keep = mask.any(1)
        return max_err(out[keep], ref_out[keep])
    return max_err(out, ref_out)


# ----------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("batch,seqlen,head_dim", [(1, 1, 64), (3, 7, 64), (2, 129, 64), (1, 300, 64),
                                                   (2, 77, 32), (2, 50, 80), (1, 33, 8), (2, 20, 13)])
@pytest.mark.parametrize("mask_kind", [None, "holes", "left", "right"])
def test_attention_bf16(path, batch, seqlen, head_dim, mask_kind):
    q, k, v = fused_qkv(batch, seqlen, 3, head_dim, torch.bfloat16)
    mask = make_mask(mask_kind, batch, seqlen)
    scale = head_dim ** -0.5
    out, lse = OPS.attention(q, k, v, mask, scale)
    ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double(), mask, scale)
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and out.shape == q.shape
    assert not out.isnan().any()
    if mask is not None and not mask.all(1).all():
        assert (out[~mask.any(1)] == 0).all()
    assert max_err(out, ref_out) <= 2 * torch_bf16_error(q, k, v, mask, scale, ref_out) + 1e-6
    check_lse(lse, ref_lse)


def test_attention_bf16_long_sequence(path):
    """2048 keys (16 key blocks): the running max moves often under a sharp softmax."""
    q, k, v = fused_qkv(1, 2048, 2, 64, torch.bfloat16)
    q = q * 3
    mask = make_mask("holes", 1, 2048)
    out, lse = OPS.attention(q, k, v, mask, 0.125)
    ref_out, ref_lse = reference.attention(q.double(), k.double(), v.double(), mask, 0.125)
    assert max_err(out, ref_out) <= 2 * torch_bf16_error(q, k, v, mask, 0.125, ref_out) + 1e-6
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("lengths", [[1], [7, 0, 129], [64, 65, 3, 512], [16, 17, 128, 8, 100]])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_varlen_attention_bf16(path, lengths, head_dim):
    total, n_heads = sum(lengths), 3
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(total, 3, n_heads, head_dim, generator=gen).bfloat16().unbind(1)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    scale = head_dim ** -0.5
    out, lse = OPS.varlen_attention(q, k, v, cu, max(lengths), scale)
    ref_out, ref_lse = reference.varlen_attention(q.double(), k.double(), v.double(), cu, max(lengths), scale)
    assert out.shape == q.shape and lse.shape == (n_heads, total)
    torch_err = 0.0  # torch's bf16 error, sequence by sequence
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end > start:
            one = [t[start:end][None] for t in (q, k, v)]
            torch_err = max(torch_err, torch_bf16_error(*one, None, scale, ref_out[start:end][None]))
    assert max_err(out, ref_out) <= 2 * torch_err + 1e-6
    check_lse(lse, ref_lse)


def test_varlen_matches_padded_bf16(path):
    """One kernel core per path serves both ops: the same sequences padded into a batch give the same bits."""
    lengths = [5, 70, 33]
    q, k, v = fused_qkv(3, 70, 2, 64, torch.bfloat16, seed=3)
    mask = torch.arange(70)[None, :] < torch.tensor(lengths)[:, None]
    out, lse = OPS.attention(q, k, v, mask, 0.125)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    packed = [torch.cat([t[b, :n] for b, n in enumerate(lengths)]) for t in (q, k, v)]
    vout, vlse = OPS.varlen_attention(*packed, cu, 70, 0.125)
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, :n], vout[cu[b]:cu[b + 1]])
        assert torch.equal(lse[b, :, :n], vlse[:, cu[b]:cu[b + 1]])


def test_matrix_unit_path_is_taken(monkeypatch):
    """The two paths round differently (P in bf16 on the matrix unit): different bits show the switch works."""
    if not amx_available():
        pytest.skip("this CPU has no AMX tiles")
    q, k, v = fused_qkv(2, 128, 4, 64, torch.bfloat16)
    monkeypatch.delenv("DISTILKERNELS_AMX", raising=False)
    amx_out, amx_lse = (t.clone() for t in OPS.attention(q, k, v, None, 0.125))
    monkeypatch.setenv("DISTILKERNELS_AMX", "0")
    ref_out, ref_lse = OPS.attention(q, k, v, None, 0.125)
    assert not torch.equal(amx_out, ref_out)
    assert max_err(amx_out, ref_out) < 0.05 and max_err(amx_lse, ref_lse) < 1e-4


def test_attention_fp16_unchanged_by_switch(monkeypatch):
    """fp16 never takes the matrix-unit path: the switch does not change a bit."""
    q, k, v = fused_qkv(2, 65, 2, 64, torch.float16)
    monkeypatch.delenv("DISTILKERNELS_AMX", raising=False)
    a = [t.clone() for t in OPS.attention(q, k, v, None, 0.125)]
    monkeypatch.setenv("DISTILKERNELS_AMX", "0")
    b = OPS.attention(q, k, v, None, 0.125)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------
# add_layer_norm and bias_act_ in bf16


@pytest.mark.parametrize("dim", [1, 37, 768, 1024])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_bf16(dim, with_residual):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(33, dim, generator=gen) * 4 + 3).bfloat16()
    residual = torch.randn(33, dim, generator=gen).bfloat16() if with_residual else None
    weight, bias = torch.randn(dim, generator=gen).bfloat16(), torch.randn(dim, generator=gen).bfloat16()
    out, mean, rstd = OPS.add_layer_norm(x, residual, weight, bias, 1e-5)
    r64 = None if residual is None else residual.double()
    ref, ref_mean, ref_rstd = reference.add_layer_norm(x.double(), r64, weight.double(), bias.double(), 1e-5)
    h = x if residual is None else x + residual
    torch_err = max_err(F.layer_norm(h, (dim,), weight, bias, 1e-5), ref)
    assert out.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    assert max_err(out, ref) <= 2 * torch_err + 1e-6
    # fp32 statistics of an exact fp32 sum of two bf16 values: fp32-level relative error.
    assert max_err(mean, ref_mean) <= 1e-5 * max(1.0, ref_mean.abs().max().item())
    assert max_err(rstd, ref_rstd) <= 1e-5 * ref_rstd.abs().max().item()


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("n", [1, 15, 17, 3072])
def test_bias_act_bf16(activation, n):
    gen = torch.Generator().manual_seed(4)
    x, bias = (torch.randn(9, n, generator=gen) * 3).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    act = F.gelu if activation == "gelu" else torch.relu
    ref = act(x.double() + bias.double())
    y = x.clone()
    OPS.bias_act_(y, bias, activation)
    assert y.dtype == torch.bfloat16
    assert max_err(y, ref) <= 2 * max_err(act(x + bias), ref) + 1e-6


def test_bias_act_bf16_rounds_like_torch():
    """relu(x + b) is exact in fp32 (a sum of two bf16 values), so the result is that sum rounded once to bf16:
    bit for bit torch's rounding (to nearest, ties to even: such sums hit ties often), NaN and inf kept."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 4099, generator=gen) * 10).bfloat16()
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38])
    bias = (torch.randn(4099, generator=gen) * 10).bfloat16()
    bias[3] = 3.0e38  # 3e38 + 3e38 overflows to inf
    y = x.clone()
    OPS.bias_act_(y, bias, "relu")
    expected = (x.float() + bias.float()).relu().bfloat16()
    assert torch.equal(y.view(torch.int16)[:, 1:], expected.view(torch.int16)[:, 1:])
    assert y[0, 0].isnan()


def test_bf16_kernels_on_avx2_and_scalar():
    """The AVX2 and baseline builds of the bf16 row kernels, and the attention fallback an AVX2-only CPU takes,
    in fresh processes capped by DISTILKERNELS_ISA."""
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
