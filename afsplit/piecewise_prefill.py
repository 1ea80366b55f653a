"""Prefill and mixed steps as piecewise CUDA graphs: graphs around everything but attention.

A prefill or mixed step has a different shape every time (the chunks' lengths, their prefixes),
so it cannot be one graph the way a decode step is (afsplit/static_decode.py). But only the
attention kernel depends on how the tokens split into sequences; every other op of a layer (norms,
QKV and O projections, RoPE, the KV store, router, fused MoE, shared expert, dense MLP) works
row by row on [T, H] and depends only on T. So, as vLLM does, the step's tokens are padded to a
*token bucket* Tb and each layer boundary is cut at attention:

    piece 0:      embed -> attention_in(0)                                  (graph, per Tb)
    attention 0:  ops.attention on the real T rows, written into a static buffer  (eager)
    piece l:      attention_out(l-1) -> FFN(l-1) -> attention_in(l)          (graph, per Tb)
    ...
    piece L:      attention_out(L-1) -> FFN(L-1)                             (graph, per Tb)
    final norm + lm_head on the rows that sample                             (eager)

L + 1 graph replays and L attention calls replace several hundred launches per step. Padding rows
carry token 0, position 0, KV slot -1 (nothing stored) and expert id -1 (no expert computes them);
attention never sees them. What crosses a cut (q, k, v, attention's output, the residual stream)
lives in static buffers shared by every piece and bucket, so graphs keep no per-layer activations
alive; the copies into them (about T x ((Hq + 2 Hkv) x D + H) values per layer) are the price of
that. A bucket is warmed up, captured and replayed as a whole: its first step runs the pieces
eagerly (Triton compiles), the second captures every piece, later ones replay; a piece that fails to
capture sends the whole bucket back to eager for good (logged). On CPU the same pieces run
uncaptured (tests, ``AFSPLIT_STATIC_DECODE=1``).

Scope: the single-process engine (routed experts local, one micro-batch) on the GQA families;
MLA (DeepSeek) prefill and the distributed runtime's prefill stay eager.
"""

from __future__ import annotations

import logging

import torch

from afsplit import ops
from afsplit.cuda_graphs import padded_sizes

log = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts graphs are made for: 16, 32, 64, 128, 256, then every 256, the last >= max_tokens."""
    return padded_sizes(max_tokens, 16, 256)


def token_bucket(n: int, max_tokens: int) -> int | None:
    """The smallest token bucket >= n, or None beyond max_tokens (or for an empty step)."""
    if n < 1 or n > max_tokens:
        return None
    return next(t for t in token_buckets(max_tokens) if t >= n)


class PiecewisePrefill:
    """One forward of a prefill/mixed step (one micro-batch) with its layers cut at attention."""

    def __init__(self, model, kv_cache, moe, device: torch.device, capture: bool, max_tokens: int):
        self.model, self.kv_cache, self.moe, self.device = model, kv_cache, moe, device
        self.capture, self.max_tokens = capture, max_tokens
        s = model.spec
        T, dev = token_buckets(max_tokens)[-1], device
        self.token_ids = torch.zeros(T, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(T, dtype=torch.int64, device=dev)
        self.slots = torch.full((T,), -1, dtype=torch.int64, device=dev)
        self.valid = torch.zeros(T, dtype=torch.bool, device=dev)
        # what crosses a cut lives in these buffers (not in per-piece graph outputs, which would keep
        # L + 1 copies of q/k/v/residual alive per bucket): attention's inputs and output, the residual
        # stream and the last hidden state; padding rows of `attn` stay 0 (finite) forever
        dt = model.w.embed.dtype

        def buf(*shape):
            return torch.zeros(T, *shape, dtype=dt, device=dev)

        self.q, self.attn = buf(s.num_heads, s.head_dim), buf(s.num_heads, s.head_dim)
        self.k, self.v = buf(s.num_kv_heads, s.head_dim), buf(s.num_kv_heads, s.head_dim)
        self.residual, self.hidden = buf(s.hidden_size), buf(s.hidden_size)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # bucket -> its L + 1 pieces, in order
        self.warmed: set[int] = set()
        self.failed: set[int] = set()
        self.pool = None
        self.calls = self.replays = 0

    @staticmethod
    def supports(spec) -> bool:
        return spec.mla is None

    def handles(self, num_tokens: int) -> bool:
        return token_bucket(num_tokens, self.max_tokens) is not None

    # -- the pieces ---------------------------------------------------------------------------------

    def _meta(self, tb: int) -> ops.AttentionMetadata:
        """What the pieces read of the metadata: the static positions, KV slots and valid rows."""
        return ops.AttentionMetadata(
            positions=self.positions[:tb], slot_mapping=self.slots[:tb], cu_seqlens_q=self.positions[:0],
            prefix_lens=self.positions[:0], seq_lens=self.positions[:0], block_tables=self.positions[:0],
            decode_only=False, cu_seqlens_list=[], prefix_lens_list=[], valid_rows=self.valid[:tb])

    def _piece(self, layer: int, tb: int) -> None:
        """Piece `layer` (0..L): finish layer-1 (O, post-norm, FFN) and start `layer` up to attention.
        Reads `attn` and `residual`; writes q, k, v and `residual` (or `hidden` and `residual` after the
        last layer) into the static buffers."""
        m, meta = self.model, self._meta(tb)
        if layer == 0:
            h, residual = m.embed(self.token_ids[:tb]), None
        else:
            x, residual = m.attention_out(layer - 1, self.attn[:tb], self.residual[:tb])
            h = m.ffn(layer - 1, x, meta.valid_rows, self.moe)
        if layer == m.spec.num_layers:
            self.hidden[:tb].copy_(h)
            self.residual[:tb].copy_(residual)
            return
        q, k, v, residual = m.attention_in(layer, h, residual, meta, self.kv_cache.layers[layer])
        for dst, src in ((self.q, q), (self.k, k), (self.v, v), (self.residual, residual)):
            dst[:tb].copy_(src)

    def _capture_piece(self, layer: int, tb: int):
        """The graph of one piece; nothing runs until it is replayed."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._piece(layer, tb)
        return graph

    def _run_piece(self, tb: int, layer: int, mode: str) -> str:
        """Run piece `layer` in `mode`; returns the mode for the next piece ("eager" after a failed capture)."""
        if mode == "replay":
            self.graphs[tb][layer].replay()
            self.replays += 1
            return mode
        if mode == "capture":
            try:
                graph = self._capture_piece(layer, tb)
            except Exception as e:  # noqa: BLE001 -- stay correct: this bucket runs eagerly from now on
                self.failed.add(tb)
                self.graphs.pop(tb, None)
                log.warning("prefill graphs for %d tokens: capture of piece %d failed, running them eagerly: %s",
                            tb, layer, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self._piece(layer, tb)
                return "eager"
            self.graphs.setdefault(tb, []).append(graph)
            graph.replay()
            self.replays += 1
            return mode
        self._piece(layer, tb)
        return mode

    # -- one step -----------------------------------------------------------------------------------

    def _fill(self, token_ids: torch.Tensor, meta: ops.AttentionMetadata, tb: int) -> None:
        T = token_ids.shape[0]
        self.token_ids[:T].copy_(token_ids)
        self.positions[:T].copy_(meta.positions)
        self.slots[:T].copy_(meta.slot_mapping)
        self.valid[:T].fill_(True)
        if tb > T:
            self.token_ids[T:tb].zero_()
            self.positions[T:tb].zero_()
            self.slots[T:tb].fill_(-1)  # padding rows store no KV
            self.valid[T:tb].fill_(False)

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, meta: ops.AttentionMetadata, rows: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), V] of the step's sampling rows (row indices into the step's T tokens)."""
        T = token_ids.shape[0]
        tb = token_bucket(T, self.max_tokens)
        self.calls += 1
        if tb in self.graphs:  # complete: a capture that fails drops the bucket's graphs
            mode = "replay"
        elif self.capture and tb in self.warmed and tb not in self.failed:
            mode = "capture"
        else:
            mode = "eager"
        self.warmed.add(tb)
        self._fill(token_ids, meta, tb)
        m, L = self.model, self.model.spec.num_layers
        for layer in range(L + 1):
            mode = self._run_piece(tb, layer, mode)
            if layer < L:
                attn = m.attention_core(layer, self.q[:T], self.k[:T], self.v[:T], meta, self.kv_cache.layers[layer])
                self.attn[:T].copy_(attn)
        if mode == "capture":
            log.info("prefill graphs captured for %d tokens (%d pieces)", tb, len(self.graphs[tb]))
        return m.final_logits(self.hidden[rows], self.residual[rows])
