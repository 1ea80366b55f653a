"""The MoE transformer, split into the part an attention rank runs and the part an expert rank runs.

One layer of one micro-batch u, as the single-process engine and the disaggregated runtime both drive it::

    x, residual = attn.attention_block(l, h, residual, meta, kv)  # norm -> QKV -> RoPE -> attention -> O -> norm
    if spec.moe_layers[l]:
        weights_TK, ids_TK = attn.route(l, x)                      # router + top-k
        moe.send(l, u, x, ids_TK, weights_TK)                      # local experts, or dispatch to expert ranks
        shared = attn.shared_expert(l, x)                          # overlaps the exchange
        h = attn.add_shared(l, x, shared, moe.recv(l, u))          # ... combine (before u's next layer)
    else:
        h = attn.dense_mlp(l, x)

The routed experts sit behind :class:`MoEBackend`: :class:`LocalExperts` in one process,
afsplit/runtime/remote_experts.py across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afsplit import ops
from afsplit.models.mla import mla_attention
from afsplit.models.rope import cos_sin_table
from afsplit.models.spec import QK_NORM_FULL, QK_NORM_HEAD, ModelSpec
from afsplit.models.weights import AttentionWeights, ExpertWeights



class AttentionModel:
    """Everything but the routed experts: embedding, attention, router, shared expert, dense MLPs, lm_head."""

    def __init__(self, spec: ModelSpec, weights: AttentionWeights, max_positions: int, routing_skew: float = 0.0):
        self.spec = spec
        self.w = weights
        self.scale = spec.mla.softmax_scale if spec.mla else spec.head_dim ** -0.5
        rope_dim = spec.mla.qk_rope_head_dim if spec.mla else spec.head_dim
        self.cos_sin = cos_sin_table(max_positions, rope_dim, spec.rope_theta, spec.rope_yarn, weights.embed.device)
        self.router_bias = self._zipf_router_bias(routing_skew) if routing_skew else None

    def _zipf_router_bias(self, s: float) -> dict[int, torch.Tensor]:
        """Benchmarks with random weights: a bias of -s * log(1 + rank) on the router logits makes expert
        popularity Zipf(s)-like, with a different expert ranking per layer (as in real models)."""
        bias = {}
        for layer in self.spec.moe_layer_ids:
            rank = torch.randperm(self.spec.num_experts, generator=torch.Generator().manual_seed(layer))
            bias[layer] = (-s * torch.log1p(rank.float())).to(self.w.embed.device)
        return bias

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.w.embed)

    def attention_block(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None,
                        meta: ops.AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]):
        """Pre-norm attention plus the post-attention norm: returns (mlp input [T, H], residual [T, H])."""
        s, lw = self.spec, self.w.layers[layer]
        if s.mla is not None:  # DeepSeek: latent attention over the latent cache (kv = (latent, None))
            x, residual = self._input_norm(layer, h, residual)
            return ops.rmsnorm(mla_attention(s, lw, x, meta, kv[0], self.cos_sin), lw.post_norm, s.rms_norm_eps,
                               residual)
        q, k, v, residual = self.attention_in(layer, h, residual, meta, kv)
        return self.attention_out(layer, self.attention_core(layer, q, k, v, meta, kv), residual)

    def _input_norm(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None):
        lw, eps = self.w.layers[layer], self.spec.rms_norm_eps
        if residual is None:
            return ops.rmsnorm(h, lw.input_norm, eps), h
        return ops.rmsnorm(h, lw.input_norm, eps, residual)

    def attention_in(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None,
                     meta: ops.AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]):
        """Everything of attention before the attention kernel (GQA families): input norm, QKV, q/k
        norms, RoPE and the KV-cache store; reads only `meta.positions` and `meta.slot_mapping`.
        Returns (q [T, Hq, D], k, v [T, Hkv, D], residual [T, H])."""
        s, lw = self.spec, self.w.layers[layer]
        x, residual = self._input_norm(layer, h, residual)
        T = x.shape[0]
        qkv = F.linear(x, lw.qkv_w, lw.qkv_b)
        q, k, v = (t.contiguous() for t in
                   qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim], -1))
        if s.qk_norm == QK_NORM_FULL:  # OLMoE: norm over the whole projection
            q, k = ops.rmsnorm(q, lw.q_norm, s.rms_norm_eps), ops.rmsnorm(k, lw.k_norm, s.rms_norm_eps)
        q = q.reshape(T, s.num_heads, s.head_dim)
        k = k.reshape(T, s.num_kv_heads, s.head_dim)
        v = v.reshape(T, s.num_kv_heads, s.head_dim)
        if s.qk_norm == QK_NORM_HEAD:  # Qwen3: norm per head
            q, k = ops.rmsnorm(q, lw.q_norm, s.rms_norm_eps), ops.rmsnorm(k, lw.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q, k = ops.apply_rotary(q, k, meta.positions, self.cos_sin)
        ops.store_kv(k, v, kv[0], kv[1], meta.slot_mapping)
        return q, k, v, residual

    def attention_core(self, layer: int, q, k, v, meta: ops.AttentionMetadata, kv) -> torch.Tensor:
        """The attention kernel over the paged cache: [T, Hq, D]. The one piece of a layer whose shape
        depends on every sequence's length (so piecewise CUDA graphs leave it out)."""
        return ops.attention(q, k, v, kv[0], kv[1], meta, self.scale, self.spec.sliding_windows[layer])

    def attention_out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor):
        """O projection and the post-attention norm: (mlp input [T, H], residual [T, H])."""
        s, lw = self.spec, self.w.layers[layer]
        out = F.linear(attn.reshape(attn.shape[0], s.num_heads * s.head_dim), lw.o_w, lw.o_b)
        return ops.rmsnorm(out, lw.post_norm, s.rms_norm_eps, residual)

    def route(self, layer: int, x: torch.Tensor):
        """Router: (weights float32 [T, K], logical expert ids int32 [T, K])."""
        lw, s = self.w.layers[layer], self.spec
        # DeepSeek routers run in float32 (gate kept in float32, as transformers does)
        logits = F.linear(x.float() if s.routing else x, lw.gate_w)
        if self.router_bias is not None:
            logits = logits.float() + self.router_bias[layer]
        if s.routing is not None:
            return ops.grouped_topk(logits, s.top_k, s.routing, lw.score_bias, s.norm_topk_prob)
        return ops.topk_gating(logits, s.top_k, s.norm_topk_prob)

    def send_routed(self, layer: int, u: int, x: torch.Tensor, valid_rows: torch.Tensor | None, moe: "MoEBackend"):
        """Route micro-batch u's MoE input and send it to the routed experts; returns the shared
        expert's output (computed while the exchange is in flight), or None."""
        weights, ids = self.route(layer, x)
        if valid_rows is not None:  # padding rows go to no expert (id -1 is skipped everywhere)
            ids = torch.where(valid_rows[:, None], ids, -1)
        moe.send(layer, u, x, ids, weights)
        return self.shared_expert(layer, x)

    def ffn(self, layer: int, x: torch.Tensor, valid_rows: torch.Tensor | None, moe: "MoEBackend") -> torch.Tensor:
        """One micro-batch's whole feed-forward part of `layer` (routed + shared experts, or the dense MLP)."""
        if not self.spec.moe_layers[layer]:
            return self.dense_mlp(layer, x)
        shared = self.send_routed(layer, 0, x, valid_rows, moe)
        return self.add_shared(moe.recv(layer, 0), shared)

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's gated output (Qwen2-MoE), or None; computed while the exchange is in flight."""
        lw = self.w.layers[layer]
        if lw.shared_w13 is None:
            return None
        shared = F.linear(ops.silu_mul(F.linear(x, lw.shared_w13)), lw.shared_w2)
        if lw.shared_gate_w is None:  # DeepSeek: ungated shared experts
            return shared
        return torch.sigmoid(F.linear(x, lw.shared_gate_w)) * shared

    @staticmethod
    def add_shared(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return routed if shared is None else routed + shared

    def dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        lw = self.w.layers[layer]
        return F.linear(ops.silu_mul(F.linear(x, lw.mlp_w13)), lw.mlp_w2)

    def final_logits(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x, _ = ops.rmsnorm(h, self.w.final_norm, self.spec.rms_norm_eps, residual)
        return F.linear(x, self.w.lm_head).float()

    def forward(self, micro_batches: list[tuple[torch.Tensor, ops.AttentionMetadata]], kv_caches, moe: "MoEBackend",
                logits_rows: list[torch.Tensor]) -> torch.Tensor:
        """All layers over m micro-batches; returns the logits of `logits_rows[u]` of each, concatenated.

        The micro-batches form a pipeline: micro-batch u's routed tokens are sent (`moe.send`)
        right after its own attention and collected (`moe.recv`) just before u's next layer, so
        while expert ranks work on u this rank computes attention for u + 1 (ping-pong), and u's
        next layer waits only for u's own experts.
        """
        hs = [self.embed(ids) for ids, _ in micro_batches]
        residuals: list[torch.Tensor | None] = [None] * len(micro_batches)
        waiting: list[tuple | None] = [None] * len(micro_batches)  # (layer, shared expert output) sent, not back
        for layer in range(self.spec.num_layers):
            for u, (_, meta) in enumerate(micro_batches):
                if waiting[u] is not None:
                    hs[u] = self.add_shared(moe.recv(waiting[u][0], u), waiting[u][1])
                    waiting[u] = None
                x, residuals[u] = self.attention_block(layer, hs[u], residuals[u], meta, kv_caches[layer])
                if self.spec.moe_layers[layer]:
                    waiting[u] = (layer, self.send_routed(layer, u, x, meta.valid_rows, moe))
                else:
                    hs[u] = self.dense_mlp(layer, x)
        for u, w in enumerate(waiting):
            if w is not None:
                hs[u] = self.add_shared(moe.recv(w[0], u), w[1])
        return torch.cat([self.final_logits(h[rows], r[rows]) for h, r, rows in zip(hs, residuals, logits_rows)])


class MoEBackend:
    """Where routed-expert work goes: `send` a micro-batch's tokens, later `recv` their outputs."""

    def agree_step(self, max_tokens: int, decode_only: bool) -> tuple[int, bool]:
        """(largest micro-batch, every rank only decodes) over all ranks; one vote per step where distributed."""
        return max_tokens, decode_only

    def begin_step(self, tokens_hint: int) -> None:
        """Called once per forward before any layer with the step's padded region size (same on all ranks)."""

    @property
    def graph_safe(self) -> bool:
        """Whether a forward through this exchange may be captured in a CUDA graph (no host syncs/counters)."""
        return False

    def end_step(self) -> None:
        """Called once per forward after the last layer, before the host reads results back."""

    def send(self, layer: int, micro_batch: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def recv(self, layer: int, micro_batch: int) -> torch.Tensor:
        raise NotImplementedError


class LocalExperts(MoEBackend):
    """Single process: every routed expert is here, indexed by its logical id."""

    def __init__(self, experts: "ExpertModel", stats=None, moe_index: dict[int, int] | None = None):
        self.experts = experts
        self.stats = stats  # optional comm.expert_stats.ExpertStatsRecorder (MoE-layer numbering)
        self.moe_index = moe_index or {}
        self._out: dict[int, torch.Tensor] = {}

    @property
    def graph_safe(self) -> bool:
        return True  # expert kernels and the statistics recorder run on the device only

    def send(self, layer, micro_batch, x, ids, weights):
        if self.stats is not None:
            self.stats.record(self.moe_index[layer], ids)
        self._out[micro_batch] = self.experts(layer, x, ids, weights)

    def recv(self, layer, micro_batch):
        return self._out.pop(micro_batch)


class ExpertModel:
    """The routed experts one rank holds; `ids` are local slot indices (-1 = not here)."""

    def __init__(self, weights: ExpertWeights):
        self.w = weights

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # received batches are row-strided views into packed comm rows: the kernels read them in place
        return ops.fused_moe(x, self.w.w13[layer], self.w.w2[layer], ids, weights)
