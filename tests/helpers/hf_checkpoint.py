"""Tiny random checkpoints written by the installed transformers (config.json and safetensors from
`save_pretrained`), so the tests read exactly the spellings the current transformers writes.

The architecture comes from afsplit's tiny family configs (`afsplit.models.tiny`, plus overrides);
transformers parses it into its own config class, initialises the model and writes it out.
Weights are then redrawn with a larger spread than transformers' init (std 0.02 gives nearly flat
logits and routers), and DeepSeek-V3's e_score_correction_bias is made non-zero so it matters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from afsplit.models.tiny import tiny_hf_config, write_byte_tokenizer

_NOT_CONFIG = {"model_type", "architectures", "torch_dtype", "dtype"}


def save_with_transformers(family: str, out_dir, seed: int = 0, std: float = 0.15, **overrides) -> Path:
    import transformers

    arch = {k: v for k, v in tiny_hf_config(family, **overrides).items() if k not in _NOT_CONFIG}
    config = transformers.AutoConfig.for_model(family, **arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or name.endswith(("inv_freq", "original_inv_freq")):
                continue
            x = torch.randn(t.shape, generator=gen)
            if "norm" in name:
                t.copy_(1.0 + 0.1 * x)
            elif name.endswith((".bias", "e_score_correction_bias")):
                t.copy_(0.1 * x)
            else:
                t.copy_(std * x)
    out = Path(out_dir)
    model.save_pretrained(out)
    write_byte_tokenizer(out)
    return out
