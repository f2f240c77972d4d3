"""The GEMM kernels a fused block's dense (fp32/bf16) GEMMs choose from (distilkernels.gemms): our packed
kernels, oneDNN's prepacked linear (whole or in row chunks) and MKL's packed GEMM. Which one runs is measured
per CPU, so every one of them must give HF's result wherever it can be chosen: each is forced in turn here, on
weights large enough to enter the contest."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import distilkernels
from distilkernels import gemms

from conftest import base_config, tiny_config
from helpers import holey_mask, lowp_bound, magnitude, make_model, max_err, model_inputs

pytestmark = pytest.mark.requires_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_rows_in_chunks(dtype, monkeypatch):
    """oneDNN's linear fed in row chunks (gemms._CHUNK_ROWS) computes what one call computes: each output row
    depends on its own input row only, so the chunked and whole results agree to one rounding of the output
    dtype (oneDNN may pick another K blocking per row count), and both are within torch's own error in that
    dtype of an fp64 reference. The chunk choice is made once per bucket of rows, and only above the chunk."""
    if not gemms._onednn_available(dtype):
        pytest.skip("oneDNN's prepacked linear is not available in this torch build")
    torch.manual_seed(0)
    x = torch.randn(gemms._CHUNK_ROWS * 2 + 37, 320).to(dtype)
    weight, bias = torch.randn(300, 320).to(dtype), torch.randn(300).to(dtype)
    packed = gemms._onednn_pack(weight)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), weight.double(), bias.double()))
    whole = gemms._onednn_chunked(x, packed, bias, "gelu", 0)
    chunked = gemms._onednn_chunked(x, packed, bias, "gelu", gemms._CHUNK_ROWS)
    torch_same = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    floor = 1e-5 * 320 ** 0.5 * magnitude(ref) if dtype == torch.float32 else None  # test_linear's fp32 bound
    for got in (whole, chunked):
        assert got.shape == ref.shape
        assert max_err(got, ref) <= lowp_bound(got, ref, [torch_same], floor=floor)
    monkeypatch.setattr(gemms, "_ROW_CHUNK", {})
    assert gemms.onednn_row_chunk(x[: gemms._CHUNK_ROWS], packed, bias, "gelu") == 0  # no contest, no entry
    assert gemms._ROW_CHUNK == {}
    assert gemms.onednn_row_chunk(x, packed, bias, "gelu") in (0, gemms._CHUNK_ROWS)
    assert list(gemms._ROW_CHUNK) == [(dtype, 320, 300, 1024)]
    gemms.onednn_row_chunk(x[:600], packed, bias, "gelu")  # same bucket: measured once
    assert len(gemms._ROW_CHUNK) == 1



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", sorted(gemms._KERNELS))
def test_every_contest_kernel_matches_hf(kernel, dtype, monkeypatch):
    """distilbert-base's shapes (2 layers), a holey batch of > _CHUNK_ROWS real tokens (so oneDNN's row chunks are
    contested too), each kernel forced for every GEMM. fp32: HF fp32's values on real tokens to 1e-4. bf16: error
    vs HF fp32 within 2x HF bf16's own (helpers' low-precision rule)."""
    if not gemms._KERNELS[kernel].available(dtype):
        pytest.skip(f"{kernel} has no {dtype} GEMM in this torch build")
    config = base_config(n_layers=2)
    model = make_model(transformers.DistilBertModel, config)
    mask = holey_mask(4, 120, seed=3)
    inputs = model_inputs(transformers.DistilBertModel, config, 4, 120, mask, with_labels=False)
    valid = mask.bool()
    with torch.inference_mode():
        ref = model.double()(**inputs).last_hidden_state[valid]
        model.float()
        torch_same = copy.deepcopy(model).to(dtype)(**inputs).last_hidden_state[valid]
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    forced = (kernel,) * len(gemms._CONTEST_ROWS)
    monkeypatch.setattr(gemms, "_WINNER", {(dtype, k, n, act): forced for k, n in shapes for act in ("none", "gelu")})
    monkeypatch.setattr(gemms, "_ROW_CHUNK", {})
    patched = copy.deepcopy(model).to(dtype)
    distilkernels.patch(patched)
    with torch.inference_mode():
        got = patched(**inputs).last_hidden_state[valid]
    gemm = next(b for b in patched.modules() if hasattr(b, "_parts"))._parts.gemms
    packing = gemms._KERNELS[kernel].packing or kernel  # mkl_rows reads mkl's packing
    assert list(gemm.packed["lin1"]) == [packing] and gemm.packed["lin1"][packing].value[0] == packing  # it ran
    (_, calls), = gemm.bound.values()
    own = gemms._KERNELS[kernel].args  # mkl_rows: its row chunk, bound after the common arguments
    assert not own or calls.lin1_act.args[-len(own):] == own
    if dtype == torch.float32:
        assert max_err(got, ref) <= 1e-4
    else:
        assert max_err(got, ref) <= lowp_bound(got, ref, [torch_same])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_per_row_count(dtype, monkeypatch):
    """A GEMM takes the winner of the contest row count nearest its own: with one kernel forced for one sequence
    and another for a batch, a block packs for each on first use, both give the same result up to the
    dtype's rounding, and a dtype change drops the old packings."""
    if not gemms._onednn_available(dtype):
        pytest.skip("oneDNN's prepacked linear is not available in this torch build")
    torch.manual_seed(0)
    model = make_model(transformers.DistilBertModel, base_config(n_layers=1)).to(dtype)
    distilkernels.patch(model)
    block_gemms = next(b for b in model.modules() if hasattr(b, "_parts"))._parts.gemms
    winners = ("packed", "onednn")
    assert len(gemms._CONTEST_ROWS) == len(winners)
    monkeypatch.setattr(gemms, "_WINNER", {(dtype, 768, 768, "none"): winners})
    x = torch.randn(2000, 768).to(dtype)
    with torch.inference_mode():
        small, large = block_gemms.out(x[:100]), block_gemms.out(x)
    assert sorted(block_gemms.packed["out"]) == ["onednn", "packed"]
    eps = torch.finfo(dtype).eps
    assert max_err(small, large[:100]) <= 100 * eps * 768 ** 0.5 * max(1.0, magnitude(large))
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    model.to(other)
    with torch.inference_mode():
        block_gemms.out(x[:100].to(other))
    assert block_gemms.packed_dtype == other and len(block_gemms.packed["out"]) == 1


