"""One bad-input table, run against every backend: the same error class and message, naming the argument.

Each row is one fault. Through distilkernels.ops the checks run once, before dispatch, so every backend (cpp,
triton, torch) must raise the same class with the same message. Rows marked `raw` also go to the C++ op
directly (torch.ops.distilkernels.*): its TORCH_CHECK says the same thing, as RuntimeError. Rows not marked
raw are faults the raw op cannot see as such (a meta tensor sends it to its fake kernel), and the matrix-unit
GEMMs' Python checks (their C++ ops word their own checks in their terms: tests/ops/test_linear.py).

The edge cases that are not errors (zero tokens, zero batch, empty sequences) must give every backend the
same fully written result: nothing uninitialized, no rows left unwritten.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from distilkernels import ops, reference
from distilkernels._ext import load_extension
from helpers import cu_seqlens_of, fused_qkv

OPS = torch.ops.distilkernels
META = "meta"  # a second device on any machine


def _x():
    return torch.randn(4, 6)


def _qkv():
    return fused_qkv(2, 5, 2, 8)


def _q3():
    q = torch.randn(5, 2, 8)
    return q, q, q


def _packed(weight):
    """pack_linear_weight's layout for this CPU (the C++ packer's panel width when the extension loaded)."""
    return OPS.pack_linear_weight(weight) if load_extension() is not None else reference.pack_linear_weight(weight)


def _word():
    return torch.randn(5, 6)


def _ids():
    return torch.tensor([[0, 1, 2], [3, 4, 0]])


def _ln():
    return torch.ones(6), torch.zeros(6)


def _x_bf16():
    return torch.randn(3, 4).bfloat16()


def _ln5():
    return torch.ones(5), torch.zeros(5)


def _plain_bf16():
    """A (5, 4) weight in linear_bf16's plain layout (weight^T), which every backend and CPU reads."""
    return reference.pack_linear_bf16(torch.randn(5, 4), False)


def _plain_bf16x3():
    """A (5, 4) weight in linear_bf16x3's plain layout ((lo | hi)^T), which every backend and CPU reads."""
    return reference.pack_linear_bf16x3(torch.randn(5, 4), False)


def _plain_int8():
    """(packed, weight_scale) of a (5, 4) weight in linear_int8's plain layout."""
    return reference.pack_linear_int8(torch.randn(5, 4), False)


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


