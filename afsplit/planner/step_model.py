"""One engine step, built the way the runtime runs it.

Per MoE layer, per micro-batch u (m micro-batches, each with its own exchange channel):
attention of u on the attention ranks -> dispatch(u) -> fused MoE of u on the expert ranks ->
combine(u). Micro-batch u's next-layer attention waits only for u's own combine, so with m >= 2
attention of u+1 overlaps the experts of u (ping-pong). In steady state one layer takes

    AF:         L = max(m Ta, m Te, m D, m C, Ta + D + Te + C)
    colocated:  L = max(m (Ta + Te), m D, m C, Ta + D + Te + C)      (one GPU does both halves)
    engine:     L = m (Ta + Te)                                      (no exchange)

with Ta, Te, D, C the times of one micro-batch (attention, experts, dispatch, combine); the
round trip Ta + D + Te + C is hidden once m Tf >= it, i.e. MegaScale-Infer's m >= 2 (Tf + Tc) / Tf
for Ta = Te = Tf, D = C = Tc. Each side's time is its slowest rank's: the expert side runs the
balancer's max/mean times the mean load (never below the random-routing floor of a micro-batch
that small), on ceil(E / n_e) local experts. Dense layers run m attention blocks plus the MLP on
the attention ranks. A step adds the lm_head per micro-batch, the per-step overhead measured in
whole runs, and the control plane's growth with the rank count.

Three kinds of step (simulate.py says which one a scheduled step is):

* a graph replay (decode_step): Ta and Te are the kernel tables' times corrected by the in-model
  factor measured in whole runs (BlockTimes.layer_scale, in_model_attention);
* an eager step (eager_step: prefill chunks, mixed steps, a bucket's first decode step): the host
  launches every kernel while the GPU runs the earlier ones, so a layer takes
  max(m x host launches, L of the GPU times), prefill attention on the kernel's padded tiles;
* a graph capture (capture_step): every layer launched once, then the replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from afsplit.cuda_graphs import bucket_for
from afsplit.planner.exchange import exchange_times, rows_per_pair
from afsplit.planner.memory import experts_per_rank


@lru_cache(maxsize=4096)
def bucket(n: int) -> int:
    """The CUDA-graph bucket (1, 2, 4, 8, then multiples of 8) a micro-batch of n rows is padded to."""
    return bucket_for(max(1, n), max(1, n))


def pingpong_layer(kind: str, m: int, ta: float, te: float, d: float, c: float) -> tuple[float, str]:
    """(seconds of one MoE layer, its bottleneck) from one micro-batch's four times (module docstring)."""
    chain = ta + d + te + c
    if kind == "engine":
        return m * (ta + te), "compute"
    if kind == "colocated":
        terms = {"compute": m * (ta + te), "exchange": m * max(d, c), "round trip": chain}
    else:
        terms = {"attention": m * ta, "experts": m * te, "exchange": m * max(d, c), "round trip": chain}
    name = max(terms, key=terms.get)
    return terms[name], name


def poisson_max_over_mean(ranks: int, mean: float) -> float:
    """Expected max/mean of `ranks` Poisson loads of mean `mean` (max ~ mean + sqrt(2 mean ln ranks))."""
    if ranks <= 1 or mean <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(ranks) / mean)


@dataclass
class StepResult:
    step_s: float
    moe_layer_s: float
    bottleneck: str
    tokens_per_s_per_gpu: float
    rows: int  # padded rows per micro-batch (P)
    parts: dict = field(default_factory=dict)  # seconds: per micro-batch terms and per-step totals


