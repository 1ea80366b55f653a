"""Model weights split by role from the start.

* :class:`AttentionWeights` — everything an attention rank holds: embedding, norms, attention
  projections (or MLA's, :class:`MLAWeights`), router gate, shared expert, dense MLP layers,
  final norm, lm_head.
* :class:`ExpertWeights` — the routed experts of each MoE layer, stacked as
  ``w13 [E_local, 2I, H]`` (gate rows then up rows) and ``w2 [E_local, H, I]``, for exactly the
  logical experts a placement names (possibly the same expert on several ranks).

Tensors come one at a time from a tensor source (:mod:`afsplit.models.checkpoint`) using hub names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from afsplit.models.spec import QK_NORM_FULL, QK_NORM_HEAD, ModelSpec


def _moe_prefix(spec: ModelSpec, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe" if spec.family == "mixtral" else "mlp")


def expert_tensor_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of (gate, up, down) of one routed expert."""
    p = f"{_moe_prefix(spec, layer)}.experts.{expert}."
    if spec.family == "mixtral":
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


@dataclass
class MLAWeights:
    """One MLA layer (DeepSeek-V2/V3). Rotary rows of interleaved checkpoints are permuted to NeoX
    halves at load (pairs (0,1),(2,3).. -> 0,2,..|1,3,..), identically for q and k, so q.k is unchanged."""

    in_w: torch.Tensor  # [Qa + r + dr, H]: q_a_proj (Qa = q_lora_rank) or q_proj (Qa = Hq (dn + dr)), then kv_a_proj_with_mqa
    in_b: torch.Tensor | None  # attention_bias: q_a / kv_a biases (q_proj has none: zeros)
    q_a_norm: torch.Tensor | None  # [q_lora_rank]
    q_b_w: torch.Tensor | None  # [Hq (dn + dr), q_lora_rank]
    kv_a_norm: torch.Tensor  # [r]
    kv_b_w: torch.Tensor  # [Hq (dn + dv), r]: per head W_UK [dn, r] rows, then W_UV [dv, r] rows


@dataclass
class AttnLayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    qkv_w: torch.Tensor | None  # [(Hq + 2 Hkv) * D, H]; None for MLA
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # [H, Hq * D] (MLA: [H, Hq * dv])
    o_b: torch.Tensor | None
    q_norm: torch.Tensor | None  # [D] (per head) or [Hq * D] (whole projection)
    k_norm: torch.Tensor | None
    mla: MLAWeights | None = None
    # MoE layers
    gate_w: torch.Tensor | None = None  # router [E, H] (DeepSeek: float32, as transformers keeps it)
    score_bias: torch.Tensor | None = None  # DeepSeek-V3 e_score_correction_bias [E] float32
    shared_w13: torch.Tensor | None = None  # [2 Is, H]
    shared_w2: torch.Tensor | None = None  # [H, Is]
    shared_gate_w: torch.Tensor | None = None  # [1, H] (Qwen2-MoE; DeepSeek's shared experts are ungated)
    # dense MLP layers
    mlp_w13: torch.Tensor | None = None  # [2 I, H]
    mlp_w2: torch.Tensor | None = None  # [H, I]


@dataclass
class AttentionWeights:
    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: list[AttnLayerWeights] = field(default_factory=list)


@dataclass
class ExpertWeights:
    """Routed experts held by one rank: layer -> (w13 [S, 2I, H], w2 [S, H, I]) for its S slots."""

    experts: dict[int, tuple[int, ...]]  # layer -> logical expert id of each local slot
    w13: dict[int, torch.Tensor]
    w2: dict[int, torch.Tensor]