# id: (op, args for ops.<op>, error, message regex, raw)
ROWS = {
    # add_layer_norm(x, residual, weight, bias)
    "layer_norm-dim0": ("add_layer_norm", lambda: (torch.randn(4, 0), None, torch.ones(0), torch.zeros(0)),
                        ValueError, r"x must be \(\.\.\., dim\) with dim > 0", True),
    "layer_norm-x-int": ("add_layer_norm", lambda: (_x().long(), None, torch.ones(6), torch.zeros(6)),
                         TypeError, "x must be float32, float16 or bfloat16", True),
    "layer_norm-weight-size": ("add_layer_norm", lambda: (_x(), None, torch.ones(5), torch.zeros(6)),
                               ValueError, "weight must be a 1-D tensor of size 6", True),
    "layer_norm-weight-dtype": ("add_layer_norm", lambda: (_x(), None, torch.ones(6, dtype=torch.int64),
                                                           torch.zeros(6)),
                                TypeError, "weight must be float32, float16 or bfloat16", True),
    "layer_norm-bias-size": ("add_layer_norm", lambda: (_x(), None, torch.ones(6), torch.zeros(6, 1)),
                             ValueError, "bias must be a 1-D tensor of size 6", True),
    "layer_norm-residual-dtype": ("add_layer_norm", lambda: (_x(), _x().half(), torch.ones(6), torch.zeros(6)),
                                  TypeError, "residual has dtype .* dtypes must match", True),
    "layer_norm-residual-shape": ("add_layer_norm", lambda: (_x(), torch.randn(4, 5), torch.ones(6), torch.zeros(6)),
                                  ValueError, "residual must have x's shape", True),
    "layer_norm-weight-device": ("add_layer_norm", lambda: (_x(), None, torch.ones(6, device=META), torch.zeros(6)),
                                 ValueError, "weight is on meta but x is on cpu", False),
    # embed_layer_norm(word, input_ids, position, position_ids, token_type, token_type_ids, weight, bias)
    "embed-word-dim0": ("embed_layer_norm", lambda: (torch.randn(5, 0), _ids(), torch.randn(4, 0), _ids(), None,
                                                     None, torch.ones(0), torch.zeros(0)),
                        ValueError, r"word must be \(vocab, dim\) with dim > 0", True),
    "embed-word-int": ("embed_layer_norm", lambda: (_word().long(), _ids(), _word(), _ids(), None, None, *_ln()),
                       TypeError, "word must be float32, float16 or bfloat16", True),
    "embed-ids-int16": ("embed_layer_norm", lambda: (_word(), _ids().short(), _word(), _ids(), None, None, *_ln()),
                        TypeError, "input_ids must be int64 or int32, got torch.int16|input_ids must be int64 or "
                        "int32, got Short", True),
    "embed-position-none": ("embed_layer_norm", lambda: (_word(), _ids(), None, None, None, None, *_ln()),
                            TypeError, "position must be a tensor", False),
    "embed-position-ids-none": ("embed_layer_norm", lambda: (_word(), _ids(), _word(), None, None, None, *_ln()),
                                TypeError, "position_ids must be a tensor", False),
    "embed-ids-range": ("embed_layer_norm", lambda: (_word(), _ids() + 5, _word(), _ids(), None, None, *_ln()),
                        IndexError, "input_ids holds 9, out of range for the 5 rows of word", False),
    "embed-position-ids-negative": ("embed_layer_norm", lambda: (_word(), _ids(), _word(), _ids() - 1, None, None,
                                                                 *_ln()),
                                    IndexError, "position_ids holds -1, out of range for the 5 rows of position",
                                    False),
    "embed-position-dim": ("embed_layer_norm", lambda: (_word(), _ids(), torch.randn(5, 4), _ids(), None, None,
                                                        *_ln()),
                           ValueError, r"position must be \(rows, dim\) with dim = 6", True),
    "embed-position-dtype": ("embed_layer_norm", lambda: (_word(), _ids(), _word().half(), _ids(), None, None,
                                                          *_ln()),
                             TypeError, "position has dtype .* dtypes must match", True),
    "embed-position-ids-shape": ("embed_layer_norm", lambda: (_word(), _ids(), _word(), _ids()[:, :2], None, None,
                                                              *_ln()),
                                 ValueError, r"position_ids must be \(batch, seqlen\) = \(2, 3\)", True),
    "embed-token-type-alone": ("embed_layer_norm", lambda: (_word(), _ids(), _word(), _ids(), _word(), None,
                                                            *_ln()),
                               ValueError, "token_type and token_type_ids must be given together", True),
    "embed-weight-size": ("embed_layer_norm", lambda: (_word(), _ids(), _word(), _ids(), None, None,
                                                       torch.ones(5), torch.zeros(6)),
                          ValueError, "weight must be a 1-D tensor of size 6", True),
    # bias_act_(x, bias, activation)
    "bias_act-hidden0": ("bias_act_", lambda: (torch.randn(4, 0), torch.zeros(0), "gelu"),
                         ValueError, r"x must be \(\.\.\., hidden_dim\) with hidden_dim > 0", True),
    "bias_act-x-float64": ("bias_act_", lambda: (_x().double(), torch.zeros(6), "gelu"),
                           TypeError, "x must be float32, float16 or bfloat16", True),
    "bias_act-x-strided": ("bias_act_", lambda: (_x().t(), torch.zeros(4), "relu"),
                           ValueError, "x must be contiguous", True),
    "bias_act-bias-size": ("bias_act_", lambda: (_x(), torch.zeros(5), "relu"),
                           ValueError, "bias must be a 1-D tensor of size 6", True),
    "bias_act-bias-dtype": ("bias_act_", lambda: (_x(), torch.zeros(6, dtype=torch.bfloat16), "relu"),
                            TypeError, "bias has dtype .* dtypes must match", True),
    "bias_act-activation": ("bias_act_", lambda: (_x(), torch.zeros(6), "tanh"),
                            ValueError, r"activation must be one of \('gelu', 'relu'\), got 'tanh'", True),
    "bias_act-bias-device": ("bias_act_", lambda: (_x(), torch.zeros(6, device=META), "relu"),
                             ValueError, "bias is on meta but x is on cpu", False),
    # attention(q, k, v, key_padding_mask)
    "attention-mask-shape": ("attention", lambda: (*_qkv(), torch.ones(2, 4, dtype=torch.bool)),
                             ValueError, r"key_padding_mask must be \(batch, seqlen\) = \(2, 5\)", True),
    "attention-mask-dtype": ("attention", lambda: (*_qkv(), torch.ones(2, 5)),
                             TypeError, r"key_padding_mask must be a bool tensor \(True = attend\)", True),
    "attention-mask-device": ("attention", lambda: (*_qkv(), torch.ones(2, 5, dtype=torch.bool, device=META)),
                              ValueError, "key_padding_mask is on meta but q is on cpu", False),
    "attention-q-int": ("attention", lambda: (*(t.long() for t in _qkv()), None),
                        TypeError, "q must be float32, float16 or bfloat16", True),
    "attention-k-dtype": ("attention", lambda: (lambda q, k, v: (q, k.half(), v, None))(*_qkv()),
                          TypeError, "k has dtype .* dtypes must match", True),
    "attention-k-device": ("attention", lambda: (lambda q, k, v: (q, k.to(META), v, None))(*_qkv()),
                           ValueError, "k is on meta but q is on cpu", False),
    "attention-v-stride": ("attention",
                           lambda: (lambda q, k, v: (q, k, torch.randn(2, 5, 2, 16)[..., ::2], None))(*_qkv()),
                           ValueError, r"v must have a unit stride in its last \(head_dim\) dimension", True),
    "attention-k-shape": ("attention", lambda: (lambda q, k, v: (q, k[:, :4], v, None))(*_qkv()),
                          ValueError, "q, k, v must have one shape", True),
    "attention-3-dims": ("attention", lambda: (*(t[0] for t in _qkv()), None),
                         ValueError, r"q must be \(batch, seqlen, n_heads, head_dim\) \(4 dims\)", True),
    "attention-head_dim-257": ("attention", lambda: (*([torch.randn(1, 2, 1, 257)] * 3), None),
                               ValueError, r"head_dim \(last dim of q\) must be in 1..256, got 257", True),
    "attention-head_dim-0": ("attention", lambda: (*([torch.randn(1, 2, 1, 0)] * 3), None),
                             ValueError, r"head_dim \(last dim of q\) must be in 1..256, got 0", True),
    # varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    "varlen-cu-int64": ("varlen_attention", lambda: (*_q3(), torch.tensor([0, 5]), 5),
                        TypeError, "cu_seqlens must be int32", True),
    "varlen-cu-one-entry": ("varlen_attention", lambda: (*_q3(), _cu([0]), 5),
                            ValueError, r"cu_seqlens must be a 1-D tensor \(batch \+ 1,\) with at least 2 entries",
                            True),
    "varlen-cu-2d": ("varlen_attention", lambda: (*_q3(), _cu([[0, 5]]), 5),
                     ValueError, r"cu_seqlens must be a 1-D tensor \(batch \+ 1,\)", True),
    "varlen-cu-start": ("varlen_attention", lambda: (*_q3(), _cu([1, 5]), 5),
                        ValueError, r"cu_seqlens\[0\] must be 0, got 1", True),
    "varlen-cu-decreasing": ("varlen_attention", lambda: (*_q3(), _cu([0, 3, 2, 5]), 5),
                             ValueError, r"cu_seqlens must be non-decreasing, but cu_seqlens\[2\] = 2", True),
    "varlen-cu-end-short": ("varlen_attention", lambda: (*_q3(), _cu([0, 2, 4]), 5),
                            ValueError, r"cu_seqlens\[-1\] must equal total_tokens = 5, got 4", True),
    "varlen-cu-end-long": ("varlen_attention", lambda: (*_q3(), _cu([0, 3, 9]), 9),
                           ValueError, r"cu_seqlens\[-1\] must equal total_tokens = 5, got 9", True),
    "varlen-max_seqlen-small": ("varlen_attention", lambda: (*_q3(), _cu([0, 3, 5]), 2),
                                ValueError, r"max_seqlen must be >= the longest sequence \(3", True),
    "varlen-max_seqlen-negative": ("varlen_attention", lambda: (*_q3(), _cu([0, 5]), -1),
                                   ValueError, "max_seqlen must be an int >= 0, got -1", True),
    "varlen-cu-device": ("varlen_attention", lambda: (*_q3(), _cu([0, 5]).to(META), 5),
                         ValueError, "cu_seqlens is on meta but q is on cpu", False),
    # linear(x, weight, bias)
    "linear-in_features": ("linear", lambda: (torch.randn(3, 4), torch.randn(5, 6), None),
                           ValueError, r"weight must be \(out_features, in_features=4\)", True),
    "linear-x-3d": ("linear", lambda: (torch.randn(2, 3, 4), torch.randn(5, 4), None),
                    ValueError, r"x must be \(tokens, in_features\)", True),
    "linear-x-int": ("linear", lambda: (torch.ones(3, 4, dtype=torch.int32), torch.randn(5, 4), None),
                     TypeError, "x must be float32, float16 or bfloat16", True),
    "linear-weight-dtype": ("linear", lambda: (torch.randn(3, 4), torch.randn(5, 4).half(), None),
                            TypeError, "weight has dtype .* dtypes must match", True),
    "linear-bias-size": ("linear", lambda: (torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)),
                         ValueError, "bias must be", True),
    # pack_linear_weight(weight), linear_packed(x, packed_weight, out_features, bias, activation)
    "pack-weight-bf16": ("pack_linear_weight", lambda: (torch.randn(5, 4).bfloat16(),),
                         TypeError, "weight must be float32 to be packed", True),
    "pack-weight-3d": ("pack_linear_weight", lambda: (torch.randn(5, 4, 1),),
                       ValueError, r"weight must be \(out_features, in_features\)", True),
    "linear_packed-x-float64": ("linear_packed", lambda: (torch.randn(3, 4).double(), torch.zeros(1, 4, 16), 5,
                                                          None, "none"),
                                TypeError, "x must be float32", True),
    "linear_packed-activation": ("linear_packed", lambda: (torch.randn(3, 4), _packed(torch.randn(5, 4)),
                                                           5, None, "tanh"),
                                 ValueError, r"activation must be one of \('none', 'gelu', 'relu'\), got 'tanh'", True),
    "linear_packed-strided": ("linear_packed", lambda: (torch.randn(3, 4), _packed(torch.randn(5, 4))
                                                        .transpose(1, 2).contiguous().transpose(1, 2), 5, None, "none"),
                              ValueError, "packed_weight must be contiguous", True),
    # pack_linear_bf16(weight), linear_bf16(x, packed_weight, out_features, bias, activation)
    "pack_bf16-weight-1d": ("pack_linear_bf16", lambda: (torch.randn(5),),
                            ValueError, r"weight must be \(out_features, in_features\)", False),
    "linear_bf16-x-fp32": ("linear_bf16", lambda: (torch.randn(3, 4), _plain_bf16(), 5),
                           TypeError, r"x must be a 2-D \(tokens, in_features\) bfloat16", False),
    "linear_bf16-packed-dtype": ("linear_bf16", lambda: (_x_bf16(), _plain_bf16().float(), 5),
                                 ValueError, "packed_weight must be a 2-D or 3-D torch.bfloat16", False),
    "linear_bf16-packed-shape": ("linear_bf16", lambda: (_x_bf16(), _plain_bf16(), 6),
                                 ValueError, r"packed_weight must be \(in_features=4, out_features=6\)", False),
    "linear_bf16-bias-size": ("linear_bf16", lambda: (_x_bf16(), _plain_bf16(), 5, torch.randn(4)),
                              ValueError, r"bias must be None or a tensor of shape \(5,\)", False),
    "linear_bf16-activation": ("linear_bf16", lambda: (_x_bf16(), _plain_bf16(), 5, None, "tanh"),
                               ValueError, "activation must be one of", False),
    # pack_linear_bf16x3(weight), linear_bf16x3(x, packed_weight, out_features, bias, activation)
    "pack_bf16x3-weight-1d": ("pack_linear_bf16x3", lambda: (torch.randn(5),),
                              ValueError, r"weight must be \(out_features, in_features\)", False),
    "pack_bf16x3-weight-int": ("pack_linear_bf16x3", lambda: (torch.ones(5, 4, dtype=torch.long),),
                               TypeError, "weight must be float32, float16 or bfloat16, got torch.int64", False),
    "linear_bf16x3-x-bf16": ("linear_bf16x3", lambda: (_x_bf16(), _plain_bf16x3(), 5),
                             TypeError, r"x must be a 2-D \(tokens, in_features\) float32", False),
    "linear_bf16x3-packed-dtype": ("linear_bf16x3", lambda: (torch.randn(3, 4), _plain_bf16x3().float(), 5),
                                   ValueError, "packed_weight must be a 2-D or 3-D torch.bfloat16", False),
    "linear_bf16x3-packed-shape": ("linear_bf16x3", lambda: (torch.randn(3, 4), _plain_bf16x3(), 6),
                                   ValueError, r"packed_weight must be \(2 \* in_features=8, out_features=6\)", False),
    "linear_bf16x3-bias-size": ("linear_bf16x3", lambda: (torch.randn(3, 4), _plain_bf16x3(), 5, torch.randn(4)),
                                ValueError, r"bias must be None or a tensor of shape \(5,\)", False),
    "linear_bf16x3-activation": ("linear_bf16x3", lambda: (torch.randn(3, 4), _plain_bf16x3(), 5, None, "tanh"),
                                 ValueError, "activation must be one of", False),
    # linear_bf16_add_layer_norm(x, packed_weight, out_features, bias, residual, weight, ln_bias)
    "linear_bf16_ln-residual-shape": ("linear_bf16_add_layer_norm",
                                      lambda: (_x_bf16(), _plain_bf16(), 5, None, _x_bf16(), *_ln5()),
                                      ValueError, r"residual must be \(tokens, out_features\) = \(3, 5\)", False),
    "linear_bf16_ln-residual-fp32": ("linear_bf16_add_layer_norm",
                                     lambda: (_x_bf16(), _plain_bf16(), 5, None, torch.randn(3, 5), *_ln5()),
                                     TypeError, "residual must be a bfloat16 tensor", False),
    "linear_bf16_ln-weight-size": ("linear_bf16_add_layer_norm",
                                   lambda: (_x_bf16(), _plain_bf16(), 5, None, torch.randn(3, 5).bfloat16(),
                                            torch.ones(4), torch.zeros(5)),
                                   ValueError, "weight must be a 1-D tensor of size 5", False),
    "linear_bf16_ln-ln_bias-int": ("linear_bf16_add_layer_norm",
                                   lambda: (_x_bf16(), _plain_bf16(), 5, None, torch.randn(3, 5).bfloat16(),
                                            torch.ones(5), torch.zeros(5, dtype=torch.int32)),
                                   TypeError, "ln_bias must be", False),
    # pack_linear_int8(weight), linear_int8(x, packed_weight, weight_scale, out_features, bias, activation,
    # out_dtype)
    "pack_int8-vnni-no-in-features": ("pack_linear_int8", lambda: (torch.randn(5, 0), True),
                                      ValueError, "in_features > 0 for vnni=True", False),
    "pack_bf16-vnni-no-in-features": ("pack_linear_bf16", lambda: (torch.randn(5, 0), True),
                                      ValueError, "in_features > 0 for vnni=True", False),
    "pack_bf16x3-vnni-no-in-features": ("pack_linear_bf16x3", lambda: (torch.randn(5, 0), True),
                                        ValueError, "in_features > 0 for vnni=True", False),
    "linear_packed-panel-0": ("linear_packed", lambda: (torch.randn(2, 8), torch.randn(0, 8, 0), 0),
                              ValueError, r"packed_weight \(0, 8, 0\) does not hold a \(0, 8\) weight", False),
    "pack_int8-weight-max-0": ("pack_linear_int8", lambda: (torch.randn(5, 4), False, 0),
                               ValueError, r"weight_max must be an integer in \[1, 127\]", True),
    "pack_int8-weight-max-128": ("pack_linear_int8", lambda: (torch.randn(5, 4), False, 128),
                                 ValueError, r"weight_max must be an integer in \[1, 127\]", True),
    "pack_int8-weight-1d": ("pack_linear_int8", lambda: (torch.randn(5),),
                            ValueError, r"weight must be \(out_features, in_features\)", False),
    "linear_int8-x-fp16": ("linear_int8", lambda: (torch.randn(3, 4).half(), *_plain_int8(), 5),
                           TypeError, "x must be a 2-D .* float32 or bfloat16", False),
    "linear_int8-out-dtype": ("linear_int8", lambda: (torch.randn(3, 4), *_plain_int8(), 5, None, "none",
                                                      torch.float16),
                              TypeError, "out_dtype must be None, torch.float32 or torch.bfloat16", False),
    "linear_int8-packed-dtype": ("linear_int8", lambda: (lambda p, s: (torch.randn(3, 4), p.float(), s, 5))(
                                     *_plain_int8()),
                                 ValueError, "packed_weight must be a 2-D or 3-D torch.int8", False),
    "linear_int8-packed-shape": ("linear_int8", lambda: (lambda p, s: (torch.randn(3, 4), p, s[:4], 4))(
                                     *_plain_int8()),
                                 ValueError, r"packed_weight must be \(in_features=4, out_features=4\)", False),
    "linear_int8-scale-size": ("linear_int8", lambda: (lambda p, s: (torch.randn(3, 4), p, s[:4], 5))(
                                   *_plain_int8()),
                               ValueError, r"weight_scale must be a float32 tensor of shape \(5,\)", False),
    "linear_int8-bias-dtype": ("linear_int8", lambda: (torch.randn(3, 4), *_plain_int8(), 5,
                                                       torch.randn(5).bfloat16()),
                               ValueError, r"bias must be None or a tensor of shape \(5,\)", False),
    # normalize_rows(x), scale_rows_(y, scale, bias)
    "normalize-x-bf16": ("normalize_rows", lambda: (_x().bfloat16(),), TypeError, "x must be float32", True),
    "normalize-x-1d": ("normalize_rows", lambda: (_x()[0],), ValueError, r"x must be 2-D \(rows, cols\)", True),
    "scale_rows-y-strided": ("scale_rows_", lambda: (_x().t(), torch.ones(6), None),
                             ValueError, "y must be contiguous", True),
    "scale_rows-scale-size": ("scale_rows_", lambda: (_x(), torch.ones(6), None), ValueError, "scale must be", True),
    "scale_rows-scale-dtype": ("scale_rows_", lambda: (_x(), torch.ones(4, dtype=torch.float64), None),
                               ValueError, "scale must be", True),
    "scale_rows-bias-size": ("scale_rows_", lambda: (_x(), torch.ones(4), torch.ones(4)),
                             ValueError, "bias must be", True),
}

