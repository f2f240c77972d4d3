"""normalize_rows and scale_rows_ (per-token scaling around the int8 GEMM) on every backend."""
from __future__ import annotations

import pytest
import torch

from distilkernels import ops, reference
from helpers import max_err, ulps

OPS = torch.ops.distilkernels


def check_round_trip(normalize, scale_rows, shape):
    """Rows scaled to max-abs 1 and back, each way exact up to one fp32 rounding per operation."""
    x = torch.randn(shape) * 3
    if shape[0] > 1:
        x[1] = 0  # an all-zero row gets the floor scale, not a division by zero
    out, scale = normalize(x)
    assert scale.shape == (shape[0],) and out.shape == x.shape
    assert torch.equal(scale, reference.normalize_rows(x)[1])  # a max is exact
    assert max_err(out, x.double() / scale.double()[:, None]) <= ulps(2, 1.0)  # |out| <= 1: x * (1/s), 2 roundings
    if shape[0] > 1 and shape[1] > 0:
        assert scale[1].item() == pytest.approx(1e-12) and (out[1] == 0).all()
        assert out[0].abs().max().item() == pytest.approx(1.0, abs=2 ** -23)
    for bias in (None, torch.randn(shape[1])):
        y = torch.randn(shape)
        ref = y.double() * scale.double()[:, None] + (0 if bias is None else bias.double())
        got = y.clone()
        scale_rows(got, scale, bias)
        # a multiply and an add (or one FMA): 2 roundings at |y * s| + |bias| <= |ref| + 1, doubled for margin
        assert max_err(got, ref) <= ulps(4, (ref.abs().max().item() + 1) if ref.numel() else 1)


@pytest.mark.requires_ext
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (128, 768), (3, 3072), (0, 4), (2, 0)])
def test_cpp_normalize_and_scale_rows(shape):
    check_round_trip(OPS.normalize_rows, OPS.scale_rows_, shape)


@pytest.mark.parametrize("shape", [(5, 37), (0, 4), (2, 0)])
def test_normalize_and_scale_rows_backends(backend, shape):
    # on the triton backend these are the reference's (per-token int8 scaling serves the CPU-only int8 mode)
    with ops.force_backend(backend):
        check_round_trip(ops.normalize_rows, lambda y, s, b: ops.scale_rows_(y, s, b), shape)


@pytest.mark.parametrize("cols", [5, 37, 768])  # a scalar tail only, vectors and a tail, vectors only
def test_normalize_rows_nan_and_inf(backend, cols):
    """A row's scale is what torch's amax gives: NaN where the row holds a NaN (wherever it sits: vector body or
    tail), inf where it holds an inf and no NaN; the other rows are untouched by them."""
    x = torch.randn(5, cols)
    x[1, cols - 1] = float("nan")
    x[2, 0] = float("nan")
    x[2, 1] = float("inf")
    x[3, cols // 2] = float("-inf")
    with ops.force_backend(backend):
        out, scale = ops.normalize_rows(x)
    want_out, want = reference.normalize_rows(x)
    assert scale[1].isnan() and scale[2].isnan() and scale[3].item() == float("inf")
    assert torch.equal(scale[[0, 4]], want[[0, 4]]) and torch.equal(scale[3], want[3])
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.allclose(out[[0, 4]], want_out[[0, 4]], rtol=2 ** -22, atol=0)