def _mha_projections(get, spec: ModelSpec, a: str) -> dict:
    """q/k/v/o (fused qkv), their biases and q/k norms of one multi-head attention layer."""
    H, D, Hq, Hkv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    qkv_w = torch.cat([get(a + "q_proj.weight", (Hq * D, H)), get(a + "k_proj.weight", (Hkv * D, H)),
                       get(a + "v_proj.weight", (Hkv * D, H))])
    qkv_b = None
    if spec.qkv_bias:
        qkv_b = torch.cat([get(a + "q_proj.bias", (Hq * D,)), get(a + "k_proj.bias", (Hkv * D,)),
                           get(a + "v_proj.bias", (Hkv * D,))])
    q_norm = k_norm = None
    if spec.qk_norm == QK_NORM_HEAD:
        q_norm, k_norm = get(a + "q_norm.weight", (D,)), get(a + "k_norm.weight", (D,))
    elif spec.qk_norm == QK_NORM_FULL:
        q_norm, k_norm = get(a + "q_norm.weight", (Hq * D,)), get(a + "k_norm.weight", (Hkv * D,))
    return dict(qkv_w=qkv_w, qkv_b=qkv_b, o_w=get(a + "o_proj.weight", (H, Hq * D)),
                o_b=get(a + "o_proj.bias", (H,)) if spec.o_bias else None, q_norm=q_norm, k_norm=k_norm)


def rope_deinterleave(w: torch.Tensor, head_rows: int, rope: int) -> torch.Tensor:
    """Reorder the last `rope` rows of every `head_rows`-row head of `w` from interleaved pairs
    (0,1),(2,3).. to halves 0,2,4..|1,3,5.. (so NeoX rotation equals the interleaved one)."""
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]) + (head_rows - rope)
    idx = torch.arange(head_rows)
    idx[head_rows - rope:] = perm
    heads = w.shape[0] // head_rows
    idx = (torch.arange(heads)[:, None] * head_rows + idx).reshape(-1).to(w.device)
    return w.index_select(0, idx)


def _mla_projections(get, spec: ModelSpec, a: str) -> dict:
    """MLA's projections (hub names) of one layer, q_a/q_proj and kv_a fused into one input GEMM."""
    m, H, Hq = spec.mla, spec.hidden_size, spec.num_heads
    r, dr, qk = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_head_dim
    kv_a_w = get(a + "kv_a_proj_with_mqa.weight", (r + dr, H))
    kv_a_b = get(a + "kv_a_proj_with_mqa.bias", (r + dr,)) if spec.qkv_bias else None
    if m.q_lora_rank is None:
        q_w, q_b, q_a_norm, q_b_w = get(a + "q_proj.weight", (Hq * qk, H)), None, None, None
    else:
        q_w = get(a + "q_a_proj.weight", (m.q_lora_rank, H))
        q_b = get(a + "q_a_proj.bias", (m.q_lora_rank,)) if spec.qkv_bias else None
        q_a_norm = get(a + "q_a_layernorm.weight", (m.q_lora_rank,))
        q_b_w = get(a + "q_b_proj.weight", (Hq * qk, m.q_lora_rank))
    if m.rope_interleaved:
        kv_a_w = rope_deinterleave(kv_a_w, r + dr, dr)
        kv_a_b = None if kv_a_b is None else rope_deinterleave(kv_a_b[:, None], r + dr, dr)[:, 0]
        if q_b_w is None:
            q_w = rope_deinterleave(q_w, qk, dr)
        else:
            q_b_w = rope_deinterleave(q_b_w, qk, dr)
    in_b = None
    if kv_a_b is not None:
        in_b = torch.cat([q_b if q_b is not None else kv_a_b.new_zeros(q_w.shape[0]), kv_a_b])
    mla = MLAWeights(in_w=torch.cat([q_w, kv_a_w]), in_b=in_b, q_a_norm=q_a_norm, q_b_w=q_b_w,
                     kv_a_norm=get(a + "kv_a_layernorm.weight", (r,)),
                     kv_b_w=get(a + "kv_b_proj.weight", (Hq * (m.qk_nope_head_dim + m.v_head_dim), r)))
    return dict(qkv_w=None, qkv_b=None, o_w=get(a + "o_proj.weight", (H, Hq * m.v_head_dim)),
                o_b=get(a + "o_proj.bias", (H,)) if spec.o_bias else None, q_norm=None, k_norm=None, mla=mla)


