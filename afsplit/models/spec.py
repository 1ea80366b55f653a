"""The one place that maps a Hugging Face config.json to afsplit's model description.

Each supported family has a small normaliser; everything downstream (loader, model, engine)
reads only :class:`ModelSpec`, never the HF fields.

Fields are read under every spelling that transformers 4.x and 5.x write and that the hub's own
config.json files use (:data:`ALIASES`): e.g. transformers 5.x saves Qwen3-MoE's expert count as
``num_local_experts`` where 4.x and the hub write ``num_experts``, and RoPE settings as
``rope_parameters`` where 4.x and the hub write ``rope_theta`` + ``rope_scaling``. Fields that
transformers defaults when absent get the same default here (DeepSeek's routing knobs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from afsplit.errors import CheckpointError

# How the router turns logits into (weights, ids); per family.
QK_NORM_NONE, QK_NORM_HEAD, QK_NORM_FULL = "none", "head", "full"

# Other names of a field, as transformers 4.x / 5.x (attribute_map) and hub config.json files write them.
ALIASES: dict[str, tuple[str, ...]] = {
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "num_local_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "n_routed_experts": ("n_routed_experts", "num_local_experts", "num_experts"),
}


class _Missing(KeyError):
    """A required config field is absent under every spelling."""


def _get(cfg: dict, name: str, default=_Missing):
    """`cfg[name]` under any of its spellings (the first present and not null), else `default`."""
    for key in ALIASES.get(name, (name,)):
        if cfg.get(key) is not None:
            return cfg[key]
    if default is _Missing:
        raise _Missing(" or ".join(repr(k) for k in ALIASES.get(name, (name,))))
    return default


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE (transformers' `_compute_yarn_parameters`): interpolated inverse frequencies, and
    cos/sin multiplied by `attention_factor` (from `mscale` / `mscale_all_dim` when not given)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    attention_factor: float


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3). Per token the KV cache holds the compressed
    latent (`kv_lora_rank`) and the shared rotary key (`qk_rope_head_dim`): one "head" of
    `latent_dim` values."""

    q_lora_rank: int | None  # None: one q_proj; else q_a_proj -> RMSNorm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # (nope + rope)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2
    rope_interleaved: bool  # rotary pairs are (x0, x1), (x2, x3), ... (DeepSeek); False = NeoX halves

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class GroupedRouting:
    """DeepSeek routers (transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter).

    V2 (`scoring="softmax"`, `group_rank="max"`): softmax scores; greedy top-k, or with
    n_group > 1 ("group_limited_greedy") only experts of the `topk_group` groups with the highest
    max score compete; weights are the scores, never renormalised.
    V3 (`scoring="sigmoid"`, `group_rank="top2_sum"`): sigmoid scores; the choice uses scores +
    `e_score_correction_bias`, groups ranked by the sum of their two best biased scores; weights
    are the unbiased scores, renormalised if `norm_topk_prob`.
    Both multiply the weights by `routed_scaling_factor`.
    """

    scoring: str  # "softmax" | "sigmoid"
    n_group: int
    topk_group: int
    group_rank: str  # "max" | "top2_sum"
    correction_bias: bool  # V3: the router has e_score_correction_bias [E]
    routed_scaling_factor: float


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only MoE transformer, family-independent."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # MLA: 1 (the latent is one shared "head")
    head_dim: int  # MLA: the KV cache's per-token width, kv_lora_rank + qk_rope_head_dim
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
    shared_expert_gated: bool = True  # Qwen2-MoE: sigmoid(x W) * shared(x); DeepSeek: ungated shared experts
    rope_yarn: YarnScaling | None = None  # None = default RoPE
    mla: MLASpec | None = None  # DeepSeek-V2/V3 attention; None = (grouped-query) multi-head attention
    routing: GroupedRouting | None = None  # None = softmax top-k (renormalised if norm_topk_prob)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.moe_layers) if m)


