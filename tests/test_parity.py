"""The parity suite, run for every family row (families.py) and every head of it: patched models and the
optimized classes against stock HF fp32, with holey/left/right masks, odd sizes, the family's best-known
checkpoint shape, and save/load round trips. A new family row is tested here without a new test."""
from __future__ import annotations

import copy

import pytest
import torch

import distilkernels
from distilkernels import ops
from distilkernels.hf import FULLY_MASKED

from helpers import (ATOL, DECODER_PARAMS, FAMILY_PARAMS, HEAD_PARAMS, OPTIMIZED_PARAMS, TOKEN_LEVEL_HEAD_PARAMS,
                     assert_parity, holey_mask, make_model, model_inputs, op_count, outputs, run_pair)


def _cpu_packed() -> bool:
    return ops.backend_for(torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_patched_holey_masks(family, head, unpad, op_spy):
    config = family.test.tiny()
    mask = holey_mask(13, 7, seed=1)
    mask[:, 0] = 1  # a [CLS] token: pooled heads read position 0
    ref, got = run_pair(head.hf_class, config, 13, 7, mask, unpad)
    assert_parity(head.hf_class, ref, got, mask, unpad)
    n_layers = family.n_layers(config)
    assert op_count(op_spy, "attention", "varlen_attention") == n_layers, op_spy  # the fused path ran, per layer
    assert op_count(op_spy, "add_layer_norm") == 2 * n_layers, op_spy
    # heads get labels here: their losses read padded positions, so those batches keep the padded layout
    assert op_count(op_spy, "varlen_attention") == (n_layers if unpad and head.labels == "none" else 0)
    # fp32 on the C++ backend: the four GEMMs of every layer run on packed weights, lin1's activation in its epilogue
    assert op_count(op_spy, "linear_packed") == (4 * n_layers if _cpu_packed() else 0), op_spy
    assert op_count(op_spy, "bias_act_") == (0 if _cpu_packed() else n_layers), op_spy


@pytest.mark.parametrize("kind", ["right", "left", "holey"])
@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_padded_layout_matches_everywhere(family, head, kind):
    """unpad=False keeps HF's padded layout: every head matches, left padding included."""
    config = family.test.tiny()
    mask = holey_mask(6, 11, seed=2, kind=kind)
    ref, got = run_pair(head.hf_class, config, 6, 11, mask, unpad=False)
    assert_parity(head.hf_class, ref, got, mask, unpad=False)


@pytest.mark.parametrize("kind", ["right", "left", "holey"])
@pytest.mark.parametrize("family, head", TOKEN_LEVEL_HEAD_PARAMS)
def test_unpadded_left_and_right_padding(family, head, kind):
    config = family.test.tiny()
    mask = holey_mask(6, 11, seed=3, kind=kind)
    ref, got = run_pair(head.hf_class, config, 6, 11, mask, unpad=True)
    assert_parity(head.hf_class, ref, got, mask, unpad=True)
    if head.labels == "none" and bool(mask[:, 0].all()):  # documented: padded positions hold zeros
        assert (got.last_hidden_state[~mask.bool()] == 0).all()  # (position 0 padded: padded layout)


@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_base_shape_2x128(family, head):
    """The shape of the family's best-known small checkpoint (distilbert-base, all-MiniLM-L6, distilroberta-base)."""
    config = family.test.base()
    mask = holey_mask(2, 128, seed=4, kind="right")
    ref, got = run_pair(head.hf_class, config, 2, 128, mask, unpad=True)
    assert_parity(head.hf_class, ref, got, mask, unpad=True)


@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_base_shape_under_high_matmul_precision(family, head, fp32_matmul_precision, op_spy):
    """torch.set_float32_matmul_precision("high") lets the fp32 GEMMs run as three bf16 products where the
    CPU's matrix unit takes bf16 (bf16x3, gemms.bf16x3_allowed); every readable output stays within ATOL of
    stock HF in strict fp32 ("highest"). Per GEMM bf16x3 is within ~1.2e-5 of sum |x w| (relative), ~10x fp32's
    error at these sizes: on random-init base shapes the outputs moved 2-4e-5, real MiniLM weights ~5e-5
    (test_bert.py). Back under "highest" the same patched model runs fp32 GEMMs only."""
    from distilkernels.gemms import bf16x3_allowed

    cls, config = head.hf_class, family.test.base()
    model = make_model(cls, config)
    mask = holey_mask(2, 128, seed=4, kind="right")
    inputs = model_inputs(cls, config, 2, 128, mask)
    with torch.inference_mode():
        ref = model(**inputs)
        distilkernels.patch(model)
        fp32_matmul_precision("high")
        got = model(**inputs)
        uses_bf16x3 = _cpu_packed() and bf16x3_allowed()
        assert op_count(op_spy, "linear_bf16x3") == (4 * family.n_layers(config) if uses_bf16x3 else 0), op_spy
        assert_parity(cls, ref, got, mask, unpad=True)
        fp32_matmul_precision("highest")
        before = op_count(op_spy, "linear_bf16x3")
        strict = model(**inputs)
    assert op_count(op_spy, "linear_bf16x3") == before
    assert_parity(cls, ref, strict, mask, unpad=True)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_seq1_and_relu(family, head, unpad):
    config = family.test.tiny(activation="relu")
    mask = torch.ones(3, 1, dtype=torch.long)
    ref, got = run_pair(head.hf_class, config, 3, 1, mask, unpad)
    assert_parity(head.hf_class, ref, got, mask, unpad)


def _head(family, labels):
    return next(head for head in family.heads if head.labels == labels)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_qa_loss_unpadded(family):
    """QA loss with unpadding matches HF when nothing is padded (HF's loss also spans padded positions)."""
    cls, config = _head(family, "question_answering").hf_class, family.test.tiny()
    mask = torch.ones(5, 9, dtype=torch.long)
    ref, got = run_pair(cls, config, 5, 9, mask, unpad=True)
    assert abs(ref.loss.item() - got.loss.item()) <= ATOL


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_no_padding_skips_unpad(family, op_spy):
    cls, config = family.base_model, family.test.tiny()
    mask = torch.ones(4, 9, dtype=torch.long)
    ref, got = run_pair(cls, config, 4, 9, mask, unpad=True)
    assert_parity(cls, ref, got, mask, unpad=True)
    assert op_count(op_spy, "attention") == family.n_layers(config), op_spy
    assert op_count(op_spy, "varlen_attention") == 0, op_spy


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fully_padded_row_no_nan(family):
    cls, config = family.base_model, family.test.tiny()
    mask = holey_mask(4, 9, seed=5)
    mask[2] = 0
    model = make_model(cls, config)
    inputs = model_inputs(cls, config, 4, 9, mask, with_labels=False)
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
        for unpad in (False, True):
            with distilkernels.patch(model, unpad=unpad):
                got = model(**inputs).last_hidden_state
            assert torch.isfinite(got).all()
            assert (got - ref)[mask.bool()].abs().max() <= ATOL  # other rows unaffected


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_fully_padded_row_matches_the_models_attention(family, attn, unpad):
    """A row with no real token: HF's eager attends uniformly over every key there (its additive mask puts the
    dtype's minimum on each score), HF's sdpa gives such a query zeros, as our kernels do. A patched model matches
    the stock model in its own implementation, every value of the row included (eager: HF's code runs)."""
    config = family.test.tiny()
    mask = holey_mask(4, 9, seed=5)
    mask[:, 0] = 1
    mask[2] = 0
    stock = {}
    for head in (family.heads[0], next(h for h in family.heads if h.labels == "sequence")):
        cls = head.hf_class
        inputs = model_inputs(cls, config, 4, 9, mask)
        for built_with in ("eager", "sdpa"):
            with torch.inference_mode():
                stock[cls, built_with] = outputs(make_model(cls, config, attn_implementation=built_with)(**inputs))
        model = make_model(cls, config, attn_implementation=attn)
        with torch.inference_mode(), distilkernels.patch(model, unpad=unpad) as handle:
            got = outputs(model(**inputs))
            stats = handle.stats()
        assert got.keys() == stock[cls, attn].keys()
        for key, want in stock[cls, attn].items():
            assert torch.isfinite(got[key]).all(), key
            err = (got[key] - want).abs().max().item()
            assert err <= ATOL, f"{cls.__name__}.{key}: max-abs {err:.3g} > {ATOL}"
        assert any(k.startswith("encoder.") for k in stats), stats
        assert (f"encoder.padded: mask format: {FULLY_MASKED}" in stats) == (attn == "eager"), stats
    # the case tells the two implementations apart (the tiny heads' logits by ~1e-4 only, BERT's pooler by 4.6e-3)
    base = family.heads[0].hf_class
    eager, sdpa = stock[base, "eager"]["last_hidden_state"][2], stock[base, "sdpa"]["last_hidden_state"][2]
    assert (eager - sdpa).abs().max() > 100 * ATOL


# Attention masks off the (batch, seqlen) 0/1 path, as HF 5.x takes them (every family, "sdpa" and "eager" alike):
# it reads a 2-D mask as mask.to(bool) (nonzero attends, NaN too; an additive 0 / -inf mask comes out inverted),
# drops a mask with no zero in it whatever its shape, broadcasts a (batch, 1) column over the keys and reads the
# first `batch` rows of a longer one; it fails on the rest. Each case: (id, the mask made from the 0/1 mask m
# (batch, seqlen), the positions HF reads as real tokens (None: every position; HF's own code runs there or
# nothing is padded), the input's batch). Where HF fails the patched model fails too (HF's own error: its mask
# preparation runs in the patched model, and HF's code runs a block whose mask is no key-padding mask).
_MASK_CASES = [
    ("2 and -1", lambda m: (m * 2).masked_fill(torch.arange(m.shape[1]) == 3, -1), lambda m: m != 0, 3),
    ("0.5", lambda m: m.float() * 0.5, lambda m: m != 0, 3),
    ("NaN", lambda m: m.float().masked_fill(torch.arange(m.shape[1]) == 2, float("nan")),
     lambda m: (m != 0) | (torch.arange(m.shape[1]) == 2), 3),
    ("additive 0/-inf", lambda m: torch.where(m.bool(), 0.0, float("-inf")), lambda m: m == 0, 3),
    ("complex", lambda m: m.to(torch.complex64), lambda m: m != 0, 3),
    ("one row of ones", lambda m: torch.ones(1, m.shape[1], dtype=torch.long), None, 3),
    ("one row with zeros", lambda m: m[:1], "raises", 3),
    ("one row with zeros, batch 1", lambda m: m[:1], lambda m: m[:1] != 0, 1),
    ("(batch, 1) ones", lambda m: torch.ones(m.shape[0], 1), None, 3),
    ("(batch, 1) with a zero", lambda m: torch.tensor([[1], [0], [1]]), None, 3),
    ("(1, 1) zero, batch 1", lambda m: torch.zeros(1, 1, dtype=torch.long), None, 1),
    ("(1, 1) zero", lambda m: torch.zeros(1, 1, dtype=torch.long), "raises", 3),
    ("an extra row", lambda m: torch.cat([m, 1 - m[:1]]), lambda m: m != 0, 3),
    ("shorter, ones", lambda m: torch.ones(m.shape[0], m.shape[1] - 2), None, 3),
    ("shorter, with zeros", lambda m: m[:, :-2], "raises", 3),
    ("longer, ones", lambda m: torch.ones(m.shape[0], m.shape[1] + 2, dtype=torch.bool), None, 3),
    ("longer, with zeros", lambda m: torch.cat([m, m[:, :2]], 1), "raises", 3),
    ("3-D, ones", lambda m: torch.ones(m.shape[0], m.shape[1], m.shape[1]), None, 3),
    ("3-D key padding", lambda m: m[:, None, :].expand(-1, m.shape[1], -1), "raises", 3),
    ("1-D, ones", lambda m: torch.ones(m.shape[1], dtype=torch.long), None, 3),
    ("1-D with zeros", lambda m: m[0], "raises", 3),
    ("0-D", lambda m: torch.tensor(1), "raises", 3),
    # a prepared 4-D int64 mask: HF's sdpa refuses its dtype, HF's eager adds it to the scores
    ("4-D int64", lambda m: m[:, None, None, :].expand(-1, 1, m.shape[1], -1), None, 3),
]


def _forward(model, args):
    try:
        with torch.inference_mode():
            return model(**args).last_hidden_state
    except Exception as error:  # noqa: BLE001  (HF's own error, whatever its type)
        return error


def _outcome(result) -> str:
    return f"raises {result!r:.120}" if isinstance(result, Exception) else "computes"


@pytest.mark.parametrize("attn", ["sdpa", "eager", "distilkernels"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_attention_masks_as_hf_takes_them(family, attn):
    """Every mask HF runs gives HF's numbers (at the tokens HF reads as real, 1e-4), every mask HF fails on
    fails; the patched model refuses none HF runs (it did: a one-row mask, values other than 0/1, other lengths,
    3-D masks). "distilkernels" (ours, HF has no such implementation) is held to what stock "sdpa" does. Values
    other than 0/1 keep the fused path."""
    cls, config = family.base_model, family.test.tiny()
    m = holey_mask(3, 8, seed=6)
    m[:, 0] = 1
    m[0, 5:] = 0  # (the first row has zeros: "one row with zeros" has some)
    stock = make_model(cls, config, attn_implementation="sdpa" if attn == "distilkernels" else attn)
    model = copy.deepcopy(stock)
    handle = distilkernels.patch(model)
    if attn == "distilkernels":
        model.set_attn_implementation(attn)
    wrong = []
    for name, make, real, batch in _MASK_CASES:
        args = dict(model_inputs(cls, config, batch, 8, m[:batch], with_labels=False), attention_mask=make(m))
        want, got = _forward(stock, args), _forward(model, args)
        if isinstance(want, Exception) or isinstance(got, Exception) or real == "raises":
            if not (isinstance(want, Exception) and isinstance(got, Exception)):
                wrong.append(f"{name}: HF {_outcome(want)}, patched {_outcome(got)}")
            continue
        keep = torch.ones(batch, 8, dtype=torch.bool) if real is None else real(m[:batch])
        err = (got - want)[keep].abs().max().item()
        if not err <= ATOL:  # (NaN fails too)
            wrong.append(f"{name}: max-abs {err:.3g} > {ATOL}")
    assert not wrong, "\n".join(wrong)
    stats = handle.stats()
    assert stats.get("embeddings.fused", 0) > 0 or family.embeddings is None, stats
    assert stats.get("encoder.unpadded", 0) >= 4, stats  # values other than 0/1 too: the fused, unpadded path


@pytest.mark.parametrize("batch,seqlen,kind", [
    (1, 1, "right"), (1, 512, "right"), (2, 512, "holey"), (7, 300, "left"), (64, 9, "holey"), (64, 128, "right"),
])
@pytest.mark.parametrize("family, head", [p for p in HEAD_PARAMS if p.values[1].labels in ("none", "sequence")])
def test_unpadded_batch_and_length_sweep(family, head, batch, seqlen, kind, op_spy):
    """Padding removal from batch 1 to 64 and length 1 to 512: real tokens match, padding holds zeros."""
    config = family.test.tiny(layers=2, max_positions=512)
    mask = holey_mask(batch, seqlen, seed=batch * 1000 + seqlen, kind=kind)
    mask[:, 0] = 1  # the pooled head reads position 0
    ref, got = run_pair(head.hf_class, config, batch, seqlen, mask, unpad=True)
    assert_parity(head.hf_class, ref, got, mask, unpad=True)
    unpadded = bool((mask == 0).any()) and head.labels == "none"  # a head given labels keeps the padded layout
    assert op_count(op_spy, "varlen_attention") == (2 if unpadded else 0), op_spy
    if head.labels == "none":
        assert (got.last_hidden_state[~mask.bool()] == 0).all()


# ---- optimized classes (distilkernels.models) --------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    def save(hf_cls, config, seed=0):
        path = tmp_path / f"{hf_cls.__name__}-{seed}"
        make_model(hf_cls, config, seed=seed).save_pretrained(path)
        return path
    return save


@pytest.mark.parametrize("family, head, ours", OPTIMIZED_PARAMS)
def test_optimized_class_parity_and_round_trip(family, head, ours, checkpoint, tmp_path, op_spy):
    hf_cls, config = head.hf_class, family.test.tiny()
    path = checkpoint(hf_cls, config)
    stock = hf_cls.from_pretrained(path, attn_implementation="eager").eval()
    model = ours.from_pretrained(path).eval()
    assert isinstance(model, hf_cls) and isinstance(model, ours)
    assert model.config._attn_implementation == "distilkernels"
    assert sum(isinstance(m, family.fused_block) for m in model.modules()) == family.n_layers(config)
    assert any(isinstance(m, family.fused_encoder) for m in model.modules())
    mask = holey_mask(7, 10, seed=3)
    mask[:, 0] = 1
    inputs = model_inputs(hf_cls, config, 7, 10, mask)
    with torch.inference_mode():
        assert_parity(hf_cls, stock(**inputs), model(**inputs), mask, unpad=True)
    n_layers = family.n_layers(config)
    assert op_count(op_spy, "attention", "varlen_attention") == n_layers, op_spy  # the fused path ran
    # heads get labels here: their losses read padded positions, so those batches keep the padded layout
    assert op_count(op_spy, "varlen_attention") == (n_layers if head.labels == "none" else 0), op_spy
    # ours -> save -> stock: the very same tensors under the same names
    model.save_pretrained(tmp_path / "ours")
    back = hf_cls.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is hf_cls
    reference = stock.state_dict()
    assert back.state_dict().keys() == reference.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.inference_mode():
        for key, value in outputs(stock(**inputs)).items():
            assert torch.equal(outputs(back(**inputs))[key], value), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_optimized_class_low_precision(family, dtype, checkpoint, op_spy):
    """from_pretrained(dtype=) (HF's own argument) gives the low-precision fused path. Our error vs fp32 HF is at
    most 2x HF's own error in the same dtype (FlashAttention's rule), plus a floor of a few units of the
    dtype's rounding at the outputs' magnitude (LayerNorm outputs of O(1-10)) for when HF's error happens to
    be tiny."""
    hf_cls, config = family.base_model, family.test.tiny()
    path = checkpoint(hf_cls, config)
    ours_cls = family.optimized_classes()[0]
    ref32 = hf_cls.from_pretrained(path, attn_implementation="eager").eval()
    hf_low = hf_cls.from_pretrained(path, dtype=dtype).eval()
    ours = ours_cls.from_pretrained(path, dtype=dtype).eval()
    assert next(ours.parameters()).dtype == dtype
    mask = holey_mask(5, 12, seed=4)
    mask[:, 0] = 1  # position 0 padded would keep the padded layout (pooled heads read it): test padding removal
    inputs = model_inputs(hf_cls, config, 5, 12, mask, with_labels=False)
    valid = mask.bool()
    with torch.inference_mode():
        ref = ref32(**inputs).last_hidden_state[valid]
        hf_err = (hf_low(**inputs).last_hidden_state.float()[valid] - ref).abs().max().item()
        got = ours(**inputs).last_hidden_state
        our_err = (got.float()[valid] - ref).abs().max().item()
    assert got.dtype == dtype
    assert op_count(op_spy, "varlen_attention") == family.n_layers(config), op_spy  # the fused path ran
    if dtype == torch.bfloat16 and _cpu_packed():  # our bf16 GEMMs, out and lin2 with the add + LayerNorm after
        assert op_count(op_spy, "linear_bf16") == 2 * family.n_layers(config), op_spy
        assert op_count(op_spy, "linear_bf16_add_layer_norm") == 2 * family.n_layers(config), op_spy
        assert op_count(op_spy, "add_layer_norm") == 0, op_spy
    floor = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
    assert our_err <= 2 * hf_err + floor, (our_err, hf_err, floor)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_patch_under_cpu_autocast_bf16(family, op_spy):
    """Under torch.autocast("cpu", dtype=torch.bfloat16) a patched fp32 model runs its blocks as HF's run there:
    GEMMs (on a bf16 packing of the fp32 weights) and attention in bf16, residual stream and LayerNorm in fp32.
    Same output dtype as HF under autocast; error vs fp32 HF at most 2x HF's own under autocast plus a few bf16
    roundings at the outputs' magnitude (as test_optimized_class_low_precision); outside autocast the fp32
    path again, to fp32 parity."""
    hf_cls, config = family.base_model, family.test.tiny()
    model = make_model(hf_cls, config)
    mask = holey_mask(5, 12, seed=6)
    mask[:, 0] = 1
    inputs = model_inputs(hf_cls, config, 5, 12, mask, with_labels=False)
    valid = mask.bool()
    with torch.inference_mode():
        ref = model(**inputs).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf_auto = model(**inputs).last_hidden_state
    patched = copy.deepcopy(model)
    distilkernels.patch(patched)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = patched(**inputs).last_hidden_state
        plain = patched(**inputs).last_hidden_state
    assert got.dtype == hf_auto.dtype == torch.float32
    hf_err = (hf_auto[valid] - ref[valid]).abs().max().item()
    our_err = (got[valid] - ref[valid]).abs().max().item()
    floor = 4 * torch.finfo(torch.bfloat16).eps * ref[valid].abs().max().item()
    assert our_err <= 2 * hf_err + floor, (our_err, hf_err, floor)
    assert (plain[valid] - ref[valid]).abs().max().item() <= ATOL
    if _cpu_packed():  # the bf16 GEMMs ran, on bf16 packings beside the fp32 ones
        assert op_spy[("linear_bf16", "cpp")] == 4 * family.n_layers(config), op_spy
        gemms = next(m for m in patched.modules() if hasattr(m, "_parts"))._parts.gemms
        assert all(gemms.cast_packed.get((torch.bfloat16, name)) for name in gemms.groups)
        assert all(gemms.packed.values())


@pytest.mark.parametrize("family, head", HEAD_PARAMS)
def test_attn_implementation_from_pretrained(family, head, checkpoint, op_spy):
    cls, config = head.hf_class, family.test.tiny()
    path = checkpoint(cls, config)
    stock = cls.from_pretrained(path, attn_implementation="eager").eval()
    ours = cls.from_pretrained(path, attn_implementation="distilkernels").eval()
    mask = holey_mask(6, 9, seed=5, kind="left")
    inputs = model_inputs(cls, config, 6, 9, mask)
    with torch.inference_mode():
        assert_parity(cls, stock(**inputs), ours(**inputs), mask, unpad=False)
    assert op_spy.get(("attention", ops.backend_for(torch.device("cpu"))), 0) == family.n_layers(config)


# ---- decoders: patched, their blocks run HF's decoder code --------------------------------------------------

@pytest.mark.parametrize("family, cls", DECODER_PARAMS)
def test_decoder_heads_fall_back(family, cls):
    """A causal LM head (is_decoder) is no encoder: patching it keeps HF's results."""
    config = family.test.tiny()
    config.is_decoder = True
    mask = torch.ones(3, 7, dtype=torch.long)
    model = make_model(cls, config)
    inputs = model_inputs(family.base_model, config, 3, 7, mask, with_labels=False)
    with torch.inference_mode():
        ref = model(**inputs).logits
        with distilkernels.patch(model):
            got = model(**inputs).logits
    assert (got - ref).abs().max() <= ATOL