def load_attention_weights(source, spec: ModelSpec, dtype: torch.dtype, device="cpu") -> AttentionWeights:
    H, V = spec.hidden_size, spec.vocab_size

    def get(name, shape):
        return source.get(name, shape, device).to(device=device, dtype=dtype)

    embed = get("model.embed_tokens.weight", (V, H))
    lm_head = embed if spec.tie_word_embeddings else get("lm_head.weight", (V, H))
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        lw = AttnLayerWeights(input_norm=get(p + "input_layernorm.weight", (H,)),
                              post_norm=get(p + "post_attention_layernorm.weight", (H,)),
                              **(_mla_projections(get, spec, a) if spec.mla else _mha_projections(get, spec, a)))
        if spec.moe_layers[i]:
            m = _moe_prefix(spec, i) + "."
            if spec.routing is not None:  # DeepSeek: the router runs in float32 (transformers keeps it so)
                lw.gate_w = source.get(m + "gate.weight", (spec.num_experts, H), device).to(device, torch.float32)
                if spec.routing.correction_bias:
                    lw.score_bias = source.get(m + "gate.e_score_correction_bias", (spec.num_experts,),
                                               device).to(device, torch.float32)
            else:
                lw.gate_w = get(m + "gate.weight", (spec.num_experts, H))
            if spec.shared_expert_intermediate_size:
                Is = spec.shared_expert_intermediate_size
                s = m + ("shared_expert." if spec.shared_expert_gated else "shared_experts.")
                lw.shared_w13 = torch.cat([get(s + "gate_proj.weight", (Is, H)), get(s + "up_proj.weight", (Is, H))])
                lw.shared_w2 = get(s + "down_proj.weight", (H, Is))
                if spec.shared_expert_gated:
                    lw.shared_gate_w = get(m + "shared_expert_gate.weight", (1, H))
        else:
            I = spec.intermediate_size
            lw.mlp_w13 = torch.cat([get(p + "mlp.gate_proj.weight", (I, H)), get(p + "mlp.up_proj.weight", (I, H))])
            lw.mlp_w2 = get(p + "mlp.down_proj.weight", (H, I))
        layers.append(lw)
    return AttentionWeights(embed=embed, final_norm=get("model.norm.weight", (H,)), lm_head=lm_head, layers=layers)


def load_expert_weights(source, spec: ModelSpec, dtype: torch.dtype, device="cpu",
                        experts: dict[int, Sequence[int]] | None = None) -> ExpertWeights:
    """Load the routed experts named by `experts` (MoE layer -> logical ids; default: all of them)."""
    H, I = spec.hidden_size, spec.moe_intermediate_size
    if experts is None:
        experts = {layer: range(spec.num_experts) for layer in spec.moe_layer_ids}
    out = ExpertWeights(experts={}, w13={}, w2={})
    for layer, ids in experts.items():
        ids = tuple(int(e) for e in ids)
        w13 = torch.empty((len(ids), 2 * I, H), dtype=dtype, device=device)
        w2 = torch.empty((len(ids), H, I), dtype=dtype, device=device)
        for slot, e in enumerate(ids):
            g, u, d = expert_tensor_names(spec, layer, e)
            w13[slot, :I] = source.get(g, (I, H), device)
            w13[slot, I:] = source.get(u, (I, H), device)
            w2[slot] = source.get(d, (H, I), device)
        out.experts[layer], out.w13[layer], out.w2[layer] = ids, w13, w2
    return out


def all_tensor_names_and_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every hub tensor name of a checkpoint with this spec and its shape (used by make-tiny)."""

    class Recorder:
        def __init__(self):
            self.shapes = {}

        def get(self, name, shape, device=None):
            self.shapes[name] = tuple(shape)
            return torch.empty(shape, device="meta")

    rec = Recorder()
    load_attention_weights(rec, spec, torch.float32, "meta")
    load_expert_weights(rec, spec, torch.float32, "meta")
    return rec.shapes