def _rope_params(cfg: dict) -> tuple[dict, str, float]:
    """(RoPE parameters, rope type, theta) from either form, with transformers' precedence: the hub /
    4.x `rope_scaling` dict (`type` or `rope_type`) over 5.x `rope_parameters`; theta from the dict,
    else the top-level `rope_theta`."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return params, kind, float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _rope_theta(cfg: dict) -> float:
    _, kind, theta = _rope_params(cfg)
    if kind != "default":
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported yet for this family (only default RoPE)")
    return theta


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: dict, params: dict) -> YarnScaling:
    # transformers: a top-level original_max_position_embeddings wins, then the dict's, then max_position_embeddings
    orig = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or cfg.get("max_position_embeddings", 4096)
    factor = params.get("factor")
    if factor is None:
        factor = cfg.get("max_position_embeddings", 4096) / orig
    factor = float(factor)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)
    return YarnScaling(factor=factor, original_max_position_embeddings=int(orig),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))


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
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,  # 5.x writes null when derived
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        clip_qkv=None,
        shared_expert_intermediate_size=0,
    )


def _qwen_moe_layers(cfg: dict, num_experts: int) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or [])
    n = cfg["num_hidden_layers"]
    return tuple(i not in only and num_experts > 0 and (i + 1) % step == 0 for i in range(n))


def _qwen2_moe(cfg: dict) -> ModelSpec:
    n = cfg["num_hidden_layers"]
    experts = _get(cfg, "num_experts")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None  # 5.x writes 0 when unused
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
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        moe_layers=_qwen_moe_layers(cfg, experts),
        intermediate_size=cfg.get("intermediate_size", 0),
    )


def _qwen3_moe(cfg: dict) -> ModelSpec:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    bias = bool(cfg.get("attention_bias", False))
    experts = _get(cfg, "num_experts")  # transformers 5.x writes num_local_experts
    return ModelSpec(
        **_common(cfg, "qwen3_moe"),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QK_NORM_HEAD,
        sliding_windows=(window,) * cfg["num_hidden_layers"],
        num_experts=experts,
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        moe_layers=_qwen_moe_layers(cfg, experts),
        intermediate_size=cfg.get("intermediate_size", 0),
    )


def _mixtral(cfg: dict) -> ModelSpec:
    return ModelSpec(
        **_common(cfg, "mixtral"),
        qkv_bias=False,
        o_bias=False,
        qk_norm=QK_NORM_NONE,
        sliding_windows=(cfg.get("sliding_window"),) * cfg["num_hidden_layers"],
        num_experts=_get(cfg, "num_local_experts"),
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
        num_experts=_get(cfg, "num_experts"),
        top_k=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=cfg["intermediate_size"],
        moe_layers=(True,) * cfg["num_hidden_layers"],
        intermediate_size=0,
    )


# transformers' DeepseekV2Config / DeepseekV3Config defaults for the fields a config.json may omit
_DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(first_k_dense_replace=0, q_lora_rank=1536, n_shared_experts=2, routed_scaling_factor=1.0,
                        topk_method="greedy", n_group=None, topk_group=None, intermediate_size=11008),
    "deepseek_v3": dict(first_k_dense_replace=3, q_lora_rank=1536, n_shared_experts=1, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True, intermediate_size=18432),
}


def _deepseek(cfg: dict, family: str) -> ModelSpec:
    """DeepSeek-V2 / V3, as transformers 5.x reads the config (see GroupedRouting and MLASpec).

    `head_dim` (written by transformers as qk_rope_head_dim) and `num_key_value_heads` do not
    describe MLA and are ignored; layers past num_hidden_layers (MTP modules) are never read.
    """
    d = _DEEPSEEK_DEFAULTS[family]

    def opt(name):
        return cfg[name] if name in cfg else d.get(name)

    where = "config.json"
    n = cfg["num_hidden_layers"]
    params, kind, theta = _rope_params(cfg)
    if kind not in ("default", "yarn"):
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported for {family} (only default and yarn)")
    yarn = _yarn(cfg, params) if kind == "yarn" else None
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    scale = (nope + rope) ** -0.5
    if yarn is not None and params.get("mscale_all_dim"):  # only mscale_all_dim enters the softmax scale
        scale *= yarn_mscale(float(params["factor"]), params["mscale_all_dim"]) ** 2
    mla = MLASpec(q_lora_rank=opt("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=nope,
                  qk_rope_head_dim=rope, v_head_dim=v, softmax_scale=scale,
                  rope_interleaved=True if family == "deepseek_v2" else bool(opt("rope_interleave")))
    experts = _get(cfg, "n_routed_experts")
    if family == "deepseek_v2":
        method = opt("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise CheckpointError(f"{where}: topk_method {method!r} is not a DeepSeek-V2 router "
                                  "(greedy or group_limited_greedy); a noaux_tc model is model_type deepseek_v3")
        grouped = method == "group_limited_greedy"
        if grouped and not (opt("n_group") and opt("topk_group")):
            raise CheckpointError(f"{where}: topk_method group_limited_greedy needs n_group and topk_group")
        routing = GroupedRouting(scoring="softmax", n_group=int(opt("n_group")) if grouped else 1,
                                 topk_group=int(opt("topk_group")) if grouped else 1, group_rank="max",
                                 correction_bias=False, routed_scaling_factor=float(opt("routed_scaling_factor")))
        norm = False  # transformers' V2 router never renormalises (norm_topk_prob is not read)
    else:
        routing = GroupedRouting(scoring="sigmoid", n_group=int(opt("n_group") or 1), topk_group=int(opt("topk_group") or 1),
                                 group_rank="top2_sum", correction_bias=True,
                                 routed_scaling_factor=float(opt("routed_scaling_factor")))
        norm = bool(opt("norm_topk_prob"))
    if experts % routing.n_group or not 1 <= routing.topk_group <= routing.n_group:
        raise CheckpointError(f"{where}: n_routed_experts {experts} must split into n_group {routing.n_group} groups "
                              f"and topk_group {routing.topk_group} must be in 1..n_group")
    if routing.group_rank == "top2_sum" and routing.n_group > 1 and experts // routing.n_group < 2:
        raise CheckpointError(f"{where}: deepseek_v3 ranks groups by their two best experts; "
                              f"{experts} experts in {routing.n_group} groups leaves fewer than 2 per group")
    eligible = routing.topk_group * (experts // routing.n_group)
    if cfg["num_experts_per_tok"] > eligible:
        raise CheckpointError(f"{where}: num_experts_per_tok {cfg['num_experts_per_tok']} > the {eligible} experts of "
                              f"topk_group {routing.topk_group} groups")
    if (cfg.get("moe_layer_freq") or 1) != 1:
        raise CheckpointError(f"{where}: moe_layer_freq {cfg['moe_layer_freq']} is not supported (transformers "
                              "ignores it too); only every layer from first_k_dense_replace on is MoE")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: mlp_bias true is not supported for {family}")
    bias = bool(cfg.get("attention_bias", False))
    first_dense = opt("first_k_dense_replace") or 0
    return ModelSpec(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=n,
        num_heads=cfg["num_attention_heads"], num_kv_heads=1, head_dim=mla.latent_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        qkv_bias=bias, o_bias=bias, qk_norm=QK_NORM_NONE, clip_qkv=None, sliding_windows=(None,) * n,
        num_experts=experts, top_k=cfg["num_experts_per_tok"], norm_topk_prob=norm,
        moe_intermediate_size=cfg["moe_intermediate_size"], moe_layers=tuple(i >= first_dense for i in range(n)),
        intermediate_size=opt("intermediate_size"),
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * (opt("n_shared_experts") or 0),
        shared_expert_gated=False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=_eos(cfg),
        bos_token_id=cfg.get("bos_token_id"), rope_yarn=yarn, mla=mla, routing=routing,
    )


NORMALISERS = {"qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "olmoe": _olmoe,
               "deepseek_v2": lambda cfg: _deepseek(cfg, "deepseek_v2"),
               "deepseek_v3": lambda cfg: _deepseek(cfg, "deepseek_v3")}


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> ModelSpec:
    """Normalise a Hugging Face config dict; errors name the file and the field."""
    model_type = cfg.get("model_type")
    if model_type not in NORMALISERS:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(NORMALISERS)}")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{where}: quantized checkpoints ({method}) are not supported; "
                              "use a bfloat16/float16 version of the model")
    try:
        spec = NORMALISERS[model_type](cfg)
    except _Missing as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]} required for model_type {model_type!r}") from None
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r} required for model_type {model_type!r}") from None
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("config.json:", f"{where}:", 1)) from None
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
