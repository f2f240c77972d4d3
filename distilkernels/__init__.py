"""distilkernels: fused kernels for DistilBERT and BERT-family encoders (BERT, MiniLM, RoBERTa).

    import distilkernels
    handle = distilkernels.patch(model)   # fused C++ (CPU) / Triton (GPU) path, same results
    handle.restore()                      # original modules back
    distilkernels.quantize(model)         # CPU int8 GEMMs (dynamic quantization) in the fused blocks
    distilkernels.refresh(model)          # repack after weight writes torch does not version (.data, ...)

Functional ops: `distilkernels.ops` (linear, pack_linear_weight / linear_packed, add_layer_norm, bias_act_,
attention, varlen_attention, the matrix-unit GEMMs pack_linear_bf16 / linear_bf16, pack_linear_bf16x3 /
linear_bf16x3 (fp32 as three bf16 products) and pack_linear_int8 / linear_int8, and normalize_rows /
scale_rows_ (per-token row scaling); cpu_cache_stats, empty_cpu_cache and set_cpu_cache_limit for the caching
allocator behind the C++ ops' outputs).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _env, ops  # noqa: E402
from ._ext import load_extension  # noqa: E402

load_extension()
_env.check_environment()

from .patching import PatchHandle, patch, quantize, refresh  # noqa: E402
from . import hf_attention as _hf_attention  # noqa: E402

_hf_attention.register()

__all__ = ["ops", "patch", "PatchHandle", "quantize", "refresh", "__version__"]