def test_mkl_kernels_share_one_packing(monkeypatch):
    """MKL threaded over the whole GEMM ("mkl") and by us over chunks of rows ("mkl_rows") read one packing: a
    GEMM that takes each at one row count packs once, and the two agree to fp32 rounding (each output row is its
    own input row's, whoever splits the rows)."""
    if not gemms._mkl_available(torch.float32):
        pytest.skip("this torch build does not export MKL's packed GEMM")
    torch.manual_seed(0)
    model = make_model(transformers.DistilBertModel, base_config(n_layers=1))
    distilkernels.patch(model)
    block_gemms = next(b for b in model.modules() if hasattr(b, "_parts"))._parts.gemms
    monkeypatch.setattr(gemms, "_WINNER", {(torch.float32, 768, 768, "none"): ("mkl_rows", "mkl")})
    x = torch.randn(2000, 768)
    with torch.inference_mode():
        chunked, whole = block_gemms.out(x[:gemms._MKL_ROW_CHUNK * 2]), block_gemms.out(x)
    assert list(block_gemms.packed["out"]) == ["mkl"]
    assert max_err(chunked, whole[: gemms._MKL_ROW_CHUNK * 2]) <= 100 * torch.finfo().eps * 768 ** 0.5 * max(
        1.0, magnitude(whole))


def test_no_contest_where_the_amx_tile_loop_runs(monkeypatch):
    """bf16 GEMMs that our AMX tile loop runs (in_features a multiple of 32, a matrix unit that takes bf16) take
    it at every row count without a contest; other in_features, and fp32, are contested."""
    contested = []
    monkeypatch.setattr(gemms, "_WINNER", {})
    monkeypatch.setattr(gemms, "_contest", lambda *key: contested.append(key) or ("packed",) * len(gemms._CONTEST_ROWS))
    amx = gemms.use_matrix_unit("bf16")
    for rows in (1, 128, 1024, 5000):
        assert gemms.dense_kernel(torch.bfloat16, 768, 2304, "none", rows) == "packed"
    gemms.dense_kernel(torch.bfloat16, 770, 2304, "none", 128)
    gemms.dense_kernel(torch.float32, 768, 2304, "none", 128)
    expected = [(torch.bfloat16, 770, 2304, "none"), (torch.float32, 768, 2304, "none")]
    assert contested == (expected if amx else [(torch.bfloat16, 768, 2304, "none")] + expected)
    assert gemms.amx_loop_runs(torch.bfloat16, 768) == amx and not gemms.amx_loop_runs(torch.bfloat16, 770)


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_gemms_follow_torch_matmul_precision(precision, monkeypatch, fp32_matmul_precision):
    """fp32 GEMMs large enough to be contested take bf16x3 (three bf16 products on the matrix unit) exactly where
    torch's float32 matmul precision permits it ("high", "medium") and the CPU's matrix unit takes bf16, at
    every row count and without a contest; smaller ones, bf16 ones and every GEMM under "highest" are as before.
    DISTILKERNELS_MATRIX_UNITS=off turns it off as it turns off the bf16 tiles."""
    contested = []
    monkeypatch.setattr(gemms, "_WINNER", {})
    monkeypatch.setattr(gemms, "_contest", lambda *key: contested.append(key) or ("packed",) * len(gemms._CONTEST_ROWS))
    fp32_matmul_precision(precision)
    x3 = precision != "highest" and gemms.use_matrix_unit("bf16")
    assert gemms.bf16x3_allowed() == x3
    for rows in (1, 128, 1024, 5000):
        assert (gemms.dense_kernel(torch.float32, 768, 3072, "gelu", rows) == "bf16x3") == x3
    assert gemms.dense_kernel(torch.float32, 64, 64, "none", 128) == "packed"  # below the contest's size
    assert gemms.dense_kernel(torch.bfloat16, 768, 3072, "gelu", 128) != "bf16x3"
    assert (contested == []) == x3
    monkeypatch.setenv(gemms.MATRIX_UNITS_ENV, "off")
    assert not gemms.bf16x3_allowed()
    assert gemms.dense_kernel(torch.float32, 768, 3072, "gelu", 128) != "bf16x3"


