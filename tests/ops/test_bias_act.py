"""bias_act_ (in place: x = activation(x + bias)) on every backend against an fp64 reference.

fp32 bound: y = x + bias rounds identically in every implementation, so the reference is the fp64 activation
of that fp32 y. GELU(y) = y/2 * (1 + erf(y / sqrt 2)): the kernels' erf is a fitted polynomial with max
absolute error ~1.2e-7 (~2 roundings), which y/2 scales to ~1 rounding of |y|; the remaining multiplies and
adds round ~3 times at |out| <= |y|. 6 roundings at max |y| covers it on every instruction set (ReLU is exact).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilkernels import ops, reference
from helpers import (DTYPES, LOW_PRECISION, assert_gelu_bf16, assert_lowp, every_finite_bf16, kernel_of, magnitude, max_err,
                     triton_kernel_runs, ulps)

OPS = torch.ops.distilkernels
requires_ext = pytest.mark.requires_ext


def fp32_bound(y: torch.Tensor) -> float:
    return ulps(6, magnitude(y))


def act64(y, activation):
    return F.gelu(y.double()) if activation == "gelu" else torch.relu(y.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_bias_act_backends(backend, activation, dtype):
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(6, 129, generator=g) * 4).to(dtype)
    bias = torch.randn(129, generator=g).to(dtype)
    y = (x.float() + bias.float())
    ref64 = act64(y if dtype == torch.float32 else x.double() + bias.double(), activation)
    same_dtype = x.clone()
    reference.bias_act_(same_dtype, bias, activation)
    out = x.clone()
    with kernel_of(backend, "bias_act_"):
        returned = ops.bias_act_(out, bias, activation)
    assert returned is out
    if dtype == torch.float32:
        assert max_err(out, ref64) <= fp32_bound(y)
    else:
        assert_lowp(out, ref64, [same_dtype], interpreter=backend == "triton")


# ----------------------------------------------------------------------------------------------------------
# cpp


@requires_ext
@pytest.mark.parametrize("shape", [(1, 7), (5, 3072), (3, 2, 37)])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_cpp_bias_act_fp32(shape, activation):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 4  # covers both erf branches (|x| < 0.75 and beyond) and the tails
    bias = torch.randn(shape[-1], generator=gen)
    y = x + bias
    out = x.clone()
    OPS.bias_act_(out, bias, activation)
    assert max_err(out, act64(y, activation)) <= fp32_bound(y)


@requires_ext
def test_cpp_gelu_wide_range():
    x = torch.linspace(-20, 20, 100_003)
    y = x.clone()
    OPS.bias_act_(y, torch.zeros(100_003), "gelu")
    assert max_err(y, F.gelu(x.double())) <= fp32_bound(x)
    assert not y.isnan().any()


@requires_ext
def test_cpp_gelu_tiny_and_clamped_inputs():
    """Inputs whose erf argument is clamped (below 2^-60, or past 9.1 * sqrt2 = 12.9), denormals, signed zeros
    and infinities: gelu(y) ~ y / 2 near 0, 0 far below it and y far above; +inf at +inf (torch 2.13 gives NaN
    there) and NaN at -inf, where y * Phi(y) is -inf * 0 (as in torch)."""
    x = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-30, -1e-30, 2.0 ** -61, -(2.0 ** -61), 12.8, -12.8, 13.5,
                      -13.5, 30.0, -30.0, 1e30, -1e30, float("inf"), float("-inf"), 12.95, -12.95, 13.2, -13.2])
    y = x.clone()
    OPS.bias_act_(y, torch.zeros(x.numel()), "gelu")
    want = F.gelu(x.double())
    tiny, moderate = x.abs() < 1e-20, (x.abs() >= 1e-20) & (x.abs() < 100)
    assert max_err(y[tiny], want[tiny]) <= fp32_bound(x[tiny])  # bound at 1e-30: relative accuracy kept
    assert max_err(y[moderate], want[moderate]) <= fp32_bound(x[moderate])
    assert y[14] == 1e30 and y[15] == 0 and y[16] == float("inf") and y[17].isnan()
    assert torch.equal(y[:16].isnan(), torch.zeros(16, dtype=torch.bool))
    # Past the clamp Phi(-|y|) is 0: no denormal output (each would cost a microcode assist), and y itself above
    assert (y[18:] == torch.tensor([12.95, 0.0, 13.2, 0.0])).all()


@requires_ext
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_cpp_bias_act_low_precision(dtype, activation):
    gen = torch.Generator().manual_seed(4)
    x, bias = (torch.randn(9, 3072, generator=gen) * 3).to(dtype), torch.randn(3072, generator=gen).to(dtype)
    act = F.gelu if activation == "gelu" else torch.relu
    ref = act(x.double() + bias.double())
    y = x.clone()
    OPS.bias_act_(y, bias, activation)
    assert_lowp(y, ref, [act(x + bias)])  # ours rounds once (fp32 math), torch rounds x + b too


# bf16 with fp32 only in registers: within 2x torch's bf16 error with a floor of 1e-6 rather than one bf16
# rounding. Ours rounds once (fp32 x + b, activation, one rounding to bf16); torch rounds x + b and then the
# activation's result: where torch is exact (ReLU of a representable sum), ours is the same rounding, so the
# floor only absorbs the fp64 comparison's own rounding.
@requires_ext
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("n", [1, 15, 17, 3072])
def test_cpp_bias_act_bf16(activation, n):
    gen = torch.Generator().manual_seed(4)
    x, bias = (torch.randn(9, n, generator=gen) * 3).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    act = F.gelu if activation == "gelu" else torch.relu
    ref = act(x.double() + bias.double())
    y = x.clone()
    OPS.bias_act_(y, bias, activation)
    assert y.dtype == torch.bfloat16
    assert_lowp(y, ref, [act(x + bias)], floor=1e-6)


@requires_ext
def test_cpp_gelu_bf16_every_input():
    """bias_act_ in bf16 (fp32 math in registers, one rounding) on every finite bf16 value, and at +-inf and NaN."""
    y = every_finite_bf16()
    got = y.clone()
    OPS.bias_act_(got, torch.zeros(y.numel(), dtype=torch.bfloat16), "gelu")
    assert_gelu_bf16(got, y)
    assert got[y.float().isnan()].isnan().all()
    special = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.bfloat16)
    OPS.bias_act_(special, torch.zeros(3, dtype=torch.bfloat16), "gelu")
    # GELU's limits at +-inf (torch gives NaN at -inf: -inf * Phi(-inf) = -inf * 0), NaN at NaN
    assert special[0] == float("inf") and special[1] == 0 and special[2].isnan()


@requires_ext
def test_cpp_bias_act_bf16_rounds_like_torch():
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


# ----------------------------------------------------------------------------------------------------------
# triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("rows, hidden_dim", [(1, 1), (5, 37), (4, 3072)])
def test_triton_bias_act_(device, rows, hidden_dim, activation, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, hidden_dim, generator=g) * 3).to(device=device, dtype=dtype)
    bias = torch.randn(hidden_dim, generator=g).to(device=device, dtype=dtype)
    ref64, same_dtype = x.double(), x.clone()
    reference.bias_act_(ref64, bias.double(), activation)
    reference.bias_act_(same_dtype, bias, activation)
    y = x.float() + bias.float()
    storage = x.data_ptr()
    with triton_kernel_runs("bias_act_"):
        returned = ops.bias_act_(x, bias, activation)
    assert returned is x and x.data_ptr() == storage, "bias_act_ must update x in place"
    if dtype == torch.float32:
        assert max_err(x, ref64) <= fp32_bound(y)
    else:
        assert_lowp(x, ref64, [same_dtype], interpreter=device.type == "cpu")
