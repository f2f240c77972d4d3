"""Triton kernels against an fp64 reference: on CPU tensors under Triton's interpreter, and on a GPU at
DistilBERT's real sizes (`requires_cuda`; run with TRITON_INTERPRET=0, see bench/gpu_check.sh)."""
from __future__ import annotations

import os

# triton.jit picks the interpreter when a kernel is decorated, i.e. when distilkernels.triton is first
# imported: this must come before that import. If another test file imported it first without the
# interpreter, the `device` fixture skips the CPU cases and says why.
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from distilkernels import ops, reference  # noqa: E402

triton = pytest.importorskip("triton")

from distilkernels.triton import _common, attention as attention_kernels, bias_act, layer_norm  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

requires_cuda = pytest.mark.requires_cuda  # skipped without a GPU by tests/conftest.py

# fp32 is held to an absolute bound against fp64: its own rounding at these magnitudes is ~1e-6.
FP32_ATOL = 1e-5
# fp16/bf16 are held to 2x the error PyTorch makes in the same dtype, plus this floor for cases where
# PyTorch happens to round exactly (seqlen 1, ReLU of exact values) and one ulp of ours would fail
# a zero bound.
LOWP_FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
# Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest as GPUs do: on CPU tensors
# bf16 results may be off by one more half-ulp (<= 2**-8 relative) than the same kernel on a GPU.
INTERPRETER_BF16_TRUNCATION = 2.0 ** -8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# lse is computed in fp32 from exact products of the inputs in every dtype
LSE_ATOL = 1e-4


def _interpreted() -> bool:
    return isinstance(attention_kernels._attention_fwd, InterpretedFunction)


def _triton_library_interpreted() -> bool:
    # triton's own @jit functions (tl.sum, tl.max, ...) are decorated when triton is imported
    return not isinstance(triton.language.sum, JITFunction)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    if request.param == "cpu" and not _interpreted():
        pytest.skip("distilkernels.triton was imported before TRITON_INTERPRET=1 was set (by another test "
                    "file?): its kernels are compiled, not interpreted; run this file alone")
    if request.param == "cpu" and not _triton_library_interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: tl.sum & co. are compiled "
                    "functions the interpreter cannot call; set TRITON_INTERPRET=1 in the environment")
    if request.param == "cuda" and _interpreted():
        pytest.skip("TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to run the compiled kernels on the GPU")
    return torch.device(request.param)


@contextlib.contextmanager
def triton_kernel_runs(name: str):
    """Dispatch to the Triton backend, and fail unless the kernel behind op `name` was launched."""
    before = _common.LAUNCHES[name]
    with ops.force_backend("triton"):
        yield
    assert _common.LAUNCHES[name] > before, f"the Triton kernel of {name} did not run"


