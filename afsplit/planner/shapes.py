"""Model sizes the planner needs: bytes of weights and KV cache, FLOPs, exchange row sizes.

A :class:`ModelShape` comes from an afsplit preset, a Hugging Face directory (through the one HF
normaliser, :func:`afsplit.models.spec.spec_from_hf_config`) or a planner-only shape such as
``deepseek-v3``: a model afsplit cannot run yet (MLA attention) but can size on paper, with
MLA's compressed KV cache (kv_lora_rank + rope dims per token and layer) and its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from afsplit.errors import ConfigError

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str
    hidden: int
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    dense_intermediate: int  # MLP of the non-MoE layers (0 if every layer is MoE)
    vocab: int
    tied_embeddings: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attn_params_per_layer: int  # q/k/v/o (or MLA's projections)
    kv_values_per_token_layer: int  # K+V values (or MLA's latent + rope key) per token and layer
    attn_flops_per_pair_decode: int  # FLOPs of one (query, cached key) pair in decode attention
    attn_flops_per_pair_prefill: int
    dtype: str = "bfloat16"
    runnable: bool = True  # afsplit can serve it (a preset or a directory), so a config can be written
    source: str = ""  # "preset qwen3-30b-a3b", a directory, or "planner shape deepseek-v3"

    # -- sizes in bytes (cached: the search asks for them millions of times) ----------------------

    @cached_property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @cached_property
    def expert_bytes(self) -> int:
        """One routed expert of one layer (gate, up, down)."""
        return 3 * self.hidden * self.moe_intermediate * self.itemsize

    @cached_property
    def routed_expert_bytes_total(self) -> int:
        return self.expert_bytes * self.num_experts * self.num_moe_layers

    @cached_property
    def kv_bytes_per_token_layer(self) -> int:
        return self.kv_values_per_token_layer * self.itemsize

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.num_layers

    @cached_property
    def attention_layer_weight_bytes(self) -> int:
        """Weights an attention rank reads in one MoE layer: projections, router, shared expert."""
        shared = 3 * self.hidden * self.shared_intermediate
        return (self.attn_params_per_layer + self.num_experts * self.hidden + shared) * self.itemsize

    @cached_property
    def dense_layer_weight_bytes(self) -> int:
        """Weights of one non-MoE layer: projections plus the dense MLP."""
        return (self.attn_params_per_layer + 3 * self.hidden * self.dense_intermediate) * self.itemsize

    @cached_property
    def head_bytes(self) -> int:
        return self.vocab * self.hidden * self.itemsize

    @cached_property
    def attention_weight_bytes_total(self) -> int:
        """Everything an attention rank holds: embedding, lm_head, every layer but the routed experts."""
        dense = self.num_layers - self.num_moe_layers
        emb = self.head_bytes * (1 if self.tied_embeddings else 2)
        return emb + self.num_moe_layers * self.attention_layer_weight_bytes + dense * self.dense_layer_weight_bytes

    def dispatch_row_bytes(self) -> int:
        """One padded dispatch row: the hidden state plus top-k (weight fp32, slot int32)."""
        return self.hidden * self.itemsize + 8 * self.top_k

    def combine_row_bytes(self) -> int:
        return self.hidden * self.itemsize

    # -- FLOPs ---------------------------------------------------------------------------------

    def attention_gemm_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.attention_layer_weight_bytes / self.itemsize

    def dense_gemm_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.dense_layer_weight_bytes / self.itemsize

    def expert_flops(self, pairs: float) -> float:
        """FLOPs of `pairs` (token, expert) assignments: 3 GEMMs of H x I each."""
        return 6.0 * pairs * self.hidden * self.moe_intermediate

    def signature(self) -> dict:
        """What must match for a profile's tables of another model to be read directly."""
        return {k: getattr(self, k) for k in ("hidden", "num_experts", "top_k", "moe_intermediate", "num_heads",
                                              "num_kv_heads", "head_dim", "shared_intermediate", "vocab", "dtype")}

    def describe(self) -> str:
        return (f"{self.name}: {self.num_layers} layers ({self.num_moe_layers} MoE), hidden {self.hidden}, "
                f"{self.num_experts} experts top-{self.top_k} x FFN {self.moe_intermediate}, "
                f"{self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}, {self.dtype}; routed experts "
                f"{self.routed_expert_bytes_total / 1e9:.1f} GB, attention side {self.attention_weight_bytes_total / 1e9:.1f} GB, "
                f"KV {self.kv_bytes_per_token / 1024:.1f} KiB/token")


