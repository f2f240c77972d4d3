"""distilkernels.ops.linear (the CPU GEMM split across threads by output columns) and linear_packed (our own
GEMM on weights packed once, bias and activation in its epilogue)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference

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


# ----------------------------------------------------------------------------------------------------------
# linear_packed


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens, in_features, out_features", [
    (1, 8, 1), (13, 32, 37), (7, 37, 129), (128, 64, 200), (300, 48, 77), (200, 800, 64),  # 800 > one k-block
    (1000, 7, 33),  # several row blocks
])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_packed_matches_fp64(tokens, in_features, out_features, bias, activation, threads):
    torch.manual_seed(0)
    x, weight = torch.randn(tokens, in_features), torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ops.force_backend("cpp"):
            packed = ops.pack_linear_weight(weight)
            got = ops.linear_packed(x, packed, out_features, b, activation)
    finally:
        torch.set_num_threads(previous)
    ref = reference.activate(F.linear(x.double(), weight.double(), None if b is None else b.double()), activation)
    assert got.shape == (tokens, out_features) and got.is_contiguous()
    # fp32 GEMM vs fp64: rounding grows with the reduction length
    assert (got.double() - ref).abs().max() <= 1e-5 * in_features ** 0.5 * ref.abs().max().clamp_min(1)


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