def max_err(ours: torch.Tensor, ref64: torch.Tensor) -> float:
    return (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0


def assert_matches_fp64(ours, ref64, torch_same_dtype):
    """fp32: |ours - fp64| <= FP32_ATOL. fp16/bf16: <= 2x PyTorch's error in that dtype + LOWP_FLOOR."""
    err = max_err(ours, ref64)
    if ours.dtype == torch.float32:
        assert err <= FP32_ATOL, f"fp32 error {err:.3g} vs fp64 > {FP32_ATOL}"
        return err
    bound = 2 * max(max_err(t, ref64) for t in torch_same_dtype) + LOWP_FLOOR[ours.dtype]
    if ours.dtype == torch.bfloat16 and ours.device.type == "cpu" and ours.numel():
        bound += INTERPRETER_BF16_TRUNCATION * ref64.abs().max().item()
    assert err <= bound, f"{ours.dtype} error {err:.3g} vs fp64 > 2x PyTorch's own + floor = {bound:.3g}"
    return err


def assert_lse_matches(lse, ref_lse):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys must have lse -inf, only them"
    finite = torch.isfinite(ref_lse)
    assert max_err(lse[finite], ref_lse[finite]) <= LSE_ATOL


# ----------------------------------------------------------------------------------------------------------
# Attention inputs


def fused_qkv(batch, seqlen, n_heads, head_dim, dtype, device, seed=0):
    """q, k, v: (batch, seqlen, n_heads, head_dim) strided views of one (batch * seqlen, 3 * dim) projection
    output, as DistilBERT's fused QKV linear produces them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch * seqlen, 3 * n_heads * head_dim, generator=g).to(device=device, dtype=dtype)
    return qkv.view(batch, seqlen, 3, n_heads, head_dim).unbind(2)


def key_padding_mask(kind, batch, seqlen, device, seed=0):
    """(batch, seqlen) bool, True = attend, or None. kind: none, holey (any 0/1 pattern, keys at both
    ends dropped too), left (left padding), empty_row (batch row 0 attends to nothing)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "left":
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
        mask = torch.arange(seqlen)[None, :] >= seqlen - lengths[:, None]
    else:
        mask = torch.rand(batch, seqlen, generator=g) < 0.6
        mask[:, 0] = False
        mask[torch.arange(batch), torch.randint(0, seqlen, (batch,), generator=g)] = True
        if kind == "empty_row":
            mask[0] = False
    return mask.to(device)


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


# ----------------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "holey", "left", "empty_row"])
@pytest.mark.parametrize("batch, seqlen, n_heads, head_dim",
                         [(1, 1, 4, 16), (3, 7, 2, 8), (2, 127, 1, 32), (1, 129, 3, 64)])
def test_attention(device, batch, seqlen, n_heads, head_dim, mask_kind, dtype):
    q, k, v = fused_qkv(batch, seqlen, n_heads, head_dim, dtype, device)
    mask = key_padding_mask(mask_kind, batch, seqlen, device)
    scale = head_dim ** -0.5
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, scale)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (batch, n_heads, seqlen)
    assert not out.isnan().any()
    assert_matches_fp64(out, out64, same_dtype)
    assert_lse_matches(lse, lse64)
    if mask_kind == "empty_row":
        assert (out[0] == 0).all(), "a query with no key to attend must get zeros"


@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
def test_attention_layouts(device, layout):
    """q/k/v that are not views of one fused tensor: separate contiguous tensors, and (batch, n_heads,
    seqlen, head_dim) storage seen as (batch, seqlen, n_heads, head_dim)."""
    batch, seqlen, n_heads, head_dim = 2, 33, 3, 16
    g = torch.Generator().manual_seed(1)
    shape = (batch, seqlen, n_heads, head_dim) if layout == "contiguous" else (batch, n_heads, seqlen, head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    if layout == "heads_major":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = key_padding_mask("holey", batch, seqlen, device)
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, softmax_scale=0.3, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, 0.3)
    assert_matches_fp64(out, out64, same_dtype)
    assert_lse_matches(lse, lse64)


# ----------------------------------------------------------------------------------------------------------
# varlen_attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads, head_dim", [(1, 8), (2, 64)])
@pytest.mark.parametrize("seqlens", [(1, 17, 50), (5, 0, 3), (0,)])
def test_varlen_attention(device, seqlens, n_heads, head_dim, dtype):
    total = sum(seqlens)
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
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
    assert_matches_fp64(out, out64, same_dtype)
    assert_lse_matches(lse, lse64)


def test_varlen_matches_padded(device):
    """Packed sequences give what the padded batch with a right-padding mask gives, token for token."""
    seqlens, n_heads, head_dim = (9, 40, 23), 2, 32
    q, k, v = fused_qkv(len(seqlens), max(seqlens), n_heads, head_dim, torch.float32, device, seed=3)
    mask = torch.arange(max(seqlens), device=device)[None, :] < torch.tensor(seqlens, device=device)[:, None]
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    with triton_kernel_runs("attention"), triton_kernel_runs("varlen_attention"):
        padded = ops.attention(q, k, v, mask)
        packed = ops.varlen_attention(q[mask], k[mask], v[mask], cu_seqlens, max(seqlens))
    assert max_err(packed, padded[mask].double()) <= FP32_ATOL