# The raw ops' extra scalar arguments that distilkernels.ops fills in.
RAW_EXTRA = {"attention": (1.0,), "varlen_attention": (1.0,), "add_layer_norm": (1e-5,), "embed_layer_norm": (1e-5,)}


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input_same_error_on_every_backend(backend, case):
    op, make_args, error, message, _ = ROWS[case]
    with ops.force_backend(backend), pytest.raises(error, match=message) as caught:
        getattr(ops, op)(*make_args())
    assert type(caught.value) is error, caught.value  # the same class, not a subclass, on every backend


@pytest.mark.requires_ext
def test_linear_packed_panel_width_of_another_backend():
    """The C++ kernels read panels of their own width only (two vectors of this CPU's ISA): another width (a
    packing from another CPU or backend) is a ValueError, as the other checks are; the torch and Triton
    backends unpack any width, so there it runs."""
    x, weight = torch.randn(2, 8), torch.randn(5, 8)
    other = reference.pack_linear_weight(weight, panel=64)
    with ops.force_backend("cpp"), pytest.raises(ValueError, match="as pack_linear_weight makes it on this CPU"):
        ops.linear_packed(x, other, 5)
    with ops.force_backend("torch"):
        assert torch.allclose(ops.linear_packed(x, other, 5), x @ weight.T, atol=1e-5)