def test_derived_weights_read_what_attribute_lookup_reads():
    """DerivedWeights reads weight/bias from the parameter dict only where attribute lookup would find the same
    tensor: a parametrized weight (a property on the module's class) is read through the property, and a
    parameter replaced or changed in place is seen."""
    import torch.nn.utils.parametrize as parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    plain, param = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    parametrize.register_parametrization(param, "weight", Double())
    derived = gemms.DerivedWeights((plain, param))
    weight, bias = derived.get()
    assert torch.equal(weight, torch.cat([plain.weight, param.weight]))
    assert torch.equal(weight[3:], 2 * param.parametrizations.weight.original)
    assert torch.equal(bias, torch.cat([plain.bias, param.bias]))
    plain.weight = torch.nn.Parameter(torch.ones(3, 4))
    assert torch.equal(derived.get()[0][:3], torch.ones(3, 4))
    with torch.no_grad():
        param.parametrizations.weight.original.fill_(0.5)
    assert torch.equal(derived.get()[0][3:], torch.ones(3, 4))


@pytest.mark.parametrize("quantized", [False, True])
def test_bound_gemms_follow_weight_changes(quantized):
    """A block's GEMMs bound once per kind of call (DenseGemms.calls / Int8Gemms.calls) are kept only while
    the block's weights and biases are the same tensors, unchanged: a parameter replaced, one changed in place
    and a dtype change each give a new binding computing with the new weights, and no binding of old weights
    stays alive."""
    from distilkernels import quant

    config = tiny_config()
    model = make_model(transformers.DistilBertModel, config)
    distilkernels.patch(model)
    if quantized:
        distilkernels.quantize(model)
    block = model.transformer.layer[0]
    parts = block._parts
    x = torch.randn(5, config.dim)

    def expected(x):  # what the bound q|k|v GEMM must compute now
        w = torch.cat([parts.q.weight, parts.k.weight, parts.v.weight]).float()
        b = torch.cat([parts.q.bias, parts.k.bias, parts.v.bias]).float()
        return torch.nn.functional.linear(x.float(), w, b)

    def check(x, rel):
        calls = parts.gemms.calls(x, "gelu")
        assert parts.gemms.calls(x, "gelu") is calls  # kept while nothing changed
        want = expected(x)
        assert (calls.qkv(x).float() - want).abs().max() <= rel * max(1.0, want.abs().max().item())
        assert len(parts.gemms.bound) == 1
        return calls

    # Relative to the outputs' magnitude: fp32 GEMM rounding (~sqrt(K) ulps, far below 1e-5); int8 with one
    # scale per token and per output channel, a few 1/127 steps of |x| |w| summed over K in random signs
    # (~1%); bf16, a few bf16 roundings (2^-8 each). A binding of the old weights is off by O(magnitude).
    rel = 0.03 if quantized else 1e-5
    with torch.inference_mode():
        first = check(x, rel)
    with torch.no_grad():
        parts.k.weight.mul_(-3.0)  # in place: the version counter moves
    with torch.inference_mode():
        second = check(x, rel)
    assert second is not first
    parts.q.weight = torch.nn.Parameter(torch.randn_like(parts.q.weight))  # replaced
    with torch.inference_mode():
        third = check(x, rel)
    assert third is not second
    if not quantized:  # a dtype change: bf16 weights, bf16 inputs
        model.to(torch.bfloat16)
        with torch.inference_mode():
            check(x.bfloat16(), 0.03)
    assert isinstance(parts.gemms, quant.Int8Gemms if quantized else gemms.DenseGemms)