# ----------------------------------------------------------------------------------------------------------
# add_layer_norm, bias_act_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dim", [37, 768, 4096])
def test_add_layer_norm(device, dim, with_residual, dtype):
    g = torch.Generator().manual_seed(4)
    x, residual = ((torch.randn(2, 3, dim, generator=g) * 2 + 1).to(device=device, dtype=dtype) for _ in range(2))
    weight, bias = (torch.randn(dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    residual = residual if with_residual else None
    with triton_kernel_runs("add_layer_norm"):
        out, mean, rstd = ops.add_layer_norm(x, residual, weight, bias, 1e-12, return_stats=True)
    as64 = (lambda t: None if t is None else t.double())
    out64, mean64, rstd64 = reference.add_layer_norm(x.double(), as64(residual), weight.double(), bias.double(), 1e-12)
    assert out.shape == x.shape and mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == torch.float32
    assert_matches_fp64(out, out64, [reference.add_layer_norm(x, residual, weight, bias, 1e-12)[0]])
    # statistics are fp32 in every dtype, of the same (exactly representable) inputs
    assert max_err(mean, mean64) <= FP32_ATOL
    assert max_err(rstd / rstd64, torch.ones_like(rstd64)) <= FP32_ATOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("rows, hidden_dim", [(1, 1), (5, 37), (4, 3072)])
def test_bias_act_(device, rows, hidden_dim, activation, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, hidden_dim, generator=g) * 3).to(device=device, dtype=dtype)
    bias = torch.randn(hidden_dim, generator=g).to(device=device, dtype=dtype)
    ref64, same_dtype = x.double(), x.clone()
    reference.bias_act_(ref64, bias.double(), activation)
    reference.bias_act_(same_dtype, bias, activation)
    storage = x.data_ptr()
    with triton_kernel_runs("bias_act_"):
        returned = ops.bias_act_(x, bias, activation)
    assert returned is x and x.data_ptr() == storage, "bias_act_ must update x in place"
    assert_matches_fp64(x, ref64, [same_dtype])


# ----------------------------------------------------------------------------------------------------------
# Registration


def test_registered_as_triton_ops():
    for name, module in (("add_layer_norm", layer_norm), ("bias_act_", bias_act),
                         ("attention", attention_kernels), ("varlen_attention", attention_kernels)):
        assert ops._TABLE[(name, "triton")] is getattr(module, name)
        assert hasattr(torch.ops.distilkernels_triton, name)


@requires_cuda
def test_torch_compile_traces_through(device):
    """On a GPU torch.compile sees the Triton kernels (triton_op + wrap_triton) in one graph. Under the
    interpreter wrap_triton hands back the interpreted function, which fake tensors cannot run."""
    q, k, v = fused_qkv(2, 65, 4, 64, torch.float16, device)
    mask = key_padding_mask("holey", 2, 65, device)
    x = torch.randn(2, 65, 256, device=device, dtype=torch.float16)
    weight, bias = torch.randn(256, device=device, dtype=torch.float16), torch.randn(256, device=device,
                                                                                       dtype=torch.float16)

    def block(x, q, k, v, mask):
        h = ops.attention(q, k, v, mask).flatten(2)
        return ops.add_layer_norm(h, x, weight, bias, 1e-12)

    with ops.force_backend("triton"):
        eager = block(x, q, k, v, mask)
        compiled = torch.compile(block, fullgraph=True)(x, q, k, v, mask)
    assert max_err(compiled, eager.double()) <= 1e-2  # fp16 outputs of order 1: a few ulps apart at most


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [128, 512])
def test_real_sizes(device, seqlen, dtype):
    """distilbert-base at batch 32: 12 heads of 64, dim 768, hidden_dim 3072."""
    batch, n_heads, head_dim = 32, 12, 64
    q, k, v = fused_qkv(batch, seqlen, n_heads, head_dim, dtype, device)
    mask = key_padding_mask("holey", batch, seqlen, device)
    with triton_kernel_runs("attention"):
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    out64, lse64, same_dtype = attention_references(q, k, v, mask, head_dim ** -0.5)
    assert_matches_fp64(out, out64, same_dtype)
    assert_lse_matches(lse, lse64)

    x = torch.randn(batch, seqlen, 768, device=device, dtype=dtype)
    weight, bias = torch.randn(768, device=device, dtype=dtype), torch.randn(768, device=device, dtype=dtype)
    with triton_kernel_runs("add_layer_norm"):
        ln = ops.add_layer_norm(x, out.flatten(2), weight, bias, 1e-12)
    ln64 = reference.add_layer_norm(x.double(), out.flatten(2).double(), weight.double(), bias.double(), 1e-12)[0]
    assert_matches_fp64(ln, ln64, [reference.add_layer_norm(x, out.flatten(2), weight, bias, 1e-12)[0]])
