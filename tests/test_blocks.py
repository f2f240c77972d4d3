"""The C++ block loop (csrc/blocks.cpp, modules.run_blocks): on the C++ backend every stack of fused blocks runs
through it, one call for the whole stack. It calls the ops the Python loop (FusedBlock._forward_tokens_python)
calls, with the same arguments and in the same order, so the two give bit-identical results in every precision,
layout and GEMM kernel; the model-level parity tests (test_parity, test_gemms, test_quant) hold it to HF."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import distilkernels
from distilkernels import gemms, modules
from distilkernels._ext import load_extension

from conftest import base_config, tiny_config
from helpers import holey_mask, make_model

pytestmark = pytest.mark.requires_ext

MODES = ("fp32", "fp32-high", "bf16", "int8")
LAYOUTS = ("no-mask", "holey-mask", "packed")


def _patched(mode: str, config):
    model = make_model(transformers.DistilBertModel, config)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    if mode == "int8":
        distilkernels.quantize(model)
    else:
        distilkernels.patch(model)
    return model


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, modules.FusedBlock)]


def _layout(name: str, batch: int, seqlen: int) -> dict:
    if name == "no-mask":
        return {"batch": batch, "seqlen": seqlen}
    mask = holey_mask(batch, seqlen, seed=5).bool()
    if name == "holey-mask":
        return {"batch": batch, "seqlen": seqlen, "key_padding_mask": mask}
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return {"cu_seqlens": cu, "max_seqlen": int(lengths.max())}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_cpp_loop_is_the_python_loop(mode, layout, fp32_matmul_precision):
    """Odd sizes (dim 96 in 3 heads, hidden 200), two blocks: the C++ loop and the Python loop agree exactly."""
    if mode == "fp32-high":
        if not gemms.use_matrix_unit("bf16"):
            pytest.skip("fp32 as bf16x3 products runs where the CPU's matrix unit takes bf16 (AMX) only")
        fp32_matmul_precision("high")
    config = tiny_config(dim=96, n_heads=3, hidden_dim=200, n_layers=2)
    model = _patched(mode, config)
    blocks = _blocks(model)
    assert len(blocks) == 2
    batch, seqlen = 3, 37
    args = _layout(layout, batch, seqlen)
    tokens = int(args["cu_seqlens"][-1]) if layout == "packed" else batch * seqlen
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        assert all(b._cpp_block(x) is not None for b in blocks)  # the C++ loop runs these
        got = modules.run_blocks(blocks, x, **args)
        want = x
        for b in blocks:
            want = b._forward_tokens_python(want, **args)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_python_gemm_in_the_cpp_loop(dtype, monkeypatch):
    """A GEMM that is not one op (oneDNN's linear, fed in row chunks where that measured faster) is called back
    in Python from the C++ loop, and gives what the Python loop gives."""
    if not gemms._onednn_available(dtype):
        pytest.skip("oneDNN's prepacked linear is not available in this torch build")
    config = base_config(n_layers=1, dim=256, n_heads=4, hidden_dim=512)
    forced = ("onednn",) * len(gemms._CONTEST_ROWS)
    shapes = ((256, 768), (256, 256), (256, 512), (512, 256))
    monkeypatch.setattr(gemms, "_WINNER", {(dtype, k, n, act): forced for k, n in shapes for act in ("none", "gelu")})
    monkeypatch.setattr(gemms, "_ROW_CHUNK", {})
    monkeypatch.setattr(gemms, "amx_loop_runs", lambda dtype, in_features: False)
    model = _patched("bf16" if dtype == torch.bfloat16 else "fp32", config)
    (block,) = _blocks(model)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        calls = block._parts.gemms.calls(x, block._parts.act)
        assert not isinstance(calls.qkv, gemms.BoundOp)  # a Python callable
        got = modules.run_blocks([block], x, batch=3, seqlen=100)
        want = block._forward_tokens_python(x, batch=3, seqlen=100)
    assert torch.equal(got, want)


def test_cpp_loop_follows_parameter_changes():
    """The bound C++ block is rebuilt when a LayerNorm parameter is replaced and sees in-place changes of the
    ones it holds; replaced or changed GEMM weights rebind the GEMMs (gemms.bound_calls): each forward equals HF
    fp32 run on the same parameters."""
    config = tiny_config(n_layers=2)
    ref = make_model(transformers.DistilBertModel, config)
    model = copy.deepcopy(ref)
    distilkernels.patch(model)
    ids = torch.randint(1, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    mask = holey_mask(2, 19, seed=3)

    def check():
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
        assert (got[valid] - want[valid]).abs().max().item() <= 1e-4

    check()
    for m in (model, ref):  # a replaced LayerNorm weight: another tensor
        layer = m.transformer.layer[1]
        layer.sa_layer_norm.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, config.dim))
    check()
    with torch.no_grad():  # in place: the tensors the C++ block holds
        for m in (model, ref):
            m.transformer.layer[0].output_layer_norm.bias.add_(0.25)
            m.transformer.layer[0].ffn.lin1.weight.mul_(1.5)
    check()


def test_bad_bindings_raise():
    """A binding that does not fit its op, or a call whose layout does not fit x, raises a RuntimeError naming
    what is wrong; a Python op's exception comes through as itself."""
    ext = load_extension()
    with pytest.raises(RuntimeError, match="distilkernels::linear_packed takes 5 arguments; cannot bind 5 from"):
        ext.BlockOp("distilkernels::linear_packed", "", [torch.zeros(1)] * 5, 1)
    with pytest.raises(RuntimeError, match="distilkernels::not_an_op"):
        ext.BlockOp("distilkernels::not_an_op", "", [], 0)
    two_bound = ext.BlockOp("distilkernels::add_layer_norm", "", [torch.ones(4), torch.zeros(4)], 2)
    model = _patched("fp32", tiny_config(n_layers=1))
    (block,) = _blocks(model)
    p = block._parts
    x = torch.randn(12, p.q.in_features)
    table = [modules._cpp_op(ext, distilkernels.dispatch.implementation(op, "cpp"))
             for op in ("attention", "varlen_attention", "add_layer_norm")]
    with torch.inference_mode():
        cpp = block._cpp_block(x)
        with pytest.raises(RuntimeError, match="shape"):  # 12 tokens are not 5 x 3
            ext.run_blocks([cpp], x, 5, 3, None, None, 0, *table)
        # add_layer_norm with 2 of its 5 arguments bound, then called with 5: 7 for 5
        with pytest.raises(RuntimeError, match="distilkernels::add_layer_norm takes 5 arguments; got 5 and 2 bound"):
            ext.run_blocks([cpp], x, 3, 4, None, None, 0, table[0], table[1], two_bound)

        def broken(t):
            raise ValueError("a GEMM of the test failed")

        bad = ext.Block(ext.BlockOp(broken), *[ext.BlockOp(lambda t: t)] * 3, None, None, p.ln1.weight, p.ln1.bias,
                        p.ln1.eps, p.ln2.weight, p.ln2.bias, p.ln2.eps, p.n_heads, p.head_dim, p.scaling)
        with pytest.raises(ValueError, match="a GEMM of the test failed"):
            ext.run_blocks([bad], x, 3, 4, None, None, 0, *table)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_threads_share_a_model(mode):
    """The C++ loop runs without the GIL: two Python threads running one patched model at once (one with a padded
    batch, one unpadded) each get what the model gives them alone."""
    import threading

    config = tiny_config(n_layers=2)
    model = _patched(mode, config)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(1, config.vocab_size, (3, 29), generator=g), holey_mask(3, 29, seed=s, kind=k))
               for s, k in ((6, "holey"), (7, "right"))]
    with torch.inference_mode():
        alone = [model(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches]
    results, errors = [[], []], []

    def work(i):
        try:
            with torch.inference_mode():
                for _ in range(20):
                    ids, mask = batches[i]
                    results[i].append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        valid = batches[i][1].bool()
        assert len(results[i]) == 20 and all(torch.equal(r[valid], alone[i][valid]) for r in results[i])