class StepModel:
    """Step times of layouts for one model on one profile (see the module docstring)."""

    def __init__(self, blocks, intra, inter, imbalance: float | None = None, exchange: str = "padded",
                 balancer: str = "replicas"):
        self.blocks, self.shape = blocks, blocks.shape
        self.intra, self.inter = intra, inter
        self.fixed_imbalance = imbalance
        self.exchange = exchange  # padded (the runtime's regions) | exact (routed rows only)
        self.balancer = balancer  # replicas (least-loaded over replica slots) | none (round robin)
        self._cache: dict = {}  # searches ask for the same blocks many times

    def _memo(self, key, fn):
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = fn()
        return v

    def imbalance(self, expert_ranks: int, mean_pairs: float) -> float:
        if self.fixed_imbalance is not None:
            return self.fixed_imbalance
        return max(self.blocks.balancer_max_over_mean(expert_ranks, self.balancer),
                   poisson_max_over_mean(expert_ranks, mean_pairs))

    def spare_slots(self, layout) -> int:
        """Replica slots per expert rank (memory; the balancer's measured max/mean assumes them)."""
        if layout.kind == "engine":
            return 0
        return self.blocks.spare_slots(self.shape.num_experts, layout.num_expert_ranks, self.balancer)

    def expert_time(self, layout, tokens_per_att_rank: float) -> tuple[float, float]:
        """(seconds, pairs) of the slowest expert rank for one micro-batch of this many tokens per attention rank."""
        s = self.shape
        if layout.kind == "engine":
            pairs = tokens_per_att_rank * s.top_k
            return self.blocks.moe(pairs, s.num_experts), pairs
        n_e = layout.num_expert_ranks
        slots = experts_per_rank(s.num_experts, n_e)
        mean = layout.num_attention_ranks * tokens_per_att_rank * s.top_k / n_e
        pairs = mean * (slots * n_e / s.num_experts) * self.imbalance(n_e, mean)
        return self.blocks.moe(pairs, slots), pairs

    def _mode(self, layout) -> str:
        return "engine" if layout.kind == "engine" else "runtime"

    def _step_extras(self, layout, seqs: int, eager: bool = False) -> float:
        b = self.blocks
        ranks = layout.gpus if layout.kind != "engine" else 1
        return (b.step_overhead(self._mode(layout), seqs) + b.control(ranks)
                + (b.eager_step_extra(self._mode(layout)) if eager else 0.0))

    def admit_time(self, layout, num_requests: int, input_len: int) -> float:
        """A run's wall time outside its steps: the driver's (and coordinator's) work per prompt token."""
        return self.blocks.admit_per_prompt_token(self._mode(layout)) * num_requests * input_len

    def _exchange(self, layout, rows: int, transport: str, tokens: int | None = None) -> tuple[float, float]:
        """(dispatch, combine) of one micro-batch of `tokens` real rows padded to `rows`."""
        call = self.blocks.exchange_call(rows) if layout.kind != "engine" else 0.0
        pair = rows_per_pair(layout, rows if tokens is None else tokens, rows, self.shape.top_k, self.exchange)
        return exchange_times(layout, pair, self.shape, self.intra, self.inter, call, transport)

    def decode_step(self, layout, batch: int, m: int, ctx: float, transport: str = "direct",
                    graphs: bool = True) -> StepResult:
        """A decode-only step: `batch` sequences per attention rank at mean context `ctx`, m micro-batches."""
        b, s = self.blocks, self.shape
        per_mb = math.ceil(batch / m)
        rows = bucket(per_mb) if graphs else per_mb
        scale = self._memo(("scale", rows), lambda: b.layer_scale(rows))
        ta = self._memo(("attn", rows, ctx), lambda: b.in_model_attention(rows, ctx, scale))
        te, pairs = self._memo(("exp", layout, per_mb), lambda: self.expert_time(layout, per_mb))
        te *= scale
        d, c = self._memo(("x", layout, rows, per_mb, transport), lambda: self._exchange(layout, rows, transport, per_mb))
        layer, neck = pingpong_layer(layout.kind, m, ta, te, d, c)
        if not graphs:
            layer = max(layer, m * b.eager_layer_host(self._mode(layout)))
        dense = 0.0
        if s.num_layers > s.num_moe_layers:
            dense = (s.num_layers - s.num_moe_layers) * m * scale * self._memo(("dense", rows, ctx),
                                                                               lambda: b.dense_layer(rows, ctx))
        head = m * self._memo(("head", rows), lambda: b.head(rows))
        extras = self._memo(("extras", layout, batch), lambda: self._step_extras(layout, batch))
        step = s.num_moe_layers * layer + dense + head + extras
        gen = layout.num_attention_ranks * batch
        parts = {"attention_mb": ta, "experts_mb": te, "dispatch_mb": d, "combine_mb": c, "expert_pairs_mb": pairs,
                 "moe_layers": s.num_moe_layers * layer, "dense_layers": dense, "head": head, "overhead": extras}
        return StepResult(step, layer, neck, gen / step / layout.gpus, rows, parts)

    def eager_step(self, layout, tokens: int, tile_pairs: float, seqs: int, sampled: int, m: int,
                   transport: str = "direct", decode_ctx: float | None = None, rows: int | None = None,
                   attention_extra: float = 0.0) -> float:
        """A step outside CUDA graphs (prefill chunks, mixed steps, a decode bucket's first step, graphs off):
        `tokens` tokens per attention rank from `seqs` sequences, `tile_pairs` (query, key) pairs of the
        prefill kernel over them (decode-only when `decode_ctx` is given: the paged decode kernel; `rows`: the
        static path pads each micro-batch to its bucket). The host launches each layer's kernels while the
        GPU runs earlier ones, so a layer takes the longer of its host time (m micro-batches' launches,
        measured with graphs off) and its GPU time. `attention_extra`: GPU seconds per layer the step's attention
        adds beyond the tiles (decode rows of a mixed step), spread over its micro-batches."""
        b, s = self.blocks, self.shape
        per_mb = math.ceil(tokens / m)
        mb_rows = rows if rows is not None else per_mb
        if decode_ctx is not None:  # the same kernels as in graphs, so the same in-model correction
            scale = b.layer_scale(mb_rows)
            ta = b.in_model_attention(mb_rows, decode_ctx, scale)
            te = self.expert_time(layout, per_mb)[0] * scale
        else:
            ta = b.attention_prefill(per_mb, tile_pairs / m) + attention_extra / m
            te = self.expert_time(layout, per_mb)[0]
        d, c = self._exchange(layout, mb_rows, transport, per_mb)
        layer, _ = pingpong_layer(layout.kind, m, ta, te, d, c)
        # a bucket's first visit runs the static path (rows given); anything else the eager metadata path
        mode = self._mode(layout)
        host = m * (b.static_layer_host(mode) if rows is not None else b.eager_layer_host(mode))
        dense_mlp = b.gemm_time(s.dense_layer_weight_bytes - s.attention_layer_weight_bytes,
                                s.dense_gemm_flops(per_mb) - s.attention_gemm_flops(per_mb))
        dense = (s.num_layers - s.num_moe_layers) * max(host, m * (ta + max(0.0, dense_mlp)))
        return (s.num_moe_layers * max(host, layer) + dense + b.head(sampled)
                + self._step_extras(layout, seqs, eager=True))

    def capture_step(self, layout, batch: int, m: int, ctx: float, transport: str = "direct") -> float:
        """The step that captures a decode bucket's CUDA graph (cuda_graphs.GraphCache, its second step): every
        layer's kernels are launched once as in an eager step (recorded, not run), then the graph replays."""
        b, s = self.blocks, self.shape
        mode = self._mode(layout)
        launch = s.num_layers * m * b.static_layer_host(mode) + b.eager_step_extra(mode)
        return launch + self.decode_step(layout, batch, m, ctx, transport).step_s
