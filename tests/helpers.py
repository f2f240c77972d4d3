"""Helpers shared by the op tests (tests/ops/*) and other test files: inputs, error measure, tolerance rule.

The tolerance rule, in one place:

- fp32 results are compared with an fp64 reference; the bound is a number of fp32 roundings at the result's
  (or the inputs') magnitude, `ulps(n, magnitude)`, with each test saying in a comment where its n comes from.
  Bounds scale with magnitudes, so they hold on every x86 CPU (AVX-512, AVX2, scalar: different FMA
  contraction and summation orders move results by a few roundings, never by more than the count allows).
- fp16/bf16 results: our error vs fp64 is at most 2x PyTorch's own error in the same dtype (FlashAttention's
  rule), `lowp_bound`. Its floor is one rounding to that dtype at the reference's magnitude: where PyTorch
  happens to be exact (seqlen 1, ReLU of representable values), our one rounding of an fp32 result must not
  fail a zero bound.
"""
from __future__ import annotations

import contextlib

import torch

from distilkernels import ops

from distilkernels._ext import load_extension

# Unit roundoff u = eps / 2 per dtype: one correctly rounded operation errs by at most u * |result|.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest as GPUs do: on CPU tensors its
# bf16 results may be off by one more half-ulp (2**-8 relative) than the same kernel on a GPU.
INTERPRETER_BF16_TRUNCATION = 2.0 ** -8


def cpu_isa() -> str:
    """The instruction set the C++ kernels dispatch to in this process ("none" without the extension)."""
    ext = load_extension()
    return ext.vector_isa() if ext is not None else "none"


def max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| in fp64 (0 for empty tensors)."""
    if ours.numel() == 0:
        return 0.0
    return (ours.double() - ref.double()).abs().max().item()


def magnitude(t: torch.Tensor) -> float:
    """max |t|, at least 1e-30 (so a bound scaled by it is never exactly 0 on an all-zero result)."""
    return max(t.double().abs().max().item(), 1e-30) if t.numel() else 1e-30


def ulps(n: float, scale: float, dtype=torch.float32) -> float:
    """n roundings of `dtype` at magnitude `scale`: n * u * scale."""
    return n * UNIT_ROUNDOFF[dtype] * scale


def lowp_bound(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype, interpreter: bool = False) -> float:
    """2x PyTorch's error in ours' dtype (the largest of `torch_same_dtype`, each compared with ref64), plus
    one rounding to that dtype at ref64's magnitude (plus the interpreter's bf16 truncation if `interpreter`)."""
    torch_err = max(max_err(t, ref64) for t in torch_same_dtype)
    bound = 2 * torch_err + ulps(1, magnitude(ref64), ours.dtype)
    if interpreter and ours.dtype == torch.bfloat16:
        bound += INTERPRETER_BF16_TRUNCATION * magnitude(ref64)
    return bound


def assert_lowp(ours, ref64, torch_same_dtype, interpreter: bool = False) -> float:
    err, bound = max_err(ours, ref64), lowp_bound(ours, ref64, torch_same_dtype, interpreter)
    assert err <= bound, f"{ours.dtype} error {err:.3g} vs fp64 > 2x PyTorch's own + one rounding = {bound:.3g}"
    return err


# ----------------------------------------------------------------------------------------------------------
# Inputs


def fused_qkv(batch, seqlen, n_heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v: (batch, seqlen, n_heads, head_dim) strided views of one (batch * seqlen, 3 * dim) projection
    output, as DistilBERT's fused QKV linear produces them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch * seqlen, 3 * n_heads * head_dim, generator=g).to(device=device, dtype=dtype)
    return qkv.view(batch, seqlen, 3, n_heads, head_dim).unbind(2)


def make_mask(kind, batch, seqlen, device="cpu", seed=0):
    """(batch, seqlen) bool, True = attend, or None for kind None / "none". Kinds:
    holey      any 0/1 pattern, the first key of every row dropped, >= 1 key per row
    left       left padding, right   right padding (the last row of a batch > 1 attends to nothing)
    empty_row  holey, and batch row 0 attends to nothing"""
    if kind is None or kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(seqlen)[None, :]
    if kind in ("left", "right"):
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
        mask = pos >= seqlen - lengths[:, None] if kind == "left" else pos < lengths[:, None]
        if kind == "right" and batch > 1:
            mask[-1] = False
    elif kind in ("holey", "empty_row"):
        mask = torch.rand(batch, seqlen, generator=g) < 0.6
        mask[:, 0] = False
        mask[torch.arange(batch), torch.randint(0, seqlen, (batch,), generator=g)] = True
        if kind == "empty_row":
            mask[0] = False
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    """(len(lengths) + 1,) int32 offsets with a leading 0."""
    return torch.tensor([0, *torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist()],
                        dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------------------
# Running an op on a backend


@contextlib.contextmanager
def triton_kernel_runs(name: str):
    """Dispatch to the Triton backend, and fail unless the kernel behind op `name` was launched."""
    from distilkernels.triton import _common

    before = _common.LAUNCHES[name]
    with ops.force_backend("triton"):
        yield
    assert _common.LAUNCHES[name] > before, f"the Triton kernel of {name} did not run"


@contextlib.contextmanager
def kernel_of(backend: str, name: str):
    """Run ops on `backend`; for triton, also fail unless its kernel of op `name` was launched."""
    if backend == "triton":
        with triton_kernel_runs(name):
            yield
    else:
        with ops.force_backend(backend):
            yield