def _grad_cases():
    """op -> (args, index of the argument made to require grad): one call per compute op."""
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    q = torch.randn(2, 3, 2, 8)
    v = torch.randn(6, 2, 8)
    return {
        "linear": ((x, w, b), 1),
        "linear_packed": ((x, ops.pack_linear_weight(w), 5, b), 3),
        "add_layer_norm": ((_x(), _x(), torch.ones(6), torch.zeros(6)), 0),
        "embed_layer_norm": ((_word(), _ids(), _word(), _ids(), None, None, *_ln()), 0),
        "bias_act_": ((torch.randn(3, 5), b, "gelu"), 1),
        "attention": ((q, q, q), 2),
        "varlen_attention": ((v, v, v, cu_seqlens_of([2, 4]), 4), 0),
        "normalize_rows": ((x,), 0),
        "scale_rows_": ((x.clone(), torch.rand(3)), 1),
        "linear_bf16": ((_x_bf16(), _plain_bf16(), 5, b), 3),
        "linear_int8": ((x, *_plain_int8(), 5), 0),
    }


@pytest.mark.parametrize("case", sorted(_grad_cases()))
def test_inputs_that_need_grad_are_refused(backend, case):
    """The ops have no backward: an argument that requires grad, with grad mode on, is an error that names it
    (its output would otherwise leave the autograd graph silently); under no_grad the same call runs."""
    args, i = _grad_cases()[case]
    args = list(args)
    args[i] = args[i].clone().requires_grad_()
    name = list(inspect.signature(getattr(ops, case)).parameters)[i]
    with ops.force_backend(backend):
        with pytest.raises(RuntimeError, match=f"ops.{case} has no backward .* {name} requires grad"):
            getattr(ops, case)(*args)
        with torch.no_grad():
            getattr(ops, case)(*args)