def shape_from_spec(spec, name: str, dtype: str = "bfloat16", source: str = "", runnable: bool = True) -> ModelShape:
    """From afsplit's ModelSpec (GQA attention)."""
    H, D, Hq, Hkv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    return ModelShape(
        name=name, family=spec.family, hidden=H, num_layers=spec.num_layers, num_moe_layers=spec.num_moe_layers,
        num_experts=spec.num_experts, top_k=spec.top_k, moe_intermediate=spec.moe_intermediate_size,
        shared_intermediate=spec.shared_expert_intermediate_size,
        dense_intermediate=spec.intermediate_size if spec.num_moe_layers < spec.num_layers else 0,
        vocab=spec.vocab_size, tied_embeddings=spec.tie_word_embeddings, num_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        attn_params_per_layer=H * (Hq + 2 * Hkv) * D + Hq * D * H, kv_values_per_token_layer=2 * Hkv * D,
        attn_flops_per_pair_decode=4 * Hq * D, attn_flops_per_pair_prefill=4 * Hq * D, dtype=dtype,
        runnable=runnable, source=source or name)


def _deepseek_v3(dtype: str) -> ModelShape:
    """DeepSeek-V3's published shapes (config.json of deepseek-ai/DeepSeek-V3): MLA attention, 61 layers of
    which the first 3 are dense, 256 routed experts top-8 plus one shared expert."""
    H, Hq, q_lora, kv_lora, rope, nope, v = 7168, 128, 1536, 512, 64, 128, 128
    attn = H * q_lora + q_lora * Hq * (nope + rope) + H * (kv_lora + rope) + kv_lora * Hq * (nope + v) + Hq * v * H
    return ModelShape(
        name="deepseek-v3", family="deepseek_v3", hidden=H, num_layers=61, num_moe_layers=58, num_experts=256,
        top_k=8, moe_intermediate=2048, shared_intermediate=2048, dense_intermediate=18432, vocab=129280,
        tied_embeddings=False, num_heads=Hq, num_kv_heads=1, head_dim=kv_lora + rope, attn_params_per_layer=attn,
        kv_values_per_token_layer=kv_lora + rope,
        # decode with absorbed projections: each head scores the 576-dim latent+rope key and sums 512-dim values
        attn_flops_per_pair_decode=2 * Hq * (kv_lora + rope + kv_lora),
        attn_flops_per_pair_prefill=2 * Hq * (nope + rope + v), dtype=dtype, runnable=False,
        source="planner shape deepseek-v3 (MLA; afsplit cannot serve it yet)")


PLANNER_SHAPES = {"deepseek-v3": _deepseek_v3}


def model_names() -> list[str]:
    from afsplit.models.presets import PRESETS

    return sorted(PRESETS) + sorted(PLANNER_SHAPES)


def resolve_shape(model: str, dtype: str = "bfloat16") -> ModelShape:
    """A preset name, a planner-only shape name, or a Hugging Face model directory."""
    from afsplit.models.presets import PRESETS
    from afsplit.models.spec import read_model_spec, spec_from_hf_config

    if dtype not in ITEMSIZE:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(ITEMSIZE)}")
    if model in PRESETS:
        return shape_from_spec(spec_from_hf_config(PRESETS[model], f"preset {model}"), model, dtype, f"preset {model}")
    if model in PLANNER_SHAPES:
        return PLANNER_SHAPES[model](dtype)
    path = Path(model)
    if (path / "config.json").exists():
        spec = read_model_spec(path)
        return shape_from_spec(spec, path.name, dtype, str(path))
    raise ConfigError(f"--model {model!r}: not a preset ({', '.join(model_names())}) nor a directory with a "
                      "config.json")


def shape_from_config(config) -> ModelShape:
    """The model a loaded afsplit Config serves (afsplit.engine.model_spec's answer), in its dtype."""
    from afsplit.engine import model_spec

    m = config.model
    spec = model_spec(config)
    if spec is None:
        raise ConfigError(f"{config.source}: model: needs a preset or a directory with config.json to be profiled or "
                          "predicted")
    from_dir = bool(m.path) and (Path(m.path) / "config.json").exists()
    name = Path(m.path).name if from_dir else m.preset
    return shape_from_spec(spec, name, m.dtype, m.path if from_dir else f"preset {m.preset}")


def preset_config_json(model: str) -> dict:
    """The HF config dict behind a preset or directory (profile writes shallow copies of it)."""
    from afsplit.models.presets import PRESETS

    if model in PRESETS:
        return dict(PRESETS[model])
    return json.loads((Path(model) / "config.json").read_text())
