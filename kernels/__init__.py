"""afsplit kernels: Triton kernels, one file per kernel, each beside its plain-torch reference.

Every wrapper validates its arguments (one-line ValueError naming the argument) and takes a
keyword-only `backend`: None (default) runs Triton on CUDA tensors and the torch reference
elsewhere; "triton" forces the Triton kernel (on CPU this needs TRITON_INTERPRET=1); "ref"
forces the reference.

Modules: `from kernels.fused_moe import moe_align` (the package attribute `kernels.fused_moe`
is the function). Submodules are imported lazily (PEP 562), so `import kernels` is cheap and does not import
triton; a missing or broken triton only disables the Triton path.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "store_kv": "store_kv",
    "store_kv_ref": "store_kv",
    "flash_attention": "flash_attention",
    "flash_attention_ref": "flash_attention",
    "paged_decode_attention": "paged_decode_attention",
    "paged_decode_attention_ref": "paged_decode_attention",
    "fused_moe": "fused_moe",
    "fused_moe_ref": "fused_moe",
    "grouped_mm_moe": "fused_moe",
    "moe_align": "fused_moe",
    "topk_gating": "topk_gating",
    "topk_gating_ref": "topk_gating",
    "rmsnorm": "rmsnorm",
    "rmsnorm_ref": "rmsnorm",
    "apply_rotary": "rotary",
    "apply_rotary_ref": "rotary",
    "rotary_cos_sin_cache": "rotary",
    "grouped_topk": "grouped_topk",
    "grouped_topk_ref": "grouped_topk",
    "mla_decode": "mla_decode",
    "mla_decode_ref": "mla_decode",
    "mla_prefill": "mla_prefill",
    "mla_prefill_ref": "mla_prefill",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Most kernels share their module's name (kernels.rmsnorm is the function; the module is
    sys.modules["kernels.rmsnorm"]). When the import system binds a freshly loaded submodule on
    the package, bind the function of the same name instead, so `kernels.<name>` is always
    the function whatever was imported first."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
