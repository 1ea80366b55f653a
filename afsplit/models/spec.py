"""The one place that maps a Hugging Face config.json to afsplit's model description.

Each supported family has a small normaliser; everything downstream (loader, model, engine)
reads only :class:`ModelSpec`, never the HF fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afsplit.errors import CheckpointError

# How the router turns logits into (weights, ids); per family.
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = "none", "head", "full"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only MoE transformer, family-independent."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # attention details
    qkv_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on the output projection
    qk_norm: str  # QK_NORM_NONE | QK_NORM_HEAD (per head, Qwen3) | QK_NORM_FULL (whole projection, OLMoE)
    clip_qkv: float | None  # OLMoE: clamp q/k/v to [-c, c]
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    # MoE
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_intermediate_size: int
    moe_layers: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP (False)
    intermediate_size: int  # dense MLP layers
    shared_expert_intermediate_size: int  # 0 = no shared expert (Qwen2-MoE has one, with a sigmoid gate)
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"config.json: rope type {params.get('rope_type')!r} is not supported yet (only default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(cfg: dict, family: str) -> dict:
    heads = cfg["num_attention_heads"]
    return dict(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        clip_qkv=None,
        shared_expert_intermediate_size=0,
    )


def _qwen_moe_layers(cfg: dict) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or [])
    n = cfg["num_hidden_layers"]
    return tuple(i not in only and cfg["num_experts"] > 0 and (i + 1) % step == 0 for i in range(n))


def _qwen2_moe(cfg: dict) -> ModelSpec:
    n = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    types = cfg.get("layer_types") or [
        "sliding_attention" if window and (i + 1) % 2 and i < cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    return ModelSpec(
        **_common(cfg, "qwen2_moe") | dict(shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0)),
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        o_bias=False,
        qk_norm=QK_NORM_NONE,
        sliding_windows=tuple(window if t == "sliding_attention" and window else None for t in types),
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        moe_layers=_qwen_moe_layers(cfg),
        intermediate_size=cfg.get("intermediate_size", 0),
    )


def _qwen3_moe(cfg: dict) -> ModelSpec:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **_common(cfg, "qwen3_moe"),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QK_NORM_HEAD,
        sliding_windows=(window,) * cfg["num_hidden_layers"],
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        moe_layers=_qwen_moe_layers(cfg),
        intermediate_size=cfg.get("intermediate_size", 0),
    )


def _mixtral(cfg: dict) -> ModelSpec:
    return ModelSpec(
        **_common(cfg, "mixtral"),
        qkv_bias=False,
        o_bias=False,
        qk_norm=QK_NORM_NONE,
        sliding_windows=(cfg.get("sliding_window"),) * cfg["num_hidden_layers"],
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=True,  # Mixtral always renormalises the top-k weights
        moe_intermediate_size=cfg["intermediate_size"],
        moe_layers=(True,) * cfg["num_hidden_layers"],
        intermediate_size=0,
    )


def _olmoe(cfg: dict) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    common = _common(cfg, "olmoe")
    common["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]  # OLMoE ignores head_dim
    common["clip_qkv"] = cfg.get("clip_qkv")
    return ModelSpec(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QK_NORM_FULL,
        sliding_windows=(None,) * cfg["num_hidden_layers"],
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["intermediate_size"],
        moe_layers=(True,) * cfg["num_hidden_layers"],
        intermediate_size=0,
    )


NORMALISERS = {"qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "olmoe": _olmoe}


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> ModelSpec:
    """Normalise a Hugging Face config dict; errors name the file and the field."""
    model_type = cfg.get("model_type")
    if model_type not in NORMALISERS:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(NORMALISERS)}")
    try:
        spec = NORMALISERS[model_type](cfg)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r} required for model_type {model_type!r}") from None
    if spec.num_heads % spec.num_kv_heads:
        raise CheckpointError(
            f"{where}: num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads {spec.num_kv_heads}")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise CheckpointError(f"{where}: num_experts_per_tok {spec.top_k} must be in 1..{spec.num_experts}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    return spec


def read_model_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; model.path must be a Hugging Face model directory") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse ({e}); re-download or regenerate the checkpoint") from None
    return spec_from_hf_config(cfg, str(path))
