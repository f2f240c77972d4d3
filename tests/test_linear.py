"""distilkernels.ops.linear: the CPU GEMM split across threads by output columns."""
from __future__ import annotations

import pytest
import torch

from distilkernels import ops

pytestmark = pytest.mark.requires_ext


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", [
    (1, 8, 1), (7, 37, 129), (128, 64, 200), (128, 96, 2304 // 8), (300, 48, 77),  # 300 > split limit
])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_torch(tokens, in_features, out_features, bias, threads):
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(tokens, in_features)
        weight = torch.randn(out_features, in_features)
        b = torch.randn(out_features) if bias else None
        with ops.force_backend("cpp"):
            got = ops.linear(x, weight, b)
        ref = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    finally:
        torch.set_num_threads(previous)
    # fp32 GEMM vs fp64: rounding grows with the reduction length
    assert (got.double() - ref).abs().max() <= 1e-5 * in_features ** 0.5 * ref.abs().max().clamp_min(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [128, 300])  # split across threads, and MKL's own threading
def test_linear_low_precision(tokens, dtype):
    """bf16/fp16 with bias: error vs fp64 within 2x that of torch's own linear in the same dtype."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(tokens, 96), torch.randn(2304 // 8, 96), torch.randn(2304 // 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ops.force_backend("cpp"):
            got = ops.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))
        same_dtype = torch.nn.functional.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))
    finally:
        torch.set_num_threads(previous)
    ref = torch.nn.functional.linear(*(t.to(dtype).double() for t in (x, weight, bias)))
    assert got.dtype == dtype
    torch_err = (same_dtype.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * torch_err + 1e-6 * ref.abs().max().item()


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