@pytest.mark.requires_ext
@pytest.mark.parametrize("case", [name for name, row in ROWS.items() if row[4]])
def test_bad_input_raw_cpp_op_says_the_same(case):
    op, make_args, _, message, _ = ROWS[case]
    with pytest.raises(RuntimeError, match=message):
        getattr(OPS, op)(*make_args(), *RAW_EXTRA.get(op, ()))


# ----------------------------------------------------------------------------------------------------------
# Empty inputs that are not errors: every backend writes the same, whole result


def _empty_cases():
    q0 = torch.randn(0, 5, 2, 8)
    q_len0 = torch.randn(2, 0, 2, 8)
    v0 = torch.randn(0, 2, 8)
    return {
        "linear-0-tokens": ("linear", (torch.randn(0, 4), torch.randn(5, 4), torch.randn(5))),
        "linear-0-in_features": ("linear", (torch.randn(3, 0), torch.randn(5, 0), torch.randn(5))),
        "layer_norm-0-rows": ("add_layer_norm", (torch.randn(0, 6), torch.randn(0, 6), torch.ones(6), torch.zeros(6))),
        "bias_act-0-rows": ("bias_act_", (torch.randn(0, 6), torch.randn(6), "gelu")),
        "embed-0-batch": ("embed_layer_norm", (torch.randn(5, 6), torch.zeros(0, 3, dtype=torch.long),
                                               torch.randn(4, 6), torch.zeros(1, 3, dtype=torch.long), None, None,
                                               torch.ones(6), torch.zeros(6))),
        "attention-0-batch": ("attention", (q0, q0, q0, torch.ones(0, 5, dtype=torch.bool))),
        "attention-0-seqlen": ("attention", (q_len0, q_len0, q_len0, None)),
        "varlen-0-tokens": ("varlen_attention", (v0, v0, v0, cu_seqlens_of([0]), 0)),
        "varlen-empty-sequences": ("varlen_attention",
                                   (*torch.randn(4, 3, 2, 8).unbind(1), cu_seqlens_of([0, 4, 0]), 4)),
        "linear_bf16_ln-0-tokens": ("linear_bf16_add_layer_norm",
                                    (torch.randn(0, 4).bfloat16(), reference.pack_linear_bf16(torch.randn(5, 4), False),
                                     5, torch.randn(5), torch.randn(0, 5).bfloat16(), torch.ones(5), torch.zeros(5))),
        "linear_bf16x3-0-tokens": ("linear_bf16x3", (torch.randn(0, 4), reference.pack_linear_bf16x3(torch.randn(5, 4),
                                                                                                False), 5, torch.randn(5))),
        "linear_bf16x3-0-in_features": ("linear_bf16x3", (torch.randn(3, 0),
                                                          reference.pack_linear_bf16x3(torch.randn(5, 0), False), 5,
                                                          torch.randn(5), "relu")),
        "normalize-0-rows": ("normalize_rows", (torch.randn(0, 4),)),
        "normalize-0-cols": ("normalize_rows", (torch.randn(3, 0),)),
    }


@pytest.mark.parametrize("case", list(_empty_cases()))
def test_empty_inputs_agree_on_every_backend(backend, case):
    op, args = _empty_cases()[case]
    clone = (lambda a: a.clone() if isinstance(a, torch.Tensor) else a)
    with ops.force_backend("torch"):
        expected = getattr(ops, op)(*map(clone, args))
    with ops.force_backend(backend):
        got = getattr(ops, op)(*map(clone, args))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-6), f"{case}: {g} != {e}"



def test_cu_seqlens_value_checks_on_a_gpu_only_behind_the_debug_switch(monkeypatch):
    """Checking cu_seqlens' values costs a device-to-host copy and a sync: on CPU always, elsewhere only with
    DISTILKERNELS_CHECK_CU_SEQLENS=1 (read per call)."""
    from distilkernels import _checks

    monkeypatch.delenv("DISTILKERNELS_CHECK_CU_SEQLENS", raising=False)
    assert _checks._host_check_wanted(torch.device("cpu"))
    assert not _checks._host_check_wanted(torch.device("cuda"))
    monkeypatch.setenv("DISTILKERNELS_CHECK_CU_SEQLENS", "1")
    assert _checks._host_check_wanted(torch.device("cuda"))
